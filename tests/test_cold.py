"""Cold items: semantic-id codes of table rows and of cold candidates against brute force, the
cold-id rule (a cold item's vector is the same whether the training indexer lists it or only the
predict set does), trained items against a naive count, the cold/warm validation split by hand,
the codebook's refusals, and a tiny train -> infer run with semantic ids."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dataset as D  # noqa: E402
import layout  # noqa: E402
import model as M  # noqa: E402
import precompute_sid as S  # noqa: E402
import validation as V  # noqa: E402
from test_precompute_sid import make_train, naive_assign, naive_normalize  # noqa: E402

N_ITEMS, DIM, CID = 30, 5, 1000


def naive_codes(v, book):
    """Level by level: the nearest centroid of the normalised vector's residual (1-based)."""
    r, out = naive_normalize([float(x) for x in v]), []
    for C in book["centroids"]:
        j = naive_assign([r], C.tolist())[0][0]
        out.append(j + 1)
        r = [x - c for x, c in zip(r, C[j])]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A training folder: items 1..30, vectors for 1..27 and for 6 creative ids the indexer lacks
    (cold candidates), and precompute_sid's outputs (3 levels x 4 codes)."""
    root = tmp_path_factory.mktemp("cold")
    rng = np.random.default_rng(5)
    vecs = {r: rng.normal(size=DIM).astype(np.float32) for r in range(1, 28)}
    make_train(root / "train", vecs, n_items=N_ITEMS, cid_base=CID)
    emb = root / "train" / "creative_emb" / f"emb_81_{DIM}.pkl"
    every = layout.load_pickle(emb)
    cold = {5000 + j: rng.normal(size=DIM).astype(np.float32) for j in range(6)}
    layout.dump_pickle({**every, **cold}, emb)
    S.main(["--data_dir", str(root / "train"), "--output_dir", str(root / "sid"), "--levels", "3", "--codes", "4"])
    return root, vecs, cold


def data_cfg(root, **kw):
    sid = D.load_sid_codebook(str(root / "sid"), str(root / "train"))
    return layout.DataConfig(maxlen=4, num_users=3, num_items=N_ITEMS, mm_emb_id=["81"], mm_dims={"81": DIM},
                             item_sparse={"100": 4}, use_timefeat=False, use_sid=True, sid=sid, **kw)


def table_of(root, cfg, indexer_items, cache):
    idx = {"u": {}, "i": {CID + r: r for r in indexer_items}, "f": {}}
    feats = {str(r): {"100": 1 + r % 3} for r in indexer_items}
    return D.ItemTable(cfg, idx, feats, str(root / "train" / "creative_emb"), str(cache))


def test_table_codes_match_precompute_and_brute_force(folder, tmp_path):
    root, vecs, cold = folder
    cfg = data_cfg(root)
    table = table_of(root, cfg, range(1, N_ITEMS + 1), tmp_path)
    codes, book, _ = S.load_sid(root / "sid")
    # the training items: precompute_sid's own codes; items 28..30 have no vector: code 0
    assert table.sid[1:].tolist() == codes[1:, :3].tolist()
    assert table.sid[28:].tolist() == [[0, 0, 0]] * 3 and table.sid[0].tolist() == [0, 0, 0]
    # cold candidates (not in the indexer): codes from the saved codebook, no refit
    rows = table.extend(sorted(cold), [{"100": 2}] * len(cold))
    for r, c in zip(rows.tolist(), sorted(cold)):
        assert table.sid[r].tolist() == naive_codes(cold[c], book)
    got = table.gather(rows, "cand_")["cand_sid"]
    assert got.tolist() == [naive_codes(cold[c], book) for c in sorted(cold)]


def test_cold_item_vector_is_the_same_built_either_way(folder, tmp_path):
    """Item 7 without a training event: listed by the training indexer (an untrained id row) or
    only by the predict set (a cold candidate appended at inference) -> the same vector under the
    mask rule; with --cold_ids keep the untrained row makes them differ (the test can fail)."""
    root, _, _ = folder
    cfg = data_cfg(root)
    listed = table_of(root, cfg, range(1, N_ITEMS + 1), tmp_path / "a")
    unlisted = table_of(root, cfg, [r for r in range(1, N_ITEMS + 1) if r != 7], tmp_path / "b")
    row = unlisted.extend([CID + 7], [{"100": 1 + 7 % 3}])
    trained = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    trained[7] = False
    for rule, same in (("mask", True), ("keep", False)):
        torch.manual_seed(0)
        m = M.GenerativeRecommender(M.ModelConfig(hidden_units=16, feat_dim=8, cold_ids=rule), cfg).eval()
        m.set_trained_items(trained)
        a = m.item_vectors(listed.gather(np.array([7]), "cand_"))
        b = m.item_vectors(unlisted.gather(row, "cand_"))
        assert torch.allclose(a, b) == same
        warm = m.item_vectors(listed.gather(np.array([8]), "cand_"))       # a trained item keeps its id row
        ids_off = dict(listed.gather(np.array([8]), "cand_"), cand_id=torch.zeros(1, dtype=torch.long))
        assert not torch.allclose(warm, m.item_vectors(ids_off))


def test_item_id_dropout_shows_items_as_new_in_training_only(folder, tmp_path):
    root, _, _ = folder
    cfg = data_cfg(root)
    table = table_of(root, cfg, range(1, N_ITEMS + 1), tmp_path)
    torch.manual_seed(0)
    m = M.GenerativeRecommender(M.ModelConfig(hidden_units=16, feat_dim=8), cfg)
    m.set_id_dropout(0.0, 1.0)
    assert m.user_tower.id_dropout == 0.0 and m.item_tower.id_dropout == 1.0
    x = table.gather(np.arange(1, 11), "c_")
    m.train()
    dropped = m.embed_items(x, "c_")
    m.eval()
    as_new = m.embed_items(dict(x, c_id=torch.full((10,), -1, dtype=torch.long)), "c_")    # the new-item row
    torch.testing.assert_close(dropped, as_new)
    assert not torch.allclose(as_new, m.embed_items(x, "c_"))


def test_trained_items_against_a_naive_count(tmp_path):
    rows = [[[1, None, {}, None, None, 10], [1, 3, None, {}, 1, 11], [1, 4, None, {}, 0, 12], [1, 5, None, {}, 1, 13]],
            [[2, 4, None, {}, 0, 5], [2, 6, None, {}, 1, 6], [2, 7, None, {}, 0, 7]],
            [[3, 3, None, {}, 1, 1], [3, 8, None, {}, 1, 2]]]
    seq = tmp_path / "seq.jsonl"
    offsets, pos = [], 0
    with open(seq, "wb") as f:
        for r in rows:
            line = (json.dumps(r) + "\n").encode()
            offsets.append(pos)
            pos += len(line)
            f.write(line)
    counts = np.zeros(10)
    for r in rows:
        for rec in r:
            if rec[1] is not None:
                counts[rec[1]] += 1
    cut = {1: 1, 2: 1}              # line 1 keeps item 4 only; line 2 keeps item 3 only
    got = D.trained_items(counts, str(seq), offsets, cut)
    kept = [rec[1] for rec in rows[0] if rec[1] is not None] + [4, 3]
    assert got.tolist() == [i in kept for i in range(10)]
    assert got.tolist() == [False, False, False, True, True, True, False, False, False, False]


def test_cold_warm_split_hand_computed():
    ranks = np.array([1, 3, 20, V.MISS, 2])
    cold = np.array([True, False, True, False, False])
    m = V.split_metrics(ranks, cold, (10,))
    assert m["HR@10"] == pytest.approx(3 / 5) and m["cold_share"] == pytest.approx(2 / 5)
    assert m["cold_HR@10"] == pytest.approx(1 / 2) and m["cold_NDCG@10"] == pytest.approx(1 / 2)
    assert m["warm_HR@10"] == pytest.approx(2 / 3)
    assert m["warm_NDCG@10"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3)) / 3)
    only_warm = V.split_metrics(ranks, np.zeros(5, bool), (10,))
    assert "cold_HR@10" not in only_warm and only_warm["warm_HR@10"] == pytest.approx(3 / 5)


def test_codebook_refusals(folder, tmp_path):
    root, vecs, _ = folder
    with pytest.raises(layout.DataError, match="no sid_meta.json"):
        D.load_sid_codebook(str(tmp_path / "nothing"), str(root / "train"))
    other = make_train(tmp_path / "other", vecs, n_items=N_ITEMS, cid_base=CID)
    with pytest.raises(layout.DataError, match="not of the training folder"):
        D.load_sid_codebook(str(root / "sid"), str(other))
    with pytest.raises(layout.DataError, match="holds no codebook"):
        D.sid_codebook(layout.DataConfig(use_sid=True))
    cfg = data_cfg(root)
    with pytest.raises(layout.DataError, match="does not read"):
        D.ItemTable(layout.DataConfig(num_items=N_ITEMS, use_sid=True, sid=cfg.sid), {"i": {}}, {})
    idx = other / "indexer.pkl"
    layout.dump_pickle(layout.load_pickle(idx), idx)          # rewritten: size or time change
    os.utime(idx, ns=(1, 1))
    with pytest.raises(layout.DataError, match="as it was then"):
        sid2 = tmp_path / "sid2"
        S.main(["--data_dir", str(other), "--output_dir", str(sid2), "--levels", "1", "--codes", "2"])
        os.utime(idx, ns=(2, 2))
        D.load_sid_codebook(str(sid2), str(other))


def sh(*args, **extra):
    """Run a repository script; its stdout (fails the test with its output on a non-zero exit)."""
    r = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **{k: str(v) for k, v in extra.items()}})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def tiny_world(tmp_path) -> tuple:
    """A tiny demo world and the run's environment paths: (world, cache, run, paths)."""
    world, cache, run = tmp_path / "w", tmp_path / "cache", tmp_path / "run"
    sh("make_demo_data.py", "--out", world, "--users", 200, "--items", 300, "--eval_users", 60, "--sanity_users", 0)
    paths = dict(TRAIN_DATA_PATH=world / "train", USER_CACHE_PATH=cache, TRAIN_CKPT_PATH=run / "ckpt",
                 TRAIN_LOG_PATH=run / "log", TRAIN_TF_EVENTS_PATH=run / "tb", EVAL_DATA_PATH=world / "eval",
                 MODEL_OUTPUT_PATH=run / "ckpt", EVAL_RESULT_PATH=run / "res")
    return world, cache, run, paths


def test_train_and_infer_with_semantic_ids(tmp_path):
    """main.py --use_sid on a tiny demo world, then infer.py without any flag: the codebook and the
    trained-item mask travel in the checkpoint; the cold candidates get codes."""
    world, cache, run, paths = tiny_world(tmp_path)
    sh("precompute_sid.py", "--data_dir", world / "train", "--output_dir", cache / "sid", "--codes", 16)
    out = sh("main.py", "--use_sid", "--item_id_dropout", "0.2", "--num_epochs", 1, "--hidden_units", 16,
             "--num_workers", 0, **paths)
    assert "cold_share" in out
    sh("infer.py", **paths)
    ck = torch.load(next((run / "ckpt").glob("global_step*/model.pt")), weights_only=True, map_location="cpu")
    assert ck["data_config"]["use_sid"] and len(ck["data_config"]["sid"]["centroids"]) == 3
    trained = ck["model"]["item_trained"]
    assert trained.dtype == torch.bool and not trained[0] and trained.sum() > 0
    result = json.loads((run / "res" / "result.json").read_text())
    assert result


def write_seq(path, rows):
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for r in rows:
            line = (json.dumps(r) + "\n").encode()
            offsets.append(pos)
            pos += len(line)
            f.write(line)
    return offsets


def test_young_until_against_a_naive_sort(tmp_path):
    rng = np.random.default_rng(3)
    rows, per_item = [], {}
    for u in range(1, 40):
        n = int(rng.integers(1, 12))
        ts = np.sort(rng.integers(0, 50, n))           # ties across users on purpose
        items = rng.integers(1, 9, n)
        rows.append([[u, int(i), None, {}, 1, int(t)] for i, t in zip(items, ts)])
    cut = {3: 1, 10: 2}
    for line, r in enumerate(rows):
        for rec in r[:cut.get(line, len(r))]:
            per_item.setdefault(rec[1], []).append(rec[5])
    offsets = write_seq(tmp_path / "seq.jsonl", rows)
    for n in (0, 1, 3):
        got = D.young_until(str(tmp_path / "seq.jsonl"), offsets, cut, 10, n, chunk=7)
        want = [sorted(per_item[i])[n] if len(per_item.get(i, [])) > n else D.NEVER for i in range(11)]
        assert got.tolist() == want


def test_young_events_get_their_own_new_item_input(tmp_path):
    """The collate keys a young event apart from the same item's other events and gives it id -1;
    the model embeds id -1 and untrained ids with the new-item row, padding stays row 0."""
    cfg = layout.DataConfig(maxlen=4, num_users=3, num_items=6, item_sparse={"100": 3}, use_timefeat=False,
                            new_item_events=1)
    idx = {"u": {}, "i": {100 + r: r for r in range(1, 7)}, "f": {}}
    table = D.ItemTable(cfg, idx, {str(r): {"100": 1 + r % 2} for r in range(1, 7)})
    until = np.array([D.NEVER, 20, D.NEVER, 5, 0, 0, 0])      # item 1 new before t=20; item 2 always
    table.set_young(until)
    b = D.SequenceBuilder(cfg, table, {})
    events = [(1, None, 1, 10), (2, None, 1, 11), (1, None, 1, 30), (3, None, 1, 31)]
    s = b.build(1, None, events, train=True)
    assert s["seq_young"].tolist() == [False, False, True, True, False]        # user token, 1@10, 2@11, 1@30
    assert s["pos_young"].tolist() == [False, True, True, False, False]        # targets 1@10, 2@11, 1@30, 3@31
    import dataset_packed as P
    batch = P.PackedCollate(table)([s])
    seq_ids = batch["seq_id"][batch["seq_inv"]][0].tolist()
    assert seq_ids == [0, -1, -1, 1]                     # the user token is row 0 (shared padding trimmed)
    assert batch["pos_id"][batch["pos_inv"]][0].tolist() == [-1, -1, 1, 3]
    m = M.GenerativeRecommender(M.ModelConfig(hidden_units=8, feat_dim=4), cfg)
    trained = torch.tensor([False, True, False, True, True, True, True])
    m.set_trained_items(trained, torch.from_numpy(until))
    new = m.item_tower.new_id
    assert new == 7 and m.item_tower.id_emb.num_embeddings == 8
    seen = {}
    m.item_tower.forward = lambda x: seen.setdefault("id", x["id"].clone())
    m.embed_items({"c_id": torch.tensor([0, -1, 1, 2, 3])}, "c_")
    assert seen["id"].tolist() == [0, new, 1, new, 3]
