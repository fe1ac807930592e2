"""Full-ranking scoring shared by training and inference: user queries and candidate vectors
of a folder or of the held-out users, exact ranks of the targets, HR/NDCG and top-k lists.

main.py validates with evaluate_folder / holdout_metrics; infer.py exports with export() and
retrieves with top_k_ids(). Every candidate is ranked (no sampled candidates), ties counted
against the target; the user's input history can be masked as inference masks it.
"""
import os
import sys
import time

import numpy as np
import torch

import dataset as D
import dataset_packed as P
import retrieval_torch as R
from layout import DataError, children_die_with_me, load_pickle, read_item_feat_dict, worker_signals

# Seconds a DataLoader worker may take to deliver one batch of user sequences before the run
# stops (a hung worker would otherwise wait forever); far above a real batch's time.
WORKER_TIMEOUT_S = 600


class DivergedError(DataError):
    """The model gives NaN or inf vectors: its weights diverged in training. `what` names the
    vectors ("user queries", "candidate vectors")."""

    def __init__(self, what: str, where: str = None):
        self.what = what
        super().__init__(f"{where + ': ' if where else ''}the model's {what} hold NaN or inf: its training "
                         f"diverged; train it again with a lower --lr or with --clip_norm set (main.py)")


def check_finite(**vectors) -> None:
    """DivergedError unless every named array is finite (one float64 sum each: no copy)."""
    for what, v in vectors.items():
        if v.size and not np.isfinite(np.sum(v, dtype=np.float64)):
            raise DivergedError(what.replace("_", " "))


def _artifact_dir(name, *dirs):
    for d in dirs:
        if d and os.path.exists(os.path.join(d, name)):
            return d
    raise DataError(f"{name}: not found in any of {', '.join(d for d in dirs if d)}")


def pick_indexer(eval_dir: str, train_dir: str) -> dict:
    """The indexer for scoring an eval folder: the eval folder's (the harness ships one there),
    unless the training folder's disagrees with it, a raw user or creative id mapped to another
    re-id: then the training one wins, with a notice, since the checkpoint's user and item rows
    follow the data it was trained on. Ids only one of them knows are no conflict."""
    art = _artifact_dir("indexer.pkl", eval_dir, train_dir)
    path = os.path.join(art, "indexer.pkl")
    other = os.path.join(train_dir, "indexer.pkl") if train_dir else None
    if art != eval_dir or other is None or not os.path.exists(other):
        return load_pickle(path)
    with open(path, "rb") as a, open(other, "rb") as b:
        if os.path.getsize(path) == os.path.getsize(other) and a.read() == b.read():
            return load_pickle(path)
    ev, tr = load_pickle(path), load_pickle(other)
    clash = {}
    for key, what in (("u", "users"), ("i", "creative ids")):
        e, t = ((x.get(key) or {}) if isinstance(x, dict) else {} for x in (ev, tr))
        n = sum(1 for k, v in e.items() if k in t and t[k] != v)
        if n:
            clash[what] = (n, sum(1 for k in e if k in t))
    if not clash:
        return ev
    print(f"notice: {path} maps " + " and ".join(f"{n} of {m} shared {what}" for what, (n, m) in clash.items())
          + f" to other re-ids than {other}; using the training folder's: the checkpoint's rows follow it",
          file=sys.stderr, flush=True)
    return tr


def pick_item_features(eval_dir: str, train_dir: str) -> dict:
    """Item features for scoring: the training folder's, updated by the eval folder's where the
    eval one gives an item features (the harness may ship new creatives and current values). An
    item the eval file lists without features (null or {}) keeps its training features, with a
    notice counting them: a feature-less eval file must not strip the candidates' features."""
    paths = [os.path.join(d, "item_feat_dict.json") for d in (train_dir, eval_dir) if d]
    paths = [p for i, p in enumerate(paths) if os.path.exists(p) and p not in paths[:i]]
    if not paths:
        _artifact_dir("item_feat_dict.json", eval_dir, train_dir)
    if len(paths) == 1:
        return read_item_feat_dict(paths[0])
    feats, ev = read_item_feat_dict(paths[0]), read_item_feat_dict(paths[1])
    kept = 0
    for k, fd in ev.items():
        if fd:
            feats[k] = fd
        elif feats.get(k):
            kept += 1
        else:
            feats[k] = fd
    if kept:
        print(f"notice: {paths[1]} lists {kept} item(s) without features that {paths[0]} describes; "
              f"they keep the training features", file=sys.stderr, flush=True)
    return feats


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def attach_young(model, table: D.ItemTable) -> None:
    """Inference tables mark an item's first new_item_events the way training did, from the
    checkpoint's record of when each item stopped being new."""
    if model.data.new_item_events > 0 and hasattr(model, "item_young_until"):
        table.set_young(model.item_young_until.cpu().numpy())


def embed_rows(model, table: D.ItemTable, rows: np.ndarray, device, chunk: int = 4096) -> np.ndarray:
    """Item vectors [N, d] of item-table rows, as scored, written into one preallocated array."""
    out, n = np.empty((len(rows), model.vector_dim), np.float32), 0
    for b in torch.utils.data.DataLoader(P.CandidateDataset(rows, table, chunk), batch_size=None):
        with autocast(device):
            v = model.item_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        out[n:n + len(v)], n = v, n + len(v)
    return out


def neighbor_vectors(cand: np.ndarray, cold: np.ndarray, content: np.ndarray, has: np.ndarray, k: int,
                     width: int, unit: bool) -> tuple:
    """Cold candidates scored through the items they resemble: each cold candidate with content
    gets the mean of the first `width` coordinates of its k nearest warm candidates by content
    cosine, keeping its own later coordinates (the item-age bias). The mean's direction is put at
    unit length where scores are cosine, else at the neighbours' mean length (a mean of k vectors
    is shorter than each, which alone would sink every cold item under the warm ones). An
    untrained item's own vector comes from an id row no gradient reached, or the shared new-item
    row, plus features the id rows outweighed in training; its neighbours' vectors were learned
    from their clicks. -> (new candidate matrix, cold candidates changed)."""
    src = np.flatnonzero(~cold & has)
    dst = np.flatnonzero(cold & has)
    if k <= 0 or not len(src) or not len(dst):
        return cand, 0
    _, idx = R.search(content[dst], content[src], min(k, len(src)))
    idx = np.asarray(idx)
    found = (idx >= 0)[..., None]                                     # [cold, k, 1]
    nb = cand[src[np.maximum(idx, 0)], :width] * found                # [cold, k, width]
    count = np.maximum(found.sum(1), 1)                               # [cold, 1]
    mean = nb.sum(1) / count
    length = 1.0 if unit else np.linalg.norm(nb, axis=2).sum(1, keepdims=True) / count
    out = cand.copy()
    out[dst, :width] = mean * (length / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12))
    return out, len(dst)


# item_recent at inference: the served histories' events in this long a window after the training
# data ends count, as training counts one calendar day before each request. On the demo-layout
# validation world every later served event (4.5 days) scored 4% lower NDCG@10 than the first day
# (0.1521 vs 0.1586; 2 days 0.1590): events long after most requests say what they could not know.
SERVED_WINDOW_S = 86400


def served_recent(model, cand: np.ndarray, rows: np.ndarray, hist_rows: list, hist_ts: list) -> tuple:
    """item_recent at inference: the candidates' recent-activity bias (the vectors' last
    coordinate holds it, with the age bias) replaced by their share of the events the served
    histories hold in the day after the training data ends (SERVED_WINDOW_S), when they hold
    any: what users met since the training data was cut, cold items included; without any, the
    training's last day stays. -> (candidate matrix, number of such events)."""
    ref = int(model.recent_ref)
    after = [h[(t > ref) & (t <= ref + SERVED_WINDOW_S)] for h, t in zip(hist_rows, hist_ts)]
    n = sum(len(a) for a in after)
    if not n:
        return cand, 0
    hits = np.concatenate(after)
    counts = np.bincount(hits[hits > 0], minlength=int(rows.max()) + 1)[rows]
    new = torch.from_numpy(D.recent_buckets(counts, n, model.data.num_items))
    ids = torch.from_numpy(rows).to(model.recent_bucket.device)
    with torch.no_grad():
        shift = model.recent_of(ids, new.to(ids.device)) - model.recent_of(ids)
    out = cand.copy()
    out[:, -1] += shift.float().cpu().numpy()
    return out, n


def cold_rows(model, rows: np.ndarray) -> np.ndarray:
    """bool per candidate row: no id row trained for it (beyond the training items, or not in
    the model's item_trained record; a model without that record calls nothing cold)."""
    if not hasattr(model, "item_trained"):
        return np.zeros(len(rows), bool)
    trained = model.item_trained.cpu().numpy()
    inside = rows < len(trained)
    return ~np.where(inside, trained[np.minimum(rows, len(trained) - 1)], False) | (rows <= 0)


def _no_hang(loader, num_workers: int):
    """Iterate a DataLoader; its timeout (a worker that sent no batch in time) as one line."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader timed out" not in str(e):
            raise
        raise DataError(f"--num_workers {num_workers}: no batch from the DataLoader workers in {loader.timeout:g} s "
                        f"(a worker hung or is starved); run again, or with --num_workers 0") from None


def _worker_init(worker_id: int) -> None:
    """A user-export worker stops with its main process, never outlives it (layout.worker_signals)."""
    worker_signals()


# Bytes of collated validation batches main.py keeps between validations (BatchCache): past it,
# the held-out users are read and collated again each time.
BATCH_CACHE_BYTES = 512 * 2**20


class BatchCache:
    """Collated batches of a dataset whose samples never change (the held-out users: the same
    sequences and features at every validation), kept after the first pass so that later
    validations run the model only; on CPU reading and collating was 40% of a validation. Holds
    at most BATCH_CACHE_BYTES of tensors, else nothing."""

    def __init__(self, limit: int = None):
        self.limit = BATCH_CACHE_BYTES if limit is None else limit
        self.batches, self.complete = [], False

    def fill(self, batches):
        """Yields `batches`, keeping them while they fit; complete once all were kept."""
        size, keep, self.batches = 0, True, []
        for b in batches:
            if keep:
                size += sum(v.numel() * v.element_size() for v in b.values() if torch.is_tensor(v))
                keep = size <= self.limit
                if keep:
                    self.batches.append(b)
                else:
                    self.batches = []
            yield b
        self.complete = keep


@torch.no_grad()
def embed_users(model, ds, table: D.ItemTable, device, batch_size: int = 256, num_workers: int = 0,
                keep=("_user", "_history", "_target"), cache: BatchCache = None) -> tuple:
    """Queries [U, d] of a dataset of user samples (newest position, asking for a click), and the
    per-sample extras named in `keep`, each a list in dataset order (the rest are dropped). With a
    cache, batches come from it once it holds the whole dataset (see BatchCache)."""
    if cache is not None and cache.complete:
        batches = cache.batches
    else:
        if num_workers > 0:
            children_die_with_me()
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=P.PackedCollate(table), worker_init_fn=_worker_init,
                                             timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0)
        batches = _no_hang(loader, num_workers)
        if cache is not None:
            batches = cache.fill(batches)
    queries, n, extras = np.empty((len(ds), model.vector_dim), np.float32), 0, {}
    for b in batches:
        b = dict(b)                                  # a cached batch stays whole
        for k in [k for k in b if k.startswith("_")]:
            v = b.pop(k)
            if k in keep:
                extras.setdefault(k, []).extend(v)
        with autocast(device):
            v = model.user_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        queries[n:n + len(v)], n = v, n + len(v)
    return queries, extras


@torch.no_grad()
def export(model, table: D.ItemTable, builder: D.SequenceBuilder, indexer: dict, eval_dir: str, device,
           batch_size: int = 256, cand_batch_size: int = 4096, num_workers: int = 0, verbose: bool = False,
           history: bool = True) -> tuple:
    """-> users (raw ids), queries [U, d], per-user history candidate rows (None unless
    `history`), candidate creative ids, retrieval ids, candidate vectors [N, d].

    Memory is the outputs plus one batch: vectors are written into preallocated arrays, and
    candidates already in the item table keep no feature dict."""
    t0 = time.time()
    cids, rids, feats = P.read_candidates(eval_dir, table.row_of_cid)
    rows = table.extend(cids.tolist(), feats)
    del feats
    cand = embed_rows(model, table, rows, device, cand_batch_size)
    check_finite(candidate_vectors=cand)
    if model.cfg.cold_neighbors:
        content, has = table.content(rows)
        cand, n = neighbor_vectors(cand, cold_rows(model, rows), content, has, model.cfg.cold_neighbors,
                                   model.cfg.hidden_units, model.cfg.score == "cosine")
        if verbose:
            print(f"cold candidates scored through their {model.cfg.cold_neighbors} nearest trained items: {n}",
                  flush=True)
    t1 = time.time()
    raw_user_of = {r: u for u, r in indexer.get("u", {}).items()}
    ds = P.PredictSeqDataset(eval_dir, builder, raw_user_of)
    recent = model.cfg.item_recent
    queries, extras = embed_users(model, ds, table, device, batch_size, num_workers,
                                  ("_user",) + (("_history",) if history or recent else ()) +
                                  (("_history_ts",) if recent else ()))
    check_finite(user_queries=queries)
    users = extras["_user"]
    if recent:
        cand, n = served_recent(model, cand, rows, extras["_history"], extras["_history_ts"])
        if verbose:
            print(f"recent activity: {n} events of the served histories after the training data" if n else
                  "recent activity: the served histories hold no event after the training data: its last day "
                  "is scored", flush=True)
    hist = [np.unique(x).astype(np.int32) for x in extras["_history"]] if history else None
    if verbose:
        t2 = time.time()
        print(f"candidates: {len(cids)} in {t1 - t0:.1f}s ({len(cids) / max(t1 - t0, 1e-9):.0f}/s); "
              f"users: {len(users)} in {t2 - t1:.1f}s ({len(users) / max(t2 - t1, 1e-9):.0f}/s)", flush=True)
    return users, queries, hist, cids, rids, cand, rows


def history_exclude(hist: list, cand_rows: np.ndarray) -> list:
    """Candidate indices of each user's history items (for --mask_history / full ranking)."""
    pos = {int(r): i for i, r in enumerate(cand_rows) if r > 0}
    return [np.array(sorted({pos[r] for r in h.tolist() if r in pos}), np.int64) for h in hist]


def top_k_ids(q: np.ndarray, c: np.ndarray, cids: np.ndarray, k: int, exclude, **search_kw) -> list:
    """Each query's top-k creative ids (candidates in `exclude` never returned)."""
    _, idx = R.search(q, c, min(k, len(cids)), exclude=exclude, **search_kw)
    # a slot no unmasked candidate can fill comes back as -1: leave it out rather than invent one
    return [[int(cids[j]) for j in row if j >= 0] for row in np.asarray(idx)]


MISS = np.iinfo(np.int64).max        # the rank of a target that cannot be retrieved


def target_ranks(q: np.ndarray, c: np.ndarray, target: np.ndarray, exclude: list = None) -> np.ndarray:
    """1-based full-ranking rank of each user's target (ties against it). With `exclude` (each
    user's masked candidates, as inference masks them) a target among them is lost: MISS."""
    ranks = R.target_ranks(q, c, target, exclude=exclude).numpy()
    if exclude is not None:
        ranks[np.array([t in e for t, e in zip(target.tolist(), exclude)], bool)] = MISS
    return ranks


def split_metrics(ranks: np.ndarray, cold: np.ndarray, ks) -> dict:
    """metrics_from_ranks over all users, plus HR@10 / NDCG@10 / Score of the users whose target
    is cold (no training event) and warm (prefixed cold_ / warm_; absent for an empty group) and
    cold_share, the cold targets' share. cold: bool per rank."""
    import evaluate as E
    out = E.metrics_from_ranks(ranks, ks)
    if cold is None:
        return out
    for name, sel in (("cold", cold), ("warm", ~cold)):
        if sel.any():
            out.update({f"{name}_{k}": v for k, v in E.metrics_from_ranks(ranks[sel], (10,)).items()})
    out["cold_share"] = float(cold.mean()) if cold.size else 0.0
    return out


# The score coordinate, on the held-out slice, of an item not yet available at a request under
# age_unseen "mask" (training does not show it to that request): below every real score.
UNAVAILABLE = -1e4


def request_variants(model, c: np.ndarray, ids: np.ndarray, ts: np.ndarray):
    """item_age / item_recent on the held-out slice, whose requests lie anywhere in the training
    period: each request is scored with the bias training gives it (the item's age at the
    request, its recent activity on the day before; an item first seen later takes the unseen
    bias, or is no candidate under age_unseen "mask"), not the one inference folds at the newest
    training event (inference's requests come after the training data). Requests are grouped
    by calendar day, each group at its latest request time. Yields (request indices, candidate
    matrix), one per request day."""
    dev = next(model.parameters()).device
    idt = torch.from_numpy(ids).to(dev)
    day = ts // 86400
    with torch.no_grad():
        for d in np.unique(day):
            idx = np.flatnonzero(day == d)
            t = torch.tensor([int(ts[idx].max())], device=dev)
            b = model.pair_bias(idt, t)[0]
            if model.cfg.item_age and model.cfg.age_unseen == "mask":
                b = torch.where(model.available(idt, t)[0], b, torch.full_like(b, UNAVAILABLE))
            cg = c.copy()
            cg[:, -1] = b.float().cpu().numpy()
            yield idx, cg


def _by_mask(q, c, target, exclude, mask_history, ks, missing=0, cold=None, variants=None) -> dict:
    """Metrics with the history masked (True), not masked (False) or both ({"plain", "masked"});
    `missing` more users count as misses (warm ones); cold: bool per target, True where the
    target item has no training event (adds the cold/warm split, see split_metrics). variants:
    a function yielding (query indices, candidate matrix) pairs that cover every query once,
    each group ranked against its own matrix (see request_variants)."""
    if cold is not None:
        cold = np.concatenate([np.asarray(cold, bool), np.zeros(missing, bool)])

    def ranks(excl):
        if variants is None:
            return target_ranks(q, c, target, excl)
        out = np.empty(len(q), np.int64)
        for idx, cg in variants():
            out[idx] = target_ranks(q[idx], cg, target[idx], None if excl is None else [excl[i] for i in idx])
        return out

    def metrics(excl):
        return split_metrics(np.concatenate([ranks(excl), np.full(missing, MISS)]), cold, ks)
    if mask_history is None:
        return {"plain": metrics(None), "masked": metrics(exclude)}
    return metrics(exclude if mask_history else None)


@torch.no_grad()
def evaluate_folder(model, data_cfg: D.DataConfig, table: D.ItemTable, eval_dir: str, train_dir: str, device,
                    mask_history=True, ks=(10, 50, 200), top_k: int = 0, trained: np.ndarray = None):
    """Full-ranking metrics on an eval-layout folder with ground_truth.jsonl (validation/test):
    every candidate is ranked, ties counted against the target, the user's input history masked
    (mask_history True, the benchmark protocol: a target in the history is then lost, as at
    inference), not masked (False) or both (None: {"plain", "masked"}). With top_k > 0, returns
    (metrics, users, each user's top-k creative ids) from the same vectors, masked as asked."""
    import evaluate as E
    was_training = model.training
    model.eval()
    indexer = pick_indexer(eval_dir, train_dir)
    builder = D.SequenceBuilder(data_cfg, table, indexer.get("u", {}))
    users, q, hist, cids, _, c, rows = export(model, table, builder, indexer, eval_dir, device)
    model.train(was_training)
    gt = E.read_ground_truth(os.path.join(eval_dir, "ground_truth.jsonl"))
    col = {int(ci): i for i, ci in enumerate(cids.tolist())}
    keep = [i for i, u in enumerate(users) if u in gt and int(gt[u]) in col]
    target = np.array([col[int(gt[users[i]])] for i in keep], np.int64)
    masked = history_exclude(hist, rows)
    cold = None
    if trained is not None:          # a candidate row beyond the training items (appended) is cold
        r = rows[target]
        cold = ~np.where(r < len(trained), trained[np.minimum(r, len(trained) - 1)], False)
    m = _by_mask(q[keep], c, target, [masked[i] for i in keep], mask_history, ks, len(gt) - len(keep), cold)
    return (m, users, top_k_ids(q, c, cids, top_k, masked if mask_history else None)) if top_k else m


@torch.no_grad()
def holdout_metrics(model, table: D.ItemTable, ds, num_items: int, device, ks=(10, 50, 200),
                    trained: np.ndarray = None, cache: BatchCache = None) -> dict:
    """Full-ranking metrics on the validation slice held out of the training users
    (dataset_packed.HoldoutDataset): every catalogue item is ranked, ties count against the
    target. Scored as inference could run: {"plain": metrics, "masked": metrics with the user's
    history masked, a target the user saw before then lost}. cache: the users' collated batches
    from one validation to the next (BatchCache)."""
    was_training = model.training
    model.eval()
    c = embed_rows(model, table, np.arange(1, num_items + 1), device)
    q, ex = embed_users(model, ds, table, device, keep=("_history", "_target", "_ts"), cache=cache)
    model.train(was_training)
    check_finite(candidate_vectors=c, user_queries=q)
    target = np.asarray(ex["_target"], np.int64) - 1                     # row r is candidate r - 1
    cold = None if trained is None else ~trained[target + 1]
    variants = None
    if model.has_pair_bias():
        def variants():
            return request_variants(model, c, np.arange(1, num_items + 1), np.asarray(ex["_ts"], np.int64))
    return _by_mask(q, c, target, [np.unique(h[h > 0]) - 1 for h in ex["_history"]], None, ks, cold=cold,
                    variants=variants)


