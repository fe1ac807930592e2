"""Tests for make_demo_data.py: the TencentGR layout (files parse, offsets, indexer, embeddings),
the eval contract (targets, histories, order, cold-start cases) checked against a naive re-run of
the simulation, the planted signal, reproducibility and the CLI (reuse, refusal, bad args)."""
import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import make_demo_data as mdd  # noqa: E402
from layout import load_pickle  # noqa: E402

SHARED = ROOT.parent / "shared"
TINY = ["--users", "200", "--items", "300", "--eval_users", "120", "--seed", "3"]


def make(out, extra=()):
    res = mdd.main(["--out", str(out), *TINY, *extra])
    assert res == 0
    return Path(out)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make(tmp_path_factory.mktemp("demo") / "d")


@pytest.fixture(scope="module")
def data(demo):
    ix = load_pickle(demo / "train/indexer.pkl")
    return dict(seq=lines(demo / "train/seq.jsonl"), pseq=lines(demo / "eval/predict_seq.jsonl"),
                pset=lines(demo / "eval/predict_set.jsonl"),
                gt=lines(demo / "eval/ground_truth.jsonl"),
                ix=ix, ifd=json.loads((demo / "train/item_feat_dict.json").read_text()),
                emb81=load_pickle(demo / "train/creative_emb/emb_81_32.pkl"))


def test_layout_files_exist(demo):
    for p in mdd.OUTPUT_FILES + ["demo_meta.json", "train/creative_emb/emb_82_64/_SUCCESS"]:
        assert (demo / p).is_file(), p
    parts = sorted((demo / "train/creative_emb/emb_82_64").glob("part-*"))
    assert len(parts) >= 2 and parts[0].name == "part-00000"


@pytest.mark.parametrize("seq, offs", [("train/seq.jsonl", "train/seq_offsets.pkl"),
                                       ("eval/predict_seq.jsonl", "eval/predict_seq_offsets.pkl")])
def test_offsets_point_to_line_starts(demo, seq, offs):
    offsets = load_pickle(demo / offs)
    raw = (demo / seq).read_bytes()
    starts, pos = [], 0
    for line in raw.splitlines(keepends=True):   # reference: cumulative line lengths
        starts.append(pos)
        pos += len(line)
    assert isinstance(offsets, list) and offsets == starts
    with open(demo / seq, "rb") as f:
        for o in offsets[::7]:
            f.seek(o)
            assert json.loads(f.readline())[0][0] is not None


def test_record_shapes_and_json_separators(demo, data):
    first = (demo / "train/seq.jsonl").read_text().split("\n")[0]
    assert first.startswith("[[") and ', null, {"112": ' in first   # json.dumps' separators
    for row in data["seq"] + data["pseq"]:
        for r in row:
            assert len(r) == 6
            if r[1] is None:
                assert r[3] is None and r[4] is None and isinstance(r[2], dict)
            else:
                assert r[2] is None and isinstance(r[3], dict) and r[4] in (0, 1, None)


def test_indexer_structure(data):
    ix = data["ix"]
    assert set(ix) == {"u", "i", "f", "a"} and ix["a"] == {1: 1, 0: 2}
    assert isinstance(ix["f"], collections.defaultdict)
    assert sorted(ix["u"].values()) == list(range(1, 201))
    assert all(k.startswith("user_") and len(k) == 13 for k in ix["u"])
    n_known = len(ix["i"])
    assert sorted(ix["i"].values()) == list(range(1, n_known + 1)) and n_known < 300
    assert all(isinstance(k, int) and k > 20000000000 for k in ix["i"])
    assert set(ix["f"]) == set(mdd.ITEM_FEATS + mdd.USER_SPARSE + mdd.USER_ARRAY)
    for fid, m in ix["f"].items():
        assert sorted(m.values()) == list(range(1, len(m) + 1)), fid
        assert all(isinstance(k, int) and k // 10**7 == int(fid) for k in m)
    assert len(ix["f"]["111"]) == n_known   # a second item id


def test_item_feat_dict_matches_records(data):
    ifd, n_known = data["ifd"], len(data["ix"]["i"])
    assert sorted(ifd, key=int) == [str(i) for i in range(1, n_known + 1)]
    card = {f: len(m) for f, m in data["ix"]["f"].items()}
    for row in data["seq"]:
        for r in row:
            if r[1] is not None:
                assert r[3] == ifd[str(r[1])]
                assert all(1 <= v <= card[f] for f, v in r[3].items())
            else:
                for f, v in r[2].items():
                    vals = v if isinstance(v, list) else [v]
                    assert 1 <= len(vals) <= 3 and all(1 <= x <= card[f] for x in vals)
    share115 = np.mean(["115" in d for d in ifd.values()])
    assert 0.2 < share115 < 0.5


def test_profile_last_with_later_timestamp(data):
    for row in data["seq"] + data["pseq"]:
        assert row[-1][1] is None and all(r[1] is not None for r in row[:-1])
        assert row[-1][5] > max(r[5] for r in row[:-1])
        ts = [r[5] for r in row[:-1]]
        assert ts == sorted(ts)


def test_clicks_null_actions_and_repeats(data):
    acts = collections.Counter(r[4] for row in data["seq"] for r in row[:-1])
    total = sum(acts.values())
    assert 0.05 < acts[1] / total < 0.16
    assert 0 < acts[None] / total < 0.04
    assert any(len({r[1] for r in row[:-1]}) < len(row) - 1 for row in data["seq"])


def test_multimodal_files(demo, data):
    e81 = data["emb81"]
    assert all(isinstance(k, int) and v.dtype == np.float32 and v.shape == (32,)
               for k, v in e81.items())
    assert np.allclose([np.linalg.norm(v) for v in e81.values()], 1, atol=1e-4)
    ids82 = set()
    for p in sorted((demo / "train/creative_emb/emb_82_64").glob("part-*")):
        for rec in lines(p):
            assert set(rec) == {"anonymous_cid", "emb"} and len(rec["emb"]) == 64
            ids82.add(rec["anonymous_cid"])
    assert ids82 == set(e81)
    # some catalogue items (known ones included) have no vector
    assert 0 < len(set(data["ix"]["i"]) - set(e81)) < len(data["ix"]["i"])


def test_pool_and_ground_truth(data):
    cids = [r["creative_id"] for r in data["pset"]]
    assert [r["retrieval_id"] for r in data["pset"]] == list(range(len(cids)))
    assert len(set(cids)) == len(cids) == 300   # the whole catalogue by default
    assert {g["creative_id"] for g in data["gt"]} <= set(cids)
    inv_u = {v: k for k, v in data["ix"]["u"].items()}
    assert len(data["gt"]) == len(data["pseq"]) > 50
    for row, g in zip(data["pseq"], data["gt"]):
        u = row[0][0]
        assert (u if isinstance(u, str) else inv_u[u]) == g["user_id"]


def test_cold_start_cases_present(data):
    ix, n_items = data["ix"], 300
    users = [row[0][0] for row in data["pseq"]]
    cold = [u for u in users if isinstance(u, str)]
    assert cold and all(u not in ix["u"] for u in cold) and len(cold) < len(users) / 5
    slots = [r[1] for row in data["pseq"] for r in row if r[1] is not None]
    raw = [s for s in slots if s > n_items]
    assert raw and all(s not in ix["i"].values() and s > 20000000000 for s in raw)
    str_feats = [f for r in data["pset"] for f, v in r["features"].items() if isinstance(v, str)]
    assert "111" in str_feats and "102" in str_feats
    new_cands = [r["creative_id"] for r in data["pset"] if r["creative_id"] not in ix["i"]]
    assert new_cands and any(c not in data["emb81"] for c in new_cands)


def test_eval_against_naive_rerun(demo, data):
    """Re-run the simulation of the (only) training chunk and check, with plain loops, that each
    predict user's target is their first click after the cutoff, the history is every event
    before it, and the training line is every event before the cutoff."""
    ns = argparse.Namespace(**json.loads((demo / "demo_meta.json").read_text())["args"])
    W = mdd._init_world(ns)
    raw_id, re_id = mdd._user_ids(ns)
    sim = mdd.simulate_users(W, np.random.default_rng([ns.seed, 1, 0]), 200, False)
    gt = {g["user_id"]: (g["creative_id"], row) for g, row in zip(data["gt"], data["pseq"])}
    train = {row[0][0]: row for row in data["seq"]}
    checked = 0
    for k, u in enumerate(sim["order"]):
        events = [(int(sim["items"][u, j]), bool(sim["click"][u, j]), int(sim["t"][u, j]))
                  for j in range(sim["n"][u])]
        before = [e for e in events if e[2] < W.T]
        trow = train[re_id(k)]
        assert [(r[5], r[4] == 1) for r in trow[:-1]] == [(e[2], e[1]) for e in before]
        first = next((j for j, e in enumerate(events) if e[1] and e[2] >= W.T), None)
        if raw_id(k) not in gt:
            continue
        checked += 1
        cid, prow = gt[raw_id(k)]
        assert first is not None and cid == int(W.cid[events[first][0]])
        hist = prow[:-1]
        assert [(r[5], r[4] == 1) for r in hist] == [(e[2], e[1]) for e in events[:first]]
        assert all(r[5] < events[first][2] for r in hist)
        assert trow[:-1] == hist[:len(trow) - 1]   # all training events, identical records
    assert checked > 30


def test_planted_signal(demo):
    q = json.loads((demo / "demo_meta.json").read_text())["sanity"]
    assert q["oracle"]["score"] > 3 * q["most_popular"]["score"]
    assert q["oracle"]["hr10"] > 5 * q["random_hr10"]
    assert q["most_popular"]["hr10"] > q["random_hr10"]
    assert all(v < q["oracle"]["score"] for v in q["oracle_score_without"].values())


def test_same_seed_identical_bytes_other_seed_differs(demo, tmp_path):
    again = make(tmp_path / "again")
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for p in files:
        assert (demo / p).read_bytes() == (again / p).read_bytes(), p
    other = make(tmp_path / "other", ["--seed", "4"])
    assert (other / "train/seq.jsonl").read_bytes() != (demo / "train/seq.jsonl").read_bytes()


def test_sanity_sample_leaves_the_data_unchanged(demo, tmp_path):
    """--sanity_users only shrinks the check: same files byte for byte (no spill file left
    behind), and the meta says how many eval users were scored."""
    small = make(tmp_path / "small", ["--sanity_users", "30"])
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    for p in files:
        if p.name != "demo_meta.json":
            assert (demo / p).read_bytes() == (small / p).read_bytes(), p
    meta = json.loads((small / "demo_meta.json").read_text())
    full = json.loads((demo / "demo_meta.json").read_text())
    assert meta["summary"]["sanity_users"] == 30
    assert full["summary"]["sanity_users"] == full["summary"]["eval_users"]
    assert meta["sanity"] != full["sanity"]


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "make_demo_data.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_reuses_refuses_and_rejects(demo, tmp_path):
    before = os.stat(demo / "train/seq.jsonl").st_mtime_ns
    r = run_cli("--out", str(demo), *TINY)
    assert r.returncode == 0 and "reused" in r.stdout
    assert os.stat(demo / "train/seq.jsonl").st_mtime_ns == before
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train/seq.jsonl").write_text("real data\n")
    r = run_cli("--out", str(foreign), *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (foreign / "train/seq.jsonl").read_text() == "real data\n"
    r = run_cli("--out", str(tmp_path / "bad"), "--users", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--users" in r.stderr


def test_real_sample_shapes_match(data):
    """The real TencentGR_1k fragment: same record layout and feature-id sets."""
    head = SHARED / "data/taac_sample/seq_head88.jsonl"
    if not head.exists():
        pytest.skip("../shared/data/taac_sample not available")
    real = json.loads(head.read_text().split("\n")[0])
    real_item_fids = {f for r in real if r[1] is not None for f in r[3]}
    ours = {f for row in data["seq"] for r in row if r[1] is not None for f in r[3]}
    assert real_item_fids <= set(mdd.ITEM_FEATS) and ours == set(mdd.ITEM_FEATS)
    assert [type(x) for x in real[0]] == [type(x) for x in data["seq"][0][0]]
