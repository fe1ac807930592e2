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
