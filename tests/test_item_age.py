"""The item-age bias (--item_age): buckets against hand-computed ages, the score the folded vectors
give against q.v + bias by hand, the availability mask against a naive loop, InfoNCE with
unavailable candidates against a naive loop (fused and plain forms alike), the first-seen pass
against a sort, and a tiny train -> infer run that rebuilds the bias from the checkpoint."""
import json
import math
import re
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
import objectives  # noqa: E402
from test_cold import sh, tiny_world, write_seq  # noqa: E402

DAY = 86400
REF = 19_675 * DAY + DAY // 2        # noon


def tiny_model(num_items=8, **kw):
    data = layout.DataConfig(maxlen=4, num_users=3, num_items=num_items, mm_emb_id=[], use_timefeat=False)
    torch.manual_seed(0)
    return M.GenerativeRecommender(M.ModelConfig(hidden_units=8, num_blocks=1, feat_dim=4, item_age=True, **kw), data)


def naive_bucket(first, item, ref=REF, n=8):
    """Bucket by hand: 0 the same calendar day (or no training event), else 1 + floor(log2(days)),
    at most 15."""
    if not 0 < item <= n or first[item] < 0:
        return 0
    days = ref // DAY - first[item] // DAY
    return 0 if days < 1 else min(15, 1 + int(math.floor(math.log2(days))))


def test_age_buckets_hand_computed():
    m = tiny_model()
    first = [-1, REF, REF - DAY // 2, REF - DAY, REF - 3 * DAY, REF - 4 * DAY, -1, REF - 19_000 * DAY, REF - 7 * DAY]
    m.set_first_seen(torch.tensor(first), REF)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [-1, 0, 9, 3]])
    want = [[naive_bucket(first, int(i)) for i in row] for row in ids]
    assert want == [[0, 0, 1, 2], [3, 0, 15, 3], [0, 0, 0, 1]]
    assert m.age_bucket(ids).tolist() == want


def test_folded_vectors_score_dot_plus_bias():
    """user_vectors . item_vectors = normalize(q) . normalize(v) + age_bias[bucket]: the bias rides
    in the vectors every retrieval backend ranks."""
    m = tiny_model()
    first = [-1, REF, REF - 2 * DAY, REF - 40 * DAY, -1, REF - DAY, REF, REF, REF]
    m.set_first_seen(torch.tensor(first), REF)
    with torch.no_grad():
        m.age_bias.copy_(torch.linspace(-1, 1, M.AGE_BUCKETS))
    q, v = torch.randn(3, 8), torch.randn(5, 8)
    ids = torch.tensor([1, 2, 3, 4, -1])
    with torch.no_grad():
        got = m.score_queries(q) @ m.score_items(v, ids).T
    for a in range(3):
        for b in range(5):
            bias = m.age_bias[naive_bucket(first, int(ids[b]))].item()
            want = float(F.normalize(q[a], dim=0) @ F.normalize(v[b], dim=0)) + bias
            assert abs(float(got[a, b]) - want) < 1e-5
    assert m.vector_dim == 9


def test_pair_bias_is_the_bucket_of_each_request_age():
    m = tiny_model()
    t0 = 100 * DAY + 3600
    first = [-1, t0, t0 - DAY, t0 - 5 * DAY, -1, t0 - 70 * DAY, t0, t0, t0]
    m.set_first_seen(torch.tensor(first), t0 + 40 * DAY)
    with torch.no_grad():
        m.age_bias.copy_(torch.arange(M.AGE_BUCKETS, dtype=torch.float32))
    # requests out of order, several on one day (the [N, M] form looks up each day once)
    ts = torch.tensor([t0 + 40 * DAY, t0, t0 + 2 * DAY - 7200, t0 + 1800, t0 + 40 * DAY + 60])
    ids = torch.tensor([1, 2, 3, 4, 5, -1])
    got = m.pair_bias(ids, ts)
    for n, t in enumerate(ts.tolist()):
        for j, i in enumerate(ids.tolist()):
            assert int(got[n, j]) == naive_bucket(first, i, ref=t), (n, j)
    assert m.pair_bias(ids.view(2, 3)[:1].expand(len(ts), 3), ts).tolist() == got[:, :3].tolist()


def test_unseen_bias_against_a_naive_loop():
    """--age_unseen bias: a pair whose item has no training event at or before the request (first
    seen later, or never) takes the one unseen bias; every other pair its age bucket's bias."""
    m = tiny_model(age_unseen="bias")
    t0 = 100 * DAY + 3600
    first = [-1, t0, t0 + DAY, t0 - 5 * DAY, -1, t0 + 3600, t0 - 70 * DAY, t0, t0]
    m.set_first_seen(torch.tensor(first), t0 + 40 * DAY)
    with torch.no_grad():
        m.age_bias.copy_(torch.arange(M.AGE_BUCKETS, dtype=torch.float32))
        m.unseen_bias.fill_(-7.0)
    ts = torch.tensor([t0 + 40 * DAY, t0, t0 + 1800, t0 + 2 * DAY])
    ids = torch.tensor([1, 2, 3, 4, 5, 6, -1])
    got = m.pair_bias(ids, ts).detach()
    for n, t in enumerate(ts.tolist()):
        for j, i in enumerate(ids.tolist()):
            seen = 0 < i <= 8 and 0 <= first[i] <= t
            assert float(got[n, j]) == (naive_bucket(first, i, ref=t) if seen else -7.0), (n, j)
    assert (got == -7.0).any() and (got != -7.0).any()
    assert m.pair_bias(ids[:3].expand(len(ts), 3), ts).tolist() == got[:, :3].tolist()


def test_unseen_bias_at_minus_infinity_is_the_mask():
    """The mask (--age_unseen mask) is the limit of the unseen bias: with it far below every score
    the InfoNCE loss and gradients of the bias form equal the masked form's."""
    g = torch.Generator().manual_seed(5)
    N, S, d, items = 10, 6, 4, 8
    first = torch.randint(0, 50 * DAY, (items + 1,), generator=g)
    models = {kind: tiny_model(age_unseen=kind) for kind in ("mask", "bias")}
    for m in models.values():
        m.set_first_seen(first, int(first.max()) + DAY)
        with torch.no_grad():
            m.age_bias.copy_(torch.linspace(-0.5, 0.5, M.AGE_BUCKETS))
    models["bias"].unseen_bias.data.fill_(-1e4)
    q = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    negs = F.normalize(torch.randn(S, d, generator=g, dtype=torch.float64), dim=-1)
    pos_ids, neg_ids = torch.randint(1, items + 1, (N,), generator=g), torch.randint(1, items + 1, (S,), generator=g)
    ts = first[pos_ids] + torch.randint(0, 20 * DAY, (N,), generator=g)
    tau = torch.full((N,), 0.1, dtype=torch.float64)
    out = {}
    for kind, m in models.items():
        qq = q.clone().requires_grad_()

        def bias(ids, m=m):
            return m.pair_bias(ids, ts).double()
        loss, _ = objectives.info_nce(qq, pos, pos_ids, negs, neg_ids, tau, None, items, True, None,
                                      available=(lambda ids, m=m: m.available(ids, ts)) if kind == "mask" else None,
                                      bias=bias, pos_bias=bias(pos_ids.unsqueeze(1)).squeeze(1))
        loss.sum().backward()
        out[kind] = (loss.detach(), qq.grad)
    assert not models["mask"].available(torch.cat([pos_ids, neg_ids]), ts).all()
    torch.testing.assert_close(out["bias"][0], out["mask"][0])
    torch.testing.assert_close(out["bias"][1], out["mask"][1])


def test_available_against_a_naive_loop():
    m = tiny_model()
    first = [-1, 10, 20, 30, -1, 5, 50, 60, 70]
    m.set_first_seen(torch.tensor(first), 100)
    ids, ts = torch.tensor([1, 2, 3, 4, 5, 8, 9, 0]), torch.tensor([5, 20, 65, 100])
    got = m.available(ids, ts)
    for n, t in enumerate(ts.tolist()):
        for j, i in enumerate(ids.tolist()):
            assert bool(got[n, j]) == (0 < i <= 8 and first[i] >= 0 and first[i] <= t)


def naive_nce_available(q, pos, pos_ids, negs, neg_ids, tau, ok, b):
    """Per target: the positive, then every in-batch and sampled candidate that is no accidental
    hit and is available to it (ok(n, item)), each dot product plus the pair's bias b(n, item)."""
    out = []
    cands = [(pos[j], int(pos_ids[j])) for j in range(len(pos))] + [(negs[j], int(neg_ids[j])) for j in range(len(negs))]
    for n in range(len(q)):
        logits = [(float(q[n] @ pos[n]) + b(n, int(pos_ids[n]))) / float(tau[n])]
        logits += [(float(q[n] @ v) + b(n, item)) / float(tau[n]) for v, item in cands
                   if item != int(pos_ids[n]) and ok(n, item)]
        t = torch.tensor(logits, dtype=torch.float64)
        out.append(float(torch.logsumexp(t, 0) - t[0]))
    return torch.tensor(out, dtype=torch.float64)


def test_info_nce_masks_unavailable_candidates_like_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    N, S, d, items = 12, 6, 4, 9
    first = torch.randint(0, 50, (items + 1,), generator=g)
    q = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    negs = F.normalize(torch.randn(S, d, generator=g, dtype=torch.float64), dim=-1)
    pos_ids, neg_ids = torch.randint(1, items + 1, (N,), generator=g), torch.randint(1, items + 1, (S,), generator=g)
    ts = first[pos_ids] + torch.randint(0, 30, (N,), generator=g)         # a target exists at its request
    tau = torch.full((N,), 0.1, dtype=torch.float64)

    table = torch.randn(items + 1, 40, generator=g, dtype=torch.float64)   # a bias per (item, time)

    def available(ids):
        return first[ids].unsqueeze(0) <= ts.unsqueeze(1)
    want = naive_nce_available(q, pos, pos_ids, negs, neg_ids, tau, lambda n, i: int(first[i]) <= int(ts[n]),
                               lambda n, i: float(table[i, int(ts[n]) % 40]))
    assert not available(torch.cat([pos_ids, neg_ids])).all()             # some candidates are masked
    grads = []
    for fused in (True, False):
        qq, pp, nn_, tt = (x.clone().requires_grad_() for x in (q, pos, negs, table))

        def bias(ids):
            return tt[ids, (ts % 40).unsqueeze(1)]                          # [N, M] or [N, K]
        got, _ = objectives.info_nce(qq, pp, pos_ids, nn_, neg_ids, tau, None, items, True, None, fused=fused,
                                     available=available, bias=bias, pos_bias=bias(pos_ids.unsqueeze(1)).squeeze(1))
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        got.sum().backward()
        grads.append([qq.grad, pp.grad, nn_.grad, tt.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_first_seen_and_newest_event_against_a_sort(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for u in range(1, 30):
        ts = np.sort(rng.integers(100, 500, int(rng.integers(1, 9))))
        rows.append([[u, int(i), None, {}, 1, int(t)] for i, t in zip(rng.integers(1, 12, len(ts)), ts)])
    cut = {2: 1, 7: 3}
    kept = [rec for line, r in enumerate(rows) for rec in r[:cut.get(line, len(r))]]
    offsets = write_seq(tmp_path / "seq.jsonl", rows)
    want = [min((r[5] for r in kept if r[1] == i), default=D.NEVER) for i in range(15)]
    for daily in (False, True):
        first, end, _, _ = D.item_time_stats(str(tmp_path / "seq.jsonl"), offsets, cut, 14, daily, chunk=5)
        assert first.tolist() == want and end == max(r[5] for r in kept)
    # as the item-age path read them before (the first of the first-n events)
    assert D.young_until(str(tmp_path / "seq.jsonl"), offsets, cut, 14, 0, chunk=5).tolist() == want


@pytest.mark.parametrize("unseen", ["mask", "bias"])
def test_train_and_infer_with_item_age(tmp_path, unseen):
    """main.py --item_age --cold_neighbors on a tiny demo world, then infer.py without any flag: the
    first-seen times, reference time and bias (and --age_unseen's) travel in the checkpoint; the
    vectors carry one more coordinate."""
    world, cache, run, paths = tiny_world(tmp_path)
    sh("main.py", "--item_age", "--age_unseen", unseen, "--cold_neighbors", 3, "--num_epochs", 2, "--hidden_units", 16,
       "--num_workers", 0, **paths)
    out = sh("infer.py", **paths)
    # --cold_neighbors travels in the checkpoint too: the eval pool's new items get neighbours
    n = int(re.search(r"cold candidates scored through their 3 nearest trained items: (\d+)", out).group(1))
    assert n > 0
    ck = torch.load(next((run / "ckpt").glob("global_step*/model.pt")), weights_only=True, map_location="cpu")
    first, ref = ck["model"]["item_first_seen"], int(ck["model"]["age_ref"])
    seen = first[first >= 0]
    assert len(seen) > 100 and int(seen.max()) <= ref and ck["model"]["age_bias"].abs().sum() > 0
    assert ("unseen_bias" in ck["model"]) == (unseen == "bias")
    if unseen == "bias":
        assert float(ck["model"]["unseen_bias"]) < 0          # trained: such an item is never a target
    dim = np.fromfile(run / "res" / "embedding.fbin", dtype=np.int32, count=2)[1]
    assert dim == 17
    result = json.loads((run / "res" / "result.json").read_text())
    assert len(result["top10s"]) == 60 and all(len(t) == 10 for t in result["top10s"])


def test_age_bias_bench_checks_its_forms_agree(capsys):
    """bench/bench_age_bias.py checks the per-pair gather against pair_bias before timing: the
    check must hold (it once broke silently when the default became age_unseen bias)."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_age_bias
    bench_age_bias.main(["--requests", "40", "--candidates", "30", "--items", "25", "--days", "5",
                         "--repeats", "1", "--no_record"])
    assert "+ --item_recent" in capsys.readouterr().out


@pytest.mark.parametrize("unseen", ["mask", "bias"])
def test_holdout_scores_each_request_at_its_own_age(unseen):
    """validation.request_variants: a held-out request (inside the training period) is scored with
    each item's age at that request's day, as training scores it, not at the newest training
    event; an item first seen later takes the unseen bias, or sinks below every score (mask)."""
    import validation as V
    m = tiny_model(age_unseen=unseen)
    t0 = 200 * DAY
    first = [-1, t0, t0 + 3 * DAY, t0 - 9 * DAY, t0 + 20 * DAY, t0 - 40 * DAY, -1, t0 + DAY, t0 - DAY]
    m.set_first_seen(torch.tensor(first), t0 + 30 * DAY)
    with torch.no_grad():
        m.age_bias.copy_(torch.arange(M.AGE_BUCKETS, dtype=torch.float32) * 0.25)
        if unseen == "bias":
            m.unseen_bias.fill_(-3.0)
    ids = np.arange(1, 9)
    c = np.random.default_rng(0).normal(size=(8, 9)).astype(np.float32)
    ts = np.array([t0 + 5 * DAY + 60, t0 + 3600, t0 + 5 * DAY + 7200, t0 + 29 * DAY])
    seen = []
    for idx, cg in V.request_variants(m, c, ids, ts):
        t = int(ts[idx].max())
        assert len(set(ts[idx] // DAY)) == 1 and np.array_equal(cg[:, :-1], c[:, :-1])
        for j, i in enumerate(ids):
            if 0 <= first[i] <= t:
                want = 0.25 * naive_bucket(first, int(i), ref=t)
            else:
                want = -3.0 if unseen == "bias" else V.UNAVAILABLE
            assert abs(float(cg[j, -1]) - want) < 1e-6, (t, i)
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(ts)))
