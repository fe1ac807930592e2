"""Tests for precompute_ctr.py: Beta method-of-moments prior, shrinkage, logit, standardisation,
ctr_value consistency, item popularity, input validation and the CLI."""
import json
import os
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import precompute_ctr as P  # noqa: E402

SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "taac_sample" / "seq_head88.jsonl"
FEAT = {"112": 14, "117": 80}


def write_seq(path, users):
    """users: list of lists of records; written one JSON array per line."""
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "precompute_ctr.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def read(path):
    return json.loads(Path(path).read_text())


# A tiny training file with hand-known counts:
#   user 1: item 10 exposure, item 11 click, item 10 null action (exposure), profile -> c=1, n=3
#   user 2: item 10 conversion (2, counts as a click), item 12 exposure, profile (with action 1,
#           still ignored)                                                      -> c=1, n=2
#   user 3: profile only                                                        -> absent
#   items: 10 -> c=1, n=3; 11 -> c=1, n=1; 12 -> c=0, n=1
TINY = [
    [[1, 10, None, FEAT, 0, 100], [1, 11, None, FEAT, 1, 101], [1, 10, None, FEAT, None, 102],
     [1, None, {"103": 4}, None, None, 999]],
    [[2, 10, None, FEAT, 2, 100], [2, 12, None, FEAT, 0, 101], [2, None, {"103": 5}, None, 1, 999]],
    [[3, None, {"103": 6}, None, None, 999]],
]


# ---------------------------------------------------------------------------------------------
# Prior fit and shrinkage
# ---------------------------------------------------------------------------------------------

def test_moments_fit_and_shrinkage_by_hand():
    c = np.array([1, 2, 3, 2])
    n = np.array([10, 10, 10, 2])
    # min_events 5 leaves rates 0.1, 0.2, 0.3 (the 2/2 entity is excluded):
    #   m = 0.2, v = (0.01 + 0 + 0.01) / 3 = 0.02/3, m(1-m) = 0.16
    #   alpha+beta = 0.16 / (0.02/3) - 1 = 24 - 1 = 23, alpha = 0.2*23 = 4.6, beta = 0.8*23 = 18.4
    fit = P.fit_beta_prior(c, n, k_clip=(1, 1000), min_events=5, min_entities=3)
    assert fit["n_fit"] == 3
    assert fit["k_raw"] == pytest.approx(23.0)
    assert fit["alpha"] == pytest.approx(4.6)
    assert fit["beta"] == pytest.approx(18.4)
    # shrunk p = (c + 4.6) / (n + 23): 1/10 -> 5.6/33, 2/2 -> 6.6/25 = 0.264
    stats = P.side_stats(c, n, fit["alpha"], fit["beta"], logit=False)
    x = P.ctr_value(c, n, stats) * stats["std"] + stats["mean"]
    assert x[0] == pytest.approx(5.6 / 33)
    assert x[3] == pytest.approx(6.6 / 25)
    assert stats["prior_value"] * stats["std"] + stats["mean"] == pytest.approx(0.2)


def test_moments_fit_falls_back_to_all_entities():
    c = np.array([1, 2, 3, 2])
    n = np.array([10, 10, 10, 2])
    # only 3 entities have >= 5 events (< min_entities 10): all four rates 0.1, 0.2, 0.3, 1.0
    #   m = 1.6/4 = 0.4, v = (0.01+0.04+0.09+1)/4 - 0.16 = 0.285 - 0.16 = 0.125
    #   alpha+beta = 0.24/0.125 - 1 = 0.92 -> alpha = 0.368, beta = 0.552
    fit = P.fit_beta_prior(c, n, k_clip=(0.5, 1000))
    assert fit["n_fit"] == 4
    assert fit["k_raw"] == pytest.approx(0.92)
    assert (fit["alpha"], fit["beta"]) == pytest.approx((0.368, 0.552))


def test_k_clip_keeps_the_mean():
    # lower clip: rates 0 and 1 -> m = 0.5, v = 0.25, alpha+beta = 0.25/0.25 - 1 = 0 -> LO = 10
    fit = P.fit_beta_prior([0, 5], [5, 5], k_clip=(10, 100), min_events=1, min_entities=1)
    assert fit["k_raw"] == pytest.approx(0.0)
    assert (fit["alpha"], fit["beta"]) == pytest.approx((5.0, 5.0))
    # upper clip: rates 0.1, 0.11 -> m = 0.105, v = 0.000025, alpha+beta = 0.093975/0.000025 - 1
    #   = 3758 -> HI = 100, alpha = 10.5, beta = 89.5
    fit = P.fit_beta_prior([10, 11], [100, 100], k_clip=(10, 100), min_events=1, min_entities=1)
    assert fit["k_raw"] == pytest.approx(3758.0)
    assert (fit["alpha"], fit["beta"]) == pytest.approx((10.5, 89.5))
    # zero variance -> upper clip
    fit = P.fit_beta_prior([1, 1], [4, 4], k_clip=(10, 100), min_events=1, min_entities=1)
    assert (fit["alpha"], fit["beta"]) == pytest.approx((25.0, 75.0))


def test_no_clicks_at_all_stays_finite():
    c, n = np.zeros(4), np.array([1, 2, 5, 9])
    fit = P.fit_beta_prior(c, n, k_clip=(10, 100))
    assert fit["alpha"] > 0 and fit["alpha"] + fit["beta"] == pytest.approx(100)
    stats = P.side_stats(c, n, fit["alpha"], fit["beta"], logit=True)
    z = P.ctr_value(c, n, stats)
    assert np.isfinite(z).all() and math.isfinite(stats["prior_value"])


def test_logit_and_standardisation_by_hand():
    # alpha 1, beta 3: (1,4) -> 2/8 = 1/4, logit log(1/3); (3,4) -> 4/8, logit 0;
    # (0,4) -> 1/8, logit log(1/7). mean = -log(21)/3, std = population std of the three.
    c, n = np.array([1, 3, 0]), np.array([4, 4, 4])
    stats = P.side_stats(c, n, 1.0, 3.0, logit=True)
    x = [math.log(1 / 3), 0.0, math.log(1 / 7)]
    mean = sum(x) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)
    assert stats["mean"] == pytest.approx(-math.log(21) / 3)
    assert stats["std"] == pytest.approx(std)
    assert P.ctr_value(c, n, stats) == pytest.approx([(v - mean) / std for v in x])
    # prior: p = 1/4 -> the same value as entity (1, 4)
    assert stats["prior_value"] == pytest.approx((math.log(1 / 3) - mean) / std)


def test_standardised_values_have_mean_0_std_1():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 50, 300)
    c = rng.binomial(n, 0.1)
    fit = P.fit_beta_prior(c, n)
    for logit in (False, True):
        z = P.ctr_value(c, n, P.side_stats(c, n, fit["alpha"], fit["beta"], logit))
        assert z.mean() == pytest.approx(0, abs=1e-9) and z.std() == pytest.approx(1)


def test_std_floor_when_all_equal():
    stats = P.side_stats([1, 1], [3, 3], 1.0, 1.0, logit=False)
    assert stats["std"] == P.STD_FLOOR
    assert P.ctr_value([1, 1], [3, 3], stats) == pytest.approx([0, 0])


def test_item_popularity_thresholds():
    # counts sorted 1 1 2 3 5; q=0.8 -> position 0.8*4 = 3.2 -> next count up 5 -> 1 hot item;
    # q=0.5 -> position 2 -> 2 -> items with 2, 3, 5 hot; q=0 -> 1 (all); q=1 -> 5
    ids, counts = [7, 3, 9, 4, 8], [1, 5, 2, 1, 3]
    pop = P.item_popularity(ids, counts, 0.8)
    assert pop == {"head_quantile": 0.8, "head_min_count": 5,
                   "counts": {"7": 1, "3": 5, "9": 2, "4": 1, "8": 3}}
    assert [P.item_popularity(ids, counts, q)["head_min_count"] for q in (0.5, 0, 1)] == [2, 1, 5]
    # 1..10: q=0.8 -> position 7.2 -> 9: items 9 and 10 hot, the top 20%
    assert P.item_popularity(range(10), range(1, 11), 0.8)["head_min_count"] == 9


# ---------------------------------------------------------------------------------------------
# Reading seq.jsonl
# ---------------------------------------------------------------------------------------------

def test_counts_null_actions_and_profiles(tmp_path):
    got = P.count_events(write_seq(tmp_path / "seq.jsonl", TINY))
    assert got["user_ids"].tolist() == [1, 2]
    assert got["user_clicks"].tolist() == [1, 1] and got["user_events"].tolist() == [3, 2]
    assert got["item_ids"].tolist() == [10, 11, 12]
    assert got["item_clicks"].tolist() == [1, 1, 0] and got["item_events"].tolist() == [3, 1, 1]
    assert got["num_lines"] == 3 and got["bad_lines"] == got["bad_records"] == 0


def test_counts_merge_across_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "FLUSH_RECORDS", 2)
    got = P.count_events(write_seq(tmp_path / "seq.jsonl", TINY * 3))
    assert got["item_ids"].tolist() == [10, 11, 12]
    assert got["item_clicks"].tolist() == [3, 3, 0] and got["item_events"].tolist() == [9, 3, 3]
    assert got["user_events"].tolist() == [9, 6]


LAYOUT = "[user_id, item_id, user_feat, item_feat, action_type, timestamp]"
BAD = [
    ("not json", "invalid JSON (Expecting value: line 1 column 1 (char 0)), expected a JSON array of records"),
    ("", "empty line, expected a JSON array of records"),
    ('{"a": 1}', "line is a JSON object, expected a JSON array of records"),
    ("[5]", f"record 1 of 1 is a JSON number, expected a 6-element array {LAYOUT}"),
    ("[[1, 2, null, {}, 0]]", f"record 1 of 1 has 5 elements, expected 6 {LAYOUT}"),
    ('[[1, 2, null, {}, 0, 5], [1, "2", null, {}, 0, 5]]',
     'record 2 of 2: item_id is "2", expected a non-negative int or null (profile record)'),
    ("[[-1, 2, null, {}, 0, 5]]", "record 1 of 1: user_id is -1, expected a non-negative int (re-id) below 2^63"),
    ("[[1.0, 2, null, {}, 0, 5]]", "record 1 of 1: user_id is 1.0, expected a non-negative int (re-id) below 2^63"),
    ("[[1, 2, null, {}, 3, 5]]", "record 1 of 1: action_type is 3, expected 0, 1, 2 or null"),
    ("[[1, 2, null, {}, true, 5]]", "record 1 of 1: action_type is true, expected 0, 1, 2 or null"),
    ("[[1, 2, null, {}, 0, -5]]", "record 1 of 1: timestamp is -5, expected a non-negative int (Unix seconds)"),
]


@pytest.mark.parametrize("line,msg", BAD)
def test_bad_line_message(tmp_path, line, msg):
    path = tmp_path / "seq.jsonl"
    path.write_text(json.dumps(TINY[0]) + "\n" + line + "\n")
    with pytest.raises(Exception) as e:
        P.count_events(path)
    assert type(e.value).__name__ == "DataError"
    assert str(e.value) == f"{path}:2: {msg}"


def test_cli_bad_line_exit_2_one_line(tmp_path):
    path = tmp_path / "seq.jsonl"
    path.write_text(json.dumps(TINY[0]) + "\n" + BAD[6][0] + "\n")
    r = run_cli("--seq_path", path, "--output_dir", tmp_path / "ctr")
    assert r.returncode == 2
    assert r.stderr == f"error: {path}:2: {BAD[6][1]}\n"
    assert not (tmp_path / "ctr").exists()
    r = run_cli("--seq_path", tmp_path / "missing.jsonl", "--output_dir", tmp_path / "ctr")
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path / 'missing.jsonl'}: file not found, expected the training seq.jsonl\n"


def test_cli_skip_bad_records(tmp_path):
    path = tmp_path / "seq.jsonl"
    lines = [json.dumps(TINY[0]), "not json",
             # one bad record between two good ones: only the bad record is skipped
             '[[2, 10, null, {}, 2, 1], [2, 13, null, {}, 7, 2], [2, 12, null, {}, 0, 3]]',
             json.dumps(TINY[2])]
    path.write_text("\n".join(lines) + "\n")
    r = run_cli("--seq_path", path, "--output_dir", tmp_path / "ctr", "--skip_bad_records",
                "--prior", "1,3")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 bad lines and 1 bad records" in r.stdout
    meta = read(tmp_path / "ctr" / "ctr_meta.json")
    assert (meta["bad_lines"], meta["bad_records"]) == (1, 1)
    items = read(tmp_path / "ctr" / "item_ctr.json")
    assert {k: v[:2] for k, v in items.items()} == {"10": [1, 3], "11": [1, 1], "12": [0, 1]}


# ---------------------------------------------------------------------------------------------
# CLI outputs
# ---------------------------------------------------------------------------------------------

def test_cli_fixed_prior_outputs(tmp_path, capsys):
    seq = write_seq(tmp_path / "seq.jsonl", TINY)
    out = tmp_path / "ctr"
    argv = ["--seq_path", str(seq), "--output_dir", str(out), "--prior", "1,3", "--k_clip", "10,100",
            "--item_pop_path", str(tmp_path / "pop.json")]
    P.main(argv)
    assert "users 2, items 3, events 5, clicks 2" in capsys.readouterr().out
    meta = read(out / "ctr_meta.json")
    users, items = read(out / "user_ctr.json"), read(out / "item_ctr.json")
    # the fixed prior is used as given: alpha+beta = 4 is not clipped up to 10
    assert (meta["user"]["alpha"], meta["user"]["beta"]) == (1.0, 3.0)
    assert (meta["item"]["alpha"], meta["item"]["beta"]) == (1.0, 3.0)
    assert meta["k_clip"] == [10.0, 100.0] and meta["user"]["logit"] is False
    assert (meta["num_users"], meta["num_items"]) == (2, 3)
    # users: (1,3) -> 2/7, (1,2) -> 2/6; mean (2/7 + 1/3)/2, std = half the difference
    p = [2 / 7, 2 / 6]
    mean, std = sum(p) / 2, abs(p[0] - p[1]) / 2
    assert users == {"1": [1, 3, pytest.approx((p[0] - mean) / std)],
                     "2": [1, 2, pytest.approx((p[1] - mean) / std)]}
    assert meta["user"]["prior_value"] == pytest.approx((1 / 4 - mean) / std)
    assert {k: v[:2] for k, v in items.items()} == {"10": [1, 3], "11": [1, 1], "12": [0, 1]}
    # item_pop: counts 1 1 3, q 0.8 -> position 1.6 -> 3
    pop = read(tmp_path / "pop.json")
    fp = pop.pop("seq_fingerprint")      # what the counts came from, to tell when they are stale
    assert pop == {"head_quantile": 0.8, "head_min_count": 3, "counts": {"10": 3, "11": 1, "12": 1}}
    assert fp["size"] == os.path.getsize(seq) and fp["path"] == str(seq)
    assert not (out / "item_pop.json").exists()
    # same command twice -> identical files
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    P.main(argv)
    assert before == {f.name: f.read_bytes() for f in out.iterdir()}


def test_ctr_value_matches_json_and_leave_one_out(tmp_path, capsys):
    seq = write_seq(tmp_path / "seq.jsonl", TINY)
    P.main(["--seq_path", str(seq), "--output_dir", str(tmp_path), "--logit", "--k_clip", "1,50"])
    users, items, meta = P.load_ctr(tmp_path)
    assert meta["item"]["logit"] is True
    for side, table in (("user", users), ("item", items)):
        s = meta[side]
        for c, n, z in table.values():
            assert P.ctr_value(c, n, s) == z  # exact, scalar path
        c, n, z = map(np.array, zip(*table.values()))
        assert (P.ctr_value(c, n, s) == z).all()  # exact, vector path
    # leave-one-out for item 11's only event (a click): no statistics left -> the prior
    assert P.ctr_value(items[11][0] - 1, items[11][1] - 1, meta["item"]) == meta["item"]["prior_value"]
    a, b, mean, std = (meta["item"][k] for k in ("alpha", "beta", "mean", "std"))
    # item 10 = (1, 3); leaving out its click -> (0, 2), p = a / (2 + a + b)
    p = a / (2 + a + b)
    assert P.ctr_value(items[10][0] - 1, items[10][1] - 1, meta["item"]) == pytest.approx(
        (math.log(p / (1 - p)) - mean) / std)


def test_load_ctr_missing_file(tmp_path):
    (tmp_path / "user_ctr.json").write_text("{}")
    with pytest.raises(Exception) as e:
        P.load_ctr(tmp_path)
    assert type(e.value).__name__ == "DataError"
    assert str(e.value).startswith(f"{tmp_path / 'item_ctr.json'}: file not found")


def test_import_has_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, precompute_ctr; "
                        "assert 'torch' not in sys.modules and 'dataset' not in sys.modules"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# Real sample
# ---------------------------------------------------------------------------------------------

def test_real_sample_counts_match_naive(tmp_path, capsys):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not available")
    users, items = {}, {}
    for line in SAMPLE.read_text().splitlines():
        for u, it, _, _, a, _ in json.loads(line):
            if it is None:
                continue
            click = int(a is not None and a >= 1)
            for table, key in ((users, u), (items, it)):
                c, n = table.get(key, (0, 0))
                table[key] = (c + click, n + 1)
    P.main(["--seq_path", str(SAMPLE), "--output_dir", str(tmp_path), "--logit"])
    u_tab, i_tab, meta = P.load_ctr(tmp_path)
    assert {k: v[:2] for k, v in u_tab.items()} == users
    assert {k: v[:2] for k, v in i_tab.items()} == items
    assert meta["num_events"] == sum(n for _, n in items.values())
    assert read(tmp_path / "item_pop.json")["counts"] == {str(k): n for k, (_, n) in items.items()}
    for side, table in (("user", u_tab), ("item", i_tab)):
        z = np.array([v[2] for v in table.values()])
        assert z.mean() == pytest.approx(0, abs=1e-9) and z.std() == pytest.approx(1)


def test_load_ctr_reads_only_the_sides_asked_for(tmp_path):
    import precompute_ctr as P
    seq = tmp_path / "seq.jsonl"
    seq.write_text('[[1, 5, null, {}, 1, 10], [1, 6, null, {}, 0, 20]]\n[[2, 5, null, {}, 0, 30]]\n')
    assert P.main(["--seq_path", str(seq), "--output_dir", str(tmp_path / "ctr")]) in (0, None)
    users, items, meta = P.load_ctr(tmp_path / "ctr", sides=("item",))
    assert users is None and items[5][:2] == (1, 2) and items[6][:2] == (0, 1)
    (tmp_path / "ctr" / "user_ctr.json").write_text("broken")   # never read for the item side
    assert P.load_ctr(tmp_path / "ctr", sides=("item",))[1] == items
