"""evaluate: HR/NDCG/Score against hand-computed values, file readers' one-line errors, the
most-popular and random baselines on a tiny hand-written layout, and the CLI."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate as E  # noqa: E402
from layout import DataError, dump_pickle  # noqa: E402


def test_hr_ndcg_hand_computed():
    gt = {"u1": 7, "u2": 1, "u3": 3, "u4": 9}
    tops = [[5, 6, 7, 8], [1, 2], [4, 4, 3, 3], [0] * 10 + [9]]
    users = ["u1", "u2", "u3", "u4"]
    m = E.hr_ndcg(tops, users, gt, k=10)
    # u1 rank 3 -> 1/log2(4) = 0.5; u2 rank 1 -> 1; u3 first at position 3 -> 0.5; u4 at 11: miss
    assert m["HR@10"] == pytest.approx(3 / 4)
    assert m["NDCG@10"] == pytest.approx((0.5 + 1 + 0.5) / 4)
    assert m["Score"] == pytest.approx(0.31 * 0.75 + 0.69 * 0.5)
    assert m["users"] == 4


def test_missing_user_counts_as_miss_and_ids_compare_as_ints():
    gt = {"a": 11, "b": 12}
    m = E.hr_ndcg([["11", 3]], ["a"], gt)  # b is missing from the result
    assert m["HR@10"] == 0.5 and m["NDCG@10"] == 0.5
    assert E.hr_ndcg([], [], gt)["Score"] == 0.0
    # a repeated user keeps its first list
    assert E.hr_ndcg([[1], [11]], ["a", "a"], {"a": 11})["HR@10"] == 0.0
    with pytest.raises(DataError):
        E.hr_ndcg([[1]], ["a", "b"], gt)


def test_metrics_from_ranks_hand_computed():
    ranks = [1, 3, 11, 60, 250]
    m = E.metrics_from_ranks(ranks, ks=(10, 50, 200))
    assert m["HR@10"] == pytest.approx(2 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5) / 5)
    assert m["HR@50"] == pytest.approx(3 / 5)
    assert m["NDCG@50"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 5)
    assert m["HR@200"] == pytest.approx(4 / 5)
    assert m["NDCG@200"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(61)) / 5)
    assert m["Score"] == pytest.approx(0.31 * 0.4 + 0.69 * 0.3)
    assert E.metrics_from_ranks([3], ks=(1,)) == {"HR@1": 0.0, "NDCG@1": 0.0,
                                                   "Score": pytest.approx(0.31 + 0.69 * 0.5)}
    big = E.metrics_from_ranks(np.array([np.iinfo(np.int64).max, 1]))
    assert big["HR@200"] == 0.5
    with pytest.raises(DataError, match="1-based"):
        E.metrics_from_ranks([0, 2])


def test_ranks_and_top_lists_agree():
    """The same ranking scored both ways gives the same numbers."""
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 30, size=50)
    gt = {f"u{i}": 1000 + i for i in range(50)}
    tops = []
    for i, r in enumerate(ranks):
        top = [-j for j in range(1, 11)]
        if r <= 10:
            top[r - 1] = 1000 + i
        tops.append(top)
    a = E.hr_ndcg(tops, list(gt), gt)
    b = E.metrics_from_ranks(ranks, ks=(10,))
    for key in ("HR@10", "NDCG@10", "Score"):
        assert a[key] == pytest.approx(b[key])


def test_readers_give_one_line_errors(tmp_path):
    p = tmp_path / "gt.jsonl"
    p.write_text('{"user_id": "u1", "creative_id": 5}\n\n{"user_id": "u2", "creative_id": 6}\n')
    assert E.read_ground_truth(p) == {"u1": 5, "u2": 6}
    for text, match in [('{"user_id": "u1", "creative_id": 5}\n{oops\n', ":2: invalid JSON"),
                        ('{"user_id": "u1"}\n', ":1: expected an object"),
                        ('{"user_id": 1, "creative_id": 5}\n{"user_id": "1", "creative_id": 6}\n',
                         ":2: user 1 appears twice")]:
        p.write_text(text)
        with pytest.raises(DataError, match=match) as e:
            E.read_ground_truth(p)
        assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)
    r = tmp_path / "result.json"
    r.write_text(json.dumps({"time": 1.5, "top10s": [[1, 2]], "user": ["u1"]}))
    assert E.read_result(r) == ([[1, 2]], ["u1"], 1.5)
    for obj, match in [({"top10s": [[1]]}, "keys"), ({"top10s": [[1]], "user": []}, "1 top"),
                       ({"top10s": [3], "user": ["a"]}, r"top10s\[0\]")]:
        r.write_text(json.dumps(obj))
        with pytest.raises(DataError, match=match):
            E.read_result(r)
    r.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        E.read_result(r)


@pytest.fixture
def layout(tmp_path):
    """Train: items (creative id -> re-id) 100->1, 200->2, 300->3, 400->4. Eval pool: 100, 200,
    1000, 300, 500. Item 1: 1 click, 3 events; item 2: 2 clicks (one a conversion), 2 events; item 3:
    1 click, 4 events (one with a null action); item 4 is not in the pool."""
    train, ev = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    ev.mkdir()
    seqs = [
        [[1, 1, None, {}, 0, 10], [1, 2, None, {}, 1, 11], [1, 3, None, {}, None, 12],
         [1, None, {"103": 2}, None, None, 99]],
        [[2, 1, None, {}, 1, 10], [2, 3, None, {}, 0, 11], [2, 4, None, {}, 1, 12],
         [2, 4, None, {}, 1, 13], [2, 4, None, {}, 1, 14]],
        [[3, 3, None, {}, 1, 10], [3, 2, None, {}, 2, 11], [3, 1, None, {}, 0, 12],
         [3, 3, None, {}, 0, 13]],
    ]
    (train / "seq.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seqs))
    dump_pickle({"u": {"user_a": 1, "user_b": 2, "user_c": 3},
                 "i": {100: 1, 200: 2, 300: 3, 400: 4}, "f": {}, "a": {}},
                train / "indexer.pkl")
    (ev / "predict_set.jsonl").write_text("".join(
        json.dumps({"creative_id": c, "retrieval_id": i, "features": {}}) + "\n"
        for i, c in enumerate([100, 200, 1000, 300, 500])))
    (ev / "predict_seq.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [
        [[2, 1, None, {}, 0, 5]], [["user_new", 999999, None, {}, 1, 6]],
        [[1, 3, None, {}, 0, 7]]]))
    return train, ev


def test_most_popular_on_tiny_layout(layout):
    train, ev = layout
    pop = E.item_popularity(train, E._indexer(train, ev))
    assert pop == {100: (1, 3), 200: (2, 2), 300: (1, 4), 400: (3, 3)}
    tops, users = E.most_popular_topk(train, ev, k=3)
    assert users == ["user_b", "user_new", "user_a"]
    # 400 has the most clicks but is not in the pool; 300 beats 100 on events; 500 and 1000
    # are unseen and follow by creative id (as numbers, not strings)
    assert tops == [[200, 300, 100]] * 3
    tops, _ = E.most_popular_topk(train, ev, k=10)
    assert tops[0] == [200, 300, 100, 500, 1000]


def test_random_expectation_hand_computed():
    gt = {"a": 1, "b": 2, "c": 99}  # c's target is outside the pool
    m = E.random_expectation(gt, [1, 2, 3, 4], k=2)
    assert m["HR@2"] == pytest.approx(2 / 3 * 2 / 4)
    assert m["NDCG@2"] == pytest.approx(2 / 3 * (1 + 1 / math.log2(3)) / 4)


def test_cli_table_and_last_line_json(layout, tmp_path, capsys):
    train, ev = layout
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps({"user_id": u, "creative_id": c}) + "\n" for u, c in
                          [("user_a", 300), ("user_b", 100), ("user_new", 500)]))
    res = tmp_path / "result.json"
    res.write_text(json.dumps({"time": 0.1, "top10s": [[300, 1], [7, 8, 100]],
                               "user": ["user_a", "user_b"]}))
    assert E.main(["--result", str(res), "--ground_truth", str(gt)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["users"] == 3 and last["HR@10"] == pytest.approx(2 / 3)
    assert last["NDCG@10"] == pytest.approx((1 + 0.5) / 3)
    assert E.main(["--result", str(res), "--ground_truth", str(gt), "--k", "3",
                   "--train_dir", str(train), "--eval_dir", str(ev)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("most-popular") for line in out)
    assert any(line.startswith("random") for line in out)
    pop = next(line for line in out if line.startswith("most-popular")).split()
    # most-popular top 3 = [200, 300, 100]: user_a 300 at rank 2, user_b 100 at rank 3
    assert float(pop[1]) == pytest.approx(2 / 3, abs=1e-4)
    assert json.loads(out[-1])["HR@3"] == pytest.approx(2 / 3)
    res.write_text("[1, 2")
    assert E.main(["--result", str(res), "--ground_truth", str(gt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cold_warm_metrics_hand_computed():
    """6 pool items, 2 of them cold (50 at count 0, 60 absent); 4 users, 2 with cold targets; k = 3."""
    counts = {10: 5, 20: 3, 30: 1, 40: 1, 50: 0}
    pool = [10, 20, 30, 40, 50, 60, 10]                     # a repeated candidate counts once
    gt = {"a": 50, "b": 60, "c": 10, "d": 30}
    users = ["a", "b", "c", "d", "e", "a"]
    tops = [[50, 10, 20],          # a: cold target at rank 1
            [10, 20, 10],          # b: cold target missed
            [20, 10, 60, 40],      # c: rank 2; 40 lies beyond k
            [40, 20, 10],          # d: missed
            [60, 70],              # e: not in gt, its 2 slots still count; 70 is outside the pool
            [99, 98, 97]]          # a again: ignored
    m = E.cold_warm_metrics(tops, users, gt, counts, pool, k=3)
    assert m["cold"] == {"HR@3": 0.5, "NDCG@3": 0.5, "Score": pytest.approx(0.5), "users": 2}
    assert m["warm"]["users"] == 2 and m["warm"]["HR@3"] == 0.5
    assert m["warm"]["NDCG@3"] == pytest.approx(1 / math.log2(3) / 2)
    assert m["warm"]["Score"] == pytest.approx(0.31 * 0.5 + 0.69 / math.log2(3) / 2)
    assert m["cold_target_share"] == 0.5
    # slots 3 + 3 + 3 + 3 + 2 = 14; cold: 50 (a), 60 (c), 60 and 70 (e)
    assert m["slots"] == 14 and m["cold_slot_share"] == pytest.approx(4 / 14)
    # recommended pool items 10, 20, 40, 50, 60; 30 never shown; 70 is not in the pool
    assert m["coverage@3"] == pytest.approx(5 / 6)
    assert m["pool_size"] == 6 and m["pool_cold_items"] == 2
    # pool counts sorted 0 0 1 1 3 5: boundaries at ranks 2 and 4 -> low <= 0 < mid <= 1 < high
    t = m["HR@3_by_pop_tercile"]
    assert t["bounds"] == [0, 1]
    assert t["low"] == {"HR@3": 0.5, "users": 2, "items": 2}     # a hit, b missed
    assert t["mid"] == {"HR@3": 0.0, "users": 1, "items": 2}     # d (30) missed
    assert t["high"] == {"HR@3": 1.0, "users": 1, "items": 2}    # c (10) hit
    # the groups recombine to the overall numbers
    whole = E.hr_ndcg(tops, users, gt, k=3)
    for key in ("HR@3", "NDCG@3", "Score"):
        assert (m["cold"][key] * 2 + m["warm"][key] * 2) / 4 == pytest.approx(whole[key])
    # ids compare as creative ids whatever their JSON spelling
    s = E.cold_warm_metrics([["50", 10]], ["a"], {"a": "10"}, {"10": 2}, ["10", 50], k=10)
    assert s["cold_target_share"] == 0 and s["warm"]["HR@10"] == 1.0 and s["cold_slot_share"] == 0.5
    assert s["coverage@10"] == 1.0


def test_cold_warm_empty_groups_and_pool():
    m = E.cold_warm_metrics([[1]], ["a"], {"a": 1}, {1: 4}, [], k=10)
    assert m["cold"] == {"HR@10": None, "NDCG@10": None, "Score": None, "users": 0}
    assert m["warm"]["HR@10"] == 1.0 and m["cold_target_share"] == 0.0
    assert m["coverage@10"] is None and m["HR@10_by_pop_tercile"] is None and m["pool_size"] == 0
    m = E.cold_warm_metrics([[]], ["a"], {"a": 7}, {}, [7, 8, 9], k=10)
    assert m["slots"] == 0 and m["cold_slot_share"] is None and m["coverage@10"] == 0.0
    t = m["HR@10_by_pop_tercile"]                 # every count is 0: one tercile holds them all
    assert t["bounds"] == [0, 0] and t["low"] == {"HR@10": 0.0, "users": 1, "items": 3}
    assert t["mid"] == {"HR@10": None, "users": 0, "items": 0} and t["high"]["items"] == 0
    with pytest.raises(DataError):
        E.cold_warm_metrics([[1]], ["a", "b"], {"a": 1}, {}, [1])


def test_pop_terciles_tie_rule():
    assert E.pop_terciles([]) is None
    assert E.pop_terciles([5]) == (5, 5)
    assert E.pop_terciles([2, 1]) == (1, 2)                       # low {1}, mid {2}, high none
    assert E.pop_terciles([9, 3, 0, 1, 1, 5]) == (1, 3)           # sorted 0 1 1 3 5 9: ranks 2 and 4
    # ties at a boundary stay together in the lower tercile: four zeros, none in mid
    assert E.pop_terciles([0, 7, 0, 2, 0, 0]) == (0, 0)
    assert E.pop_terciles([1, 1, 1, 2, 2, 2, 2, 3, 3]) == (1, 2)


def test_cold_warm_matches_naive_loops():
    """Random shapes against plain loops written from the definitions; a target's tercile by
    the rule "low when fewer than ceil(n/3) pool items are strictly less popular, mid when fewer
    than ceil(2n/3), else high"."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        pool = [int(x) for x in rng.choice(60, size=int(rng.integers(1, 40)), replace=False)]
        counts = {c: int(rng.integers(0, 6)) for c in rng.choice(60, size=30, replace=False).tolist()}
        users = [f"u{i}" for i in range(25)]
        gt = {u: int(rng.integers(0, 60)) for u in users if rng.random() < 0.8}
        tops = [[int(x) for x in rng.integers(0, 60, size=int(rng.integers(0, 14)))] for _ in users]
        k = int(rng.integers(1, 12))
        m = E.cold_warm_metrics(tops, users, gt, counts, pool, k=k)
        top = dict(zip(users, tops))
        ranks = {}
        for u, t in gt.items():
            ranks[u] = next((i + 1 for i, x in enumerate(top[u][:k]) if x == t), None)
        cold = [u for u in gt if counts.get(gt[u], 0) == 0]
        warm = [u for u in gt if u not in cold]
        for name, group in (("cold", cold), ("warm", warm)):
            if group:
                assert m[name]["HR@" + str(k)] == pytest.approx(sum(ranks[u] is not None for u in group) / len(group))
                assert m[name]["NDCG@" + str(k)] == pytest.approx(
                    sum(1 / math.log2(ranks[u] + 1) for u in group if ranks[u]) / len(group))
        slots = [x for t in tops for x in t[:k]]
        assert m["cold_slot_share"] == (pytest.approx(sum(counts.get(x, 0) == 0 for x in slots) / len(slots))
                                        if slots else None)
        distinct = set(pool)
        assert m[f"coverage@{k}"] == pytest.approx(len(distinct & set(slots)) / len(distinct))
        n = len(distinct)
        pc = [counts.get(c, 0) for c in distinct]

        def tercile(x):
            below = sum(c < x for c in pc)
            return "low" if below < math.ceil(n / 3) else "mid" if below < math.ceil(2 * n / 3) else "high"
        t = m[f"HR@{k}_by_pop_tercile"]
        for name in E.TERCILES:
            group = [u for u in gt if tercile(counts.get(gt[u], 0)) == name]
            assert t[name]["users"] == len(group)
            assert t[name]["items"] == sum(tercile(c) == name for c in pc)
            if group:
                assert t[name][f"HR@{k}"] == pytest.approx(sum(ranks[u] is not None for u in group) / len(group))


def test_cli_cold_warm_report(layout, tmp_path, capsys, monkeypatch):
    """Training events: 100 -> 3, 200 -> 2, 300 -> 4 (400 is not a candidate); 500 and 1000 are
    cold. Pool counts sorted 0 0 2 3 4: low <= 0 < mid <= 3 < high."""
    train, ev = layout
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps({"user_id": u, "creative_id": c}) + "\n" for u, c in
                          [("user_a", 300), ("user_b", 100), ("user_new", 500)]))
    res = tmp_path / "result.json"
    res.write_text(json.dumps({"time": 0.1, "top10s": [[500, 300, 7], [1000, 300, 100], [100, 1000]],
                               "user": ["user_a", "user_b", "user_new"]}))
    scans = []
    real = E.count_events
    monkeypatch.setattr(E, "count_events", lambda *a, **kw: scans.append(a) or real(*a, **kw))
    assert E.main(["--result", str(res), "--ground_truth", str(gt),
                   "--train_dir", str(train), "--eval_dir", str(ev)]) == 0
    assert len(scans) == 1                                    # seq.jsonl read once
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["HR@10"] == pytest.approx(2 / 3) and last["users"] == 3
    assert last["NDCG@10"] == pytest.approx((1 / math.log2(3) + 0.5) / 3)
    assert last["cold"] == {"HR@10": 0.0, "NDCG@10": 0.0, "Score": 0.0, "users": 1}
    assert last["warm"]["HR@10"] == 1.0 and last["warm"]["users"] == 2
    assert last["warm"]["NDCG@10"] == pytest.approx((1 / math.log2(3) + 0.5) / 2)
    assert last["cold_target_share"] == pytest.approx(1 / 3)
    # slots 3 + 3 + 2; cold: 500 and 7 (user_a), 1000 (user_b), 1000 (user_new)
    assert last["cold_slot_share"] == 0.5 and last["slots"] == 8
    assert last["coverage@10"] == pytest.approx(4 / 5)      # 200 never recommended
    t = last["HR@10_by_pop_tercile"]
    assert t["bounds"] == [0, 3]
    assert [(t[x]["HR@10"], t[x]["users"], t[x]["items"]) for x in E.TERCILES] == \
        [(0.0, 1, 2), (1.0, 1, 2), (1.0, 1, 1)]
    assert [line[:18].strip() for line in out[1:8]] == ["model", "cold targets", "warm targets", "most-popular",
                                                         "cold targets", "warm targets", "random (expected)"]
    # most-popular gives [200, 300, 100, 500, 1000] to all 3 users: 6 of 15 slots cold, the whole pool
    pop = [line.split() for line in out if line.startswith("most-popular")][1]
    assert [float(x) for x in pop[1:]] == [0.4, 1.0, 1.0, 1.0, 1.0]
    assert any("low <= 0 (2 items, 1 targets), 0 < mid <= 3 (2 items, 1 targets), high > 3 (1 items, "
               "1 targets)" in line for line in out)
    assert E.main(["--result", str(res), "--ground_truth", str(gt)]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"HR@10", "NDCG@10", "Score", "users"}
