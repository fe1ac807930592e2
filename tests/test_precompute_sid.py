"""Tests for precompute_sid.py: k-means++, Lloyd and RQ-KMeans against pure-python loops, codes of
unseen vectors against brute force, the collision column, reserved codes, --reuse, capped K,
bad input and the real TencentGR sample (skipped when ../shared is absent)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import layout  # noqa: E402
import precompute_sid as P  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "taac_sample"


# ---------------------------------------------------------------------------------------------
# Naive references: lists of floats, one loop per sum
# ---------------------------------------------------------------------------------------------

def sq(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def naive_assign(X, C):
    """Nearest centroid (first one on ties) and the squared distance, by exact differences."""
    a, d = [], []
    for x in X:
        best, bd = 0, sq(x, C[0])
        for j in range(1, len(C)):
            dj = sq(x, C[j])
            if dj < bd:
                best, bd = j, dj
        a.append(best)
        d.append(bd)
    return a, d


def naive_kmeans_pp(X, K, rng):
    first = int(rng.integers(len(X)))
    chosen = [first]
    D = [sq(x, X[first]) for x in X]
    while len(chosen) < K:
        run, total = [], 0.0
        for v in D:
            total += v
            run.append(total)
        if total <= 0:
            break
        u = rng.random() * total
        i = next((j for j, r in enumerate(run) if r > u), max(j for j, v in enumerate(D) if v > 0))
        chosen.append(i)
        D = [min(v, sq(x, X[i])) for v, x in zip(D, X)]
    return [list(X[i]) for i in chosen]


def naive_lloyd(X, C, iters):
    C, prev = [list(c) for c in C], None
    for _ in range(iters):
        a, d = naive_assign(X, C)
        if a == prev:
            break
        new = []
        for j in range(len(C)):
            members = [X[i] for i in range(len(X)) if a[i] == j]
            new.append([sum(col) / len(members) for col in zip(*members)] if members else None)
        far = sorted(range(len(X)), key=lambda i: -d[i])        # stable: ties keep the lower row
        empty = [j for j in range(len(C)) if new[j] is None]
        for j, i in zip(empty, far):
            new[j] = list(X[i])
        C, prev = new, a
    return C


def naive_rq(X, levels, K, iters, seed):
    rng = np.random.default_rng(seed)
    R = [list(map(float, x)) for x in X]
    codes = [[] for _ in X]
    books = []
    for _ in range(levels):
        C = naive_lloyd(R, naive_kmeans_pp(R, K, rng), iters)
        a, _ = naive_assign(R, C)
        for i, j in enumerate(a):
            codes[i].append(j + 1)
            R[i] = [r - c for r, c in zip(R[i], C[j])]
        books.append(C)
    return books, codes


def naive_normalize(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else list(v)


# ---------------------------------------------------------------------------------------------
# Tiny training folders
# ---------------------------------------------------------------------------------------------

def make_train(root, vectors, n_items=None, cid_base=1000, fid="81", spark=False):
    """vectors: {item re-id: vector}; the indexer maps creative id cid_base + r -> r for
    r = 1..n_items (default: the largest re-id given). spark: JSON-lines shards instead of a pickle."""
    n_items = n_items or max(vectors)
    root.mkdir(parents=True, exist_ok=True)
    layout.dump_pickle({"u": {}, "i": {cid_base + r: r for r in range(1, n_items + 1)}, "f": {}, "a": {}},
                       root / "indexer.pkl")
    emb = root / "creative_emb"
    emb.mkdir(exist_ok=True)
    dim = len(next(iter(vectors.values())))
    if spark:
        shard = emb / f"emb_{fid}_{dim}"
        shard.mkdir(exist_ok=True)
        (shard / "part-00000").write_text("".join(
            json.dumps({"anonymous_cid": cid_base + r, "emb": [float(x) for x in v]}) + "\n"
            for r, v in vectors.items()))
    else:
        layout.dump_pickle({cid_base + r: np.asarray(v, np.float32) for r, v in vectors.items()},
                           emb / f"emb_{fid}_{dim}.pkl")
    return root


def run_main(capsys, *argv):
    P.main([str(a) for a in argv])
    return capsys.readouterr()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "precompute_sid.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, **(env or {})})


def random_vectors(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    return {r: rng.normal(size=dim).astype(np.float32) for r in range(1, n + 1)}


# ---------------------------------------------------------------------------------------------
# The fit against the naive loops
# ---------------------------------------------------------------------------------------------

def test_kmeans_pp_matches_naive():
    X = np.random.default_rng(3).normal(size=(30, 3))
    ours = P.kmeans_pp(X, 5, np.random.default_rng(7))
    ref = naive_kmeans_pp(X.tolist(), 5, np.random.default_rng(7))
    assert ours.tolist() == ref


def test_lloyd_matches_naive_and_reseeds_an_empty_cluster():
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(0, 0.3, (10, 2)), rng.normal(5, 0.3, (10, 2)), [[20.0, 20.0]]])
    # centroid 2 at (100, 100) loses every point to (20, 20)'s nearer centroid 1: re-seeded with
    # the farthest point from its centroid
    C0 = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])
    ours = P.lloyd(X, C0, 10)
    ref = naive_lloyd(X.tolist(), C0.tolist(), 10)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert P.nearest(X, ours)[0].tolist() == naive_assign(X.tolist(), ref)[0]
    assert [100.0, 100.0] not in ours.tolist()
    assert np.bincount(P.nearest(X, ours)[0], minlength=3).min() >= 1


def test_rq_kmeans_matches_naive():
    X = np.random.default_rng(5).normal(size=(40, 3))
    books, codes = P.fit_rq_kmeans(X, levels=3, K=4, iters=8, seed=11)
    ref_books, ref_codes = naive_rq(X.tolist(), 3, 4, 8, 11)
    assert codes.tolist() == ref_codes
    for ours, ref in zip(books, ref_books):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # deeper levels quantise what the earlier ones left: the residual shrinks
    R, energy = X.copy(), []
    for level, C in enumerate(books):
        R -= C[codes[:, level] - 1]
        energy.append((R ** 2).sum())
    assert energy[0] > energy[1] > energy[2]


def test_nearest_chunks_give_the_same_answer(monkeypatch):
    X = np.random.default_rng(6).normal(size=(50, 4))
    C = np.random.default_rng(7).normal(size=(6, 4))
    whole = P.nearest(X, C)[0]
    monkeypatch.setattr(P, "CHUNK_ELEMS", 6 * 7)    # 7 rows a chunk
    assert P.nearest(X, C)[0].tolist() == whole.tolist() == naive_assign(X.tolist(), C.tolist())[0]


def test_dedup_column_by_hand():
    codes = np.array([[1, 2], [3, 1], [1, 2], [1, 2], [3, 1], [2, 2]])
    assert P.dedup_column(codes).tolist() == [0, 0, 1, 2, 1, 0]
    assert P.collision_stats(codes) == {"unique_codes": 3, "items_in_collisions": 5,
                                        "codes_with_collisions": 2, "max_collision_depth": 3}


# ---------------------------------------------------------------------------------------------
# The script's outputs
# ---------------------------------------------------------------------------------------------

def test_unseen_vectors_get_brute_force_codes(tmp_path, capsys):
    vecs = random_vectors(60, 5, seed=1)
    data = make_train(tmp_path / "train", vecs)
    run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--levels", 3, "--codes", 4)
    codes, book, meta = P.load_sid(tmp_path / "sid")
    assert meta["codes_per_level"] == [4, 4, 4] and book["normalize"] and book["dims"] == [5]
    # the saved codebook reproduces the training codes
    rows = sorted(vecs)
    assert P.assign_codes(np.stack([vecs[r] for r in rows]), book).tolist() == codes[rows, :3].tolist()
    # vectors training never saw: nearest centroid level by level, by brute force
    new = np.random.default_rng(99).normal(scale=7.0, size=(25, 5)).astype(np.float32)
    got = P.assign_codes(new, book)
    for v, g in zip(new.tolist(), got.tolist()):
        r, want = naive_normalize(v), []
        for C in book["centroids"]:
            j = naive_assign([r], C.tolist())[0][0]
            want.append(j + 1)
            r = [x - c for x, c in zip(r, C[j])]
        assert g == want


def test_duplicates_get_a_collision_column_and_k_is_capped(tmp_path, capsys):
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    data = make_train(tmp_path / "train", {1: a, 2: b, 3: a, 4: b, 5: a, 6: a})
    out = run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--codes", 8)
    codes, _, meta = P.load_sid(tmp_path / "sid")
    # two distinct vectors: level 1 has 2 codes, the residuals are all zero: 1 code after
    assert meta["codes_per_level"] == [2, 1, 1]
    assert "notice: codes per level capped to [2, 1, 1] (fewer distinct vectors than --codes 8)\n" in out.err
    assert codes[1, :3].tolist() == codes[3, :3].tolist() == codes[5, :3].tolist() == codes[6, :3].tolist()
    assert codes[2, :3].tolist() == codes[4, :3].tolist() != codes[1, :3].tolist()
    assert codes[1:, 3].tolist() == [0, 0, 1, 1, 2, 3]     # by re-id order within each group
    assert len({tuple(r) for r in codes[1:].tolist()}) == 6
    assert meta["collisions"]["max_collision_depth"] == 4 and meta["dedup_vocab"] == 4
    assert meta["code_usage"] == [2, 1, 1]


def test_more_codes_than_items(tmp_path, capsys):
    data = make_train(tmp_path / "train", random_vectors(5, 4, seed=2))
    out = run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--codes", 256, "--levels", 2)
    codes, _, meta = P.load_sid(tmp_path / "sid")
    assert meta["codes_per_level"] == [5, 1]
    assert sorted(codes[1:, 0].tolist()) == [1, 2, 3, 4, 5]     # each item its own centroid
    assert codes[1:, 1].tolist() == [1] * 5 and codes[1:, 2].tolist() == [0] * 5
    assert "capped to [5, 1]" in out.err


def test_items_without_vectors_get_the_reserved_code(tmp_path, capsys):
    vecs = random_vectors(8, 3, seed=3)
    for r in (2, 5):
        del vecs[r]
    data = make_train(tmp_path / "train", vecs, n_items=10)        # 9 and 10 have none either
    out = run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--codes", 3)
    codes, _, meta = P.load_sid(tmp_path / "sid")
    assert codes.shape == (11, 4)
    for r in (0, 2, 5, 9, 10):
        assert codes[r].tolist() == [0, 0, 0, 0]
    assert (codes[[1, 3, 4, 6, 7, 8], :3] >= 1).all()
    assert meta["items_without_vectors"] == 4 and meta["items_with_vectors"] == 6
    assert ("notice: 4 of 10 items have no vector of feature(s) 81; they get the reserved code 0 at "
            "every level\n") in out.err


def test_two_features_are_normalised_per_block(tmp_path, capsys):
    v81, v82 = random_vectors(12, 2, seed=4), random_vectors(12, 3, seed=5)
    data = make_train(tmp_path / "train", v81)
    make_train(tmp_path / "train", v82, fid="82", spark=True)
    del v82[4]                                                  # item 4 lacks feature 82
    (next((data / "creative_emb").glob("emb_82_*")) / "part-00000").write_text("".join(
        json.dumps({"anonymous_cid": 1000 + r, "emb": v.tolist()}) + "\n" for r, v in v82.items()))
    run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--mm_emb_id", "81", "82",
             "--codes", 3, "--levels", 2)
    codes, book, meta = P.load_sid(tmp_path / "sid")
    assert book["dims"] == [2, 3] and book["feature_ids"] == ["81", "82"] and meta["items_with_vectors"] == 11
    assert codes[4].tolist() == [0, 0, 0]
    raw = np.array([0.3, -4.0, 2.0, 0.0, 1.0])
    want = (naive_normalize(raw[:2].tolist()) + naive_normalize(raw[2:].tolist()))
    want = [x / math.sqrt(2) for x in want]
    np.testing.assert_allclose(P.prepare(raw[None], [2, 3], True)[0], want, rtol=0, atol=1e-15)
    rows = [r for r in range(1, 13) if r != 4]
    X = np.stack([np.concatenate([v81[r], v82[r]]) for r in rows])
    assert P.assign_codes(X, book).tolist() == codes[rows, :2].tolist()


def test_reuse_skips_and_a_changed_source_refits(tmp_path, capsys):
    vecs = random_vectors(30, 4, seed=6)
    data = make_train(tmp_path / "train", vecs)
    sid = tmp_path / "sid"
    args = ["--data_dir", data, "--output_dir", sid, "--codes", 4, "--reuse"]
    assert "wrote" in run_main(capsys, *args).out
    meta_path = sid / P.META_FILE
    stamp = meta_path.stat().st_mtime_ns
    assert "up to date" in run_main(capsys, *args).out
    assert meta_path.stat().st_mtime_ns == stamp
    assert "wrote" in run_main(capsys, *args[:-1], "--levels", 2, "--reuse").out     # other options
    assert P.load_sid(sid)[2]["levels"] == 2
    assert "wrote" in run_main(capsys, *args).out
    first = np.load(sid / P.CODES_FILE)
    # a changed vector file refits and its codes follow the new vectors
    vecs[1] = -vecs[1] * 10
    pkl = data / "creative_emb" / "emb_81_4.pkl"
    layout.dump_pickle({1000 + r: v for r, v in vecs.items()}, pkl)
    os.utime(pkl, ns=(stamp + 10**9, stamp + 10**9))
    assert "wrote" in run_main(capsys, *args).out
    codes, book, _ = P.load_sid(sid)
    assert P.assign_codes(vecs[1], book)[0].tolist() == codes[1, :3].tolist()
    assert not np.array_equal(first, codes)
    assert "up to date" in run_main(capsys, *args).out
    # a shard added for the same feature is a changed source too
    shard = data / "creative_emb" / "emb_81_4x"
    shard.mkdir()
    (shard / "part-00000").write_text(json.dumps({"anonymous_cid": 1031, "emb": [1, 2, 3, 4]}) + "\n")
    assert "wrote" in run_main(capsys, *args).out
    assert P.load_sid(sid)[2]["unknown_cids"] == 1
    meta_path.write_text("[]")                      # a meta that is not ours: refit, never a traceback
    assert "wrote" in run_main(capsys, *args).out


def test_same_seed_same_bytes_and_env_defaults(tmp_path):
    data = make_train(tmp_path / "train", random_vectors(40, 4, seed=7))
    r = run_cli("--codes", 5, env={"TRAIN_DATA_PATH": str(data), "USER_CACHE_PATH": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    r = run_cli("--data_dir", data, "--output_dir", tmp_path / "again", "--codes", 5)
    assert r.returncode == 0, r.stderr
    for name in (P.CODES_FILE, P.CODEBOOK_FILE):
        assert (tmp_path / "cache" / "sid" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------

def test_non_finite_vector_one_line_or_skipped(tmp_path, capsys):
    vecs = random_vectors(6, 3, seed=8)
    vecs[4] = np.array([0.1, np.nan, 0.2], np.float32)
    data = make_train(tmp_path / "train", vecs)
    r = run_cli("--data_dir", data, "--output_dir", tmp_path / "sid")
    pkl = data / "creative_emb" / "emb_81_3.pkl"
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: {pkl}: creative id 1004: feature 81 vector holds nan at index 1, "
                        f"expected finite numbers (or --skip_nonfinite)\n")
    out = run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--skip_nonfinite", "--codes", 2)
    codes, _, meta = P.load_sid(tmp_path / "sid")
    assert meta["skipped_nonfinite"] == 1 and codes[4].tolist() == [0, 0, 0, 0]
    assert "notice: 1 vectors hold NaN or inf; skipped (--skip_nonfinite)" in out.err


def test_non_finite_in_a_json_shard_names_line_and_creative_id(tmp_path):
    data = make_train(tmp_path / "train", {1: [0.0, 1.0], 2: [1.0, 0.0]}, spark=True)
    part = data / "creative_emb" / "emb_81_2" / "part-00000"
    part.write_text(part.read_text() + '{"anonymous_cid": 1002, "emb": [Infinity, 0.0]}\n')
    r = run_cli("--data_dir", data, "--output_dir", tmp_path / "sid")
    assert r.returncode == 2
    assert r.stderr == (f"error: {part}:3: creative id 1002: feature 81 vector holds inf at index 0, "
                        f"expected finite numbers (or --skip_nonfinite)\n")


@pytest.mark.parametrize("case", ["width", "no_emb", "no_fid", "no_indexer", "no_items", "levels", "fid"])
def test_bad_input_one_line(tmp_path, case):
    data = make_train(tmp_path / "train", {1: [0.0, 1.0], 2: [1.0, 0.0]}, spark=True)
    part = data / "creative_emb" / "emb_81_2" / "part-00000"
    extra, want = [], None
    if case == "width":
        part.write_text(part.read_text() + json.dumps({"anonymous_cid": 1003, "emb": [1.0, 2.0, 3.0]}) + "\n")
        want = f"{part}:3: feature 81 vector has 3 values, expected 2 like the first one ({part}:1)"
    elif case == "no_emb":
        emb = data / "creative_emb"
        for p in sorted(emb.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        emb.rmdir()
        want = f"{emb}: folder not found, expected the multimodal vectors (emb_{{fid}}_*.pkl or emb_{{fid}}_*/part-*)"
    elif case == "no_fid":
        extra = ["--mm_emb_id", "82"]
        want = (f"{data / 'creative_emb'}: no vectors for multimodal feature 82 "
                f"(looked for emb_82_*.pkl and emb_82_*/part-*)")
    elif case == "no_indexer":
        (data / "indexer.pkl").unlink()
        want = f"{data / 'indexer.pkl'}: file not found, expected the training folder's creative id -> item re-id map"
    elif case == "no_items":
        layout.dump_pickle({"i": {5: 1}}, data / "indexer.pkl")
        want = (f"{data / 'creative_emb'}: none of the 1 items of {data / 'indexer.pkl'} has a vector of "
                f"feature(s) 81, expected at least one")
    elif case == "levels":
        extra = ["--levels", "0"]
    elif case == "fid":
        extra = ["--mm_emb_id", "x"]
    r = run_cli("--data_dir", data, "--output_dir", tmp_path / "sid", *extra)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    if want:
        assert r.stderr == f"error: {want}\n"
    assert not (tmp_path / "sid" / P.META_FILE).exists()


def test_codebook_from_other_data(tmp_path, capsys):
    data = make_train(tmp_path / "train", random_vectors(10, 4, seed=9))
    run_main(capsys, "--data_dir", data, "--output_dir", tmp_path / "sid", "--codes", 3)
    book = P.load_codebook(tmp_path / "sid" / P.CODEBOOK_FILE)
    with pytest.raises(layout.DataError, match=r"^vectors of shape \(2, 5\), expected \[n, 4\] \(features 81: 4\); "
                                               r"is the codebook from other data\?$"):
        P.assign_codes(np.zeros((2, 5)), book)
    with pytest.raises(layout.DataError, match="^vector 1 holds a non-finite value"):
        P.assign_codes(np.array([[0, 0, 0, 1], [0, np.inf, 0, 0]]), book)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(layout.DataError, match=f"^{bad}: not a readable codebook"):
        P.load_codebook(bad)


def test_import_has_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, precompute_sid; assert 'torch' not in sys.modules"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# The real TencentGR_1k sample
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/taac_sample not present")
def test_real_sample(tmp_path, capsys):
    out = run_main(capsys, "--data_dir", SAMPLE, "--output_dir", tmp_path / "sid", "--codes", 32)
    codes, book, meta = P.load_sid(tmp_path / "sid")
    indexer = layout.load_pickle(SAMPLE / "indexer.pkl")
    vecs = {}
    for part in sorted((SAMPLE / "creative_emb" / "emb_81_32").iterdir()):
        for line in part.read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                vecs[indexer["i"][obj["anonymous_cid"]]] = obj["emb"]
    assert meta["num_items"] == max(indexer["i"].values()) == 58734
    assert meta["items_with_vectors"] == len(vecs) == 479 and meta["dims"] == [32]
    rows = sorted(vecs)
    has = np.zeros(len(codes), bool)
    has[rows] = True
    assert (codes[~has] == 0).all() and (codes[has, :3] >= 1).all()
    assert P.assign_codes(np.array([vecs[r] for r in rows]), book).tolist() == codes[rows, :3].tolist()
    assert len({tuple(r) for r in codes[rows].tolist()}) == 479
    assert "notice: 58255 of 58734 items have no vector" in out.err
