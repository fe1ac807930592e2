r"""Precompute semantic IDs of the training items: residual k-means (RQ-KMeans) over their
multimodal vectors, so an item is a short tuple of codes that items with similar content share,
and a cold item (never seen in training) can be given codes from its vector alone.

Reads <data_dir>/indexer.pkl (creative id -> item re-id) and the vectors of the chosen features
in <data_dir>/creative_emb/ (emb_{fid}_*.pkl or emb_{fid}_*/part-*, docs/DATA_FORMAT.md). With
several features an item's vector is their concatenation (each L2-normalised and scaled by
1/sqrt(#features) under --normalize), and an item needs all of them. Then, per level l = 1..L:
k-means++ initialisation (numpy default_rng(--seed), one stream for all levels), Lloyd
iterations until the assignment stops changing or --iters, code = nearest centroid, and the
next level is fitted on the residuals x - centroid. An empty cluster is re-seeded with the point
farthest from its centroid (ties: lowest row), so the fit is deterministic. When a level's input
has fewer distinct vectors than --codes, k-means++ runs out of points to pick and that level
gets fewer codes, with a one-line notice. faiss is not used: numpy fits 58k x 32 vectors into
3 x 256 codes in seconds, and one implementation keeps the codes reproducible.

Codes are 1..K_l; 0 is reserved for padding (row 0) and for items without a vector, which get 0
at every level (a notice counts them). Items sharing all L codes get an extra last column
0, 1, 2, ... in re-id order, so every item with a vector has a unique tuple.

Outputs in --output_dir (atomic writes; the meta is removed first and written last, so an
interrupted run is never reused):
  sid_codes.npy     int32 [num_items + 1, L + 1], row = item re-id (num_items = the largest
                    re-id in indexer.pkl; a re-id beyond it has no semantic id)
  sid_codebook.npz  centroids_0 .. centroids_{L-1} (float64 [K_l, dim]), normalize, dims,
                    feature_ids: all that assign_codes needs
  sid_meta.json     settings, source fingerprints, counts, code usage, collision statistics
assign_codes(raw_vectors, load_codebook(path)) gives the L codes of any vectors (no refit);
on the training vectors it reproduces the first L columns of sid_codes.npy. Uses numpy and
layout.py; no torch import.

  python -u precompute_sid.py --data_dir $TRAIN_DATA_PATH --output_dir $USER_CACHE_PATH/sid --reuse
"""
import argparse
import os
import sys
import time
import zipfile

import numpy as np

from layout import (ArgumentParser, DataError, _mm_cid, atomic_write, check_writable, dump_json, file_fingerprint,
                    iter_mm_vectors, load_pickle, mm_sources, read_json, run_cli, same_source, show_json)

CODES_FILE = "sid_codes.npy"
CODEBOOK_FILE = "sid_codebook.npz"
META_FILE = "sid_meta.json"
CHUNK_ELEMS = 1 << 23   # distance-matrix entries per chunk of nearest(): 64 MiB of float64


def read_item_ids(indexer_path) -> dict:
    """indexer.pkl's 'i' map as {creative id: item re-id}, re-ids checked to be ints >= 1."""
    indexer = load_pickle(indexer_path)
    if not isinstance(indexer, dict) or not isinstance(indexer.get("i"), dict):
        raise DataError(f"{indexer_path}: expected a dict whose 'i' entry maps creative ids to item re-ids")
    out = {}
    for cid, reid in indexer["i"].items():
        where = f"{indexer_path}: 'i' entry {show_json(cid)}"
        if not isinstance(reid, (int, np.integer)) or isinstance(reid, bool) or reid < 1:
            raise DataError(f"{where} maps to {show_json(reid)}, expected an item re-id (int >= 1)")
        out[_mm_cid(cid, where)] = int(reid)
    if not out:
        raise DataError(f"{indexer_path}: no items in its 'i' entry, expected creative id -> item re-id")
    return out


def read_item_vectors(emb_dir, fids, cid_to_reid, skip_nonfinite=False):
    """Per-feature float32 tables [num_items + 1, dim_f] by item re-id, and which rows hold a
    vector of every feature. Creative ids unknown to the indexer are checked, then ignored.

    Returns (tables, has_vector, stats); stats counts unknown ids, repeated ids (the last vector
    wins, as in dataset.py's cache) and vectors skipped as non-finite under skip_nonfinite.
    """
    if not os.path.isdir(emb_dir):
        raise DataError(f"{emb_dir}: folder not found, expected the multimodal vectors "
                        f"(emb_{{fid}}_*.pkl or emb_{{fid}}_*/part-*)")
    rows = max(cid_to_reid.values()) + 1
    tables, has = [], np.ones(rows, bool)
    has[0] = False
    stats = {"unknown_cids": 0, "repeated_cids": 0, "skipped_nonfinite": 0}
    for fid in fids:
        table, seen, bad_rows = None, np.zeros(rows, bool), np.zeros(rows, bool)
        first = None
        for cid, vec, where in iter_mm_vectors(emb_dir, fid):
            if table is None:
                table, first = np.zeros((rows, len(vec)), np.float32), where
            elif len(vec) != table.shape[1]:
                raise DataError(f"{where}: feature {fid} vector has {len(vec)} values, expected "
                                f"{table.shape[1]} like the first one ({first})")
            row = cid_to_reid.get(cid)
            bad = np.flatnonzero(~np.isfinite(vec))
            if bad.size:
                if not skip_nonfinite:
                    named = where if "creative id" in where else f"{where}: creative id {cid}"
                    raise DataError(f"{named}: feature {fid} vector holds {vec[bad[0]]} at index {bad[0]}, "
                                    f"expected finite numbers (or --skip_nonfinite)")
                stats["skipped_nonfinite"] += 1
                if row is not None:
                    bad_rows[row] = True
                continue
            if row is None:
                stats["unknown_cids"] += 1
                continue
            stats["repeated_cids"] += int(seen[row])
            table[row], seen[row], bad_rows[row] = vec, True, False
        if table is None:
            raise DataError(f"{emb_dir}: no vectors for multimodal feature {fid} "
                            f"(looked for emb_{fid}_*.pkl and emb_{fid}_*/part-*)")
        tables.append(table)
        has &= seen & ~bad_rows
    return tables, has, stats


# ---------------------------------------------------------------------------------------------
# RQ-KMeans
# ---------------------------------------------------------------------------------------------

def prepare(vectors, dims, normalize) -> np.ndarray:
    """Raw concatenated vectors [n, sum(dims)] -> the float64 rows the codebook works on: with
    normalize, each feature's block L2-normalised (a zero block stays zero) and the whole scaled
    by 1/sqrt(#features), so a row whose blocks are all nonzero has norm 1."""
    X = np.array(vectors, np.float64, ndmin=2)
    if normalize:
        start = 0
        for d in dims:
            block = X[:, start:start + d]
            norm = np.sqrt(np.einsum("ij,ij->i", block, block))
            block /= np.where(norm > 0, norm, 1.0)[:, None]
            start += d
        X /= np.sqrt(len(dims))
    return X


def nearest(X, C):
    """(index of the nearest row of C for each row of X, its squared distance). Ties go to the
    lowest index. Computed as |c|^2 - 2 x.c in chunks, so memory stays bounded for any n."""
    cc = np.einsum("ij,ij->i", C, C)
    idx, d2 = np.empty(len(X), np.int64), np.empty(len(X))
    step = max(1, CHUNK_ELEMS // max(len(C), 1))
    for s in range(0, len(X), step):
        x = X[s:s + step]
        d = cc - 2.0 * (x @ C.T)
        j = d.argmin(1)
        idx[s:s + step] = j
        d2[s:s + step] = np.maximum(d[np.arange(len(x)), j] + np.einsum("ij,ij->i", x, x), 0.0)
    return idx, d2


def kmeans_pp(X, K, rng) -> np.ndarray:
    """k-means++ centroids (rows of X): the first uniformly, each next one with probability
    proportional to its squared distance to the nearest chosen one, drawn as one rng.random()
    against the running sum. Stops early, with fewer than K rows, when every point already
    coincides with a chosen one (fewer than K distinct vectors)."""
    n = len(X)
    chosen = [int(rng.integers(n))]
    D = ((X - X[chosen[0]]) ** 2).sum(1)
    while len(chosen) < K:
        run = np.cumsum(D)
        if run[-1] <= 0:
            break
        i = int(np.searchsorted(run, rng.random() * run[-1], side="right"))
        if i >= n:   # u rounded up to the total: take the last point with weight
            i = int(np.flatnonzero(D)[-1])
        chosen.append(i)
        D = np.minimum(D, ((X - X[i]) ** 2).sum(1))
    return X[chosen].copy()


def _update(X, a, d2, C):
    """Lloyd's update: each centroid becomes the mean of its points; an empty one is re-seeded
    with the points farthest from their centroids (largest first, ties: lowest row)."""
    counts = np.bincount(a, minlength=len(C))
    full = np.flatnonzero(counts)
    order = np.argsort(a, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts[full])[:-1]])
    out = C.copy()
    out[full] = np.add.reduceat(X[order], starts, axis=0) / counts[full, None]
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        out[empty] = X[np.argsort(-d2, kind="stable")[:empty.size]]
    return out


def lloyd(X, C, iters) -> np.ndarray:
    """Up to `iters` Lloyd iterations from centroids C; stops once the assignment repeats."""
    C, prev = np.array(C, np.float64), None
    for _ in range(iters):
        a, d2 = nearest(X, C)
        if prev is not None and np.array_equal(a, prev):
            break
        C, prev = _update(X, a, d2, C), a
    return C


def fit_rq_kmeans(X, levels, K, iters, seed):
    """Residual k-means over the rows of X (already prepared). Returns (centroids, codes):
    a list of `levels` float64 arrays [K_l, dim] (K_l <= K, fewer when the level's input has
    fewer distinct rows) and int64 codes [n, levels] in 1..K_l."""
    R = np.array(X, np.float64, ndmin=2)
    if len(R) == 0:
        raise DataError("no vectors to fit semantic ids on")
    rng = np.random.default_rng(seed)
    centroids, codes = [], np.empty((len(R), levels), np.int64)
    for level in range(levels):
        C = lloyd(R, kmeans_pp(R, K, rng), iters)
        a, _ = nearest(R, C)
        codes[:, level] = a + 1
        R -= C[a]
        centroids.append(C)
    return centroids, codes


def assign_codes(vectors, codebook) -> np.ndarray:
    """Codes [n, L] (1..K_l) of raw vectors [n, sum(dims)], features concatenated in the
    codebook's order: normalised like the training vectors, then the nearest centroid per
    level on the residuals. No refit; a vector of another width is a DataError."""
    want = int(sum(codebook["dims"]))
    V = np.asarray(vectors)
    if V.ndim == 1:
        V = V[None, :]
    if V.ndim != 2 or V.shape[1] != want:
        feats = ", ".join(f"{f}: {d}" for f, d in zip(codebook["feature_ids"], codebook["dims"]))
        raise DataError(f"vectors of shape {V.shape}, expected [n, {want}] (features {feats}); "
                        f"is the codebook from other data?")
    if not np.isfinite(V).all():
        row = int(np.flatnonzero(~np.isfinite(V).all(1))[0])
        raise DataError(f"vector {row} holds a non-finite value, expected finite numbers")
    R = prepare(V, codebook["dims"], bool(codebook["normalize"]))
    codes = np.empty((len(R), len(codebook["centroids"])), np.int64)
    for level, C in enumerate(codebook["centroids"]):
        a, _ = nearest(R, C)
        codes[:, level] = a + 1
        R -= C[a]
    return codes


def dedup_column(codes) -> np.ndarray:
    """0, 1, 2, ... among rows sharing the same code tuple, in row order."""
    if len(codes) == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(codes, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    sizes = np.bincount(inv)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.empty(len(codes), np.int64)
    out[order] = np.arange(len(codes)) - np.repeat(first, sizes)
    return out


def collision_stats(codes) -> dict:
    """How many items share their full L-level code with another item."""
    if len(codes) == 0:
        return {"unique_codes": 0, "items_in_collisions": 0, "codes_with_collisions": 0, "max_collision_depth": 0}
    _, sizes = np.unique(codes, axis=0, return_counts=True)
    return {"unique_codes": int(len(sizes)), "items_in_collisions": int(sizes[sizes > 1].sum()),
            "codes_with_collisions": int((sizes > 1).sum()), "max_collision_depth": int(sizes.max())}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def load_codebook(path) -> dict:
    """sid_codebook.npz -> {"centroids": [float64 [K_l, dim]], "normalize", "dims", "feature_ids"}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found, expected the sid_codebook.npz of precompute_sid.py")
    try:
        with np.load(path, allow_pickle=False) as z:
            levels = sum(k.startswith("centroids_") for k in z.files)
            book = {"centroids": [z[f"centroids_{i}"] for i in range(levels)],
                    "normalize": bool(z["normalize"]), "dims": [int(d) for d in z["dims"]],
                    "feature_ids": [str(f) for f in z["feature_ids"]]}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable codebook ({type(e).__name__}: {str(e)[:80]}), expected "
                        f"the sid_codebook.npz of precompute_sid.py") from None
    if not levels or any(c.ndim != 2 or c.shape[1] != sum(book["dims"]) for c in book["centroids"]):
        raise DataError(f"{path}: centroids missing or not [K, {sum(book['dims'])}], expected the "
                        f"sid_codebook.npz of precompute_sid.py")
    return book


def load_sid(sid_dir):
    """(codes int32 [num_items + 1, L + 1], codebook, meta) from precompute_sid.py's folder."""
    meta_path, codes_path = os.path.join(sid_dir, META_FILE), os.path.join(sid_dir, CODES_FILE)
    if not os.path.isfile(meta_path):
        raise DataError(f"{meta_path}: file not found, expected the output of precompute_sid.py")
    meta = read_json(meta_path)
    book = load_codebook(os.path.join(sid_dir, CODEBOOK_FILE))
    try:
        codes = np.load(codes_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{codes_path}: not a readable .npy ({str(e)[:80]}), expected the output of "
                        f"precompute_sid.py") from None
    if not isinstance(meta, dict) or codes.shape != (meta.get("num_items", -2) + 1, len(book["centroids"]) + 1):
        raise DataError(f"{codes_path}: shape {codes.shape} disagrees with {meta_path}; "
                        f"rerun precompute_sid.py")
    return codes, book, meta


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _positive(text):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return v


def _count(text):
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return v


def _fid(text):
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a feature id such as 81")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None,
                   help="training folder with indexer.pkl and creative_emb/ (default: $TRAIN_DATA_PATH, "
                        "else data/demo/train)")
    p.add_argument("--output_dir", default=None,
                   help="folder for sid_codes.npy, sid_codebook.npz, sid_meta.json (default: "
                        "$USER_CACHE_PATH/sid, else runs/cache/sid)")
    p.add_argument("--mm_emb_id", nargs="+", type=_fid, default=["81"],
                   help="multimodal feature ids whose vectors (concatenated) are quantised")
    p.add_argument("--levels", type=_positive, default=3, help="code levels L (k-means on residuals)")
    p.add_argument("--codes", type=_positive, default=256,
                   help="codes K per level; a level whose input has fewer distinct vectors gets fewer")
    p.add_argument("--iters", type=_count, default=25,
                   help="most Lloyd iterations per level (it stops earlier once assignments repeat)")
    p.add_argument("--seed", type=int, default=42, help="seed of the k-means++ initialisation")
    p.add_argument("--normalize", type=int, choices=(0, 1), default=1,
                   help="1: L2-normalise each feature's vector before quantising (cosine geometry); "
                        "0: raw vectors")
    p.add_argument("--skip_nonfinite", action="store_true",
                   help="treat a vector holding NaN or inf as missing and count it, instead of "
                        "stopping with exit code 2")
    p.add_argument("--reuse", action="store_true",
                   help="do nothing when the outputs exist and were computed from these source files "
                        "(same size and time) with the same options")
    return p


def get_args(argv=None):
    args = parser().parse_args(argv)
    if args.data_dir is None:
        args.data_dir = os.environ.get("TRAIN_DATA_PATH", "data/demo/train")
    if args.output_dir is None:
        args.output_dir = os.path.join(os.environ.get("USER_CACHE_PATH", "runs/cache"), "sid")
    return args


def _options(args) -> dict:
    return {"mm_emb_id": list(args.mm_emb_id), "levels": args.levels, "codes": args.codes,
            "iters": args.iters, "seed": args.seed, "normalize": bool(args.normalize),
            "skip_nonfinite": bool(args.skip_nonfinite)}


def _source_files(args) -> list:
    emb_dir = os.path.join(args.data_dir, "creative_emb")
    return [os.path.join(args.data_dir, "indexer.pkl")] + [p for f in args.mm_emb_id for p in mm_sources(emb_dir, f)]


def up_to_date(args) -> bool:
    """--reuse: the outputs exist and were computed from these source files, as they are now,
    with the same options (a source file added or removed counts as a change)."""
    out = [os.path.join(args.output_dir, f) for f in (CODES_FILE, CODEBOOK_FILE, META_FILE)]
    if not all(os.path.isfile(p) for p in out):
        return False
    try:
        meta = read_json(out[-1])
    except DataError:
        return False
    if not isinstance(meta, dict):
        return False
    srcs, rec = _source_files(args), meta.get("sources")
    return (meta.get("options") == _options(args) and isinstance(rec, list) and len(rec) == len(srcs)
            and all(isinstance(r, dict) and r.get("path") == os.path.abspath(p) and same_source(r, p)
                    for r, p in zip(rec, srcs)))


def run(args):
    t0 = time.time()
    indexer_path = os.path.join(args.data_dir, "indexer.pkl")
    emb_dir = os.path.join(args.data_dir, "creative_emb")
    if not os.path.isfile(indexer_path):
        raise DataError(f"{indexer_path}: file not found, expected the training folder's creative id -> "
                        f"item re-id map")
    fingerprints = [file_fingerprint(p) for p in _source_files(args)]   # before reading: a later change refits
    cid_to_reid = read_item_ids(indexer_path)
    tables, has, stats = read_item_vectors(emb_dir, args.mm_emb_id, cid_to_reid, args.skip_nonfinite)
    num_items = len(has) - 1
    rows = np.flatnonzero(has)
    if not rows.size:
        raise DataError(f"{emb_dir}: none of the {len(cid_to_reid)} items of {indexer_path} has a vector "
                        f"of feature(s) {' '.join(args.mm_emb_id)}, expected at least one")
    dims = [t.shape[1] for t in tables]
    X = prepare(np.concatenate([t[rows] for t in tables], 1), dims, args.normalize)
    t_fit = time.time()
    centroids, codes = fit_rq_kmeans(X, args.levels, args.codes, args.iters, args.seed)
    fit_s = time.time() - t_fit
    ks = [len(c) for c in centroids]

    R, err, total = X.copy(), [], float(np.einsum("ij,ij->", X, X)) or 1.0
    for level, C in enumerate(centroids):
        R -= C[codes[:, level] - 1]
        err.append(round(float(np.einsum("ij,ij->", R, R)) / total, 6))
    out = np.zeros((num_items + 1, args.levels + 1), np.int32)
    out[rows, :args.levels] = codes
    out[rows, args.levels] = dedup_column(codes)
    coll = collision_stats(codes)
    meta = {"options": _options(args), "levels": args.levels, "codes": args.codes, "codes_per_level": ks,
            "code_usage": [int(len(np.unique(codes[:, i]))) for i in range(args.levels)],
            "dedup_vocab": int(out[:, -1].max()) + 1, "collisions": coll, "residual_error": err,
            "feature_ids": list(args.mm_emb_id), "dims": dims, "normalize": bool(args.normalize),
            "seed": args.seed, "num_items": num_items, "items_in_indexer": len(cid_to_reid),
            "items_with_vectors": int(rows.size), "items_without_vectors": len(cid_to_reid) - int(rows.size),
            **stats, "fit_seconds": round(fit_s, 2), "seconds": round(time.time() - t0, 2),
            "data_dir": os.path.abspath(args.data_dir), "sources": fingerprints}

    paths = [os.path.join(args.output_dir, f) for f in (CODES_FILE, CODEBOOK_FILE, META_FILE)]
    if os.path.isfile(paths[2]):
        os.unlink(paths[2])
    with atomic_write(paths[0], "wb") as f:
        np.save(f, out)
    with atomic_write(paths[1], "wb") as f:
        np.savez(f, normalize=np.array(bool(args.normalize)), dims=np.array(dims, np.int64),
                 feature_ids=np.array(args.mm_emb_id), **{f"centroids_{i}": c for i, c in enumerate(centroids)})
    dump_json(meta, paths[2], indent=1)
    return meta, paths


def _notices(meta) -> list:
    out = []
    if meta["items_without_vectors"]:
        out.append(f"{meta['items_without_vectors']} of {meta['items_in_indexer']} items have no vector of "
                   f"feature(s) {' '.join(meta['feature_ids'])}; they get the reserved code 0 at every level")
    if any(k < meta["codes"] for k in meta["codes_per_level"]):
        out.append(f"codes per level capped to {meta['codes_per_level']} (fewer distinct vectors than "
                   f"--codes {meta['codes']})")
    if meta["unknown_cids"]:
        out.append(f"{meta['unknown_cids']} vectors belong to creative ids not in indexer.pkl; ignored")
    if meta["repeated_cids"]:
        out.append(f"{meta['repeated_cids']} creative ids have more than one vector; the last one is used")
    if meta["skipped_nonfinite"]:
        out.append(f"{meta['skipped_nonfinite']} vectors hold NaN or inf; skipped (--skip_nonfinite)")
    return out


def _summary(meta, paths):
    c = meta["collisions"]
    print(f"items {meta['items_in_indexer']} (max re-id {meta['num_items']}), with vectors "
          f"{meta['items_with_vectors']}, dims {meta['dims']}; fit {meta['fit_seconds']} s, total {meta['seconds']} s")
    print(f"codes used per level {meta['code_usage']} of {meta['codes_per_level']}; residual energy after "
          f"each level {meta['residual_error']}")
    print(f"unique {meta['levels']}-level codes {c['unique_codes']}; {c['items_in_collisions']} items share one "
          f"(deepest {c['max_collision_depth']}, dedup column values 0..{meta['dedup_vocab'] - 1})")
    print("wrote " + ", ".join(paths))


def main(argv=None):
    """The command line. Bad input raises DataError; as a script (layout.run_cli) it is one
    "error: ..." line on stderr and exit 2, as is an unreadable input or unwritable output."""
    args = get_args(argv)
    if args.reuse and up_to_date(args):
        print(f"{args.output_dir}: up to date with {args.data_dir}; nothing to do")
        return
    if not os.path.isdir(args.data_dir):
        raise DataError(f"{args.data_dir}: folder not found (--data_dir), expected the training folder "
                        f"with indexer.pkl and creative_emb/")
    check_writable(args.output_dir, "--output_dir", create=False)
    for name in (CODES_FILE, CODEBOOK_FILE, META_FILE):
        if os.path.isdir(os.path.join(args.output_dir, name)):
            raise DataError(f"{os.path.join(args.output_dir, name)}: a folder, expected the output file's "
                            f"path (or nothing there)")
    meta, paths = run(args)
    for n in _notices(meta):
        print(f"notice: {n}", file=sys.stderr, flush=True)
    _summary(meta, paths)


if __name__ == "__main__":
    run_cli(main)
