"""Training data for the generative recommender: safe file I/O, the feature schema, time and CTR
features, the offsets-based sequence reader and the packed collate.

Layout and quirks follow ../shared/docs/DATA_FORMAT.md (the TencentGR / TAAC 2025 layout).
"""
import contextlib
import io
import json
import math
import os
import pickle
import random
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from precompute_ctr import ctr_value, load_ctr


class DataError(Exception):
    """Bad or missing input. Scripts print str(err) as one line and exit non-zero."""


# ---------------------------------------------------------------------------------------------
# Safe file I/O
# ---------------------------------------------------------------------------------------------

# The layout's pickles hold only builtin containers and numbers, plus defaultdict (indexer['f'])
# and, in emb_81_32.pkl, numpy arrays. Anything else could execute code on load.
_SAFE_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bool"), ("builtins", "complex"),
    ("collections", "defaultdict"), ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "float32"), ("numpy", "float64"),
    ("numpy", "int64"), ("numpy", "int32"), ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def load_pickle(path):
    """Unpickle `path` allowing only the builtin types these data files hold."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or invalid pickle ({e}); only builtin containers, "
                        f"numbers and numpy arrays are allowed") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def atomic_write(path, mode="w", **kwargs):
    """Open a temporary file next to `path`; on success flush, fsync and rename it over `path`.

    A crash midway leaves `path` untouched (old content or absent), never half-written.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)       # mkstemp makes 0600; give the usual file mode
        with io.open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dump_pickle(obj, path):
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def dump_json(obj, path, **kwargs):
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **kwargs)


# ---------------------------------------------------------------------------------------------
# Layout readers
# ---------------------------------------------------------------------------------------------

def read_offsets(path):
    """Byte offsets of each line. Accepts the list the layout specifies or a {reid: offset} dict
    written by some converters (then lines are taken in file order)."""
    off = load_pickle(path)
    if isinstance(off, dict):
        off = sorted(off.values())
    if not isinstance(off, (list, tuple)) or not all(isinstance(o, int) and o >= 0 for o in off):
        raise DataError(f"{path}: expected a pickled list of non-negative int byte offsets")
    return list(off)


def read_json(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def iter_jsonl(path):
    """Yield (line_number, object) for each non-empty line of a JSON-lines file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}), "
                                f"expected one JSON value per line") from None


def parse_user_records(records, where):
    """Split one user's line into (user_key, user_feat, events).

    events: list of (item, item_feat, action, ts) in time order (stable sort by timestamp); a
    null action is an exposure. The profile record's timestamp is dropped here on purpose: it is
    written after the target and would leak its timing.
    """
    if not isinstance(records, list):
        raise DataError(f"{where}: expected a JSON array of records, got {type(records).__name__}")
    user, user_feat, events = None, None, []
    for j, r in enumerate(records):
        if not isinstance(r, list) or len(r) != 6:
            raise DataError(f"{where}: record {j} is not a 6-element array "
                            f"[user_id, item_id, user_feat, item_feat, action_type, timestamp]")
        u, item, uf, itf, act, ts = r
        if user is None:
            user = u
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
            raise DataError(f"{where}: record {j} timestamp {ts!r} is not a non-negative int")
        if item is None:
            if uf is not None and not isinstance(uf, dict):
                raise DataError(f"{where}: record {j} user_feat must be an object or null")
            user_feat = uf or user_feat
            continue
        if act is None:
            act = 0
        if act not in (0, 1, 2):
            raise DataError(f"{where}: record {j} action_type {act!r} not in {{0, 1, 2, null}}")
        if itf is not None and not isinstance(itf, dict):
            raise DataError(f"{where}: record {j} item_feat must be an object or null")
        events.append((item, itf, act, ts))
    events.sort(key=lambda e: e[3])
    return user, user_feat, events


# ---------------------------------------------------------------------------------------------
# Feature schema: derived from the data, never hard-coded, saved in every checkpoint
# ---------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Everything the readers need to rebuild features; stored in the checkpoint."""
    maxlen: int = 100                 # item events in the input window (plus one user token)
    max_array_len: int = 8            # array features keep at most this many values
    use_timefeat: bool = True
    use_userctr: bool = False
    use_itemctr: bool = False
    mm_emb_id: list = field(default_factory=list)
    num_users: int = 0
    num_items: int = 0
    user_sparse: dict = field(default_factory=dict)   # fid -> vocab size (max re-id + 1)
    user_array: dict = field(default_factory=dict)
    item_sparse: dict = field(default_factory=dict)
    item_array: dict = field(default_factory=dict)
    mm_dims: dict = field(default_factory=dict)       # fid -> vector length
    ctr_meta: dict = field(default_factory=dict)      # precompute_ctr's ctr_meta.json


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


def derive_schema(cfg, indexer, item_feat_dict, profile_feats):
    """Fill cfg's sizes from the indexer, item_feat_dict and a sample of user profile records.

    A feature is an array feature when its values are lists; vocab = max(#indexer values, max
    re-id seen) + 1, so re-id 0 stays free for padding / unknown.
    """
    f = indexer.get("f", {}) or {}
    isp, iar, usp, uar, longest = {}, {}, {}, {}, [1]
    _scan_feats(item_feat_dict.values(), isp, iar, longest)
    _scan_feats(profile_feats, usp, uar, longest)
    cfg.item_sparse, cfg.item_array = _vocab(isp, f), _vocab(iar, f)
    cfg.user_sparse, cfg.user_array = _vocab(usp, f), _vocab(uar, f)
    cfg.num_users = max(list(indexer.get("u", {}).values()) + [0])
    cfg.num_items = max([int(k) for k in item_feat_dict] + list(indexer.get("i", {}).values()) + [0])
    cfg.max_array_len = max(1, min(cfg.max_array_len, longest[0]))
    return cfg


def encode_feats(feat_dicts, sparse_vocab, array_vocab, max_len):
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

TZ_OFFSET = 8 * 3600          # TencentGR timestamps are Unix seconds; users live in UTC+8
GAP_BUCKETS = 32              # 0 pad, 1 "no previous event", 2.. log2 buckets of the gap
_LOG_YEAR = math.log1p(365 * 86400)


def gap_bucket(gap):
    """Log2 bucket of a non-negative gap in seconds: 2 + floor(log2(1 + gap)), capped."""
    g = np.asarray(gap, dtype=np.float64)
    return (2 + np.minimum(np.floor(np.log2(1.0 + np.maximum(g, 0))), GAP_BUCKETS - 3)).astype(np.int64)


def time_features(ts):
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

def _mm_sources(emb_dir, fid):
    """Files holding feature `fid`: emb_{fid}_*.pkl and/or emb_{fid}_*/ Spark shards."""
    out = []
    if os.path.isdir(emb_dir):
        for name in sorted(os.listdir(emb_dir)):
            if not name.startswith(f"emb_{fid}_"):
                continue
            p = os.path.join(emb_dir, name)
            if os.path.isdir(p):
                out += [os.path.join(p, s) for s in sorted(os.listdir(p))
                        if s.startswith("part-") or s.endswith(".json")]
            elif name.endswith(".pkl"):
                out.append(p)
    return out


def iter_mm_vectors(emb_dir, fid):
    """Yield (creative_id, float32 vector) for feature `fid`, whichever form it is stored in."""
    for src in _mm_sources(emb_dir, fid):
        if src.endswith(".pkl"):
            for cid, vec in load_pickle(src).items():
                yield int(cid), np.asarray(vec, np.float32).reshape(-1), src
            continue
        for lineno, obj in iter_jsonl(src):
            try:
                cid, vec = obj["anonymous_cid"], obj["emb"]
            except (KeyError, TypeError):
                raise DataError(f"{src}:{lineno}: expected an object with 'anonymous_cid' and 'emb'") from None
            yield int(cid), np.asarray(vec, np.float32).reshape(-1), f"{src}:{lineno}"


def build_mm_cache(emb_dir, fid, cid_to_reid, num_items, cache_dir):
    """Convert feature `fid` to `cache_dir/mm/emb_{fid}.npy` (rows: 0 pad, 1..num_items by item
    re-id, then creative ids unknown to the indexer) plus a JSON index written last.

    Returns (memmap table, meta) where meta has 'dim', 'mask' (bool per row) and 'extra' (cid ->
    row). Reuses the cache when the index exists and matches the number of items.
    """
    out = os.path.join(cache_dir, "mm")
    npy, idx_path = os.path.join(out, f"emb_{fid}.npy"), os.path.join(out, f"emb_{fid}.index.json")
    if os.path.exists(idx_path):
        meta = read_json(idx_path)
        if meta.get("num_items") == num_items and os.path.exists(npy):
            table = np.load(npy, mmap_mode="r")
            meta["extra"] = {int(c): r for c, r in meta["extra"].items()}
            meta["mask"] = np.load(os.path.join(out, f"emb_{fid}.mask.npy"))
            return table, meta
    dim, extra = None, {}
    for cid, vec, where in iter_mm_vectors(emb_dir, fid):
        if dim is None:
            dim = len(vec)
        elif len(vec) != dim:
            raise DataError(f"{where}: feature {fid} vector of length {len(vec)}, expected {dim}")
        if not np.isfinite(vec).all():
            raise DataError(f"{where}: feature {fid} vector holds NaN or Inf")
        if cid not in cid_to_reid and cid not in extra:
            extra[cid] = num_items + 1 + len(extra)
    if dim is None:
        raise DataError(f"{emb_dir}: no vectors for multimodal feature {fid} "
                        f"(looked for emb_{fid}_*.pkl and emb_{fid}_*/part-*)")
    os.makedirs(out, exist_ok=True)
    rows = num_items + 1 + len(extra)
    tmp = npy + f".{os.getpid()}.tmp"
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
    mask = np.zeros(rows, bool)
    for cid, vec, _ in iter_mm_vectors(emb_dir, fid):
        r = cid_to_reid.get(cid) or extra[cid]
        table[r], mask[r] = vec, True
    table.flush()
    del table
    os.replace(tmp, npy)
    np.save(os.path.join(out, f"emb_{fid}.mask.npy"), mask)
    dump_json({"fid": fid, "dim": dim, "num_items": num_items, "rows": rows,
               "extra": {str(c): r for c, r in extra.items()}}, idx_path)
    return build_mm_cache(emb_dir, fid, cid_to_reid, num_items, cache_dir)


# ---------------------------------------------------------------------------------------------
# Item table: every per-item input, by row (row = item re-id; cold items appended at inference)
# ---------------------------------------------------------------------------------------------

class ItemTable:
    """Dense per-item features so samples gather them with numpy fancy indexing in workers."""

    def __init__(self, cfg, indexer, item_feat_dict, emb_dir=None, cache_dir=None, item_ctr=None):
        self.cfg = cfg
        n = cfg.num_items + 1
        self.row_of_cid = {int(c): r for c, r in indexer.get("i", {}).items()}
        self.cid = np.zeros(n, np.int64)
        for c, r in self.row_of_cid.items():
            if r < n:
                self.cid[r] = c
        self.id = np.arange(n, dtype=np.int64)
        feats = [None] * n
        for k, fd in item_feat_dict.items():
            r = int(k)
            if 0 < r < n:
                feats[r] = fd
        self.sparse, self.array = encode_feats(feats, cfg.item_sparse, cfg.item_array, cfg.max_array_len)
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
        self.mm, self.mm_row, self.mm_extra = {}, {}, {}
        for fid in cfg.mm_emb_id:
            fid = str(fid)
            table, meta = build_mm_cache(emb_dir, fid, self.row_of_cid, cfg.num_items, cache_dir)
            cfg.mm_dims[fid] = int(meta["dim"])
            self.mm[fid], self.mm_extra[fid] = table, meta["extra"]
            self.mm_row[fid] = np.where(meta["mask"][:n], np.arange(n), -1).astype(np.int64)

    def __len__(self):
        return len(self.id)

    def extend(self, cids, feat_dicts):
        """Append rows for creative ids not in the table (cold items); returns every cid's row."""
        new = [(c, fd) for c, fd in zip(cids, feat_dicts) if c not in self.row_of_cid]
        new = list({c: fd for c, fd in new}.items())
        if new:
            start = len(self.id)
            for j, (c, _) in enumerate(new):
                self.row_of_cid[c] = start + j
            sp, ar = encode_feats([fd for _, fd in new], self.cfg.item_sparse, self.cfg.item_array,
                                  self.cfg.max_array_len)
            k = len(new)
            self.cid = np.concatenate([self.cid, np.array([c for c, _ in new], np.int64)])
            self.id = np.concatenate([self.id, np.zeros(k, np.int64)])
            self.sparse, self.array = np.concatenate([self.sparse, sp]), np.concatenate([self.array, ar])
            prior = ctr_value(0.0, 0.0, self.ctr_meta) if self.ctr_meta is not None else 0.0
            self.ctr_c = np.concatenate([self.ctr_c, np.zeros(k, np.float32)])
            self.ctr_n = np.concatenate([self.ctr_n, np.zeros(k, np.float32)])
            self.ctr_z = np.concatenate([self.ctr_z, np.full(k, prior, np.float32)])
            for fid in self.mm:
                rows = np.array([self.mm_extra[fid].get(c, -1) for c, _ in new], np.int64)
                self.mm_row[fid] = np.concatenate([self.mm_row[fid], rows])
        return np.array([self.row_of_cid.get(c, 0) for c in cids], np.int64)

    def gather(self, rows, prefix, ctr=None):
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
        return {prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# One user's line -> fixed-length numpy arrays (shared by training and inference)
# ---------------------------------------------------------------------------------------------

PAD, USER_TOKEN, ITEM_TOKEN = 0, 1, 2


class SequenceBuilder:
    """Turns parsed records into the token arrays the encoder reads.

    Tokens are [user token] + the newest `maxlen` item events, left-padded to maxlen + 1. In
    training each token is followed by a target (the next event); at inference there is none and
    the newest event is part of the context (the official baseline drops it).
    """

    def __init__(self, cfg, table, user_index):
        self.cfg, self.table, self.user_index = cfg, table, user_index
        self.user_meta = cfg.ctr_meta.get("user") if cfg.use_userctr else None

    def user_row(self, user):
        """Record user id -> re-id; a raw string (unseen user) or anything unknown -> 0."""
        if type(user) is int:
            return user if 0 < user <= self.cfg.num_users else 0
        return self.user_index.get(user, 0) if isinstance(user, str) else 0

    def item_rows(self, items):
        """Record item slots -> table rows: an int <= num_items is a re-id, a larger int a raw
        creative id (cold item at inference), anything else unknown (0)."""
        n, rows = self.cfg.num_items, np.zeros(len(items), np.int64)
        for j, it in enumerate(items):
            if type(it) is int:
                rows[j] = it if 0 < it <= n else self.table.row_of_cid.get(it, 0)
        return rows

    def build(self, user, user_feat, events, train):
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

        s = {"token_type": np.zeros(T, np.int64), "seq_row": np.zeros(T, np.int64),
             "action": np.zeros(T, np.int64), "ts": np.zeros(T, np.int64),
             "pos_idx": np.zeros(T, np.int64)}
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
            s["pos_ctr"] = np.zeros(T, np.float32)
            if n:
                s["pos_row"][start:] = items[tgt]
                s["pos_action"][start:] = acts[tgt] + 1
                tm = self.table.ctr_meta
                if tm is not None:
                    # leave-one-out: the target's own event must not count in its CTR
                    r = items[tgt]
                    s["pos_ctr"][start:] = ctr_value(self.table.ctr_c[r] - (acts[tgt] >= 1),
                                                     np.maximum(self.table.ctr_n[r] - 1, 0), tm)
        return s


# ---------------------------------------------------------------------------------------------
# Training dataset and packed collate
# ---------------------------------------------------------------------------------------------

class LineReader:
    """Random access to lines of a JSON-lines file by the offsets pickle; one handle per process."""

    def __init__(self, path, offsets):
        self.path, self.offsets = os.fspath(path), offsets
        if not os.path.exists(self.path):
            raise DataError(f"{self.path}: file not found")
        self._fh, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(self.offsets[i])
        raw = self._fh.readline()
        where = f"{self.path}:{i + 1}"
        try:
            return json.loads(raw), where
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: invalid JSON at byte offset {self.offsets[i]} ({e.msg}); "
                            f"is the offsets file from this seq file?") from None


class SeqDataset(torch.utils.data.Dataset):
    """Training users, one sample per line of seq.jsonl."""

    def __init__(self, seq_path, offsets, builder, train=True):
        self.lines, self.builder, self.train = LineReader(seq_path, offsets), builder, train

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        records, where = self.lines[i]
        user, user_feat, events = parse_user_records(records, where)
        return self.builder.build(user, user_feat, events, self.train)


class PackedCollate:
    """Stacks samples and gathers all item inputs (history, targets, sampled negatives) into one
    dict of tensors inside the DataLoader worker, so the training step only moves tensors."""

    def __init__(self, table, num_neg=0, num_items=0):
        self.table, self.num_neg, self.num_items = table, num_neg, num_items

    def __call__(self, samples):
        batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]
                 if not k.startswith("_")}
        batch.update({k: [s[k] for s in samples] for k in samples[0] if k.startswith("_")})
        batch.update(self.table.gather(batch.pop("seq_row").numpy(), "seq_"))
        if "pos_row" in batch:
            rows = batch["pos_row"].numpy()
            ctr = batch.pop("pos_ctr").numpy() if self.table.ctr_meta is not None else None
            batch.update(self.table.gather(rows, "pos_", ctr=ctr))
            batch["pos_row"] = torch.from_numpy(rows)
            if self.num_neg:
                # -1: the whole catalogue (full softmax), affordable for small catalogues
                neg = (np.arange(1, self.num_items + 1) if self.num_neg < 0 else
                       torch.randint(1, self.num_items + 1, (self.num_neg,)).numpy())
                batch.update(self.table.gather(neg, "neg_"))
                batch["neg_row"] = torch.from_numpy(neg)
        return batch


def seed_worker(worker_id):
    """DataLoader worker_init_fn: numpy and random follow torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ---------------------------------------------------------------------------------------------
# Loading a training folder
# ---------------------------------------------------------------------------------------------

def scan_profiles(seq_path, offsets, limit=5000):
    """User feature dicts of up to `limit` users (enough to see every user feature id)."""
    lines = LineReader(seq_path, offsets)
    step = max(1, len(lines) // limit)
    out = []
    for i in range(0, len(lines), step):
        records, where = lines[i]
        out.append(parse_user_records(records, where)[1])
    return out


def dataset_has_timestamps(data_dir):
    """False only when a converter's dataset_meta.json (in the folder or its parent) says the
    timestamps are synthetic (e.g. S3Rec: order only)."""
    for d in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
        path = os.path.join(d, "dataset_meta.json")
        if os.path.exists(path):
            return bool(read_json(path).get("has_timestamps", True))
    return True


def find_ctr_dir(*candidates):
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "ctr_meta.json")):
            return d
    return None


def load_train_data(data_dir, cfg, cache_dir, ctr_dir=None, limit_lines=None):
    """Read a training folder: returns (cfg with the schema filled in, ItemTable, builder,
    seq path, offsets)."""
    seq_path = os.path.join(data_dir, "seq.jsonl")
    offsets = read_offsets(os.path.join(data_dir, "seq_offsets.pkl"))
    if limit_lines is not None:
        offsets = offsets[:limit_lines]
    if not offsets:
        raise DataError(f"{seq_path}: no users (empty offsets file)")
    indexer = load_pickle(os.path.join(data_dir, "indexer.pkl"))
    if not isinstance(indexer, dict) or "i" not in indexer:
        raise DataError(f"{data_dir}/indexer.pkl: expected a dict with keys 'u', 'i', 'f'")
    item_feat_dict = read_json(os.path.join(data_dir, "item_feat_dict.json"))
    derive_schema(cfg, indexer, item_feat_dict, scan_profiles(seq_path, offsets))
    item_ctr = load_ctr_for(cfg, ctr_dir, seq_path)
    table = ItemTable(cfg, indexer, item_feat_dict, os.path.join(data_dir, "creative_emb"),
                      cache_dir, item_ctr)
    builder = SequenceBuilder(cfg, table, indexer.get("u", {}))
    return cfg, table, builder, seq_path, offsets


def load_ctr_for(cfg, ctr_dir, seq_path):
    """Item CTR table when a CTR channel is on (cfg.ctr_meta is filled in); else None.

    The user channel needs only the prior and standardisation: its value is computed from the
    user's own events before each position, the same way in training and inference."""
    if not (cfg.use_userctr or cfg.use_itemctr):
        return None
    if ctr_dir is None:
        raise DataError(f"CTR features asked for but no ctr_meta.json found; run "
                        f"precompute_ctr.py --seq_path {seq_path} --output_dir <USER_CACHE_PATH>/ctr")
    _, item_ctr, cfg.ctr_meta = load_ctr(ctr_dir)
    return item_ctr
