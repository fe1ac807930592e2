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
import retrieval_torch as R
from layout import (ArgumentParser, DataError, check_writable, dump_json, finish_publish, own_folder,
                    publish_files, run_cli, sweep_temp)
from validation import (WORKER_TIMEOUT_S, DivergedError, _artifact_dir, check_finite, embed_rows,  # noqa: F401
                        attach_young, embed_users, evaluate_folder, export, history_exclude, holdout_metrics,
                        pick_indexer, pick_item_features, top_k_ids)

# A stopped inference (Ctrl-C, a harness's SIGTERM) ends within this many seconds even if its
# unwinding hangs (layout.stop_deadline); a normal stop takes about the DataLoader's 5 s shutdown.
STOP_GRACE_S = 20.0


class OutputSet:
    """Output files published together, into a result folder this run owns: claim() takes the
    folder (a second inference into it is refused, naming the holder), completes a publish that a
    killed run left half done and sweeps files it staged. Each file is written under a temporary
    name in `folder`, and publish() renames them all at the end as one unit (layout.publish_files:
    a journal written first lets the next run complete renames a kill interrupted). A failed write
    (a full disk) leaves the folder's earlier outputs as they were; close() removes what was
    staged and gives the folder up. Errors name the final file."""

    def __init__(self, folder: str):
        self.folder, self.staged = folder, []       # [(temporary path, final path)]
        self._owner, self._claimed = contextlib.ExitStack(), False

    def claim(self) -> None:
        if self._claimed:
            return
        self._owner.enter_context(own_folder(self.folder, "EVAL_RESULT_PATH"))
        self._claimed = True
        finish_publish(self.folder, say=lambda m: print(m, file=sys.stderr, flush=True))
        sweep_temp(self.folder, lambda name: name.endswith(".staged.tmp"))

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
        """Rename every staged file over its final name, as one unit (layout.publish_files)."""
        try:
            publish_files(self.folder, self.staged)
        finally:
            self.staged = []

    def close(self) -> None:
        """Remove what is still staged and give the folder up."""
        self.discard()
        self._owner.close()
        self._claimed = False


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


def get_args(argv=()):
    """Inference options from `argv` (a list; infer() from a harness passes none). A flag this
    script does not know, such as a training flag of the seed's commands, is ignored with a
    one-line notice: the model's settings come from its checkpoint."""
    args, unknown = parser().parse_known_args(list(argv))
    flags = [t.split("=", 1)[0] for t in unknown if t.startswith("-")]
    if flags:
        print(f"notice: infer.py ignores {', '.join(flags)}: not an inference flag (the model's settings come from "
              f"its checkpoint; python infer.py --help lists the inference flags)", file=sys.stderr, flush=True)
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
        if bool(int(force)):
            raise DataError(f"{path}: FORCE_USE_TIMEFEAT=1 but the checkpoint was trained without time features")
        data_cfg = dataclasses.replace(data_cfg, use_timefeat=False)
        model.data = data_cfg
    return model.to(device), data_cfg, path


def prepare_tables(data_cfg: D.DataConfig, eval_dir: str, train_dir: str, cache_dir: str) -> tuple:
    """Item table, sequence builder and indexer for inference, from the checkpoint's schema."""
    indexer = pick_indexer(eval_dir, train_dir)
    item_feat_dict = pick_item_features(eval_dir, train_dir)
    ctr_dir = D.find_ctr_dir(os.path.join(cache_dir, "ctr"), train_dir and os.path.join(train_dir, "ctr"))
    # counts from the CTR folder, whose priors must be the checkpoint's (data_cfg.ctr_meta)
    item_ctr = D.load_item_ctr(data_cfg, ctr_dir) if data_cfg.use_itemctr else None
    emb_dir = next((os.path.join(d, "creative_emb") for d in (eval_dir, train_dir)
                    if d and os.path.isdir(os.path.join(d, "creative_emb"))), None)
    table = D.ItemTable(data_cfg, indexer, item_feat_dict, emb_dir, cache_dir, item_ctr)
    return table, D.SequenceBuilder(data_cfg, table, indexer.get("u", {})), indexer


def run(args, eval_dir: str, result_dir: str, ckpt: str, cache_dir: str, train_dir: str = None,
        outputs: OutputSet = None) -> tuple:
    """-> (top-k creative ids per user, users). The output files are staged in `outputs` (an
    OutputSet of result_dir) for the caller to publish with its own files (result.json); without
    one they are published here, all together, once everything succeeded."""
    own = outputs is None
    outputs = OutputSet(result_dir) if own else outputs
    try:
        outputs.claim()
        out = _run(args, eval_dir, result_dir, ckpt, cache_dir, train_dir, outputs)
        if own:
            outputs.publish()
        return out
    finally:
        if own:
            outputs.close()


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
    attach_young(model, table)
    try:
        users, q, hist, cids, rids, c, rows = export(model, table, builder, indexer, eval_dir, device, args.batch_size,
                                                     args.cand_batch_size, args.num_workers, verbose=True, history=mask)
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


def infer(outputs: OutputSet = None, argv=()) -> tuple:
    """Harness entry point: environment-driven, returns (top10s, user_list). Options come from
    `argv` only, never from the calling program's command line. The files it writes are
    published together when it returns (or, given `outputs`, staged there for the caller)."""
    args = get_args(argv)
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_known_args(argv)[0]
    t0 = time.time()
    result_dir = os.environ.get("EVAL_RESULT_PATH", "runs/result")
    outputs = OutputSet(result_dir)         # result.json is published with the other outputs, or none is
    try:
        top10s, users = infer(outputs, argv)
        outputs.write("result.json", lambda p: dump_json(
            {"time": round(time.time() - t0, 3), "top10s": top10s, "user": users}, p))
        outputs.publish()
    finally:
        outputs.close()
    print(f"{len(users)} users, top-{args.top_k} in {time.time() - t0:.1f}s -> {result_dir}/result.json")


if __name__ == "__main__":
    run_cli(main, stop_grace_s=STOP_GRACE_S)
