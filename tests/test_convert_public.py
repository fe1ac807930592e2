"""Tests for convert_public.py: the leave-one-out split, stable sort, actions, features and
indexer, predict_set, S3Rec without timestamps, every MovieLens variant, bad input, and the real
ml-100k / Beauty files in ../shared (skipped when absent)."""
import collections
import json
import math
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


# ---------------------------------------------------------------------------------------------
# Cold items and content (--cold_items, --seed, --content)
# ---------------------------------------------------------------------------------------------

COLD_ITEMS = list(range(3, 123, 3))       # 40 raw item ids
COLD_GENRES = {i: [GENRES[1 + (i // 3) % 18]] + ([GENRES[1 + (i // 7) % 18]] if i % 2 else []) for i in COLD_ITEMS}
COLD_GENRES[6] = []                       # no genre
COLD_YEARS = {i: 1931 + (i * 7) % 67 for i in COLD_ITEMS}
COLD_YEARS[9] = None                      # no year: no year, no decade


def cold_rows(n_users=14, seed=5):
    """(user, item, rating, ts) rows: random items, timestamps with ties; user 50's only history
    item (before its last two events) is item 3, so it is dropped when item 3 is cold."""
    import numpy as np
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for _ in range(int(rng.integers(4, 12))):
            rows.append((u, int(rng.choice(COLD_ITEMS)), int(rng.integers(1, 6)), int(rng.integers(0, 20))))
    rows += [(50, 3, 5, 1), (50, 12, 5, 2), (50, 15, 4, 3)]
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


def write_cold_ml(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)))
    (d / "u.item").write_text("".join(
        f"{i}|Film {i}|{'01-Jan-%d' % COLD_YEARS[i] if COLD_YEARS[i] else ''}||u|{flags(*COLD_GENRES[i])}\n"
        for i in COLD_ITEMS))
    (d / "u.user").write_text("".join(f"{u}|30|M|other|12345\n" for u in sorted({r[0] for r in rows})))
    return d


def naive_cold_set(catalogue, frac, seed):
    import numpy as np
    cat = np.array(sorted(catalogue))
    return set(np.random.default_rng(seed).choice(cat, int(math.floor(frac * len(cat) + 0.5)),
                                                  replace=False).tolist())


def histories(o, split):
    """{raw user: [(raw item, action, ts)]} of a split's predict_seq (or train's seq.jsonl)."""
    lines = o["train"] if split == "train" else o[split]["seq"]
    return {u: ev for u, ev, _ in (decode(x, o["indexer"]) for x in lines)}


def items_of(o):
    inv = {v: k for k, v in o["indexer"]["i"].items()}
    return {inv[int(k)] for k in o["items"]}


def seed_making_cold(item, catalogue, frac):
    return next(s for s in range(200) if item in naive_cold_set(catalogue, frac, s))


@pytest.fixture
def cold_src(tmp_path):
    rows = cold_rows()
    return str(write_cold_ml(tmp_path / "cin", rows)), rows


@pytest.mark.parametrize("targets, min_rating", [("last", None), ("clicks", 3)])
def test_cold_items_leave_training_and_histories_targets_stay(tmp_path, cold_src, targets, min_rating):
    src, rows = cold_src
    catalogue = {r[1] for r in rows}
    seed = seed_making_cold(3, catalogue, 0.25)
    cp.convert("movielens", src, str(tmp_path / "warm"), min_rating=min_rating, targets=targets)
    meta = cp.convert("movielens", src, str(tmp_path / "cold"), min_rating=min_rating, targets=targets,
                      cold_items=0.25, seed=seed)
    w, c = load_out(tmp_path / "warm"), load_out(tmp_path / "cold")
    cold = naive_cold_set(catalogue, 0.25, seed)
    assert len(cold) == 10 and 3 in cold
    # the same split, then cold events removed: each history is the warm history without cold
    # items; a user whose training line would be empty is dropped (user 50: its one history item is 3)
    dropped = {u for u, ev in histories(w, "train").items() if all(e[0] in cold for e in ev)}
    assert "50" in dropped and len(dropped) < len(w["indexer"]["u"]) // 2
    for split in ("train", "valid", "test"):
        hw, hc = histories(w, split), histories(c, split)
        assert hc == {u: [e for e in ev if e[0] not in cold] for u, ev in hw.items() if u not in dropped}
        assert all(ev and e[0] not in cold for ev in hc.values() for e in ev)
    for split in ("valid", "test"):
        assert c[split]["gt"] == [g for g in w[split]["gt"] if g["user_id"] not in dropped]
        n_cold = sum(g["creative_id"] in cold for g in c[split]["gt"])
        assert meta["cold_items"][f"{split}_cold_targets"] == n_cold
    assert sum(meta["cold_items"][f"{s}_cold_targets"] for s in ("valid", "test")) > 0
    assert meta["cold_items"]["items"] == 10 and meta["cold_items"]["users_dropped"] == len(dropped)
    assert meta["counts"]["users"] == len(w["indexer"]["u"]) - len(dropped)
    # cold items: not in the indexer nor item_feat_dict, but candidates with their features
    assert set(c["indexer"]["i"]) == catalogue - cold == items_of(c)
    assert list(c["indexer"]["i"].values()) == list(range(1, len(catalogue) - 9))
    for split in ("valid", "test"):
        ps = c[split]["set"]
        assert [p["creative_id"] for p in ps] == sorted(catalogue - cold) + sorted(cold)
        assert [p["retrieval_id"] for p in ps] == list(range(len(catalogue)))
    f = c["indexer"]["f"]
    inv = {fid: {v: k for k, v in m.items()} for fid, m in f.items()}
    for p in c["test"]["set"]:
        i, feats = p["creative_id"], p["features"]
        raw = {fid: ([inv[fid].get(x, x) for x in v] if isinstance(v, list) else inv[fid].get(v, v))
               for fid, v in feats.items()}
        want = {}
        if COLD_YEARS[i]:
            want.update({"112": COLD_YEARS[i], "113": COLD_YEARS[i] // 10 * 10})
        if COLD_GENRES[i]:
            want["125"] = list(dict.fromkeys(g for g in GENRES if g in COLD_GENRES[i]))
        if i in cold:   # a value no warm item has is its raw string
            raw = {fid: ([int(x) if isinstance(x, str) and x.isdigit() else x for x in v] if isinstance(v, list)
                         else int(v) if isinstance(v, str) and v.isdigit() else v) for fid, v in raw.items()}
        else:
            assert feats == c["items"][str(c["indexer"]["i"][i])]
            assert all(type(x) is int for v in feats.values() for x in (v if isinstance(v, list) else [v]))
        assert raw == want, i
    strings = [v for p in c["test"]["set"] for v in p["features"].values() if isinstance(v, str)]
    assert strings and all(p["creative_id"] in cold for p in c["test"]["set"]
                           if any(isinstance(v, str) for v in p["features"].values()))
    # every item has some content (6 a year, 9 a genre): a vector for each, warm and cold
    assert set(load_pickle(tmp_path / "cold" / cp.CONTENT_FILE)) == catalogue


def test_same_seed_same_cold_set_other_seed_other(tmp_path, cold_src):
    src, rows = cold_src
    sets = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        cp.convert("movielens", src, str(tmp_path / name), cold_items=0.3, seed=seed)
        o = load_out(tmp_path / name)
        sets.append({p["creative_id"] for p in o["test"]["set"]} - set(o["indexer"]["i"]))
    assert sets[0] == sets[1] == naive_cold_set({r[1] for r in rows}, 0.3, 4)
    assert sets[2] == naive_cold_set({r[1] for r in rows}, 0.3, 5) != sets[0]
    for p in sorted((tmp_path / "a").rglob("*")):
        if p.is_file() and p.name != "dataset_meta.json":
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p


def test_without_cold_items_output_is_byte_identical(tmp_path, cold_src):
    src, _ = cold_src
    cp.main(["--format", "movielens", "--input", src, "--out", str(tmp_path / "absent")])
    cp.main(["--format", "movielens", "--input", src, "--out", str(tmp_path / "zero"), "--cold_items", "0",
             "--seed", "7"])
    # a folder converted with cold items, converted again without: its content file goes too
    cp.main(["--format", "movielens", "--input", src, "--out", str(tmp_path / "again"), "--cold_items", "0.2"])
    assert (tmp_path / "again" / cp.CONTENT_FILE).exists()
    cp.main(["--format", "movielens", "--input", src, "--out", str(tmp_path / "again")])
    files = sorted(p.relative_to(tmp_path / "absent") for p in (tmp_path / "absent").rglob("*") if p.is_file())
    assert len(files) == 13 and not (tmp_path / "absent" / "train" / "creative_emb").exists()
    for other in ("zero", "again"):
        assert sorted(p.relative_to(tmp_path / other) for p in (tmp_path / other).rglob("*") if p.is_file()) == files
        for p in files:
            a, b = (tmp_path / "absent" / p).read_bytes(), (tmp_path / other / p).read_bytes()
            if p.name == "dataset_meta.json":
                a, b = (json.loads(x) for x in (a, b))
                a.pop("source"), b.pop("source")
            assert a == b, (other, p)


def naive_content_vector(tokens_by_field, dim=cp.CONTENT_DIM):
    """Independent recomputation: per token, bit k of SHA-256(salt + token) -> +-1, read bit by bit."""
    import hashlib
    v = [0.0] * dim
    for tokens in tokens_by_field:
        for t in tokens:
            d = hashlib.sha256(("content-v1:" + t).encode("utf-8")).digest()
            for k in range(dim):
                v[k] += (1.0 if (d[k // 8] >> (k % 8)) & 1 else -1.0) / math.sqrt(len(tokens))
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_content_vectors_fixed_projection_independent_of_cold_seed(tmp_path, cold_src):
    src, rows = cold_src
    vecs = []
    for name, seed in (("a", 0), ("b", 1)):
        cp.convert("movielens", src, str(tmp_path / name), cold_items=0.25, seed=seed)
        vecs.append(load_pickle(tmp_path / name / cp.CONTENT_FILE))
    assert vecs[0] == vecs[1] and set(vecs[0]) == {r[1] for r in rows}
    for i, v in vecs[0].items():
        fields = []
        if COLD_GENRES[i]:
            fields.append([f"genre:{g}" for g in GENRES if g in COLD_GENRES[i]])
        if COLD_YEARS[i]:
            fields += [[f"year:{COLD_YEARS[i]}"], [f"decade:{COLD_YEARS[i] // 10 * 10}"]]
        assert type(v) is list and len(v) == cp.CONTENT_DIM
        assert v == pytest.approx(naive_content_vector(fields), abs=1e-6), i
    # --content on without cold items: the same vectors, the same item re-ids, plus the decade
    cp.convert("movielens", src, str(tmp_path / "c"), content="on")
    cp.convert("movielens", src, str(tmp_path / "plain"))
    assert load_pickle(tmp_path / "c" / cp.CONTENT_FILE) == vecs[0]
    oc, op = load_out(tmp_path / "c"), load_out(tmp_path / "plain")
    assert oc["indexer"]["i"] == op["indexer"]["i"] and "113" in oc["indexer"]["f"] and "113" not in op["indexer"]["f"]
    assert histories(oc, "test").keys() == histories(op, "test").keys()


def test_s3rec_attribute_content_and_movielens_tags(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "Toy.txt").write_text("1 5 6 7 5\n2 6 8 9\n3 5 6 8 9\n")
    (d / "Toy_item2attributes.json").write_text(json.dumps({"5": [3, 1, 3], "6": [2], "7": [], "8": [1, 2]}))
    meta = cp.convert("s3rec", str(d), str(tmp_path / "so"), content="on")
    vecs = load_pickle(tmp_path / "so" / cp.CONTENT_FILE)
    assert set(vecs) == {5, 6, 8} and meta["content"]["items_without_content"] == 2   # 7, 9: no attributes
    assert vecs[5] == pytest.approx(naive_content_vector([["attr:3", "attr:1"]]), abs=1e-6)
    assert vecs[8] == pytest.approx(naive_content_vector([["attr:1", "attr:2"]]), abs=1e-6)
    m = tmp_path / "m"
    m.mkdir()
    (m / "ratings.csv").write_text("userId,movieId,rating,timestamp\n5,3,4.0,100\n5,1,2.5,90\n5,2,5.0,95\n")
    (m / "movies.csv").write_text("movieId,title,genres\n1,Big Fish (2003),Drama|Fantasy\n2,B,(no genres listed)\n"
                                  "3,Crime (2006),Crime\n")
    (m / "tags.csv").write_text('userId,movieId,tag,timestamp\n5,1,"Tim  Burton",1\n6,1,tim burton,2\n'
                                "6,1,whimsical,3\n7,2,space,4\n8,3, ,5\n")
    meta = cp.convert("movielens", str(m), str(tmp_path / "mo"), content="on")
    o = load_out(tmp_path / "mo")
    f = o["indexer"]["f"]
    assert f["126"] == {"space": 1, "tim burton": 2, "whimsical": 3} and meta["content"]["tags_file"] == "tags.csv"
    assert o["items"]["1"]["126"] == [2, 3] and o["items"]["2"] == {"126": [1]} and "126" not in o["items"]["3"]
    assert meta["feature_ids"]["item_array"] == ["125", "126"] and meta["feature_ids"]["item_sparse"] == ["112", "113"]
    vecs = load_pickle(tmp_path / "mo" / cp.CONTENT_FILE)
    assert vecs[1] == pytest.approx(naive_content_vector(
        [["genre:Drama", "genre:Fantasy"], ["year:2003"], ["decade:2000"], ["tag:tim burton", "tag:whimsical"]]),
        abs=1e-6)
    assert vecs[2] == pytest.approx(naive_content_vector([["tag:space"]]), abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--cold_items", "1"], "--cold_items 1.0: expected a share of the items >= 0 and < 1"),
    (["--cold_items", "-0.1"], "--cold_items -0.1: expected"),
    (["--cold_items", "nan"], "--cold_items nan: expected"),
    (["--cold_items", "0.001"], "0 of the 38 items would be cold"),
    (["--cold_items", "0.2", "--seed", "-1"], "--seed -1: expected a non-negative integer"),
    (["--cold_items", "x"], "argument --cold_items: invalid float value"),
    (["--content", "yes"], "argument --content: invalid choice"),
])
def test_bad_cold_flags_exit_2_with_one_line(tmp_path, capsys, cold_src, args, message):
    src, _ = cold_src
    with pytest.raises(SystemExit) as e:
        cp.main(["--format", "movielens", "--input", src, "--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_bad_tags_file_exits_2(tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    (m / "ratings.csv").write_text("userId,movieId,rating,timestamp\n5,3,4.0,100\n5,1,2.5,90\n5,2,5.0,95\n")
    (m / "movies.csv").write_text("movieId,title,genres\n1,A (2003),Drama\n2,B,Crime\n3,C,Crime\n")
    (m / "tags.csv").write_text("userId,movieId,tag,timestamp\n5,x,good,1\n")
    with pytest.raises(SystemExit) as e:
        cp.main(["--format", "movielens", "--input", str(m), "--out", str(tmp_path / "o"), "--cold_items", "0.4"])
    assert e.value.code == 2 and "tags.csv:2: movie id 'x' is not an integer" in capsys.readouterr().err


def test_content_baseline_ranks_match_naive_loop(tmp_path, cold_src, capsys):
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import content_baseline as cb
    src, _ = cold_src
    cp.convert("movielens", src, str(tmp_path / "o"), cold_items=0.25, seed=2)
    o = load_out(tmp_path / "o")
    vecs = load_pickle(tmp_path / "o" / cp.CONTENT_FILE)
    cands = [p["creative_id"] for p in o["test"]["set"]]
    gt = {g["user_id"]: g["creative_id"] for g in o["test"]["gt"]}
    want = []
    for u, ev in histories(o, "test").items():
        hist = [i for i, _, _ in ev]
        m = np.mean([vecs[i] for i in hist], axis=0)
        score = {c: -math.inf if c in hist else float(np.dot(vecs[c], m) / np.linalg.norm(m)) for c in cands}
        t = gt[u]
        want.append(math.inf if score[t] == -math.inf else sum(score[c] >= score[t] for c in cands))
    _, users = cb.read_split(str(tmp_path / "o" / "test"), o["indexer"])
    got = cb.ranks(cands, users, {k: np.array(v, np.float64) for k, v in vecs.items()})
    assert [len(cands) + 1 if w == math.inf else w for w in want] == got.tolist()
    cb.main(["--data", str(tmp_path / "o")])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    hr = sum(w <= 10 for w in want) / len(want)
    ndcg = sum(1 / math.log2(w + 1) for w in want if w <= 10) / len(want)
    assert rows["all"] == [str(len(want)), f"{hr:.4f}", f"{ndcg:.4f}"] and hr > 0
    rnd_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / len(cands)
    assert rows["random"] == [f"{10 / len(cands):.4f}", f"{rnd_ndcg:.4f}"]
    n_cold = sum(g["creative_id"] not in o["indexer"]["i"] for g in o["test"]["gt"])
    assert rows["cold"][0] == str(n_cold) and int(rows["warm"][0]) == len(want) - n_cold


@pytest.mark.parametrize("fmt, path, cold, candidates", [
    ("movielens", "data/ml-100k", 336, 1682),
    ("s3rec", "data/s3rec-Beauty/Beauty.txt", 2420, 12101),
])
def test_real_public_datasets_cold(tmp_path, fmt, path, cold, candidates):
    src = SHARED / path
    if not src.exists():
        pytest.skip(f"{src} not present")
    meta = cp.convert(fmt, str(src), str(tmp_path), cold_items=0.2, seed=0)
    assert (meta["cold_items"]["items"], meta["cold_items"]["candidates"]) == (cold, candidates)
    ix = load_pickle(tmp_path / "train/indexer.pkl")
    assert len(ix["i"]) == candidates - cold
    n_items = len(ix["i"])
    for p in ("train/seq.jsonl", "valid/predict_seq.jsonl", "test/predict_seq.jsonl"):
        assert all(0 < r[1] <= n_items for line in read_jsonl(tmp_path / p) for r in line[:-1])
    assert len(load_pickle(tmp_path / cp.CONTENT_FILE)) == candidates
