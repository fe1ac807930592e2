"""Training data: the feature schema, time and CTR features, the multimodal cache, the item table,
the sequence builder and the training dataset, plus loading a training folder.

Reading and validating files is layout.py's job (torch-free); packing samples into batches,
negatives, samplers and the inference datasets are dataset_packed.py's. The folder layout is
docs/DATA_FORMAT.md. Configs are built once and never mutated: functions that learn something
from the data (the schema, the CTR standardisation, the multimodal dimensions) return a new
DataConfig.
"""
import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import re

import numpy as np
import torch

from layout import (GAP_BUCKETS, ITEM_TOKEN, RECENT_BUCKETS, RECENT_MID, TZ_OFFSET, USER_TOKEN, DataConfig, DataError, LineReader, atomic_write,
                    dump_json, file_fingerprint, iter_mm_vectors, load_pickle, mm_sources, own_folder,
                    parse_user_records, read_item_feat_dict, read_json, read_offsets, same_source, show_json,
                    sweep_temp, with_location)
import precompute_ctr as P
import precompute_sid as S
from precompute_ctr import ctr_value, load_ctr

# ---------------------------------------------------------------------------------------------
# Feature schema: derived from the data, never hard-coded, saved in every checkpoint
# (DataConfig itself lives in layout.py: the model reads it too, and layout imports no torch)
# ---------------------------------------------------------------------------------------------

# Timestamps from here on (the year 5138 as Unix seconds) are milliseconds: hour, weekday and gaps
# computed from them would be noise, so they are refused rather than read as seconds.
MS_TIMESTAMP = 10**11


def digit_strings(feat_dicts, what: str) -> tuple:
    """(count, first example) of feature values written as digit strings ("12"): the layout reads
    a string as a raw value unseen in training (re-id 0), never as a number."""
    n, first = 0, None
    for key, fd in feat_dicts:
        for fid, v in (fd or {}).items():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, str) and x.isascii() and x.isdigit():
                    n += 1
                    first = first or f"{what} {key} feature {fid!r}: {x!r}"
    return n, first


def _scan_feats(feat_dicts, sparse, array, longest):
    """Collect fid -> max scalar value (sparse) / max list value (array)."""
    for fd in feat_dicts:
        for fid, v in (fd or {}).items():
            if isinstance(v, list):
                vals = [x for x in v if isinstance(x, int)]
                array[fid] = max([array.get(fid, 0)] + vals)
                longest[0] = max(longest[0], len(v))
            elif isinstance(v, int) and not isinstance(v, bool):
                sparse[fid] = max(sparse.get(fid, 0), v)


def _vocab(found, indexer_f):
    return {fid: max(m, len(indexer_f.get(fid, ()))) + 1
            for fid, m in sorted(found.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0])}


def derive_schema(cfg: DataConfig, indexer: dict, item_feat_dict: dict, profile_feats: list) -> DataConfig:
    """cfg with the sizes filled in from the indexer, item_feat_dict and a sample of user profile
    records.

    A feature is an array feature when its values are lists; vocab = max(#indexer values, max
    re-id seen) + 1, so re-id 0 stays free for padding / unknown.
    """
    f = indexer.get("f", {}) or {}
    isp, iar, usp, uar, longest = {}, {}, {}, {}, [1]
    _scan_feats(item_feat_dict.values(), isp, iar, longest)
    _scan_feats(profile_feats, usp, uar, longest)
    return dataclasses.replace(
        cfg, item_sparse=_vocab(isp, f), item_array=_vocab(iar, f), user_sparse=_vocab(usp, f),
        user_array=_vocab(uar, f), num_users=max(list(indexer.get("u", {}).values()) + [0]),
        num_items=max([int(k) for k in item_feat_dict] + list(indexer.get("i", {}).values()) + [0]),
        max_array_len=max(1, min(cfg.max_array_len, longest[0])))


def encode_feats(feat_dicts: list, sparse_vocab: dict, array_vocab: dict, max_len: int) -> tuple:
    """Feature dicts -> (sparse int64 [N, n_sparse], array int64 [N, n_array, max_len]).

    Missing features, strings (unseen values at inference) and out-of-vocab ids become 0.
    """
    sfids, afids = list(sparse_vocab), list(array_vocab)
    sp = np.zeros((len(feat_dicts), len(sfids)), np.int64)
    ar = np.zeros((len(feat_dicts), len(afids), max_len), np.int64)
    for n, fd in enumerate(feat_dicts):
        if not fd:
            continue
        for j, fid in enumerate(sfids):
            v = fd.get(fid)
            if type(v) is int and 0 < v < sparse_vocab[fid]:
                sp[n, j] = v
        for j, fid in enumerate(afids):
            v = fd.get(fid)
            if isinstance(v, list):
                vals = [x for x in v if type(x) is int and 0 < x < array_vocab[fid]][:max_len]
                ar[n, j, :len(vals)] = vals
            elif type(v) is int and 0 < v < array_vocab[fid]:
                ar[n, j, 0] = v
    return sp, ar


# ---------------------------------------------------------------------------------------------
# Time features: one function for training and inference
# ---------------------------------------------------------------------------------------------

_LOG_YEAR = math.log1p(365 * 86400)


def gap_bucket(gap) -> np.ndarray:
    """Log2 bucket of a non-negative gap in seconds: 2 + floor(log2(1 + gap)), capped."""
    g = np.asarray(gap, dtype=np.float64)
    return (2 + np.minimum(np.floor(np.log2(1.0 + np.maximum(g, 0))), GAP_BUCKETS - 3)).astype(np.int64)


def time_features(ts) -> dict:
    """Per-event calendar and gap features for timestamps in time order.

    hour 1..24, weekday 1..7 (Monday = 1), week 1..53 (ISO-like week of year): every real value
    gets its own embedding row, 0 is padding. The gap is to the PREVIOUS event (never the next:
    that would leak the target's timing).
    """
    ts = np.asarray(ts, dtype=np.int64)
    local = ts + TZ_OFFSET
    days = local // 86400
    hour = (local % 86400) // 3600 + 1
    weekday = (days + 3) % 7 + 1                     # 1970-01-01 was a Thursday
    d = days.astype("datetime64[D]")
    doy = (d - d.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) + 1
    week = np.minimum((doy - 1) // 7 + 1, 53)
    gap = np.empty_like(ts)
    if len(ts):
        gap[0] = 0
        gap[1:] = np.maximum(ts[1:] - ts[:-1], 0)
    bucket = gap_bucket(gap)
    glog = (np.log1p(gap) / _LOG_YEAR).astype(np.float32)
    if len(ts):
        bucket[0], glog[0] = 1, 0.0
    return {"hour": hour, "weekday": weekday, "week": week, "gap_bucket": bucket, "gap_log": glog}


# ---------------------------------------------------------------------------------------------
# Multimodal vectors: creative_emb/ -> one memory-mapped table per feature, built once
# ---------------------------------------------------------------------------------------------

def mm_fingerprint(emb_dir: str, fid: str, cid_to_reid: dict, num_items: int) -> dict:
    """What a multimodal cache is built from: the item count, a hash of the creative id -> re-id
    map, and each source file's name, size and modification time (None when the vectors are not
    at hand, e.g. at inference without creative_emb/)."""
    keys = np.fromiter(cid_to_reid.keys(), np.int64, len(cid_to_reid))
    vals = np.fromiter(cid_to_reid.values(), np.int64, len(cid_to_reid))
    order = np.argsort(keys, kind="stable")
    ids = hashlib.sha1(keys[order].tobytes() + vals[order].tobytes()).hexdigest()
    srcs = None
    if emb_dir and os.path.isdir(emb_dir):
        srcs = [[os.path.relpath(p, emb_dir), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in mm_sources(emb_dir, fid)]
    return {"num_items": num_items, "ids_sha1": ids, "sources": srcs}


def _reserve(path: str) -> None:
    """Allocate a (sparse) file's blocks now: on a full disk the write of a memory-mapped page
    would kill the process with SIGBUS; posix_fallocate fails with a plain OSError instead."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):   # a file system without it
            raise
    finally:
        os.close(fd)


def build_mm_cache(emb_dir: str, fid: str, cid_to_reid: dict, num_items: int, cache_dir: str) -> tuple:
    """Convert feature `fid` to `cache_dir/mm/emb_{fid}.npy` (rows: 0 pad, 1..num_items by item
    re-id, then creative ids unknown to the indexer) plus a JSON index written last.

    Returns (memmap table, meta) where meta has 'dim', 'mask' (bool per row) and 'extra' (cid ->
    row). The cache is reused only when its fingerprint (mm_fingerprint) matches: same items,
    same id map, same source files (not checked when the sources are not at hand); otherwise it
    is rebuilt, with a notice. The index also records the size and time of the table and mask it
    describes, and a rebuild deletes it first: a rebuild killed midway leaves no index vouching
    for the new vectors. One run at a time checks and builds (the cache's mm/ folder is locked):
    another run waits for it, then reuses what it built; temporary files of a killed build are
    swept first. A run that already mapped the table keeps its vectors when another rebuilds.
    """
    out = os.path.join(cache_dir, "mm")
    with own_folder(out, "USER_CACHE_PATH", wait=True):
        sweep_temp(out, lambda name: name.startswith(f".emb_{fid}."))
        return _mm_cache(emb_dir, fid, cid_to_reid, num_items, out)


def _cache_file(path: str) -> list:
    """[size, modification time] of a cache file: what its index records of it."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _mm_cache(emb_dir: str, fid: str, cid_to_reid: dict, num_items: int, out: str) -> tuple:
    """build_mm_cache's work, with the cache folder `out` held."""
    npy, idx_path = os.path.join(out, f"emb_{fid}.npy"), os.path.join(out, f"emb_{fid}.index.json")
    mask_path = os.path.join(out, f"emb_{fid}.mask.npy")
    fp = mm_fingerprint(emb_dir, fid, cid_to_reid, num_items)
    if os.path.exists(idx_path):
        meta = read_json(idx_path)
        old = meta.get("fingerprint") or {"num_items": meta.get("num_items")}
        same = (old.get("num_items") == num_items and old.get("ids_sha1") in (None, fp["ids_sha1"])
                and (fp["sources"] is None or old.get("sources") == fp["sources"]))
        files = ({"npy": _cache_file(npy), "mask": _cache_file(mask_path)}
                 if os.path.exists(npy) and os.path.exists(mask_path) else None)
        if same and files is not None and meta.get("files") == files:
            table = np.load(npy, mmap_mode="r")
            meta["extra"] = {int(c): r for c, r in meta["extra"].items()}
            meta["mask"] = np.load(mask_path)
            return table, meta
        why = ("items, ids or creative_emb files changed" if not same else
               "its table files are not those it indexed (a rebuild was interrupted, or they were replaced)")
        print(f"notice: {idx_path} was built from other data ({why}); rebuilding", flush=True)
    if not emb_dir or not os.path.isdir(emb_dir):
        raise DataError(f"{emb_dir or 'creative_emb'}: folder not found, expected the vectors of "
                        f"multimodal feature {fid} (emb_{fid}_*.pkl or emb_{fid}_*/part-*)")
    dim, first, extra = None, None, {}
    for cid, vec, where in iter_mm_vectors(emb_dir, fid):
        if dim is None:
            dim, first = len(vec), where
        elif len(vec) != dim:
            raise DataError(f"{where}: feature {fid} vector has {len(vec)} values, expected {dim} "
                            f"like the first one ({first})")
        bad = np.flatnonzero(~np.isfinite(vec))
        if bad.size:
            raise DataError(f"{where}: feature {fid} vector holds {vec[bad[0]]} at index {bad[0]}, "
                            f"expected finite numbers")
        if cid not in cid_to_reid and cid not in extra:
            extra[cid] = num_items + 1 + len(extra)
    if dim is None:
        raise DataError(f"{emb_dir}: no vectors for multimodal feature {fid} "
                        f"(looked for emb_{fid}_*.pkl and emb_{fid}_*/part-*)")
    os.makedirs(out, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(idx_path)        # until the new index is written last, no index vouches for these files
    rows = num_items + 1 + len(extra)
    tmp = os.path.join(out, f".emb_{fid}.npy.{os.getpid()}.tmp")     # layout.atomic_write's naming
    try:
        table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        _reserve(tmp)
        mask = np.zeros(rows, bool)
        for cid, vec, _ in iter_mm_vectors(emb_dir, fid):
            r = cid_to_reid.get(cid) or extra[cid]
            table[r], mask[r] = vec, True
        table.flush()
        del table
        os.replace(tmp, npy)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):     # a failed write names no file
            raise OSError(e.errno, e.strerror or str(e), npy) from None
        raise
    with atomic_write(mask_path, "wb") as f:
        np.save(f, mask)
    dump_json({"fid": fid, "dim": dim, "num_items": num_items, "rows": rows, "fingerprint": fp,
               "files": {"npy": _cache_file(npy), "mask": _cache_file(mask_path)},
               "extra": {str(c): r for c, r in extra.items()}}, idx_path)
    return _mm_cache(emb_dir, fid, cid_to_reid, num_items, out)


# ---------------------------------------------------------------------------------------------
# Item table: every per-item input, by row (row = item re-id; cold items appended at inference)
# ---------------------------------------------------------------------------------------------

def sid_codebook(cfg: DataConfig):
    """The run's semantic-id codebook (cfg.sid, saved in the checkpoint) as precompute_sid's
    assign_codes takes it; None when semantic ids are off."""
    if not cfg.use_sid:
        return None
    if not cfg.sid.get("centroids"):
        raise DataError("semantic ids are on (--use_sid) but the configuration holds no codebook; "
                        "run precompute_sid.py on the training folder")
    return {"centroids": [np.asarray(c, np.float64) for c in cfg.sid["centroids"]],
            "dims": [int(d) for d in cfg.sid["dims"]], "normalize": bool(cfg.sid["normalize"]),
            "feature_ids": [str(f) for f in cfg.sid["feature_ids"]]}


def load_sid_codebook(sid_dir: str, data_dir: str) -> dict:
    """precompute_sid.py's codebook of this training folder, as DataConfig.sid. Refuses a missing
    folder, a codebook computed from another folder, and one whose sources changed since."""
    hint = (f"run python precompute_sid.py --data_dir {data_dir} --output_dir "
            f"{sid_dir or '<USER_CACHE_PATH>/sid'} --reuse (or turn --use_sid off)")
    if not sid_dir or not os.path.isfile(os.path.join(sid_dir, S.META_FILE)):
        raise DataError(f"{sid_dir or 'USER_CACHE_PATH/sid'}: no {S.META_FILE} (--use_sid); {hint}")
    meta_path = os.path.join(sid_dir, S.META_FILE)
    meta = read_json(meta_path)
    book = S.load_codebook(os.path.join(sid_dir, S.CODEBOOK_FILE))
    srcs = meta.get("sources") if isinstance(meta, dict) else None
    idx = os.path.abspath(os.path.join(data_dir, "indexer.pkl"))
    if not isinstance(srcs, list) or not srcs or not isinstance(srcs[0], dict) or srcs[0].get("path") != idx:
        raise DataError(f"{meta_path}: semantic ids of {meta.get('data_dir') if isinstance(meta, dict) else '?'}, "
                        f"not of the training folder {data_dir}; {hint}")
    for rec in srcs:
        if not isinstance(rec, dict) or not same_source(rec, rec.get("path", "")):
            raise DataError(f"{meta_path}: computed from {rec.get('path') if isinstance(rec, dict) else rec} as it "
                            f"was then (size or time differ now); {hint}")
    return {"feature_ids": book["feature_ids"], "dims": book["dims"], "normalize": book["normalize"],
            "centroids": [c.tolist() for c in book["centroids"]]}


class ItemTable:
    """Dense per-item features so samples gather them with numpy fancy indexing in workers.

    Reads cfg, never writes it: the multimodal dimensions it finds are `mm_dims` (training puts
    them in the config it saves; inference checks them against the checkpoint's)."""

    def __init__(self, cfg: DataConfig, indexer: dict, item_feat_dict: dict, emb_dir: str = None,
                 cache_dir: str = None, item_ctr: dict = None):
        self.schema = (cfg.item_sparse, cfg.item_array, cfg.max_array_len)
        n = cfg.num_items + 1
        self.row_of_cid = {int(c): r for c, r in indexer.get("i", {}).items()}
        self.cid = np.zeros(n, np.int64)
        for c, r in self.row_of_cid.items():
            if r < n:
                self.cid[r] = c
        self.id = np.arange(n, dtype=np.int64)
        self.young_until = None          # set_young: per row, the time before which an event shows a new item
        feats = [None] * n
        for k, fd in item_feat_dict.items():
            r = int(k)
            if 0 < r < n:
                feats[r] = fd
        self.sparse, self.array = encode_feats(feats, *self.schema)
        # item CTR: clicks / events per row for the leave-one-out target value, z for the rest
        self.ctr_meta = cfg.ctr_meta.get("item") if cfg.use_itemctr else None
        self.ctr_c, self.ctr_n = np.zeros(n, np.float32), np.zeros(n, np.float32)
        if self.ctr_meta is not None:
            for r, (c, e, _) in (item_ctr or {}).items():
                if 0 < r < n:
                    self.ctr_c[r], self.ctr_n[r] = c, e
            self.ctr_z = ctr_value(self.ctr_c, self.ctr_n, self.ctr_meta).astype(np.float32)
        else:
            self.ctr_z = np.zeros(n, np.float32)
        self.mm, self.mm_row, self.mm_extra, self.mm_dims = {}, {}, {}, {}
        for fid in cfg.mm_emb_id:
            fid = str(fid)
            table, meta = build_mm_cache(emb_dir, fid, self.row_of_cid, cfg.num_items, cache_dir)
            self.mm_dims[fid] = int(meta["dim"])
            if cfg.mm_dims.get(fid, self.mm_dims[fid]) != self.mm_dims[fid]:
                raise DataError(f"{emb_dir}: multimodal feature {fid} vectors have {self.mm_dims[fid]} values, "
                                f"expected {cfg.mm_dims[fid]} like the data the model was trained on")
            self.mm[fid], self.mm_extra[fid] = table, meta["extra"]
            self.mm_row[fid] = np.where(meta["mask"][:n], np.arange(n), -1).astype(np.int64)
        self.sid_book = sid_codebook(cfg)
        if self.sid_book is not None:
            missing = [f for f in self.sid_book["feature_ids"] if f not in self.mm]
            if missing:
                raise DataError(f"semantic ids are codes of multimodal feature(s) {' '.join(missing)}, which this run "
                                f"does not read (--mm_emb_id {' '.join(self.mm) or 'none'}); add them to --mm_emb_id")
            self.sid = self.sid_codes(np.arange(n))

    def __len__(self):
        return len(self.id)

    def sid_codes(self, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Semantic-id codes [len(rows), L] of table rows from their multimodal vectors and the
        run's codebook (nearest centroid per level, no refit): the one construction of an item's
        codes, in training and at inference, for trained and cold items alike. A row without a
        vector of every codebook feature gets code 0 (none) at every level."""
        book = self.sid_book
        codes = np.zeros((len(rows), len(book["centroids"])), np.int64)
        mr = np.stack([self.mm_row[f][rows] for f in book["feature_ids"]], 1)          # [n, features]
        have = np.flatnonzero((mr >= 0).all(1))
        for a in range(0, len(have), chunk):
            sel = have[a:a + chunk]
            vecs = np.concatenate([np.asarray(self.mm[f][mr[sel, j]], np.float64)
                                   for j, f in enumerate(book["feature_ids"])], 1)
            codes[sel] = S.assign_codes(vecs, book)
        return codes

    def content(self, rows: np.ndarray) -> tuple:
        """(vectors float32 [n, sum of dims], has bool [n]) of table rows: every multimodal
        feature's vector, each L2-normalised, side by side; `has` where a row has all of them
        (the rest are zero rows). The items' content as --cold_neighbors compares it."""
        rows = np.asarray(rows, np.int64)
        has = np.ones(len(rows), bool)
        parts = []
        for fid, table in self.mm.items():
            mr = self.mm_row[fid][rows]
            v = np.asarray(table[np.maximum(mr, 0)], np.float32)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            v[mr < 0] = 0.0
            parts.append(v)
            has &= mr >= 0
        if not parts:
            return np.zeros((len(rows), 0), np.float32), np.zeros(len(rows), bool)
        return np.concatenate(parts, 1), has

    def set_young(self, until: np.ndarray) -> None:
        """young_until (dataset.young_until, by row; rows beyond it: never young)."""
        self.young_until = np.zeros(len(self.id), np.int64)
        self.young_until[:min(len(until), len(self.id))] = until[:len(self.id)]

    def young(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """bool: the events (rows, ts) are among their item's first new_item_events."""
        return ts < self.young_until[rows]

    def set_popularity(self, counts: np.ndarray, head_min_count: float) -> None:
        """Item event counts by row (from item_pop.json); hot = count >= head_min_count."""
        self.pop_count = np.zeros(len(self.id), np.float64)
        self.pop_count[:min(len(counts), len(self.id))] = counts[:len(self.id)]
        self.hot = self.pop_count >= head_min_count

    def extend(self, cids: list, feat_dicts: list) -> np.ndarray:
        """Append rows for creative ids not in the table (cold items); returns every cid's row."""
        new = [(c, fd) for c, fd in zip(cids, feat_dicts) if c not in self.row_of_cid]
        new = list({c: fd for c, fd in new}.items())
        if new:
            start = len(self.id)
            for j, (c, _) in enumerate(new):
                self.row_of_cid[c] = start + j
            sp, ar = encode_feats([fd for _, fd in new], *self.schema)
            k = len(new)
            self.cid = np.concatenate([self.cid, np.array([c for c, _ in new], np.int64)])
            # -1: an item the training data never named; the model embeds it as a new item (no id row)
            self.id = np.concatenate([self.id, np.full(k, -1, np.int64)])
            if self.young_until is not None:
                self.young_until = np.concatenate([self.young_until, np.zeros(k, np.int64)])
            self.sparse, self.array = np.concatenate([self.sparse, sp]), np.concatenate([self.array, ar])
            prior = ctr_value(0.0, 0.0, self.ctr_meta) if self.ctr_meta is not None else 0.0
            self.ctr_c = np.concatenate([self.ctr_c, np.zeros(k, np.float32)])
            self.ctr_n = np.concatenate([self.ctr_n, np.zeros(k, np.float32)])
            self.ctr_z = np.concatenate([self.ctr_z, np.full(k, prior, np.float32)])
            for fid in self.mm:
                rows = np.array([self.mm_extra[fid].get(c, -1) for c, _ in new], np.int64)
                self.mm_row[fid] = np.concatenate([self.mm_row[fid], rows])
            if self.sid_book is not None:
                self.sid = np.concatenate([self.sid, self.sid_codes(np.arange(start, start + k))])
        return np.array([self.row_of_cid.get(c, 0) for c in cids], np.int64)

    def loo_ctr(self, rows: np.ndarray, clicked: np.ndarray):
        """Item CTR of a target event without that event (leave-one-out): the feature must not
        encode its own label. None when the item CTR channel is off."""
        if self.ctr_meta is None:
            return None
        return ctr_value(self.ctr_c[rows] - clicked, np.maximum(self.ctr_n[rows] - 1, 0),
                         self.ctr_meta).astype(np.float32)

    def gather(self, rows: np.ndarray, prefix: str, ctr: np.ndarray = None) -> dict:
        """Item inputs for an int array of rows (any shape) as a dict of tensors `prefix + key`."""
        rows = np.asarray(rows, np.int64)
        out = {"id": self.id[rows], "sparse": self.sparse[rows], "array": self.array[rows],
               "ctr": self.ctr_z[rows] if ctr is None else ctr}
        if self.mm:
            masks = []
            for fid, table in self.mm.items():
                mr = self.mm_row[fid][rows]
                flat = mr.reshape(-1)
                vec = np.asarray(table[np.maximum(flat, 0)], np.float32)
                vec[flat < 0] = 0.0
                out[f"mm_{fid}"] = vec.reshape(rows.shape + (table.shape[1],))
                masks.append(mr >= 0)
            out["mm_mask"] = np.stack(masks, -1)
        if self.sid_book is not None:
            out["sid"] = self.sid[rows]
        return {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# One user's line -> fixed-length numpy arrays (shared by training and inference)
# ---------------------------------------------------------------------------------------------

class SequenceBuilder:
    """Turns parsed records into the token arrays the encoder reads.

    Tokens are [user token] + the newest `maxlen` item events, left-padded to maxlen + 1. In
    training each token is followed by a target (the next event); at inference there is none and
    the newest event is part of the context (the official baseline drops it).
    """

    def __init__(self, cfg: DataConfig, table: ItemTable, user_index: dict, strict_items: bool = False,
                 rank_packages: bool = False, keep_items: bool = False):
        self.cfg, self.table, self.user_index = cfg, table, user_index
        self.rank_packages = rank_packages
        self.keep_items = keep_items     # also return every item row of the line (hard negatives)
        self.user_meta = cfg.ctr_meta.get("user") if cfg.use_userctr else None
        # training data holds re-ids only: an id past num_items there is a broken file, while at
        # inference it is a raw creative id (a cold item)
        self.strict_items = strict_items

    def user_row(self, user) -> int:
        """Record user id -> re-id; a raw string (unseen user) or anything unknown -> 0."""
        if type(user) is int:
            return user if 0 < user <= self.cfg.num_users else 0
        return self.user_index.get(user, 0) if isinstance(user, str) else 0

    def item_rows(self, items: list) -> np.ndarray:
        """Record item slots -> table rows: an int <= num_items is a re-id, a larger int a raw
        creative id (cold item at inference), anything else unknown (0). With strict_items
        (training) an id outside 1..num_items is a DataError."""
        n, rows = self.cfg.num_items, np.zeros(len(items), np.int64)
        for j, it in enumerate(items):
            if self.strict_items and not (type(it) is int and 0 < it <= n):
                raise DataError(f"item id {show_json(it)} unknown to the indexer (num_items {n})")
            if type(it) is int:
                rows[j] = it if 0 < it <= n else self.table.row_of_cid.get(it, 0)
        return rows

    def packages(self, items: np.ndarray, acts: np.ndarray, tgt: np.ndarray, rng) -> tuple:
        """Rank package per target: [cold click, hot click, cold exposure, hot exposure, random].

        The first four come from the user's own events strictly before the target event (index
        < tgt), by item popularity (table.hot) and action; the fifth is a uniformly random
        catalogue item, so the grades click (3) > exposure (2) > random (1) never contradict
        each other. A slot with no such event is masked (grade 0), never faked.
        """
        hot, click = self.table.hot[items], acts >= 1
        rows, grade = np.zeros((len(tgt), 5), np.int64), np.zeros((len(tgt), 5), np.int64)
        for c, (mask, g) in enumerate([(click & ~hot, 3), (click & hot, 3), (~click & ~hot, 2), (~click & hot, 2)]):
            idx = np.flatnonzero(mask & (items > 0))
            cnt = np.searchsorted(idx, tgt)                   # such events strictly before each target
            ok = cnt > 0
            pick = (rng.random(len(tgt)) * cnt).astype(np.int64)
            rows[ok, c], grade[ok, c] = items[idx[pick[ok]]], g
        rows[:, 4] = rng.integers(1, self.cfg.num_items + 1, len(tgt))
        grade[:, 4] = 1
        return rows, grade

    def build(self, user, user_feat: dict, events: list, train: bool, rng=None) -> dict:
        """One sample: per-token arrays [T] (T = maxlen + 1), per-user arrays, and in training
        the next-event targets (pos_*) and rank packages (pkg_* [T, 5])."""
        cfg, T = self.cfg, self.cfg.maxlen + 1
        n = len(events)
        if train:
            lo, hi = max(0, n - 1 - cfg.maxlen), max(n - 1, 0)
        else:
            lo, hi = max(0, n - cfg.maxlen), n
        window = events[lo:hi]
        k = len(window)
        start = T - 1 - k                              # index of the user token
        items = self.item_rows([e[0] for e in events])
        acts = np.array([e[2] for e in events], np.int64)
        ts = np.array([e[3] for e in events], np.int64)
        if n and ts.max() >= MS_TIMESTAMP:
            raise DataError(f"timestamp {int(ts.max())} is after the year 5000 as Unix seconds: milliseconds? "
                            f"expected Unix seconds like the training data (divide by 1000)")

        s = {"token_type": np.zeros(T, np.int64), "seq_row": np.zeros(T, np.int64),
             "action": np.zeros(T, np.int64), "ts": np.zeros(T, np.int64),
             "pos_idx": np.zeros(T, np.int64)}
        young = self.table.young_until is not None
        if young:
            s["seq_young"] = np.zeros(T, bool)
            s["seq_young"][start + 1:] = self.table.young(items[lo:hi], ts[lo:hi])
        s["token_type"][start] = USER_TOKEN
        s["token_type"][start + 1:] = ITEM_TOKEN
        s["seq_row"][start + 1:] = items[lo:hi]
        s["action"][start + 1:] = acts[lo:hi] + 1
        s["pos_idx"][start:] = np.arange(1, k + 2)
        # The user token sits at the time of the first event it precedes, never at the profile
        # record's timestamp (written after the target).
        s["ts"][start + 1:] = ts[lo:hi]
        s["ts"][start] = ts[lo] if n > lo else 0

        if cfg.use_timefeat:
            tf = time_features(ts)
            for key, v in tf.items():
                arr = np.zeros(T, v.dtype)
                arr[start + 1:] = v[lo:hi]
                s[key] = arr
        if self.user_meta is not None:
            # running user CTR up to and including each event: nothing after the token enters
            c, e = np.cumsum(acts >= 1), np.arange(1, n + 1)
            z = np.zeros(T, np.float32)
            z[start] = ctr_value(float(c[lo - 1]) if lo else 0.0, float(lo), self.user_meta)
            z[start + 1:] = ctr_value(c[lo:hi].astype(np.float64), e[lo:hi].astype(np.float64),
                                      self.user_meta)
            s["user_ctr"] = z

        s["user_id"] = np.int64(self.user_row(user))
        sp, ar = encode_feats([user_feat], cfg.user_sparse, cfg.user_array, cfg.max_array_len)
        s["user_sparse"], s["user_array"] = sp[0], ar[0]

        if train:
            tgt = np.arange(lo, lo + k + 1) if n else np.zeros(0, np.int64)
            s["pos_row"] = np.zeros(T, np.int64)
            s["pos_action"] = np.zeros(T, np.int64)
            s["pos_ts"] = np.zeros(T, np.int64)
            if n:
                s["pos_row"][start:] = items[tgt]
                s["pos_action"][start:] = acts[tgt] + 1
                s["pos_ts"][start:] = ts[tgt]
            if young:
                s["pos_young"] = np.zeros(T, bool)
                if n:
                    s["pos_young"][start:] = self.table.young(items[tgt], ts[tgt])
            if self.keep_items:
                s["_items"] = items
            if self.rank_packages:
                s["pkg_row"], s["pkg_grade"] = np.zeros((T, 5), np.int64), np.zeros((T, 5), np.int64)
                if n:
                    s["pkg_row"][start:], s["pkg_grade"][start:] = self.packages(items, acts, tgt, rng)
        return s


# ---------------------------------------------------------------------------------------------
# The training dataset
# ---------------------------------------------------------------------------------------------

class SeqDataset(torch.utils.data.Dataset):
    """Training users, one sample per line of seq.jsonl. `cut` {line: k} keeps only the first k
    events (time order) of a line: the rest is the validation slice's (holdout_last_clicks), and
    never a training target."""

    def __init__(self, seq_path: str, offsets: list, builder: SequenceBuilder, train: bool = True, seed: int = 0,
                 skip_bad: bool = False, cut: dict = None):
        self.lines, self.builder, self.train = LineReader(seq_path, offsets), builder, train
        # package sampling depends only on (seed, epoch, line): workers need no shared RNG state
        self.seed, self.epoch = seed, 0
        self.skip_bad, self.cut = skip_bad, cut or {}

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.builder.rank_packages else None
        try:
            records, where = self.lines[i]
            user, user_feat, events = parse_user_records(records, where)
            k = self.cut.get(i)
            s = with_location(where, self.builder.build, user, user_feat, events if k is None else events[:k],
                              self.train, rng)
            if k is not None and "_items" in s:
                # the held-out click is still this user's positive: never one of its hard negatives
                s["_items"] = with_location(where, self.builder.item_rows, [e[0] for e in events])
        except DataError as e:
            if not self.skip_bad:
                raise
            # lenient mode: the line becomes a sample without targets; the message is reported
            s = self.builder.build(0, None, [], self.train, rng)
            s["_skipped"] = str(e)
            return s
        if self.skip_bad:
            s["_skipped"] = None
        return s


# ---------------------------------------------------------------------------------------------
# Loading a training folder
# ---------------------------------------------------------------------------------------------

def scan_profiles(seq_path: str, offsets: list, limit: int = 5000, skip_bad: bool = False) -> list:
    """User feature dicts of up to `limit` users (enough to see every user feature id)."""
    lines = LineReader(seq_path, offsets)
    step = max(1, len(lines) // limit)
    out = []
    for i in range(0, len(lines), step):
        try:
            records, where = lines[i]
            out.append(parse_user_records(records, where)[1])
        except DataError:
            if not skip_bad:
                raise
    return out


def holdout_last_clicks(seq_path: str, offsets: list, n_users: int, seed: int, skip_bad: bool = False) -> dict:
    """The validation slice of a training folder, the competition's own offline proxy: up to
    n_users lines (a seeded sample, at most half of them), each with its user's last click that
    has an event before it. Returns {line: k}: events[:k] (time order) are the history, event k
    the target, and training keeps only events[:k] of those lines. Lines are read in sampled
    order until enough qualify, so a large file is not read whole."""
    lines = LineReader(seq_path, offsets)
    want = min(n_users, len(lines) // 2)
    cut = {}
    for i in np.random.default_rng(seed).permutation(len(lines)).tolist():
        if len(cut) >= want:
            break
        try:
            records, where = lines[i]
            events = parse_user_records(records, where)[2]
        except DataError:
            if not skip_bad:
                raise
            continue
        k = next((j for j in range(len(events) - 1, 0, -1) if events[j][2] >= 1), None)
        if k is not None:
            cut[i] = k
    return cut


def trained_items(counts: np.ndarray, seq_path: str, offsets: list, cut: dict) -> np.ndarray:
    """bool [num_items + 1]: the items that occur in the training sequences, i.e. with an event in
    seq.jsonl (counts, by re-id) that is not held out for validation (cut: events[k:] of those
    lines leave training, see holdout_last_clicks)."""
    left = np.asarray(counts, np.float64).copy()
    if cut:
        lines = LineReader(seq_path, offsets)
        for i, k in cut.items():
            records, where = lines[i]
            for item, _, _, _ in parse_user_records(records, where)[2][k:]:
                if isinstance(item, int) and 0 < item < len(left):
                    left[item] -= 1
    out = left > 0
    out[0] = False
    return out


def kept_item_events(seq_path: str, offsets: list, cut: dict, num_items: int):
    """Per line of seq.jsonl, the (item re-id, timestamp) of its events that training keeps:
    events of held-out slices excluded (cut: events[k:] of those lines, see holdout_last_clicks),
    items outside 1..num_items and unreadable lines skipped (the training reader reports or skips
    bad lines itself)."""
    lines = LineReader(seq_path, offsets)
    for i in range(len(lines)):
        try:
            records, where = lines[i]
            events = parse_user_records(records, where)[2]
        except DataError:
            continue
        yield [(item, ts) for item, _, _, ts in events[:cut.get(i, len(events))]
               if type(item) is int and 0 < item <= num_items]


NEVER = np.iinfo(np.int64).max


def young_until(seq_path: str, offsets: list, cut: dict, num_items: int, n: int, chunk: int = 1 << 20):
    """int64 [num_items + 1]: the timestamp of each item's (n+1)-th event in the training
    sequences (events of held-out slices excluded, see holdout_last_clicks), NEVER when it has at
    most n. An event of the item strictly before that time is one of its first n: the item is
    new then (SequenceBuilder marks it young). n = 0: each item's first event. One streamed
    pass; per item at most n + 1 timestamps are kept, merged chunk by chunk."""
    keep_i, keep_t = np.zeros(0, np.int64), np.zeros(0, np.int64)
    buf_i, buf_t = [], []

    def merge(ki, kt):
        it, tt = np.concatenate([ki, np.asarray(buf_i, np.int64)]), np.concatenate([kt, np.asarray(buf_t, np.int64)])
        order = np.lexsort((tt, it))                      # by item, then time
        it, tt = it[order], tt[order]
        start = np.searchsorted(it, it, side="left")      # first index of each item's run
        rank = np.arange(len(it)) - start
        sel = rank <= n
        buf_i.clear()
        buf_t.clear()
        return it[sel], tt[sel]
    for events in kept_item_events(seq_path, offsets, cut, num_items):
        for item, ts in events:
            buf_i.append(item)
            buf_t.append(ts)
        if len(buf_i) >= chunk:
            keep_i, keep_t = merge(keep_i, keep_t)
    keep_i, keep_t = merge(keep_i, keep_t)
    out = np.full(num_items + 1, NEVER, np.int64)
    start = np.searchsorted(keep_i, keep_i, side="left")
    last = (np.arange(len(keep_i)) - start) == n
    out[keep_i[last]] = keep_t[last]
    return out


def recent_buckets(counts: np.ndarray, total, num_items: int) -> np.ndarray:
    """uint8 buckets of item event counts in a window holding `total` events (an array of
    totals broadcast against counts' last axis works too): 0 without an event, else
    RECENT_MID + floor(log2(count / total * num_items)), clipped to 1..RECENT_BUCKETS - 1. A
    share, not a count, so that windows of different volume (a training day, the events a
    serving log holds) mean the same."""
    counts = np.asarray(counts, np.float64)
    share = counts / np.maximum(np.asarray(total, np.float64), 1) * max(num_items, 1)
    with np.errstate(divide="ignore"):
        b = np.floor(np.log2(np.where(counts > 0, share, 1.0))) + RECENT_MID
    return np.where(counts > 0, np.clip(b, 1, RECENT_BUCKETS - 1), 0).astype(np.uint8)


def item_time_stats(seq_path: str, offsets: list, cut: dict, num_items: int, daily: bool = True,
                    chunk: int = 1 << 20) -> tuple:
    """One streamed pass over the events training keeps (see kept_item_events) -> (first, end,
    days, first_day): int64 [num_items + 1] each item's first event (NEVER without one); the
    newest event's timestamp (0 without any); with daily, uint8 [num_items + 1, D] the
    recent_buckets of each item's events on each calendar day (UTC) from first_day, the day of
    the earliest first event, to the day of `end` (None, first_day None without daily). Counts
    are kept per calendar day met, [num_items + 1] int32 each, so the day range need not be known
    before the pass: the memory of the dense table, and one JSON parse of seq.jsonl instead of one
    for the first events and one for the days."""
    first = np.full(num_items + 1, NEVER, np.int64)
    end = 0
    by_day = {}
    buf_i, buf_t = [], []

    def add():
        nonlocal end
        if not buf_i:
            return
        it, tt = np.asarray(buf_i, np.int64), np.asarray(buf_t, np.int64)
        buf_i.clear()
        buf_t.clear()
        np.minimum.at(first, it, tt)
        end = max(end, int(tt.max()))
        if daily:
            day = tt // 86400
            order = np.argsort(day, kind="stable")
            day, it = day[order], it[order]
            cuts = np.flatnonzero(np.diff(day)) + 1
            for d, items in zip(day[np.concatenate([[0], cuts])].tolist(), np.split(it, cuts)):
                col = by_day.get(d)
                if col is None:
                    col = by_day[d] = np.zeros(num_items + 1, np.int32)
                col += np.bincount(items, minlength=num_items + 1).astype(np.int32)
    for events in kept_item_events(seq_path, offsets, cut, num_items):
        for item, ts in events:
            buf_i.append(item)
            buf_t.append(ts)
        if len(buf_i) >= chunk:
            add()
    add()
    if not daily:
        return first, end, None, None
    seen = first[first < NEVER]
    lo, hi = (int(seen.min()) // 86400 if len(seen) else end // 86400), end // 86400
    counts = np.zeros((num_items + 1, hi - lo + 1), np.int32)
    for d, col in by_day.items():
        if lo <= d <= hi:
            counts[:, d - lo] = col
    return first, end, recent_buckets(counts, counts.sum(0, keepdims=True), num_items), lo


def dataset_has_timestamps(data_dir: str) -> bool:
    """False only when a converter's dataset_meta.json (in the folder or its parent) says the
    timestamps are synthetic (e.g. S3Rec: order only)."""
    for d in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
        path = os.path.join(d, "dataset_meta.json")
        if os.path.exists(path):
            return bool(read_json(path).get("has_timestamps", True))
    return True


def find_ctr_dir(*candidates: str):
    """The first candidate folder holding ctr_meta.json, else None."""
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "ctr_meta.json")):
            return d
    return None


def load_item_pop(data_dir: str, ctr_dir: str, seq_path: str, cache_dir: str, num_items: int,
                  skip_bad: bool = False) -> tuple:
    """Item popularity: item_pop.json from the train folder, the CTR folder or cache_dir/ctr, the
    first that was computed from this seq.jsonl as it is now (one without a record of its source
    is trusted); else counted anew by precompute_ctr into cache_dir/ctr, with a notice. Returns
    (event counts by re-id [num_items + 1], head_min_count)."""
    path = None
    for d in dict.fromkeys((data_dir, ctr_dir, os.path.join(cache_dir, "ctr"))):
        cand = os.path.join(d, P.ITEM_POP_FILE) if d else None
        if cand and os.path.exists(cand):
            rec = read_json(cand)
            fp = rec.get("seq_fingerprint") if isinstance(rec, dict) else None
            if fp is None or same_source(fp, seq_path):
                path = cand
                break
            print(f"notice: {cand} was counted from {seq_path} as it was before (size or time differ); not used")
    if path is None:
        c = P.count_events(seq_path, skip_bad=skip_bad)
        pop = {**P.item_popularity(c["item_ids"], c["item_events"], 0.8), "seq_fingerprint": file_fingerprint(seq_path)}
        path = os.path.join(cache_dir, "ctr", P.ITEM_POP_FILE)
        dump_json(pop, path)
        print(f"notice: no current item_pop.json in {data_dir}, the CTR folder or the cache; wrote {path}")
    pop = read_json(path)
    try:
        ids = np.array([int(k) for k in pop["counts"]], np.int64)
        cnt = np.array(list(pop["counts"].values()), np.float64)
        head = float(pop["head_min_count"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: expected {{'head_min_count': H, 'counts': {{item re-id: events}}}}") from None
    counts = np.zeros(num_items + 1)
    keep = (ids > 0) & (ids <= num_items)
    counts[ids[keep]] = cnt[keep]
    return counts, head


_LINE_USER = re.compile(rb"\s*\[\s*\[\s*(\d+)\s*,")


def check_one_user_per_line(seq_path: str, offsets: list, skip_bad: bool = False) -> None:
    """seq.jsonl holds one line per user (docs/DATA_FORMAT.md). A user on several lines would
    train on one line the click another holds out for validation, and count twice: refused,
    with the count and the first case. Reads only the first bytes of each line (the first
    record's user id). A line of such a pair that is not a valid user line gets its own error
    instead (with skip_bad: it is skipped in training, so it repeats no one)."""
    if not os.path.isfile(seq_path):
        return                          # its reader names what is wrong with it
    first, pairs = {}, []
    with open(seq_path, "rb") as f:
        for i, off in enumerate(offsets):
            f.seek(off)
            m = _LINE_USER.match(f.read(64))
            if m is None:
                continue
            j = first.setdefault(int(m.group(1)), i)
            if j != i:
                pairs.append((int(m.group(1)), j, i))
    if not pairs:
        return
    lines, bad = LineReader(seq_path, offsets), set()
    for i in sorted({k for _, a, b in pairs for k in (a, b)}):
        try:
            records, where = lines[i]
            parse_user_records(records, where)
        except DataError:
            if not skip_bad:
                raise
            bad.add(i)
    pairs = [(u, a, b) for u, a, b in pairs if a not in bad and b not in bad]
    if pairs:
        u, a, b = pairs[0]
        raise DataError(f"{seq_path}: {len(pairs)} line(s) repeat a user of an earlier line ({len(first)} users on "
                        f"{len(offsets)} lines; first: user {u} on lines {a + 1} and {b + 1}); expected one line per "
                        f"user: merge each user's records into one line")


def load_train_data(data_dir: str, cfg: DataConfig, cache_dir: str, ctr_dir: str = None,
                    limit_lines: int = None, skip_bad: bool = False, rank_packages: bool = False,
                    keep_items: bool = False, sid_dir: str = None) -> tuple:
    """Read a training folder: returns (the complete DataConfig: cfg with the schema, CTR
    standardisation and multimodal dimensions filled in; ItemTable; SequenceBuilder; seq path;
    offsets)."""
    seq_path = os.path.join(data_dir, "seq.jsonl")
    offsets = read_offsets(os.path.join(data_dir, "seq_offsets.pkl"))
    if limit_lines is not None:
        offsets = offsets[:limit_lines]
    if not offsets:
        raise DataError(f"{seq_path}: no users (empty offsets file)")
    check_one_user_per_line(seq_path, offsets, skip_bad)
    indexer = load_pickle(os.path.join(data_dir, "indexer.pkl"))
    if not isinstance(indexer, dict) or "i" not in indexer:
        raise DataError(f"{data_dir}/indexer.pkl: expected a dict with keys 'u', 'i', 'f'")
    item_feat_dict = read_item_feat_dict(os.path.join(data_dir, "item_feat_dict.json"))
    profiles = scan_profiles(seq_path, offsets, skip_bad=skip_bad)
    cfg = derive_schema(cfg, indexer, item_feat_dict, profiles)
    n_items, first_item = digit_strings(item_feat_dict.items(), "item")
    n_users, first_user = digit_strings(enumerate(profiles, 1), "profile")
    if n_items + n_users:
        print(f"notice: {data_dir}: {n_items + n_users} feature values are digit strings ({n_items} in "
              f"item_feat_dict.json, {n_users} in the first {len(profiles)} profiles; first: {first_item or first_user}); "
              f"a string is read as a value unseen in training (0), not as a number: write re-ids as JSON numbers",
              flush=True)
    item_ctr, ctr_meta = load_ctr_for(cfg, ctr_dir, seq_path)
    cfg = dataclasses.replace(cfg, ctr_meta=ctr_meta)
    if cfg.use_sid and not cfg.sid:
        cfg = dataclasses.replace(cfg, sid=load_sid_codebook(sid_dir, data_dir))
    table = ItemTable(cfg, indexer, item_feat_dict, os.path.join(data_dir, "creative_emb"),
                      cache_dir, item_ctr)
    cfg = dataclasses.replace(cfg, mm_dims=dict(table.mm_dims))
    # training records hold user re-ids: no raw-id index needed (it grows with the users)
    builder = SequenceBuilder(cfg, table, {}, strict_items=True, rank_packages=rank_packages,
                              keep_items=keep_items)
    return cfg, table, builder, seq_path, offsets


def load_ctr_for(cfg: DataConfig, ctr_dir: str, seq_path: str) -> tuple:
    """(item CTR table, ctr_meta) when a CTR channel is on, else (None, {}). Refuses priors
    computed from another seq.jsonl, or from this one before it changed.

    The user channel needs only the prior and standardisation: its value is computed from the
    user's own events before each position, the same way in training and inference."""
    if not (cfg.use_userctr or cfg.use_itemctr):
        return None, {}
    if ctr_dir is None:
        raise DataError(f"CTR features asked for but no ctr_meta.json found; run "
                        f"precompute_ctr.py --seq_path {seq_path} --output_dir <USER_CACHE_PATH>/ctr")
    _, item_ctr, meta = load_ctr(ctr_dir, sides=("item",))
    fp = meta.get("seq_fingerprint")
    if fp is not None and not same_source(fp, seq_path):
        raise DataError(f"{os.path.join(ctr_dir, P.META_FILE)}: CTR priors computed from {fp.get('path')} as it was "
                        f"then, not from {seq_path} as it is now; run precompute_ctr.py --seq_path {seq_path} "
                        f"--output_dir {ctr_dir} again")
    return item_ctr, meta


def load_item_ctr(cfg: DataConfig, ctr_dir: str) -> dict:
    """Inference: the item CTR counts of a CTR folder, refused unless its priors and standardisation
    are those the checkpoint was trained with (cfg.ctr_meta)."""
    if ctr_dir is None:
        raise DataError("the model uses item CTR but no ctr_meta.json was found in USER_CACHE_PATH/ctr or "
                        "TRAIN_DATA_PATH/ctr; run precompute_ctr.py on the training seq.jsonl")
    _, item_ctr, meta = load_ctr(ctr_dir, sides=("item",))
    keys = ("alpha", "beta", "logit", "mean", "std")
    want = cfg.ctr_meta.get("item", {})
    if any(meta["item"].get(k) != want.get(k) for k in keys):
        raise DataError(f"{os.path.join(ctr_dir, P.META_FILE)}: item CTR priors differ from those the model was "
                        f"trained with; point USER_CACHE_PATH at the training run's cache")
    return item_ctr
