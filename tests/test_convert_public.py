"""Tests for convert_public.py: the leave-one-out split, stable sort, actions, features and
indexer, predict_set, S3Rec without timestamps, every MovieLens variant, bad input, and the real
ml-100k / Beauty files in ../shared (skipped when absent)."""
import collections
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert_public as cp  # noqa: E402
from layout import load_pickle  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DAY = 86400

# user, item, rating, ts in file order. User 2's last two events share ts 500: file order (30
# then 20) must decide the targets. User 9 has 2 events and must be dropped with its item 99.
ML_ROWS = [
    (1, 10, 5, 100), (2, 30, 5, 500), (1, 20, 3, 100), (1, 30, 4, 50), (2, 20, 2, 500),
    (1, 40, 1, 200), (2, 10, 3, 400), (9, 99, 5, 10), (1, 10, 2, 300), (2, 40, 5, 100),
    (3, 20, 4, 7), (3, 10, 4, 7), (3, 30, 1, 7), (9, 10, 5, 20),
]
GENRES = list(cp.ML100K_GENRES)


def expected_sequences(rows):
    """Naive reference: per user, Python's stable sort by timestamp keeps file order on ties."""
    per = collections.defaultdict(list)
    for r in rows:
        per[r[0]].append(r)
    return {u: sorted(ev, key=lambda r: r[3]) for u, ev in per.items() if len(ev) >= 3}


def flags(*names):
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_ml100k(d, rows=ML_ROWS):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n")
    (d / "u.item").write_bytes((
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Comedy')}\n"
        f"20|Caf\xe9 (1994)||||{flags('Drama')}\n"
        f"30|No Year||||{flags()}\n"
        f"40|Heat (1995)|15-Dec-1995||http://y|{flags('Action', 'Crime', 'Thriller')}\n"
        f"99|Other (1990)|01-Jan-1990||http://z|{flags('Drama')}\n").encode("latin-1"))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n3|17|M|writer|\n"
                              "9|60|F|other|10001\n")
    return d


def read_jsonl(path, offsets_path=None):
    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]
    if offsets_path is not None:
        offsets = load_pickle(offsets_path)
        assert isinstance(offsets, list) and len(offsets) == len(lines)
        with open(path, "rb") as f:
            for off, want in zip(offsets, lines):
                f.seek(off)
                assert json.loads(f.readline()) == want
    return lines


def load_out(out):
    out = Path(out)
    return {
        "train": read_jsonl(out / "train/seq.jsonl", out / "train/seq_offsets.pkl"),
        "indexer": load_pickle(out / "train/indexer.pkl"),
        "items": json.loads((out / "train/item_feat_dict.json").read_text()),
        "meta": json.loads((out / "dataset_meta.json").read_text()),
        **{s: {"seq": read_jsonl(out / s / "predict_seq.jsonl",
                                 out / s / "predict_seq_offsets.pkl"),
               "set": read_jsonl(out / s / "predict_set.jsonl"),
               "gt": read_jsonl(out / s / "ground_truth.jsonl")} for s in ("valid", "test")},
    }


def decode(line, indexer):
    """(raw user, [(raw item, action, ts)], profile record) of one sequence line."""
    inv_u = {v: k for k, v in indexer["u"].items()}
    inv_i = {v: k for k, v in indexer["i"].items()}
    *events, profile = line
    assert all(r[2] is None and r[1] is not None for r in events)
    assert profile[1] is None and profile[3] is None and profile[4] is None
    assert len({r[0] for r in line}) == 1
    return inv_u[line[0][0]], [(inv_i[r[1]], r[4], r[5]) for r in events], profile


@pytest.fixture
def ml100k(tmp_path):
    meta = cp.convert("movielens", str(write_ml100k(tmp_path / "in")), str(tmp_path / "out"))
    return meta, load_out(tmp_path / "out")


def test_split_histories_and_targets_match_naive_reference(ml100k):
    meta, o = ml100k
    exp = expected_sequences(ML_ROWS)
    assert sorted(int(u) for u in o["indexer"]["u"]) == sorted(exp)
    assert meta["counts"]["users_dropped"] == 1 and meta["counts"]["events_dropped"] == 2
    assert meta["counts"]["events"] == sum(len(v) for v in exp.values())
    assert 99 not in o["indexer"]["i"]  # only user 9 had it
    for split, cut in (("train", 2), ("valid", 2), ("test", 1)):
        lines = o[split] if split == "train" else o[split]["seq"]
        assert len(lines) == len(exp)
        for line in lines:
            user, events, profile = decode(line, o["indexer"])
            want = exp[int(user)][:-cut]
            assert events == [(i, 1, t) for _, i, _, t in want]
            assert profile[5] == want[-1][3] + DAY
    for split, k in (("valid", -2), ("test", -1)):
        users = [decode(line, o["indexer"])[0] for line in o[split]["seq"]]
        assert o[split]["gt"] == [{"user_id": u, "creative_id": exp[int(u)][k][1]} for u in users]
    # every record's item features are the item's entry in item_feat_dict
    for line in o["train"]:
        for r in line[:-1]:
            assert r[3] == o["items"][str(r[1])]


def test_equal_timestamps_keep_file_order(ml100k):
    _, o = ml100k
    gt = {g["user_id"]: g["creative_id"] for g in o["valid"]["gt"]}
    gt_test = {g["user_id"]: g["creative_id"] for g in o["test"]["gt"]}
    # user 2: 40@100, 10@400, 30@500 (row 2), 20@500 (row 5)
    assert (gt["2"], gt_test["2"]) == (30, 20)
    # user 3: three events at ts 7 -> file order 20, 10, 30
    assert (gt["3"], gt_test["3"]) == (10, 30)
    line = next(x for x in o["train"] if decode(x, o["indexer"])[0] == "1")
    assert [e[0] for e in decode(line, o["indexer"])[1]] == [30, 10, 20]


def test_min_rating_makes_exposures_but_targets_stay(tmp_path):
    meta = cp.convert("movielens", str(write_ml100k(tmp_path / "in")), str(tmp_path / "out"),
                      min_rating=3)
    o = load_out(tmp_path / "out")
    exp = expected_sequences(ML_ROWS)
    for line in o["test"]["seq"]:
        user, events, _ = decode(line, o["indexer"])
        assert [a for _, a, _ in events] == [int(r >= 3) for _, _, r, _ in exp[int(user)][:-1]]
    # user 2's test target (item 20) has rating 2: an exposure, still the target
    assert {"user_id": "2", "creative_id": 20} in o["test"]["gt"]
    kept = [r for rows in exp.values() for r in rows]
    assert meta["counts"]["exposures"] == sum(r[2] < 3 for r in kept) > 0


def test_features_and_indexer(ml100k):
    meta, o = ml100k
    ix = o["indexer"]
    assert isinstance(ix["f"], collections.defaultdict) and ix["a"] == {1: 1, 0: 2}
    assert ix["u"] == {"1": 1, "2": 2, "3": 3} and ix["i"] == {10: 1, 20: 2, 30: 3, 40: 4}
    f = ix["f"]
    assert f["103"] == {1: 1, 18: 2, 50: 3}  # ages 17, 24, 53 (60 belongs to dropped user 9)
    assert f["104"] == {"F": 1, "M": 2}
    assert f["105"] == {"other": 1, "technician": 2, "writer": 3}
    assert f["109"] == {"8": 1, "T": 2}  # user 3 has an empty zip: no value
    assert f["112"] == {1994: 1, 1995: 2}
    assert f["125"] == {g: k for k, g in enumerate(sorted(
        ["Animation", "Comedy", "Drama", "Action", "Crime", "Thriller"]), 1)}
    g = f["125"]
    assert o["items"] == {
        "1": {"112": 2, "125": [g["Animation"], g["Comedy"]]},
        "2": {"112": 1, "125": [g["Drama"]]},  # year from the title, date empty
        "3": {},  # no year, no genre: both absent
        "4": {"112": 2, "125": [g["Action"], g["Crime"], g["Thriller"]]},
    }
    profiles = {decode(x, ix)[0]: decode(x, ix)[2][2] for x in o["train"]}
    assert profiles == {"1": {"103": 2, "104": 2, "105": 2, "109": 1},
                        "2": {"103": 3, "104": 1, "105": 1, "109": 2},
                        "3": {"103": 1, "104": 2, "105": 3}}
    assert meta["feature_ids"] == {"user_sparse": ["103", "104", "105", "109"], "user_array": [],
                                   "item_sparse": ["112"], "item_array": ["125"]}
    assert meta["feature_cardinality"] == {k: len(v) for k, v in f.items()}


def test_predict_set_is_whole_catalogue(ml100k):
    _, o = ml100k
    for split in ("valid", "test"):
        ps = o[split]["set"]
        assert [p["retrieval_id"] for p in ps] == list(range(len(o["indexer"]["i"])))
        assert [p["creative_id"] for p in ps] == sorted(o["indexer"]["i"])
        for p in ps:
            assert p["features"] == o["items"][str(o["indexer"]["i"][p["creative_id"]])]
    assert o["valid"]["set"] == o["test"]["set"]


def test_output_is_deterministic(tmp_path):
    src = str(write_ml100k(tmp_path / "in"))
    for name in ("a", "b"):
        cp.convert("movielens", src, str(tmp_path / name))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert len(files) == 13
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p


def test_s3rec_without_timestamps(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "Toy.txt").write_text("1 5 6 7 5\n2 6 8 9\n3 5 6\n")
    (d / "Toy_item2attributes.json").write_text(json.dumps(
        {"5": [3, 1, 3], "6": [2], "7": [], "8": [1, 2], "100": [7]}))
    cp.main(["--format", "s3rec", "--input", str(d), "--out", str(tmp_path / "out")])
    assert "time features off" in capsys.readouterr().out
    o = load_out(tmp_path / "out")
    assert o["meta"]["has_timestamps"] is False and o["meta"]["counts"]["users_dropped"] == 1
    assert o["indexer"]["f"]["125"] == {1: 1, 2: 2, 3: 3}  # attribute 7: item 100 never seen
    assert o["items"] == {"1": {"125": [3, 1]}, "2": {"125": [2]}, "3": {}, "4": {"125": [1, 2]},
                          "5": {}}  # items 5, 6, 7, 8, 9 -> re-ids 1..5
    exp = {"1": [5, 6, 7, 5], "2": [6, 8, 9]}
    for line in o["test"]["seq"]:
        user, events, profile = decode(line, o["indexer"])
        assert [i for i, _, _ in events] == exp[user][:-1]
        assert [t for _, _, t in events] == list(range(1, len(exp[user])))
        assert profile[2] == {} and profile[5] == len(exp[user])
    assert o["test"]["gt"] == [{"user_id": "1", "creative_id": 5},
                               {"user_id": "2", "creative_id": 9}]
    assert o["valid"]["gt"] == [{"user_id": "1", "creative_id": 7},
                                {"user_id": "2", "creative_id": 8}]


def test_ml1m_dat_variant(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n1::3::4::978301968\n")
    (d / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                   "2::Caf\xe9: A::B (1994)::Drama\n3::Heat (1995)::Action\n"
                                   .encode("latin-1"))
    (d / "users.dat").write_text("1::F::25::10::48067\n")
    meta = cp.convert("movielens", str(d), str(tmp_path / "out"))
    o = load_out(tmp_path / "out")
    assert meta["variant"].startswith("ml-1m")
    f = o["indexer"]["f"]
    assert f["103"] == {25: 1} and f["105"] == {10: 1} and f["109"] == {"4": 1}
    assert f["112"] == {1994: 1, 1995: 2}
    assert o["items"]["2"] == {"112": 1, "125": [f["125"]["Drama"]]}
    assert o["valid"]["gt"] == [{"user_id": "1", "creative_id": 3}]  # ts 978301968 is 2nd
    assert o["test"]["gt"] == [{"user_id": "1", "creative_id": 2}]


def test_ml10m_dat_without_users_and_half_stars(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ratings.dat").write_text("7::1::3.5::10\n7::2::4.5::11\n7::1::4::12\n")
    (d / "movies.dat").write_text("1::Heat (1995)::Action|Crime\n2::X (2001)::(no genres listed)\n")
    meta = cp.convert("movielens", str(d), str(tmp_path / "out"), min_rating=4.0)
    o = load_out(tmp_path / "out")
    assert meta["counts"]["exposures"] == 1
    assert decode(o["test"]["seq"][0], o["indexer"])[1] == [(1, 0, 10), (2, 1, 11)]
    assert o["items"]["2"] == {"112": 2} and o["train"][0][-1][2] == {}


def test_ml_csv_variant(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n5,3,4.0,100\n5,1,2.5,90\n"
                                   "5,2,5.0,95\n6,3,1.0,1\n")
    (d / "movies.csv").write_text('movieId,title,genres\n1,"Big, Fish (2003) ",Drama|Fantasy\n'
                                  "2,Babylon 5,(no genres listed)\n3,Crime (2006-2007),Crime\n")
    meta = cp.convert("movielens", str(d), str(tmp_path / "out"))
    o = load_out(tmp_path / "out")
    assert meta["variant"].startswith("ml-20m") and meta["counts"]["users_dropped"] == 1
    assert o["indexer"]["f"]["112"] == {2003: 1, 2006: 2}
    assert o["items"]["2"] == {}
    assert decode(o["train"][0], o["indexer"])[1] == [(1, 1, 90)]
    assert o["test"]["gt"] == [{"user_id": "5", "creative_id": 3}]


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: (d / "u.data").write_text("1\t2\t3\t4\n1\tx\t3\t5\n"), [], "u.data:2: item id 'x'"),
    (lambda d: (d / "u.data").write_text("1\t2\t3\n"), [], "u.data:1: expected 4"),
    (lambda d: (d / "u.data").write_text("1\t2\t3\t4\n"), [], "u.item: missing"),
    (lambda d: (d / "x.csv").write_text(""), [], "looked for u.data, ratings.dat, ratings.csv"),
    (lambda d: (d / "ratings.csv").write_text("a,b\n1,2\n"), [],
     "ratings.csv:1: expected a header"),
    (lambda d: write_ml100k(d), ["--min_seq_len", "2"], "at least 3"),
])
def test_bad_movielens_input_exits_2(tmp_path, capsys, setup, args, message):
    d = tmp_path / "in"
    d.mkdir()
    setup(d)
    with pytest.raises(SystemExit) as e:
        cp.main(["--format", "movielens", "--input", str(d), "--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("files, message", [
    ({"A.txt": "1 2 3\n", "B.txt": "1 2 3\n"}, "exactly one <Name>.txt"),
    ({"A.txt": "1 2 3 4\n1 5 6 7\n"}, "A.txt:2: user 1 already has a line"),
    ({"A.txt": "1 2 3 4\n", "A_item2attributes.json": '{"2": [1,\n "x"]}'}, "item '2': expected"),
    ({"A.txt": "1 2 3 4\n", "A_item2attributes.json": '{"2": [1,\n'}, "json:2: not valid JSON"),
])
def test_bad_s3rec_input_exits_2(tmp_path, capsys, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as e:
        cp.main(["--format", "s3rec", "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("fmt, path, users, items, events", [
    ("movielens", "data/ml-100k", 943, 1682, 100000),
    ("s3rec", "data/s3rec-Beauty/Beauty.txt", 22363, 12101, 198502),
])
def test_real_public_datasets(tmp_path, fmt, path, users, items, events):
    src = SHARED / path
    if not src.exists():
        pytest.skip(f"{src} not present")
    meta = cp.convert(fmt, str(src), str(tmp_path))
    c = meta["counts"]
    assert (c["users"], c["items"], c["events"], c["users_dropped"]) == (users, items, events, 0)
    for split in ("valid", "test"):
        gt = (tmp_path / split / "ground_truth.jsonl").read_text().splitlines()
        assert len(gt) == users
        assert len((tmp_path / split / "predict_set.jsonl").read_text().splitlines()) == items
    train = read_jsonl(tmp_path / "train/seq.jsonl")
    assert sum(len(line) - 1 for line in train) == events - 2 * users
