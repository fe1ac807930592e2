"""Inference: load a checkpoint, export user queries and candidate embeddings, retrieve top-k.

`infer()` follows the TAAC 2025 harness contract: no arguments, paths from EVAL_DATA_PATH,
EVAL_RESULT_PATH, MODEL_OUTPUT_PATH and USER_CACHE_PATH; returns (top10s, user_list) with raw
creative ids and raw user ids in predict_seq.jsonl order. It writes query.fbin, embedding.fbin,
id.u64bin and retrive_id2creative_id.json (sic) to EVAL_RESULT_PATH. `python infer.py` also
writes result.json like the harness. The model is rebuilt from the checkpoint's own configs, so
no training flag is repeated. Unlike the official baseline, the user's newest event is part of
its context.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np
import torch

import checkpoint as C
import dataset as D
import dataset_packed as P
import retrieval_torch as R
from layout import (ArgumentParser, DataError, check_writable, dump_json, load_pickle, os_error, read_item_feat_dict,
                    run_cli)

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


class OutputSet:
    """Output files published together: each is written under a temporary name in `folder`, and
    publish() renames them all at the end. A failed write (a full disk) leaves the folder's earlier
    outputs as they were; discard() removes what was staged. Errors name the final file."""

    def __init__(self, folder: str):
        self.folder, self.staged = folder, []       # [(temporary path, final path)]

    def write(self, name: str, fn) -> None:
        """fn(path) writes the file `name` at the temporary path it is given."""
        final = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, f".{name}.{os.getpid()}.staged.tmp")
        self.staged.append((tmp, final))
        try:
            fn(tmp)
        except OSError as e:
            if e.filename not in (None, tmp):
                raise
            raise OSError(e.errno, e.strerror or str(e), final) from None

    def discard(self) -> None:
        for tmp, _ in self.staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.staged = []

    def publish(self) -> None:
        """Rename every staged file over its final name. Should a rename fail midway, the set's
        files (new and earlier ones alike) are removed, so no mix of two runs remains, and the
        error says so."""
        done = []
        try:
            for tmp, final in self.staged:
                os.replace(tmp, final)
                done.append(final)
        except OSError as e:
            for _, f in self.staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
            self.discard()
            why = os_error(OSError(e.errno, e.strerror or str(e), final))
            raise DataError(f"{why}; removed the outputs of this run ({len(done)} already renamed) and the earlier "
                            f"ones, so {self.folder} holds no mix of two runs: run again") from None
        self.staged = []


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval_backend", choices=["torch", "faiss", "faiss_ivf", "faiss_hnsw"], default="torch",
                   help="top-k backend; faiss falls back to torch with a notice when not installed")
    p.add_argument("--top_k", type=int, default=10, help="items retrieved per user")
    p.add_argument("--batch_size", type=int, default=256, help="users per encoder batch")
    p.add_argument("--cand_batch_size", type=int, default=4096, help="candidates per item-tower batch")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers for user sequences")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ckpt", default=None, help="checkpoint file or folder (default: MODEL_OUTPUT_PATH)")
    p.add_argument("--mask_history", choices=["auto", "0", "1"], nargs="?", const="1", default="auto",
                   help="1: never recommend items already in the user's input history; 0: do; auto: as the "
                        "checkpoint's validation chose (masking wins where users rarely return to an item)")
    return p


def get_args(argv=None):
    """Inference options; `infer()` reads them from sys.argv too (harness-style calls pass none)."""
    args, _ = parser().parse_known_args(argv)
    return args


def check_args(args) -> None:
    """Flag ranges, the device and FORCE_USE_TIMEFEAT, before any work (DataError naming the flag)."""
    for flag, lo, hi in (("top_k", 1, None), ("batch_size", 1, 1_000_000), ("cand_batch_size", 1, 10_000_000),
                         ("num_workers", 0, 1024)):     # caps far above real use: a typo is no traceback
        v = getattr(args, flag)
        if v < lo:
            raise DataError(f"--{flag} {v}: expected an integer >= {lo}")
        if hi is not None and v > hi:
            raise DataError(f"--{flag} {v}: expected an integer <= {hi}")
    if args.device is not None:
        R.parse_device(args.device)
    force = os.environ.get("FORCE_USE_TIMEFEAT")
    if force is not None and force.strip() not in ("0", "1"):
        raise DataError(f"FORCE_USE_TIMEFEAT={force!r}: expected 0 or 1 (or unset: as the checkpoint was trained)")


def check_paths(eval_dir: str, result_dir: str) -> None:
    """The input folder exists and the result folder can be written, before any work."""
    if not os.path.isdir(eval_dir):
        what = "not a folder" if os.path.exists(eval_dir) else "folder not found"
        raise DataError(f"{eval_dir}: {what} (EVAL_DATA_PATH), expected predict_seq.jsonl and predict_set.jsonl")
    check_writable(result_dir, "EVAL_RESULT_PATH")


def report_repeats(users: list, eval_dir: str) -> None:
    """A notice on stderr when a user is on several lines of predict_seq.jsonl (each line is
    answered, in order; result.json then repeats the user)."""
    first, extra, example = {}, 0, None
    for i, u in enumerate(users, 1):
        if u in first:
            extra += 1
            example = example or (u, first[u], i)
        else:
            first[u] = i
    if extra:
        u, a, b = example
        print(f"notice: {os.path.join(eval_dir, 'predict_seq.jsonl')}: {extra} lines repeat a user already "
              f"listed ({len(first)} distinct users in {len(users)} lines; first: user {u} on lines {a} and {b}); "
              f"each line is answered in order", file=sys.stderr, flush=True)


def load_model(ckpt: str, device: torch.device, verbose: bool = False, info: dict = None) -> tuple:
    """(model in eval mode on `device`, DataConfig, model.pt path) from a checkpoint file, folder
    or root (best by validation, else the newest complete one); `info`, when given, receives
    checkpoint.load_for_inference's. FORCE_USE_TIMEFEAT=0/1 overrides the checkpoint's
    time-feature setting."""
    model, data_cfg, path, meta = C.load_for_inference(ckpt)
    if info is not None:
        info.update(meta)
    if verbose:
        print(f"checkpoint: {path} ({meta['why']})", flush=True)
    force = os.environ.get("FORCE_USE_TIMEFEAT")
    if force is not None and bool(int(force)) != data_cfg.use_timefeat:
        if bool(int(force)) and not model.cfg.use_timefeat:
            raise DataError(f"{path}: FORCE_USE_TIMEFEAT=1 but the checkpoint was trained without time features")
        data_cfg = dataclasses.replace(data_cfg, use_timefeat=bool(int(force)))
        model.cfg = dataclasses.replace(model.cfg, use_timefeat=bool(int(force)))
    return model.to(device), data_cfg, path


def _artifact_dir(name, *dirs):
    for d in dirs:
        if d and os.path.exists(os.path.join(d, name)):
            return d
    raise DataError(f"{name}: not found in any of {', '.join(d for d in dirs if d)}")


def prepare_tables(data_cfg: D.DataConfig, eval_dir: str, train_dir: str, cache_dir: str) -> tuple:
    """Item table, sequence builder and indexer for inference, from the checkpoint's schema."""
    art = _artifact_dir("indexer.pkl", eval_dir, train_dir)
    indexer = load_pickle(os.path.join(art, "indexer.pkl"))
    item_feat_dict = read_item_feat_dict(os.path.join(_artifact_dir("item_feat_dict.json", eval_dir, train_dir),
                                                        "item_feat_dict.json"))
    ctr_dir = D.find_ctr_dir(os.path.join(cache_dir, "ctr"), train_dir and os.path.join(train_dir, "ctr"))
    # counts from the CTR folder, whose priors must be the checkpoint's (data_cfg.ctr_meta)
    item_ctr = D.load_item_ctr(data_cfg, ctr_dir) if data_cfg.use_itemctr else None
    emb_dir = next((os.path.join(d, "creative_emb") for d in (eval_dir, train_dir)
                    if d and os.path.isdir(os.path.join(d, "creative_emb"))), None)
    table = D.ItemTable(data_cfg, indexer, item_feat_dict, emb_dir, cache_dir, item_ctr)
    return table, D.SequenceBuilder(data_cfg, table, indexer.get("u", {})), indexer


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def embed_rows(model, table: D.ItemTable, rows: np.ndarray, device, chunk: int = 4096) -> np.ndarray:
    """Item vectors [N, d] of item-table rows, as scored, written into one preallocated array."""
    out, n = np.empty((len(rows), model.cfg.hidden_units), np.float32), 0
    for b in torch.utils.data.DataLoader(P.CandidateDataset(rows, table, chunk), batch_size=None):
        with autocast(device):
            v = model.item_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        out[n:n + len(v)], n = v, n + len(v)
    return out


def _no_hang(loader, num_workers: int):
    """Iterate a DataLoader; its timeout (a worker that sent no batch in time) as one line."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader timed out" not in str(e):
            raise
        raise DataError(f"--num_workers {num_workers}: no batch from the DataLoader workers in {loader.timeout:g} s "
                        f"(a worker hung or is starved); run again, or with --num_workers 0") from None


@torch.no_grad()
def embed_users(model, ds, table: D.ItemTable, device, batch_size: int = 256, num_workers: int = 0,
                keep=("_user", "_history", "_target")) -> tuple:
    """Queries [U, d] of a dataset of user samples (newest position, asking for a click), and the
    per-sample extras named in `keep`, each a list in dataset order (the rest are dropped)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=P.PackedCollate(table),
                                         timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0)
    queries, n, extras = np.empty((len(ds), model.cfg.hidden_units), np.float32), 0, {}
    for b in _no_hang(loader, num_workers):
        for k in [k for k in b if k.startswith("_")]:
            v = b.pop(k)
            if k in keep:
                extras.setdefault(k, []).extend(v)
        with autocast(device):
            v = model.user_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        queries[n:n + len(v)], n = v, n + len(v)
    return queries, extras


@torch.no_grad()
def export(model, table: D.ItemTable, builder: D.SequenceBuilder, indexer: dict, eval_dir: str, device, args,
           verbose: bool = False, history: bool = True) -> tuple:
    """-> users (raw ids), queries [U, d], per-user history candidate rows (None unless
    `history`), candidate creative ids, retrieval ids, candidate vectors [N, d].

    Memory is the outputs plus one batch: vectors are written into preallocated arrays, and
    candidates already in the item table keep no feature dict."""
    t0 = time.time()
    cids, rids, feats = P.read_candidates(eval_dir, table.row_of_cid)
    rows = table.extend(cids.tolist(), feats)
    del feats
    cand = embed_rows(model, table, rows, device, args.cand_batch_size)
    check_finite(candidate_vectors=cand)
    t1 = time.time()
    raw_user_of = {r: u for u, r in indexer.get("u", {}).items()}
    ds = P.PredictSeqDataset(eval_dir, builder, raw_user_of)
    queries, extras = embed_users(model, ds, table, device, args.batch_size, args.num_workers,
                                  ("_user", "_history") if history else ("_user",))
    check_finite(user_queries=queries)
    users = extras["_user"]
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


def run(args, eval_dir: str, result_dir: str, ckpt: str, cache_dir: str, train_dir: str = None,
        outputs: OutputSet = None) -> tuple:
    """-> (top-k creative ids per user, users). The output files are staged in `outputs` (an
    OutputSet of result_dir) for the caller to publish with its own files (result.json); without
    one they are published here, all together, once everything succeeded."""
    own = outputs is None
    outputs = OutputSet(result_dir) if own else outputs
    try:
        out = _run(args, eval_dir, result_dir, ckpt, cache_dir, train_dir, outputs)
        if own:
            outputs.publish()
        return out
    finally:
        if own:
            outputs.discard()


def _run(args, eval_dir, result_dir, ckpt, cache_dir, train_dir, outputs: OutputSet) -> tuple:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {}
    model, data_cfg, path = load_model(ckpt, device, verbose=True, info=info)
    mask = bool(info.get("mask_history")) if args.mask_history == "auto" else args.mask_history == "1"
    if args.mask_history == "auto":
        print(f"history masked: {'yes' if mask else 'no'} (as the checkpoint's validation chose)"
              if info.get("mask_history") is not None else "history masked: no (the checkpoint's validation did not say)",
              flush=True)
    table, builder, indexer = prepare_tables(data_cfg, eval_dir, train_dir, cache_dir)
    try:
        users, q, hist, cids, rids, c, rows = export(model, table, builder, indexer, eval_dir, device, args,
                                                     verbose=True, history=mask)
    except DivergedError as e:
        raise DivergedError(e.what, path) from None
    os.makedirs(result_dir, exist_ok=True)
    outputs.write("query.fbin", lambda p: R.write_fbin(p, q))
    outputs.write("embedding.fbin", lambda p: R.write_fbin(p, c))
    outputs.write("id.u64bin", lambda p: R.write_u64bin(p, rids.astype(np.uint64)))
    outputs.write("retrive_id2creative_id.json", lambda p: dump_json(
        {str(r): int(ci) for r, ci in zip(rids.tolist(), cids.tolist())}, p))
    exclude = history_exclude(hist, rows) if mask else None
    return top_k_ids(q, c, cids, args.top_k, exclude, backend=args.retrieval_backend, device=device), users


def top_k_ids(q: np.ndarray, c: np.ndarray, cids: np.ndarray, k: int, exclude, **search_kw) -> list:
    """Each query's top-k creative ids (candidates in `exclude` never returned)."""
    _, idx = R.search(q, c, min(k, len(cids)), exclude=exclude, **search_kw)
    # a slot no unmasked candidate can fill comes back as -1: leave it out rather than invent one
    return [[int(cids[j]) for j in row if j >= 0] for row in np.asarray(idx)]


def infer(outputs: OutputSet = None) -> tuple:
    """Harness entry point: environment-driven, returns (top10s, user_list). The files it writes
    are published together when it returns (or, given `outputs`, staged there for the caller)."""
    args = get_args(sys.argv[1:])
    check_args(args)
    eval_dir = os.environ.get("EVAL_DATA_PATH", "data/demo/eval")
    result_dir = os.environ.get("EVAL_RESULT_PATH", "runs/result")
    check_paths(eval_dir, result_dir)
    top, users = run(args, eval_dir, result_dir,
                     args.ckpt or os.environ.get("MODEL_OUTPUT_PATH", "runs/ckpt"),
                     os.environ.get("USER_CACHE_PATH", "runs/cache"),
                     os.environ.get("TRAIN_DATA_PATH", "data/demo/train"), outputs)
    report_repeats(users, eval_dir)
    return top, users


MISS = np.iinfo(np.int64).max        # the rank of a target that cannot be retrieved


def target_ranks(q: np.ndarray, c: np.ndarray, target: np.ndarray, exclude: list = None) -> np.ndarray:
    """1-based full-ranking rank of each user's target (ties against it). With `exclude` (each
    user's masked candidates, as inference masks them) a target among them is lost: MISS."""
    ranks = R.target_ranks(q, c, target, exclude=exclude).numpy()
    if exclude is not None:
        ranks[np.array([t in e for t, e in zip(target.tolist(), exclude)], bool)] = MISS
    return ranks


def _by_mask(q, c, target, exclude, mask_history, ks, missing=0) -> dict:
    """Metrics with the history masked (True), not masked (False) or both ({"plain", "masked"});
    `missing` more users count as misses."""
    import evaluate as E

    def metrics(excl):
        return E.metrics_from_ranks(np.concatenate([target_ranks(q, c, target, excl), np.full(missing, MISS)]), ks)
    if mask_history is None:
        return {"plain": metrics(None), "masked": metrics(exclude)}
    return metrics(exclude if mask_history else None)


@torch.no_grad()
def evaluate_folder(model, data_cfg: D.DataConfig, table: D.ItemTable, eval_dir: str, train_dir: str, device,
                    mask_history=True, ks=(10, 50, 200), top_k: int = 0):
    """Full-ranking metrics on an eval-layout folder with ground_truth.jsonl (validation/test):
    every candidate is ranked, ties counted against the target, the user's input history masked
    (mask_history True, the benchmark protocol: a target in the history is then lost, as at
    inference), not masked (False) or both (None: {"plain", "masked"}). With top_k > 0, returns
    (metrics, users, each user's top-k creative ids) from the same vectors, masked as asked."""
    import evaluate as E
    was_training = model.training
    model.eval()
    indexer = load_pickle(os.path.join(_artifact_dir("indexer.pkl", eval_dir, train_dir), "indexer.pkl"))
    builder = D.SequenceBuilder(data_cfg, table, indexer.get("u", {}))
    args = argparse.Namespace(batch_size=256, cand_batch_size=4096, num_workers=0)
    users, q, hist, cids, _, c, rows = export(model, table, builder, indexer, eval_dir, device, args)
    model.train(was_training)
    gt = E.read_ground_truth(os.path.join(eval_dir, "ground_truth.jsonl"))
    col = {int(ci): i for i, ci in enumerate(cids.tolist())}
    keep = [i for i, u in enumerate(users) if u in gt and int(gt[u]) in col]
    target = np.array([col[int(gt[users[i]])] for i in keep], np.int64)
    masked = history_exclude(hist, rows)
    m = _by_mask(q[keep], c, target, [masked[i] for i in keep], mask_history, ks, len(gt) - len(keep))
    return (m, users, top_k_ids(q, c, cids, top_k, masked if mask_history else None)) if top_k else m


@torch.no_grad()
def holdout_metrics(model, table: D.ItemTable, ds, num_items: int, device, ks=(10, 50, 200)) -> dict:
    """Full-ranking metrics on the validation slice held out of the training users
    (dataset_packed.HoldoutDataset): every catalogue item is ranked, ties count against the
    target. Scored as inference could run: {"plain": metrics, "masked": metrics with the user's
    history masked, a target the user saw before then lost}."""
    was_training = model.training
    model.eval()
    c = embed_rows(model, table, np.arange(1, num_items + 1), device)
    q, ex = embed_users(model, ds, table, device, keep=("_history", "_target"))
    model.train(was_training)
    check_finite(candidate_vectors=c, user_queries=q)
    target = np.asarray(ex["_target"], np.int64) - 1                     # row r is candidate r - 1
    return _by_mask(q, c, target, [np.unique(h[h > 0]) - 1 for h in ex["_history"]], None, ks)


def main():
    args = get_args()
    t0 = time.time()
    result_dir = os.environ.get("EVAL_RESULT_PATH", "runs/result")
    outputs = OutputSet(result_dir)         # result.json is published with the other outputs, or none is
    try:
        top10s, users = infer(outputs)
        outputs.write("result.json", lambda p: dump_json(
            {"time": round(time.time() - t0, 3), "top10s": top10s, "user": users}, p))
        outputs.publish()
    finally:
        outputs.discard()
    print(f"{len(users)} users, top-{args.top_k} in {time.time() - t0:.1f}s -> {result_dir}/result.json")


if __name__ == "__main__":
    run_cli(main)
