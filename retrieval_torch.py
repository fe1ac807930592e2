"""Vectors in, neighbours out: .fbin / .u64bin I/O and exact streaming top-k inner-product search.

This file sees vectors only (no model, no dataset readers). The binary layouts are the ones in
docs/DATA_FORMAT.md: a uint32 (N, D) header, then the row-major payload, little-endian.

The exact search streams the base in chunks: one GEMM per (query chunk, base chunk), then the
maxima of 64-row groups are compared with each query's running k-th best score, so only the few
scores that can still enter the top k reach the (pooled) exact merge. Peak memory is about
workers * chunk_q * chunk_n scores, not Q * N; on the CPU each worker thread owns its query
chunks. On CUDA, search() scans in half precision for a shortlist and re-ranks it in fp32.

    python retrieval_torch.py --query query.fbin --base embedding.fbin --ids id.u64bin \
        --k 10 --out id10.u64bin [--backend torch|faiss|faiss_ivf|faiss_hnsw]
"""
import argparse
import importlib
import errno
import math
import os
import sys
import warnings

import numpy as np
import torch

from layout import ArgumentParser, DataError, atomic_write, os_error

# 2048 x 512 fp32 scores (4 MiB per worker) kept the GEMM near peak and the filter pass cheap on
# the 2-core EPYC this was tuned on (bench/bench_retrieval.py); a GPU wants far bigger blocks.
CPU_CHUNK_Q, CPU_CHUNK_N = 2048, 512
GPU_CHUNK_Q, GPU_CHUNK_N = 8192, 65536
SHORTLIST = 4096  # half-precision candidates per query before the exact fp32 re-rank on CUDA

# ---------------------------------------------------------------------------------------------
# Binary files
# ---------------------------------------------------------------------------------------------


def _read_header(path, itemsize, kind):
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected a {kind} file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
    if len(raw) < 8:
        raise DataError(f"{path}: {size} bytes, too short for the 8-byte {kind} header "
                        f"(uint32 N, uint32 D)")
    n, d = (int(v) for v in np.frombuffer(raw, dtype="<u4"))
    want = 8 + n * d * itemsize
    if size != want:
        raise DataError(f"{path}: header says N={n}, D={d}, so a {kind} file must be {want} bytes "
                        f"(8 + N*D*{itemsize}), but it is {size} bytes")
    if d == 0 and n > 0:
        raise DataError(f"{path}: header says N={n}, D=0; rows must have at least one column")
    return path, n, d


def _write_bin(path, arr, header):
    # f.write, not arr.tofile(f): tofile's C stdio buffer can fail at its flush without an error
    # (a full disk then left a short file that the rename published as complete)
    with atomic_write(path, "wb") as f:
        f.write(np.asarray(header, dtype="<u4").tobytes())
        f.write(arr.reshape(-1).view(np.uint8).data)
        want = 8 + arr.nbytes
        if f.tell() != want:
            raise OSError(errno.EIO, f"wrote {f.tell()} of {want} bytes", os.fspath(path))


def write_fbin(path, arr):
    """Write float32 [N, D] as .fbin (atomic)."""
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if a.ndim != 2 or max(a.shape, default=0) >= 2 ** 32:
        raise DataError(f"{path}: .fbin needs a 2-D array with sides < 2**32, got shape {a.shape}")
    _write_bin(path, np.ascontiguousarray(a, dtype="<f4"), a.shape)


def read_fbin(path, mmap=False):
    """Read .fbin as float32 [N, D]; mmap=True maps it copy-on-write (never loaded whole)."""
    path, n, d = _read_header(path, 4, ".fbin")
    if mmap and n * d > 0:
        return np.memmap(path, dtype="<f4", mode="c", offset=8, shape=(n, d))
    return np.fromfile(path, dtype="<f4", count=n * d, offset=8).reshape(n, d)


def write_u64bin(path, arr):
    """Write uint64 [N] (header N, 1) or [Q, K] (header Q, K) as .u64bin (atomic)."""
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    if a.ndim != 2 or max(a.shape, default=0) >= 2 ** 32:
        raise DataError(f"{path}: .u64bin needs a 1-D or 2-D array with sides < 2**32, got "
                        f"shape {np.shape(arr)}")
    if a.size and a.dtype.kind not in "ui":
        raise DataError(f"{path}: .u64bin holds integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind == "i" and a.min() < 0:
        raise DataError(f"{path}: .u64bin holds unsigned ids, got a negative value {a.min()}")
    _write_bin(path, np.ascontiguousarray(a, dtype="<u8"), a.shape)


def read_u64bin(path):
    """Read .u64bin as uint64 [N, cols]."""
    path, n, d = _read_header(path, 8, ".u64bin")
    return np.fromfile(path, dtype="<u8", count=n * d, offset=8).reshape(n, d)


# ---------------------------------------------------------------------------------------------
# Streaming exact search
# ---------------------------------------------------------------------------------------------


def _resolve_device(device, *xs):
    if device is None:
        device = next((x.device for x in xs if isinstance(x, torch.Tensor) and x.is_cuda), "cpu")
    return torch.device(device)


def _rows(x, name):
    """(n, d, get): get(s, e, device) yields rows s:e as contiguous float32 on device.

    A float32 C-order numpy array (np.memmap included) is wrapped once without a copy, so a
    mapped base is paged in as the scan reaches it; other dtypes are converted chunk by chunk.
    """
    if not isinstance(x, torch.Tensor):
        x = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=np.float32)
        if x.dtype == np.float32 and x.dtype.isnative and x.flags.c_contiguous and x.ndim == 2:
            with warnings.catch_warnings():  # read-only maps: nothing writes through this view
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(x)
    if x.ndim != 2:
        raise DataError(f"{name}: expected a 2-D [rows, dim] array, got shape {tuple(x.shape)}")
    if isinstance(x, torch.Tensor):
        return x.shape[0], x.shape[1], lambda s, e, dev: x[s:e].to(dev, torch.float32).contiguous()
    return x.shape[0], x.shape[1], lambda s, e, dev: torch.from_numpy(
        np.ascontiguousarray(x[s:e], dtype=np.float32)).to(dev)


def _gather(x, idx, device):
    """Rows idx of x (numpy, memmap or torch) as float32 on device."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, device=x.device)].to(device, torch.float32)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)[idx], dtype=np.float32)).to(device)


def _finite(t, name):
    # one reduction: a NaN or inf anywhere makes the sum non-finite (so would values so large
    # that the sum overflows, and their scores would overflow too)
    if not math.isfinite(float(t.sum())):
        raise DataError(f"{name}: vectors hold NaN or inf (or values near the float32 limit)")


def _masker(exclude, qs, qe, nb, chunk_n, device, keep=None):
    """fn(S, s, e) setting the excluded entries of query rows qs:qe, base rows s:e to -inf."""
    if exclude is None:
        return None
    lists = [np.asarray(exclude[i] if exclude[i] is not None else (), dtype=np.int64).ravel()
             for i in range(qs, qe)]
    cols = np.concatenate(lists)
    rows = np.repeat(np.arange(qe - qs, dtype=np.int64), [len(c) for c in lists])
    if cols.size and (cols.min() < 0 or cols.max() >= nb):
        raise DataError(f"exclude: base rows must lie in [0, {nb}), got {cols.min()}..{cols.max()}")
    if keep is not None:  # the target itself is never masked
        ok = cols != keep[qs:qe][rows]
        rows, cols = rows[ok], cols[ok]
    order = np.argsort(cols, kind="stable")
    rows, cols = rows[order], cols[order]
    bounds = np.searchsorted(cols, np.arange(0, nb + chunk_n, chunk_n))
    rows, cols = torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)

    def apply(S, s, e):
        a, b = bounds[s // chunk_n], bounds[s // chunk_n + 1]
        if a < b:
            S[rows[a:b], cols[a:b] - s] = float("-inf")
    return apply


def _setup(query, base, exclude, chunk_q, chunk_n, device):
    dev = _resolve_device(device, query, base)
    nq, dq, qget = _rows(query, "query")
    nb, db, bget = _rows(base, "base")
    if dq != db:
        raise DataError(f"query dim {dq} != base dim {db}")
    if exclude is not None and len(exclude) != nq:
        raise DataError(f"exclude: expected one list per query ({nq}), got {len(exclude)}")
    cq = chunk_q or (GPU_CHUNK_Q if dev.type == "cuda" else CPU_CHUNK_Q)
    cn = chunk_n or (GPU_CHUNK_N if dev.type == "cuda" else CPU_CHUNK_N)
    if cq < 1 or cn < 1:
        raise DataError(f"chunk_q and chunk_n must be >= 1, got {cq}, {cn}")
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    # equal query chunks, a multiple of the worker count of them, none above chunk_q
    n_chunks = workers * -(-nq // (workers * cq))
    cq = max(1, -(-nq // max(1, n_chunks)))
    return dev, nq, qget, nb, bget, cq, cn, workers


def _run_chunks(fn, nq, cq, workers):
    """fn(qs, qe) over query chunks. On the CPU each worker thread runs single-threaded torch
    ops on its own chunks: on a loaded machine the per-op OpenMP barriers of intra-op
    parallelism stall whenever one thread is descheduled, independent workers do not."""
    starts = list(range(0, nq, cq))
    if workers <= 1 or len(starts) <= 1:
        return [fn(qs, min(qs + cq, nq)) for qs in starts]
    from concurrent.futures import ThreadPoolExecutor
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda qs: fn(qs, min(qs + cq, nq)), starts))
    finally:
        torch.set_num_threads(old)


_GROUP = 64  # base rows per filter group: the unit a candidate drags into the exact merge


def _merge_dense(vals, idx, rows, S, s, k):
    """Fold the top-k of S[rows] into rows of (vals, idx); keeps every row sorted best first."""
    sub = S.index_select(0, rows)
    v, i = torch.topk(sub, min(k, S.shape[1]), dim=1, sorted=False)
    cv = torch.cat([vals.index_select(0, rows), v], 1)
    ci = torch.cat([idx.index_select(0, rows), i + s], 1)
    nv, p = torch.topk(cv, k, dim=1)
    vals.index_copy_(0, rows, nv)
    idx.index_copy_(0, rows, ci.gather(1, p))


def _merge_sparse(vals, idx, cr, cv, ci, k):
    """Fold a ragged list of candidates (row cr, score cv, base index ci) into (vals, idx):
    each touched row's k best plus its candidates, padded with -inf, through one small topk."""
    o = torch.argsort(cr, stable=True)
    cr, cv, ci = cr[o], cv[o], ci[o]
    touched, counts = torch.unique_consecutive(cr, return_counts=True)
    slot = torch.repeat_interleave(torch.arange(touched.numel(), device=cr.device), counts)
    pos = torch.arange(cr.numel(), device=cr.device) - (torch.cumsum(counts, 0) - counts)[slot]
    w = k + int(counts.max())
    mv = torch.full((touched.numel(), w), float("-inf"), device=cr.device)
    mi = torch.full((touched.numel(), w), -1, dtype=torch.int64, device=cr.device)
    mv[:, :k] = vals.index_select(0, touched)
    mi[:, :k] = idx.index_select(0, touched)
    mv[slot, k + pos] = cv
    mi[slot, k + pos] = ci
    nv, p = torch.topk(mv, k, dim=1)
    vals.index_copy_(0, touched, nv)
    idx.index_copy_(0, touched, mi.gather(1, p))


def _topk_one(q, bget, nb, k, cn, buf, mask, scorer, check_base):
    qn, dev = q.shape[0], q.device
    vals = torch.full((qn, k), float("-inf"), device=dev)
    idx = torch.full((qn, k), -1, dtype=torch.int64, device=dev)
    thr = vals[:, k - 1]  # a view: each query's running k-th best
    pool, pooled = [], 0

    def flush():
        if pool:
            _merge_sparse(vals, idx, *(torch.cat(c) for c in zip(*pool)), k)
            pool.clear()

    for s in range(0, nb, cn):
        e = min(s + cn, nb)
        S = buf[:qn * (e - s)].view(qn, e - s)
        b = bget(s, e, dev)
        if check_base:  # one query chunk checks the base: NaN scores would never be selected
            _finite(b, "base")
        if scorer is None:
            torch.mm(q, b.T, out=S)
        else:
            scorer(q, b, S)
        if mask is not None:
            mask(S, s, e)
        # Group maxima against the running k-th best: after the first chunks only a handful of
        # 64-row groups per query can still improve it, so the exact merge sees those few
        # scores instead of the block (torch.topk costs ~10 ns a score on this CPU).
        g = _GROUP if (e - s) % _GROUP == 0 else e - s
        ng = (e - s) // g
        hit = torch.nonzero(S.view(qn, ng, g).amax(2) > thr[:, None])
        if 2 * hit.shape[0] > qn * ng:  # warm-up: most groups qualify, dense row top-k is cheaper
            flush()
            pooled = 0
            _merge_dense(vals, idx, torch.unique(hit[:, 0]), S, s, k)
        elif hit.shape[0]:
            rows, grp = hit[:, 0], hit[:, 1]
            cand = S.view(qn * ng, g).index_select(0, rows * ng + grp)
            hr, hc = torch.nonzero(cand > thr.index_select(0, rows)[:, None]).unbind(1)
            pool.append((rows[hr], cand[hr, hc], s + grp[hr] * g + hc))
            pooled += hr.numel()
            # Merging is ~20 small ops, so candidates wait in a pool; thr lags meanwhile, which
            # only lets a few more candidates in.
            if pooled >= 4 * qn:
                flush()
                pooled = 0
    flush()
    return vals, idx


def _sort_rows(vals, idx, k):
    """Best first, equal scores by lower index, first k columns; -inf slots get index -1."""
    idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)
    o = torch.argsort(idx, dim=1)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, o), idx.gather(1, o)


def topk_inner_product(query, base, k, *, exclude=None, chunk_q=None, chunk_n=None, device=None,
                       scorer=None):
    """Exact top-k of query @ base.T: (scores float32 [Q, k'], idx int64 [Q, k']), k' = min(k, N).

    query / base: numpy (np.memmap is streamed, never loaded whole) or torch, [Q, D] and [N, D].
    exclude: None or, per query, base-row indices to mask out (e.g. the user's history).
    Results are on the CPU, best first (equal scores inside the result by lower index; which of
    several rows tied at the cut-off gets in is unspecified); slots no unmasked row can fill
    hold score -inf and index -1. Peak extra memory is about workers * chunk_q * chunk_n
    floats (workers = torch.get_num_threads() on CPU). scorer(q, b, out) replaces the fp32
    GEMM (the half-precision shortlist uses it). NaN/inf in the vectors raise DataError.
    """
    dev, nq, qget, nb, bget, cq, cn, workers = _setup(query, base, exclude, chunk_q, chunk_n,
                                                     device)
    if int(k) < 1:
        raise DataError(f"k must be >= 1, got {k}")
    k = min(int(k), nb)
    if nq == 0 or k == 0:
        return torch.zeros(nq, k), torch.full((nq, k), -1, dtype=torch.int64)

    def one(qs, qe):
        q = qget(qs, qe, dev)
        _finite(q, "query")
        buf = torch.empty((qe - qs) * min(cn, nb), device=dev)
        mask = _masker(exclude, qs, qe, nb, cn, dev)
        vals, idx = _topk_one(q, bget, nb, k, cn, buf, mask, scorer, check_base=qs == 0)
        vals, idx = _sort_rows(vals, idx, k)
        return vals.cpu(), idx.cpu()

    parts = _run_chunks(one, nq, cq, workers)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def target_ranks(query, base, target_idx, *, exclude=None, chunk_q=None, chunk_n=None,
                 device=None):
    """Pessimistic 1-based rank of base row target_idx[i] for query i: 1 + #(score > s_t) +
    #(score == s_t, row != target), masked rows not counted (the target is never masked).

    Every score, the target's own included, comes from the same chunked GEMM, so exact ties (a
    constant model, duplicate vectors) count against the target. Returns int64 [Q] (CPU).
    """
    dev, nq, qget, nb, bget, cq, cn, workers = _setup(query, base, exclude, chunk_q, chunk_n,
                                                     device)
    t_all = np.asarray(target_idx, dtype=np.int64).ravel()
    if len(t_all) != nq:
        raise DataError(f"target_idx: expected {nq} entries, got {len(t_all)}")
    if t_all.size and (t_all.min() < 0 or t_all.max() >= nb):
        raise DataError(f"target_idx: values must lie in [0, {nb}), got "
                        f"{t_all.min()}..{t_all.max()}")

    def one(qs, qe):
        qn = qe - qs
        q = qget(qs, qe, dev)
        _finite(q, "query")
        buf = torch.empty(qn * min(cn, nb), device=dev)
        mask = _masker(exclude, qs, qe, nb, cn, dev, keep=t_all)
        t = torch.from_numpy(t_all[qs:qe]).to(dev)
        rows = torch.arange(qn, device=dev)
        # A first guess at each target score from a GEMM of the scan's own shape; the scan
        # reads the true value from its block, and a chunk that disagrees is scanned again.
        s_t = torch.empty(qn, device=dev)
        cw = min(cn, nb)
        for a in range(0, qn, cw):
            b = min(a + cw, qn)
            tb = torch.zeros(cw, q.shape[1], device=dev)
            tb[:b - a] = _gather(base, t_all[qs + a:qs + b], dev)
            s_t[a:b] = torch.mm(q, tb.T)[rows[a:b], rows[:b - a]]
        for attempt in range(2):
            cnt = torch.zeros(qn, dtype=torch.int64, device=dev)
            s_own = torch.full((qn,), float("nan"), device=dev)
            for s in range(0, nb, cn):
                e = min(s + cn, nb)
                bb = bget(s, e, dev)
                if qs == 0 and attempt == 0:
                    _finite(bb, "base")
                S = buf[:qn * (e - s)].view(qn, e - s)
                torch.mm(q, bb.T, out=S)
                if mask is not None:
                    mask(S, s, e)
                cnt += (S >= s_t[:, None]).sum(1)
                own = torch.nonzero((t >= s) & (t < e)).squeeze(1)
                s_own[own] = S[own, t[own] - s]
            if attempt == 1 or bool((s_own == s_t).all()):
                break
            s_t = s_own
        # the target counted itself iff its scanned score reached the threshold used
        return (cnt + 1 - (s_own >= s_t).long()).cpu()

    parts = _run_chunks(one, nq, cq, workers)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Backends: torch (exact; on CUDA a half-precision shortlist + exact re-rank), faiss
# ---------------------------------------------------------------------------------------------

BACKENDS = ("torch", "faiss", "faiss_ivf", "faiss_hnsw")
_told = set()


def _notice(msg):
    """One line on stderr, once per distinct message and process."""
    if msg not in _told:
        _told.add(msg)
        print(f"retrieval_torch: {msg}", file=sys.stderr)


def topk_half_rerank(query, base, k, *, exclude=None, device=None, shortlist=SHORTLIST,
                     dtype=torch.float16, chunk_q=None, chunk_n=None):
    """Top-k by a half-precision scan for `shortlist` candidates, then an exact fp32 re-rank.

    Queries are scaled to unit norm for the half scan (a per-query positive factor leaves the
    ranking unchanged and keeps scores in fp16 range); a base chunk whose row norms could
    still overflow fp16 is scanned in bfloat16. Exact unless a true top-k row falls outside
    the shortlist, which needs half-precision error larger than the gap between the k-th and
    the shortlist-th score. Meant for CUDA; runs (slowly) on CPU too.
    """
    dev = _resolve_device(device, query, base)
    nb = base.shape[0]
    short = min(max(int(shortlist), int(k)), nb)

    def scorer(q, b, out):
        qh = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
        lo = dtype if float(b.norm(dim=1).amax()) < 3e4 else torch.bfloat16
        out.copy_(torch.mm(qh.to(lo), b.to(lo).T))

    _, cand = topk_inner_product(query, base, short, exclude=exclude, device=dev, scorer=scorer,
                                 chunk_q=chunk_q, chunk_n=chunk_n)
    nq, _, qget = _rows(query, "query")
    out_v, out_i = [], []
    step = max(1, (1 << 24) // max(1, short * base.shape[1]))  # ~64 MiB of gathered rows
    for qs in range(0, nq, step):
        qe = min(qs + step, nq)
        c = cand[qs:qe]
        rows = _gather(base, c.clamp_min(0).flatten().numpy(), dev).view(qe - qs, short, -1)
        sc = torch.bmm(rows, qget(qs, qe, dev)[:, :, None]).squeeze(2)
        sc = sc.masked_fill(c.to(dev) < 0, float("-inf"))
        v, i = _sort_rows(sc.cpu(), c, min(int(k), nb))
        out_v.append(v)
        out_i.append(i)
    kk = min(int(k), nb)
    if not out_v:
        return torch.zeros(0, kk), torch.full((0, kk), -1, dtype=torch.int64)
    return torch.cat(out_v), torch.cat(out_i)


def _faiss_search(query, base, k, kind, exclude, device, seed, nprobe, ef_search):
    import faiss
    xb = base.detach().cpu().numpy() if isinstance(base, torch.Tensor) else base
    xq = query.detach().cpu().numpy() if isinstance(query, torch.Tensor) else query
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nb, d = xb.shape
    if xq.ndim != 2 or xq.shape[1] != d:
        raise DataError(f"query shape {xq.shape} does not match base dim {d}")
    if exclude is not None and len(exclude) != len(xq):
        raise DataError(f"exclude: expected one list per query ({len(xq)}), got {len(exclude)}")
    # faiss cannot mask per query: fetch enough extra neighbours to drop every excluded one
    extra = 0 if exclude is None else max((len(e) for e in exclude if e is not None), default=0)
    kk = min(k + extra, nb)
    if kind == "faiss_ivf":
        nlist = max(1, min(int(4 * math.sqrt(nb)), nb // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = xb
        if nb > 64 * nlist:
            rng = np.random.default_rng(seed)
            train = xb[np.sort(rng.choice(nb, 64 * nlist, replace=False))]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = min(nlist, nprobe)
    elif kind == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = max(ef_search, kk)
    else:
        index = faiss.IndexFlatIP(d)
    if torch.device(device or "cpu").type == "cuda" and kind != "faiss_hnsw":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        else:
            _notice("faiss has no GPU support here; using faiss-cpu")
    index.add(xb)
    scores, ids = index.search(xq, kk)
    vals, idx = torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))
    vals = vals.masked_fill(idx < 0, float("-inf"))
    if extra:
        rows = np.repeat(np.arange(len(xq)), [0 if e is None else len(e) for e in exclude])
        cols = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in exclude
                               if e is not None] or [np.zeros(0, np.int64)])
        hit = np.isin(np.arange(len(xq))[:, None] * nb + ids, rows * nb + cols)
        vals = vals.masked_fill(torch.from_numpy(hit), float("-inf"))
    return _sort_rows(vals, idx, min(k, nb))


def search(query, base, k, *, backend="torch", exclude=None, device=None, seed=0, nprobe=64,
           ef_search=128):
    """Top-k inner-product search: (scores float32 [Q, k'], idx int64 [Q, k']) on the CPU.

    backend: "torch" (exact streaming; with device cuda a half-precision shortlist and an
    exact fp32 re-rank), "faiss" (exact IndexFlatIP), "faiss_ivf" / "faiss_hnsw" (approximate,
    nprobe / ef_search). A faiss backend runs on the GPU when device is cuda and faiss has GPU
    support, else on the CPU; without faiss it falls back to the exact torch search, each
    fallback with a one-line notice on stderr.
    """
    if backend not in BACKENDS:
        raise DataError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if int(k) < 1:
        raise DataError(f"k must be >= 1, got {k}")
    dev = _resolve_device(device, query, base)
    if dev.type == "cuda" and not torch.cuda.is_available():
        _notice("CUDA is not available; searching on the CPU")
        dev = torch.device("cpu")
    if backend != "torch":
        try:
            importlib.import_module("faiss")
        except ImportError:
            _notice(f"faiss is not installed; backend {backend} falls back to the exact torch "
                    f"search")
            backend = "torch"
    if backend != "torch":
        return _faiss_search(query, base, int(k), backend, exclude, dev, seed, nprobe, ef_search)
    if dev.type == "cuda":
        return topk_half_rerank(query, base, k, exclude=exclude, device=dev)
    return topk_inner_product(query, base, k, exclude=exclude, device=dev)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--query", required=True, help="query vectors, .fbin [Q, D]")
    ap.add_argument("--base", required=True, help="base (item) vectors, .fbin [N, D]")
    ap.add_argument("--ids", required=True, help="retrieval ids of the base rows, .u64bin [N, 1]")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (capped at N)")
    ap.add_argument("--out", required=True, help="output .u64bin [Q, K]: retrieval ids, best first")
    ap.add_argument("--backend", default="torch", choices=BACKENDS, help="search backend")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--nprobe", type=int, default=64, help="faiss_ivf: lists probed per query")
    ap.add_argument("--ef_search", type=int, default=128, help="faiss_hnsw: search beam width")
    ap.add_argument("--seed", type=int, default=0, help="seed of the faiss_ivf training sample")
    return ap


def parse_device(value: str, need_cuda: bool = True) -> torch.device:
    """--device VALUE as a torch.device: cpu or cuda[:N], else a DataError naming the flag; with
    need_cuda, a CUDA device must also exist on this machine."""
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise DataError(f"--device {value}: expected cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise DataError(f"--device {value}: expected cpu or cuda (cuda:N)")
    if need_cuda and dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {value}: expected a device this machine has: CUDA is not available here")
    return dev


def check_args(args) -> None:
    """Flag ranges and the device, before any file is read (DataError naming the flag)."""
    for flag, lo in (("k", 1), ("threads", 0), ("nprobe", 1), ("ef_search", 1), ("seed", 0)):
        v = getattr(args, flag)
        if v < lo:
            raise DataError(f"--{flag} {v}: expected an integer >= {lo}")
    parse_device(args.device, need_cuda=False)      # search() falls back to the CPU with a notice
    outs = os.path.realpath(args.out)
    for flag in ("query", "base", "ids"):
        if os.path.realpath(getattr(args, flag)) == outs:
            raise DataError(f"{args.out}: --out would overwrite the input --{flag} {getattr(args, flag)}")
    if os.path.isdir(args.out):
        raise DataError(f"{args.out}: a folder (--out), expected the path of the .u64bin file to write")


def main(argv=None):
    """The command line; bad flags and files are one "error: ..." line and exit 2."""
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 2


def _main(args):
    check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    query = read_fbin(args.query, mmap=True)
    base = read_fbin(args.base, mmap=True)
    ids = read_u64bin(args.ids)
    if ids.shape != (base.shape[0], 1):
        raise DataError(f"{args.ids}: expected [{base.shape[0]}, 1] ids (one per row of "
                        f"{args.base}), got {list(ids.shape)}")
    if query.shape[1] != base.shape[1] and query.shape[0] and base.shape[0]:
        raise DataError(f"{args.query}: dim {query.shape[1]} != dim {base.shape[1]} of "
                        f"{args.base}")
    if base.shape[0] == 0:
        raise DataError(f"{args.base}: no base vectors to search")
    try:
        _, idx = search(query, base, args.k, backend=args.backend, device=args.device,
                        seed=args.seed, nprobe=args.nprobe, ef_search=args.ef_search)
    except DataError as e:   # "query: ..." / "base: ...": name the file
        msg = str(e)
        for name, path in (("query", args.query), ("base", args.base)):
            if msg.startswith(name + ":"):
                msg = path + msg[len(name):]
        raise DataError(msg) from None
    if bool((idx < 0).any()):
        raise DataError("some queries found fewer than --k neighbours")
    if idx.shape[1] < args.k:
        print(f"warning: --k {args.k} but {args.base} holds only {base.shape[0]} vectors: "
              f"{idx.shape[1]} ids per query", file=sys.stderr)
    if query.shape[0] == 0:
        print(f"warning: {args.query}: no query vectors; {args.out} holds no rows", file=sys.stderr)
    write_u64bin(args.out, ids[:, 0][idx.numpy()])
    print(f"wrote {args.out}: {idx.shape[0]} queries x {idx.shape[1]} ids ({args.backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
