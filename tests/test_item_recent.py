"""The recent-activity bias (--item_recent): buckets against hand-computed shares, the per-day
training table against a naive count, each training pair's bias against a naive loop (the day
before the request), the served histories' shares replacing the training's last day in exported
vectors, and a tiny train -> infer run that rebuilds it all from the checkpoint."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dataset as D  # noqa: E402
import layout  # noqa: E402
import model as M  # noqa: E402
import validation as V  # noqa: E402
from test_cold import sh, tiny_world, write_seq  # noqa: E402

DAY = 86400


def naive_bucket(count, total, n):
    """0 without an event, else 8 + floor(log2(count / total * n)), within 1..15."""
    if count == 0:
        return 0
    return min(15, max(1, 8 + math.floor(math.log2(count / total * n))))


def tiny_model(num_items=8, **kw):
    data = layout.DataConfig(maxlen=4, num_users=3, num_items=num_items, mm_emb_id=[], use_timefeat=False)
    torch.manual_seed(0)
    return M.GenerativeRecommender(M.ModelConfig(hidden_units=8, num_blocks=1, feat_dim=4, item_recent=True, **kw),
                                   data)


def test_recent_buckets_hand_computed():
    counts = np.array([0, 1, 2, 3, 50, 1000, 4, 0])
    got = D.recent_buckets(counts, 1000, 100).tolist()
    want = [naive_bucket(int(c), 1000, 100) for c in counts]
    assert got == want == [0, 4, 5, 6, 10, 14, 6, 0]
    assert D.recent_buckets(np.array([1]), 10**6, 10).tolist() == [1]          # clipped below
    # share, not count: the same counts in a window ten times smaller move each item up three buckets
    assert D.recent_buckets(np.array([1, 2, 8]), 16, 16).tolist() == [8, 9, 11]
    assert D.recent_buckets(np.array([10**6]), 10**6, 10**9).tolist() == [15]


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_first_events_and_daily_buckets_against_a_naive_count(tmp_path, chunk):
    rng = np.random.default_rng(2)
    day0 = 20_000
    rows = []
    for u in range(1, 40):
        ts = np.sort(rng.integers(day0 * DAY, (day0 + 6) * DAY, int(rng.integers(1, 10))))
        rows.append([[u, int(i), None, {}, 1, int(t)] for i, t in zip(rng.integers(1, 10, len(ts)), ts)])
    rows[5][0][5] = day0 * DAY + 17             # the earliest event: column 0 is its day
    cut = {3: 1, 8: 2}
    kept = [rec for line, r in enumerate(rows) for rec in r[:cut.get(line, len(r))]]
    offsets = write_seq(tmp_path / "seq.jsonl", rows)
    first, end, got, lo = D.item_time_stats(str(tmp_path / "seq.jsonl"), offsets, cut, 9, chunk=chunk)
    assert lo == day0 and end == max(r[5] for r in kept)
    assert first.tolist() == [min((r[5] for r in kept if r[1] == i), default=D.NEVER) for i in range(10)]
    assert got.shape == (10, end // DAY - day0 + 1)
    for d in range(got.shape[1]):
        on_day = [r[1] for r in kept if r[5] // DAY == day0 + d]
        for i in range(10):
            assert got[i, d] == naive_bucket(on_day.count(i), len(on_day), 9), (i, d)
    assert (got[0] == 0).all() and (got > 0).any()


def test_pair_bias_is_the_bucket_of_the_day_before_each_request():
    m = tiny_model()
    day0 = 300
    days = torch.from_numpy(np.random.default_rng(1).integers(0, 16, (9, 5)).astype(np.uint8))
    days[0] = 0
    m.set_recent(days, day0, (day0 + 4) * DAY + 100)
    with torch.no_grad():
        m.recent_bias.copy_(torch.arange(M.RECENT_BUCKETS, dtype=torch.float32) * 0.5)

    def want(i, t):
        col = t // DAY - 1 - day0                 # the calendar day before the request's
        if not 0 < i <= 8 or not 0 <= col < 5:
            return 0.0
        return 0.5 * int(days[i, col])
    ts = torch.tensor([(day0 + 3) * DAY + 5, day0 * DAY + 7, (day0 + 1) * DAY, (day0 + 5) * DAY + 1, (day0 + 3) * DAY])
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 0, 12])
    got = m.pair_bias(ids, ts).detach()
    for n, t in enumerate(ts.tolist()):
        for j, i in enumerate(ids.tolist()):
            assert float(got[n, j]) == want(i, t), (n, j)
    per = m.pair_bias(ids[:4].expand(len(ts), 4), ts).detach()
    assert per.tolist() == got[:, :4].tolist()
    # inference without a serving log: the training's last day, as one more coordinate
    q, v = torch.randn(2, 8), torch.randn(10, 8)
    with torch.no_grad():
        s = m.score_queries(q) @ m.score_items(v, ids).T
    for a in range(2):
        for b, i in enumerate(ids.tolist()):
            w = float(F.normalize(q[a], dim=0) @ F.normalize(v[b], dim=0)) + (0.5 * int(days[i, -1]) if 0 < i <= 8 else 0)
            assert abs(float(s[a, b]) - w) < 1e-5


def test_pair_bias_adds_age_and_recent():
    m = tiny_model(item_age=True, age_unseen="mask")
    first = torch.tensor([-1, 0, DAY, 2 * DAY, 3 * DAY, -1, 0, 0, 0])
    m.set_first_seen(first, 5 * DAY)
    days = torch.full((9, 6), 9, dtype=torch.uint8)
    m.set_recent(days, 0, 5 * DAY)
    with torch.no_grad():
        m.age_bias.copy_(torch.arange(M.AGE_BUCKETS, dtype=torch.float32))
        m.recent_bias.copy_(torch.arange(M.RECENT_BUCKETS, dtype=torch.float32) * 100)
    ids, ts = torch.tensor([1, 2, 3]), torch.tensor([4 * DAY + 5, 0])
    got = m.pair_bias(ids, ts).detach()
    age = M.GenerativeRecommender.age_bucket_of
    for n, t in enumerate(ts.tolist()):
        for j, i in enumerate(ids.tolist()):
            a = int(age(torch.tensor(t // DAY - int(first[i]) // DAY)))
            r = 900 if t // DAY >= 1 else 0
            assert float(got[n, j]) == a + r


def test_served_histories_replace_the_last_day():
    """Events of the day after the training data's newest (recent_ref) in the served histories
    set each candidate's share; history rows outside the pool count in the total only; earlier
    and later events not at all."""
    m = tiny_model()
    ref = 100 * DAY
    days = torch.full((9, 3), 5, dtype=torch.uint8)
    m.set_recent(days, 98, ref)
    with torch.no_grad():
        m.recent_bias.copy_(torch.linspace(-2, 2, M.RECENT_BUCKETS))
    rows = np.array([1, 2, 3, 9, 10, 0])                  # 9, 10: cold candidates appended to the table
    cand = np.random.default_rng(0).normal(size=(len(rows), 9)).astype(np.float32)
    hist = [np.array([1, 9, 9, 2]), np.array([9, 3, 11]), np.array([2, 3, 3])]
    ts = [np.array([ref - 5, ref + 1, ref + 2, ref + 3]), np.array([ref + 9, ref, ref + 4]),
          np.array([ref - 1, ref + DAY + 1, ref + 2 * DAY])]
    out, n = V.served_recent(m, cand, rows, hist, ts)
    assert n == 5                                          # 9, 9, 2, 9, 11 in the day after ref; not 3, 3
    counts = {9: 3, 2: 1}
    bias = m.recent_bias.detach()
    for j, r in enumerate(rows):
        old = float(bias[5]) if 0 < r <= 8 else float(bias[0])
        new = float(bias[naive_bucket(counts.get(int(r), 0), 5, 8)])
        assert abs(out[j, -1] - (cand[j, -1] - old + new)) < 1e-5, j
        assert np.array_equal(out[j, :-1], cand[j, :-1])
    same, n0 = V.served_recent(m, cand, rows, [h[:1] for h in hist[:1]], [t[:1] for t in ts[:1]])
    assert n0 == 0 and same is cand


def test_train_and_infer_with_item_recent(tmp_path):
    """main.py --item_age --item_recent on a tiny demo world, then infer.py without any flag: the
    bias and the last day's buckets travel in the checkpoint; the served histories' later events
    (the tiny world's eval histories run past the training cut) replace them."""
    world, cache, run, paths = tiny_world(tmp_path)
    sh("main.py", "--item_age", "--item_recent", "--num_epochs", 2, "--hidden_units", 16, "--num_workers", 0, **paths)
    out = sh("infer.py", **paths)
    assert "events of the served histories after the training data" in out
    ck = torch.load(next((run / "ckpt").glob("global_step*/model.pt")), weights_only=True, map_location="cpu")
    assert "recent_days" not in ck["model"]                 # rebuilt from the data, not saved
    assert int(ck["model"]["recent_ref"]) == int(ck["model"]["age_ref"]) > 0
    assert ck["model"]["recent_bucket"].max() > 0 and ck["model"]["recent_bias"].abs().sum() > 0
    dim = np.fromfile(run / "res" / "embedding.fbin", dtype=np.int32, count=2)[1]
    assert dim == 17
    result = json.loads((run / "res" / "result.json").read_text())
    assert len(result["top10s"]) == 60 and all(len(t) == 10 for t in result["top10s"])


def test_holdout_ranks_each_request_with_the_day_before_it():
    """request_variants through _by_mask: each held-out request ranked against the candidates'
    bias of the day before it, against a naive full score matrix with that bias per pair."""
    m = tiny_model()
    rng = np.random.default_rng(3)
    day0 = 50
    days = torch.from_numpy(rng.integers(0, 16, (9, 4)).astype(np.uint8))
    m.set_recent(days, day0, (day0 + 3) * DAY + 10)
    with torch.no_grad():
        m.recent_bias.copy_(torch.linspace(-1.5, 1.5, M.RECENT_BUCKETS))
    ids = np.arange(1, 9)
    v = torch.randn(8, 8)
    with torch.no_grad():
        c = m.score_items(v, torch.from_numpy(ids)).numpy()
        q = m.score_queries(torch.randn(7, 8)).numpy()
    ts = np.array([day0, day0 + 1, day0 + 1, day0 + 3, day0 + 2, day0, day0 + 3]) * DAY + 77
    target = rng.integers(0, 8, 7)
    bias = m.recent_bias.detach().numpy()
    want = []
    for u in range(7):
        col = ts[u] // DAY - 1 - day0
        s = [float(q[u, :-1] @ c[j, :-1]) + (bias[days[j + 1, col]] if col >= 0 else bias[0]) for j in range(8)]
        want.append(1 + sum(x > s[target[u]] for x in s) + sum(x == s[target[u]] for j, x in enumerate(s)
                                                                    if j != target[u]))
    import evaluate as E
    for u in range(7):           # one request at a time: HR@1..8 pin its rank down
        ks = tuple(range(1, 9))
        got = V._by_mask(q[u:u + 1], c, target[u:u + 1], None, False, ks,
                         variants=lambda u=u: V.request_variants(m, c, ids, ts[u:u + 1]))
        assert got == E.metrics_from_ranks(np.array(want[u:u + 1]), ks), u
    last_day = V.target_ranks(q, c, target)
    assert last_day.tolist() != want        # the training's last day would rank them otherwise
