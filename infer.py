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
from layout import DataError, dump_json, load_pickle, read_item_feat_dict, run_cli


def get_args(argv=None):
    """Inference options; `infer()` reads them from sys.argv too (harness-style calls pass none)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval_backend", choices=["torch", "faiss", "faiss_ivf", "faiss_hnsw"], default="torch",
                   help="top-k backend; faiss falls back to torch with a notice when not installed")
    p.add_argument("--top_k", type=int, default=10, help="items retrieved per user")
    p.add_argument("--batch_size", type=int, default=256, help="users per encoder batch")
    p.add_argument("--cand_batch_size", type=int, default=4096, help="candidates per item-tower batch")
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers for user sequences")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ckpt", default=None, help="checkpoint file or folder (default: MODEL_OUTPUT_PATH)")
    p.add_argument("--mask_history", action="store_true",
                   help="never recommend items already in the user's input history")
    args, _ = p.parse_known_args(argv)
    return args


def load_model(ckpt: str, device: torch.device, verbose: bool = False) -> tuple:
    """(model in eval mode on `device`, DataConfig, model.pt path) from a checkpoint file, folder
    or root (best by validation, else the newest complete one). FORCE_USE_TIMEFEAT=0/1
    overrides the checkpoint's time-feature setting."""
    model, data_cfg, path, why = C.load_for_inference(ckpt)
    if verbose:
        print(f"checkpoint: {path} ({why})", flush=True)
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
    # counts from the CTR folder; the standardisation stays the checkpoint's (data_cfg.ctr_meta)
    item_ctr = D.load_ctr_for(data_cfg, ctr_dir, "seq.jsonl")[0] if data_cfg.use_itemctr else None
    emb_dir = next((os.path.join(d, "creative_emb") for d in (eval_dir, train_dir)
                    if d and os.path.isdir(os.path.join(d, "creative_emb"))), None)
    table = D.ItemTable(data_cfg, indexer, item_feat_dict, emb_dir, cache_dir, item_ctr)
    return table, D.SequenceBuilder(data_cfg, table, indexer.get("u", {})), indexer


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
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    d = model.cfg.hidden_units                     # width of query and item vectors alike
    cand, n = np.empty((len(rows), d), np.float32), 0
    for b in torch.utils.data.DataLoader(P.CandidateDataset(rows, table, args.cand_batch_size), batch_size=None):
        with amp:
            v = model.item_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        cand[n:n + len(v)], n = v, n + len(v)
    t1 = time.time()
    raw_user_of = {r: u for u, r in indexer.get("u", {}).items()}
    ds = P.PredictSeqDataset(eval_dir, builder, raw_user_of)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=P.PackedCollate(table))
    users, hist, queries, n = [], [] if history else None, np.empty((len(ds), d), np.float32), 0
    for b in loader:
        users += b.pop("_user")
        h = b.pop("_history")
        if history:
            hist += [np.unique(x).astype(np.int32) for x in h]
        with amp:
            v = model.user_vectors({k: v.to(device) for k, v in b.items()}).float().cpu().numpy()
        queries[n:n + len(v)], n = v, n + len(v)
    if verbose:
        t2 = time.time()
        print(f"candidates: {len(cids)} in {t1 - t0:.1f}s ({len(cids) / max(t1 - t0, 1e-9):.0f}/s); "
              f"users: {len(users)} in {t2 - t1:.1f}s ({len(users) / max(t2 - t1, 1e-9):.0f}/s)", flush=True)
    return users, queries, hist, cids, rids, cand, rows


def history_exclude(hist: list, cand_rows: np.ndarray) -> list:
    """Candidate indices of each user's history items (for --mask_history / full ranking)."""
    pos = {int(r): i for i, r in enumerate(cand_rows) if r > 0}
    return [np.array(sorted({pos[r] for r in h.tolist() if r in pos}), np.int64) for h in hist]


def run(args, eval_dir: str, result_dir: str, ckpt: str, cache_dir: str, train_dir: str = None) -> tuple:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, data_cfg, path = load_model(ckpt, device, verbose=True)
    table, builder, indexer = prepare_tables(data_cfg, eval_dir, train_dir, cache_dir)
    users, q, hist, cids, rids, c, rows = export(model, table, builder, indexer, eval_dir, device, args, verbose=True,
                                                 history=args.mask_history)
    os.makedirs(result_dir, exist_ok=True)
    R.write_fbin(os.path.join(result_dir, "query.fbin"), q)
    R.write_fbin(os.path.join(result_dir, "embedding.fbin"), c)
    R.write_u64bin(os.path.join(result_dir, "id.u64bin"), rids.astype(np.uint64))
    dump_json({str(r): int(ci) for r, ci in zip(rids.tolist(), cids.tolist())},
                os.path.join(result_dir, "retrive_id2creative_id.json"))
    exclude = history_exclude(hist, rows) if args.mask_history else None
    return top_k_ids(q, c, cids, args.top_k, exclude, backend=args.retrieval_backend, device=device), users


def top_k_ids(q: np.ndarray, c: np.ndarray, cids: np.ndarray, k: int, exclude, **search_kw) -> list:
    """Each query's top-k creative ids (candidates in `exclude` never returned)."""
    _, idx = R.search(q, c, min(k, len(cids)), exclude=exclude, **search_kw)
    # a slot no unmasked candidate can fill comes back as -1: leave it out rather than invent one
    return [[int(cids[j]) for j in row if j >= 0] for row in np.asarray(idx)]


def infer() -> tuple:
    """Harness entry point: environment-driven, returns (top10s, user_list)."""
    args = get_args(sys.argv[1:])
    return run(args, os.environ.get("EVAL_DATA_PATH", "data/demo/eval"),
               os.environ.get("EVAL_RESULT_PATH", "runs/result"),
               args.ckpt or os.environ.get("MODEL_OUTPUT_PATH", "runs/ckpt"),
               os.environ.get("USER_CACHE_PATH", "runs/cache"),
               os.environ.get("TRAIN_DATA_PATH", "data/demo/train"))


@torch.no_grad()
def evaluate_folder(model, data_cfg: D.DataConfig, table: D.ItemTable, eval_dir: str, train_dir: str, device,
                    mask_history: bool = True, ks=(10, 50, 200), top_k: int = 0):
    """Full-ranking metrics on an eval-layout folder with ground_truth.jsonl (validation/test):
    every candidate is ranked, the user's input history masked, ties counted against the target.
    With top_k > 0, returns (metrics, users, each user's top-k creative ids) from the same
    vectors, its history masked whole: what a result file holds."""
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
    masked = history_exclude(hist, rows) if mask_history else None
    # a target the user saw before stays rankable: masking it would make it unreachable
    exclude = None if masked is None else [masked[i][masked[i] != t] for i, t in zip(keep, target)]
    ranks = R.target_ranks(q[keep], c, target, exclude=exclude)
    ranks = np.concatenate([ranks, np.full(len(gt) - len(keep), np.iinfo(np.int64).max)])
    m = E.metrics_from_ranks(ranks, ks)
    return (m, users, top_k_ids(q, c, cids, top_k, masked)) if top_k else m


def main():
    args = get_args()
    t0 = time.time()
    top10s, users = infer()
    result_dir = os.environ.get("EVAL_RESULT_PATH", "runs/result")
    dump_json({"time": round(time.time() - t0, 3), "top10s": top10s, "user": users},
                os.path.join(result_dir, "result.json"))
    print(f"{len(users)} users, top-{args.top_k} in {time.time() - t0:.1f}s -> {result_dir}/result.json")


if __name__ == "__main__":
    run_cli(main)
