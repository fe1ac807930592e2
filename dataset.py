"""Training data for the generative recommender: safe file I/O, the feature schema, time and CTR
features, the offsets-based sequence reader and the packed collate.

Layout and quirks follow ../shared/docs/DATA_FORMAT.md (the TencentGR / TAAC 2025 layout).
"""
import contextlib
import io
import itertools
import json
import math
import os
import pickle
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from precompute_ctr import ctr_value, load_ctr


class DataError(Exception):
    """Bad or missing input. Scripts print str(err) as one line and exit non-zero."""

    def __str__(self):
        # A DataLoader worker re-raises as "Caught DataError in DataLoader worker ...\nOriginal
        # Traceback ...\ndataset.DataError: <msg>": keep only the original one-line message.
        msg = super().__str__()
        if msg.startswith("Caught DataError") and "DataError: " in msg:
            msg = msg.rsplit("DataError: ", 1)[1].strip()
        return msg


def run_cli(main, exit_codes=None):
    """A script's entry point: runs main(); a known error (DataError, exit 2, plus any given in
    exit_codes) becomes one "error: ..." line on stderr and that exit code, never a traceback."""
    codes = {DataError: 2, **(exit_codes or {})}
    try:
        main()
    except tuple(codes) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(next(c for t, c in codes.items() if isinstance(e, t)))


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


def _first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_pickle(path):
    """Unpickle `path` allowing only the builtin types these data files hold."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file, expected a pickle")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or invalid pickle ({_first_line(e)}); only builtin containers, "
                        f"numbers and numpy arrays are allowed") from None
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, ValueError, struct.error...
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {_first_line(e)})") from None


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

def read_offsets(path, seq_path=None):
    """Byte offsets of each line. Accepts the list the layout specifies or a {reid: offset} dict
    written by some converters (then lines are taken in file order).

    The offsets are checked against the sequence file (`seq_path`; by default `<name>.jsonl`
    beside `<name>_offsets.pkl`, when it exists) without reading it all: they must increase, and
    the last one must start a line of the file after which only blank lines follow. That refuses
    an offsets file from another seq file, offsets past the end and a count that disagrees with
    the number of lines (too many or too few at the end). A wrong offset in the middle is refused
    when its line is read: LineReader checks that each offset starts a line.
    """
    path = os.fspath(path)
    off = load_pickle(path)
    if isinstance(off, dict):
        entries = off.items()
    elif isinstance(off, (list, tuple)):
        entries = enumerate(off)
    else:
        raise DataError(f"{path}: a pickled {type(off).__name__}, expected a list of byte offsets "
                        f"(one per line of the seq file) or a dict re-id -> offset")
    for k, o in entries:
        if not isinstance(o, (int, np.integer)) or isinstance(o, bool) or o < 0:
            raise DataError(f"{path}: entry {k!r} is {o!r}, expected a non-negative int byte offset")
    off = sorted(int(o) for o in off.values()) if isinstance(off, dict) else [int(o) for o in off]
    for k in range(1, len(off)):
        if off[k] <= off[k - 1]:
            raise DataError(f"{path}: entry {k} (byte offset {off[k]}) is not after entry {k - 1} "
                            f"({off[k - 1]}), expected increasing offsets, one per line")
    if seq_path is None and path.endswith("_offsets.pkl"):
        seq_path = path[:-len("_offsets.pkl")] + ".jsonl"
    if seq_path is not None and os.path.isfile(seq_path):
        _check_offsets_cover(path, off, os.fspath(seq_path))
    return off


def _check_offsets_cover(path, off, seq):
    """The cheap load-time check of read_offsets: an O(1) look at the end of `seq`."""
    size = os.path.getsize(seq)
    if size == 0:
        raise DataError(f"{seq}: empty file, expected one JSON array of records per line")
    if not off:
        raise DataError(f"{path}: no offsets, but {seq} holds {size} bytes; expected one offset per line")
    n, last = len(off), off[-1]
    if last >= size:
        raise DataError(f"{path}: entry {n - 1} (byte offset {last}) is past the end of {seq} "
                        f"({size} bytes); is the offsets file from this seq file?")
    with open(seq, "rb") as f:
        f.seek(max(last - 1, 0))
        if last and f.read(1) != b"\n":
            raise DataError(f"{path}: entry {n - 1} (byte offset {last}) is not at a line start of "
                            f"{seq}; is the offsets file from this seq file?")
        f.readline()
        end = f.tell()
        while chunk := f.read(1 << 16):
            if chunk.strip():
                raise DataError(f"{path}: {n} offsets, but {seq} has more lines (the line at the "
                                f"last offset ends at byte {end} of {size}); expected one offset per line")


def read_json(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_item_feat_dict(path):
    """item_feat_dict.json: an object keyed by item re-id strings ("47086") whose values are
    feature dicts (null for an item without features)."""
    obj = read_json(path)
    if type(obj) is not dict:
        raise DataError(f"{path}: a JSON {_jtype(obj)}, expected an object "
                        f"{{item re-id: {{feature_id: value}}}}")
    for k, fd in obj.items():
        if not (k.isascii() and k.isdigit()):
            raise DataError(f"{path}: key {json.dumps(k)} is not an item re-id, expected a "
                            f"decimal integer string like \"47086\"")
        check_feats(fd, path, f"item {json.dumps(k)}")
    return obj


def _json_error(where, e, expected):
    """DataError for a line json.loads refused (JSONDecodeError, UnicodeDecodeError, RecursionError)."""
    if isinstance(e, json.JSONDecodeError):
        why = f"{e.msg}, column {e.colno}"
    elif isinstance(e, UnicodeDecodeError):
        why = f"not UTF-8: {e.reason} at column {e.start + 1}"
    else:
        why = "nested too deeply"
    return DataError(f"{where}: invalid JSON ({why}), expected {expected}")


def iter_jsonl(path):
    """Yield (line_number, object) for each non-empty line of a JSON-lines file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise _json_error(f"{path}:{lineno}", e, "one JSON value per line") from None
            yield lineno, obj


RECORD_LAYOUT = "[user_id, item_id, user_feat, item_feat, action_type, timestamp]"


def _jtype(v):
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def show_json(v):
    """A parsed JSON value as the file spells it, cut to 40 characters."""
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_feats(fd, where, what):
    """A feature dict: fid -> int, string (an unseen value at inference), a list of them, or null."""
    if fd is None:
        return
    if type(fd) is not dict:
        raise DataError(f"{where}: {what} is a JSON {_jtype(fd)}, expected an object "
                        f"{{feature_id: value}} or null")
    for k, v in fd.items():
        t = type(v)
        if t is int or t is str or v is None or (t is list and all(type(x) in (int, str) for x in v)):
            continue
        raise DataError(f"{where}: {what} feature {json.dumps(k)} is {show_json(v)}, expected an int, "
                        f"a string or a list of them")


_FEAT_TYPES = frozenset((int, str, list, type(None)))


def _feats_ok(dicts):
    """check_feats' verdict for many dicts in one C-level pass (this runs for every sample)."""
    vals = list(itertools.chain.from_iterable(map(dict.values, dicts)))
    types = set(map(type, vals))
    if not _FEAT_TYPES.issuperset(types):
        return False
    return list not in types or {int, str}.issuperset(
        map(type, itertools.chain.from_iterable(v for v in vals if type(v) is list)))


def parse_user_records(records, where):
    """Split one user's line into (user_key, user_feat, events).

    events: list of (item, item_feat, action, ts) in time order (stable sort by timestamp); a
    null action is an exposure. The profile record's timestamp is dropped here on purpose: it is
    written after the target and would leak its timing. Every field is type-checked (a user id is
    a re-id or a raw string, an item id a non-negative int: its range is the caller's business,
    as a raw creative id is valid at inference); records are numbered from 1 in messages.
    """
    if type(records) is not list:
        raise DataError(f"{where}: the line is a JSON {_jtype(records)}, expected a JSON array of "
                        f"records {RECORD_LAYOUT}")
    if not records:
        raise DataError(f"{where}: empty array, expected at least one record {RECORD_LAYOUT}")
    user, user_feat, events, feats, n = None, None, [], [], len(records)
    for j, r in enumerate(records, 1):
        rec = f"record {j} of {n}"
        if type(r) is not list:
            raise DataError(f"{where}: {rec} is a JSON {_jtype(r)}, expected a 6-element array {RECORD_LAYOUT}")
        if len(r) != 6:
            raise DataError(f"{where}: {rec} has {len(r)} elements, expected 6 {RECORD_LAYOUT}")
        u, item, uf, itf, act, ts = r
        if not ((type(u) is int and u >= 0) or (type(u) is str and u)):
            raise DataError(f"{where}: {rec}: user_id is {show_json(u)}, expected a non-negative int "
                            f"(re-id) or a non-empty string (raw id)")
        if user is None:
            user = u
        if type(ts) is not int or ts < 0:
            raise DataError(f"{where}: {rec}: timestamp is {show_json(ts)}, expected a non-negative int "
                            f"(Unix seconds)")
        if item is None:
            check_feats(uf, where, f"{rec}: user_feat")
            user_feat = uf or user_feat
            continue
        if type(item) is not int or item < 0:
            raise DataError(f"{where}: {rec}: item_id is {show_json(item)}, expected a non-negative int "
                            f"or null (profile record)")
        if act is None:
            act = 0
        elif type(act) is not int or act not in (0, 1, 2):
            raise DataError(f"{where}: {rec}: action_type is {show_json(act)}, expected 0, 1, 2 or null")
        if itf is not None:
            if type(itf) is not dict:
                check_feats(itf, where, f"{rec}: item_feat")
            feats.append((rec, itf))
        events.append((item, itf, act, ts))
    if not _feats_ok(fd for _, fd in feats):
        for rec, fd in feats:
            check_feats(fd, where, f"{rec}: item_feat")
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


def _mm_cid(cid, where):
    """A creative id key: an int, or its decimal string (pickled dicts from some converters)."""
    if isinstance(cid, str) and cid.isascii() and cid.isdigit():
        return int(cid)
    if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or cid < 0:
        raise DataError(f"{where}: creative id {show_json(cid)} is not a non-negative int")
    return int(cid)


def _mm_vector(vec, where):
    """A vector as flat float32: a non-empty list (or numpy array) of numbers."""
    try:
        a = np.asarray(vec) if isinstance(vec, (list, np.ndarray)) else None
    except ValueError:                       # ragged nested lists
        a = None
    if a is None or a.ndim == 0 or a.size == 0 or a.dtype.kind not in "fiu":
        raise DataError(f"{where}: emb is {show_json(vec)}, expected a non-empty list of numbers")
    return a.astype(np.float32).reshape(-1)


def iter_mm_vectors(emb_dir, fid):
    """Yield (creative_id, float32 vector, where) for feature `fid`, whichever form it is stored in."""
    for src in _mm_sources(emb_dir, fid):
        if src.endswith(".pkl"):
            table = load_pickle(src)
            if not isinstance(table, dict):
                raise DataError(f"{src}: a pickled {type(table).__name__}, expected a dict "
                                f"creative_id -> vector")
            for cid, vec in table.items():
                cid = _mm_cid(cid, src)
                where = f"{src}: creative id {cid}"
                yield cid, _mm_vector(vec, where), where
            continue
        for lineno, obj in iter_jsonl(src):
            where = f"{src}:{lineno}"
            if type(obj) is not dict or "anonymous_cid" not in obj or "emb" not in obj:
                raise DataError(f"{where}: expected an object {{\"anonymous_cid\": <int>, \"emb\": [floats]}}")
            yield _mm_cid(obj["anonymous_cid"], where), _mm_vector(obj["emb"], where), where


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

    def set_popularity(self, counts, head_min_count):
        """Item event counts by row (from item_pop.json); hot = count >= head_min_count."""
        self.pop_count = np.zeros(len(self.id), np.float64)
        self.pop_count[:min(len(counts), len(self.id))] = counts[:len(self.id)]
        self.hot = self.pop_count >= head_min_count

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

    def loo_ctr(self, rows, clicked):
        """Item CTR of a target event without that event (leave-one-out): the feature must not
        encode its own label. None when the item CTR channel is off."""
        if self.ctr_meta is None:
            return None
        return ctr_value(self.ctr_c[rows] - clicked, np.maximum(self.ctr_n[rows] - 1, 0),
                         self.ctr_meta).astype(np.float32)

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

    def __init__(self, cfg, table, user_index, strict_items=False, rank_packages=False):
        self.cfg, self.table, self.user_index = cfg, table, user_index
        self.rank_packages = rank_packages
        self.keep_items = False          # also return every item row of the line (hard negatives)
        self.user_meta = cfg.ctr_meta.get("user") if cfg.use_userctr else None
        # training data holds re-ids only: an id past num_items there is a broken file, while at
        # inference it is a raw creative id (a cold item)
        self.strict_items = strict_items

    def user_row(self, user):
        """Record user id -> re-id; a raw string (unseen user) or anything unknown -> 0."""
        if type(user) is int:
            return user if 0 < user <= self.cfg.num_users else 0
        return self.user_index.get(user, 0) if isinstance(user, str) else 0

    def item_rows(self, items):
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

    def packages(self, items, acts, tgt, rng):
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

    def build(self, user, user_feat, events, train, rng=None):
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
            if n:
                s["pos_row"][start:] = items[tgt]
                s["pos_action"][start:] = acts[tgt] + 1
            if self.keep_items:
                s["_items"] = items
            if self.rank_packages:
                s["pkg_row"], s["pkg_grade"] = np.zeros((T, 5), np.int64), np.zeros((T, 5), np.int64)
                if n:
                    s["pkg_row"][start:], s["pkg_grade"][start:] = self.packages(items, acts, tgt, rng)
        return s


# ---------------------------------------------------------------------------------------------
# Training dataset and packed collate
# ---------------------------------------------------------------------------------------------

class LineReader:
    """Random access to lines of a JSON-lines file by the offsets pickle; one handle per process."""

    def __init__(self, path, offsets):
        self.path, self.offsets = os.fspath(path), offsets
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found")
        self.size = os.path.getsize(self.path)
        self._fh, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def line_bytes(self):
        """Bytes per line (up to the next offset, the last to the end of the file): a proxy for
        each user's number of events that costs no read."""
        return np.diff(np.append(np.asarray(self.offsets, np.int64), self.size))

    def __getitem__(self, i):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        off, where = self.offsets[i], f"{self.path}:{i + 1}"
        if off >= self.size:
            raise DataError(f"{where}: byte offset {off} is past the end of the file ({self.size} "
                            f"bytes); is the offsets file from this seq file?")
        # one byte more per read: the offset must follow a newline (or be 0)
        self._fh.seek(max(off - 1, 0))
        if off and self._fh.read(1) != b"\n":
            raise DataError(f"{where}: byte offset {off} is not at a line start (the byte before it "
                            f"is not a newline); is the offsets file from this seq file?")
        raw = self._fh.readline()
        if not raw.strip():
            raise DataError(f"{where}: empty line at byte offset {off}, expected a JSON array of records")
        try:
            return json.loads(raw), where
        except (ValueError, RecursionError) as e:
            raise _json_error(where, e, "a JSON array of records") from None


def with_location(where, fn, *args):
    """Call fn; a DataError it raises without a location gets `where` (file:line) in front."""
    try:
        return fn(*args)
    except DataError as e:
        if str(e).startswith(where.rsplit(":", 1)[0]):
            raise
        raise DataError(f"{where}: {e}") from None


class SeqDataset(torch.utils.data.Dataset):
    """Training users, one sample per line of seq.jsonl."""

    def __init__(self, seq_path, offsets, builder, train=True, seed=0, skip_bad=False):
        self.lines, self.builder, self.train = LineReader(seq_path, offsets), builder, train
        # package sampling depends only on (seed, epoch, line): workers need no shared RNG state
        self.seed, self.epoch = seed, 0
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.builder.rank_packages else None
        try:
            records, where = self.lines[i]
            user, user_feat, events = parse_user_records(records, where)
            s = with_location(where, self.builder.build, user, user_feat, events, self.train, rng)
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


class PackedCollate:
    """Stacks samples and gathers all item inputs (history, targets, sampled negatives) into one
    dict of tensors inside the DataLoader worker, so the training step only moves tensors.

    Item inputs are gathered once per distinct item (`seq_inv` / `pos_inv` map tokens to them):
    a batch repeats items a lot, and the item tower then runs once per distinct item. Targets
    are distinct per (item, clicked), because the target's item CTR leaves out its own event.
    """

    PER_USER = ("user_id", "user_sparse", "user_array")    # every other array is per token [T, ...]

    def __init__(self, table, trim=True):
        self.table, self.trim = table, trim

    def __call__(self, samples):
        keys = [k for k in samples[0] if not k.startswith("_")]
        lo = 0
        if self.trim:
            # Left padding that every sample of the batch shares is dropped: outputs do not depend
            # on it (the encoder is left-padding invariant, a test checks it), and with batches of
            # similar lengths (EpochSampler's bucketing) it is most of the work on short sequences.
            lo = min(int(np.argmax(s["token_type"] > 0)) for s in samples)
        batch = {k: torch.from_numpy(np.stack([s[k] if k in self.PER_USER else s[k][lo:] for s in samples]))
                 for k in keys}
        batch.update({k: [s[k] for s in samples] for k in samples[0] if k.startswith("_")})
        seq = batch.pop("seq_row").numpy()
        rows, inv = np.unique(seq, return_inverse=True)
        batch.update(self.table.gather(rows, "seq_"))
        batch["seq_inv"] = torch.from_numpy(inv.reshape(seq.shape))
        if "pos_row" in batch:
            pos, click = batch["pos_row"].numpy(), (batch["pos_action"].numpy() >= 2).astype(np.int64)
            keys, inv = np.unique(pos * 2 + click, return_inverse=True)
            rows = keys // 2
            batch.update(self.table.gather(rows, "pos_", ctr=self.table.loo_ctr(rows, keys % 2)))
            batch["pos_inv"] = torch.from_numpy(inv.reshape(pos.shape))
        if "pkg_row" in batch:
            pkg = batch["pkg_row"].numpy()
            rows, inv = np.unique(pkg, return_inverse=True)
            batch.update(self.table.gather(rows, "pkg_"))
            batch["pkg_inv"] = torch.from_numpy(inv.reshape(pkg.shape))
        return batch


def sample_negatives(table, num_neg, num_items, generator=None):
    """Uniform random negatives shared by a batch (prefix neg_); num_neg -1 = the whole catalogue.

    Drawn in the training process from a checkpointed RNG, so a resumed run draws the same."""
    rows = (np.arange(1, num_items + 1) if num_neg < 0 else
            torch.randint(1, num_items + 1, (num_neg,), generator=generator).numpy())
    out = table.gather(rows, "neg_")
    out["neg_row"] = torch.from_numpy(rows)
    return out


def seed_worker(worker_id):
    """DataLoader worker_init_fn: numpy and random follow torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ---------------------------------------------------------------------------------------------
# Loading a training folder
# ---------------------------------------------------------------------------------------------

def scan_profiles(seq_path, offsets, limit=5000, skip_bad=False):
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


def load_item_pop(data_dir, ctr_dir, seq_path, cache_dir, num_items):
    """Item popularity: item_pop.json from the train folder, else the CTR folder; built by
    precompute_ctr's counting into cache_dir/ctr when neither has it. Returns (event counts by
    re-id [num_items + 1], head_min_count)."""
    import precompute_ctr as P
    path = next((os.path.join(d, P.ITEM_POP_FILE) for d in (data_dir, ctr_dir)
                 if d and os.path.exists(os.path.join(d, P.ITEM_POP_FILE))), None)
    if path is None:
        c = P.count_events(seq_path)
        pop = P.item_popularity(c["item_ids"], c["item_events"], 0.8)
        path = os.path.join(cache_dir, "ctr", P.ITEM_POP_FILE)
        dump_json(pop, path)
        print(f"notice: no item_pop.json in {data_dir} or the CTR folder; wrote {path}")
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


def load_train_data(data_dir, cfg, cache_dir, ctr_dir=None, limit_lines=None, skip_bad=False):
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
    item_feat_dict = read_item_feat_dict(os.path.join(data_dir, "item_feat_dict.json"))
    derive_schema(cfg, indexer, item_feat_dict, scan_profiles(seq_path, offsets, skip_bad=skip_bad))
    item_ctr = load_ctr_for(cfg, ctr_dir, seq_path)
    table = ItemTable(cfg, indexer, item_feat_dict, os.path.join(data_dir, "creative_emb"),
                      cache_dir, item_ctr)
    # training records hold user re-ids: no raw-id index needed (it grows with the users)
    builder = SequenceBuilder(cfg, table, {}, strict_items=True)
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
    _, item_ctr, cfg.ctr_meta = load_ctr(ctr_dir, sides=("item",))
    return item_ctr
