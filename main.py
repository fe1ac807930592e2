"""Train the generative recommender on a TencentGR-layout folder.

Next-item InfoNCE on L2-normalised vectors: every position's query (the encoder state after that
event, optionally told which action comes next) must pick the next item out of in-batch targets
plus uniformly sampled negatives, with a logQ popularity correction and accidental hits masked.
AdamW, linear warmup + cosine decay, gradient accumulation and clipping, TensorBoard, atomic
checkpoints, optional per-epoch validation with full ranking, DDP under torchrun.

Paths come from the seed's environment variables (TRAIN_DATA_PATH, TRAIN_LOG_PATH,
TRAIN_TF_EVENTS_PATH, TRAIN_CKPT_PATH, USER_CACHE_PATH) with defaults under ./data and ./runs.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import dataset as D
from model import GenerativeRecommender, ModelConfig


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {v!r}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, default, help):
        p.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help + f" (default {default})")

    g = p.add_argument_group("data")
    g.add_argument("--maxlen", type=int, default=100, help="item events in the input window (one user token is added)")
    g.add_argument("--mm_emb_id", nargs="*", default=None,
                   help="multimodal feature ids to use, e.g. 81 82 (default: 81 when present; pass none for no vectors)")
    flag("--use_timefeat", True, "hour/weekday/week embeddings and the log gap to the previous event")
    flag("--use_ctr", False, "CTR channels: user 150 (running) and item 151 (leave-one-out for targets)")
    flag("--use_userctr", None, "user CTR channel (defaults to --use_ctr)")
    flag("--use_itemctr", None, "item CTR channel (defaults to --use_ctr)")
    g.add_argument("--ctr_dir", default=None, help="folder of precompute_ctr.py outputs "
                   "(default: USER_CACHE_PATH/ctr, then TRAIN_DATA_PATH/ctr)")
    g.add_argument("--valid_dir", default=None, help="validation folder in the eval layout "
                   "(default: ../valid beside the train folder when it exists; 'none' disables)")
    g.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    flag("--length_bucketing", True, "batch users of similar sequence length together (sorted within runs of 64 "
         "batches, then shuffled) so the padding they share is dropped; 0 = plain shuffle")
    flag("--pin_memory", False, "pin host memory for faster host-to-GPU copies")
    g.add_argument("--limit_users", type=int, default=None, help="train on the first N lines only (smoke tests)")
    flag("--skip_bad_records", False, "skip malformed user lines instead of stopping; each skipped location is "
         "written to TRAIN_LOG_PATH/skipped_records.txt and counted in a summary")

    g = p.add_argument_group("model")
    g.add_argument("--encoder_type", choices=["hstu", "transformer"], default="hstu", help="encoder blocks")
    g.add_argument("--hidden_units", type=int, default=64, help="model width d")
    g.add_argument("--feat_dim", type=int, default=32, help="width of each feature embedding (0 = hidden_units)")
    g.add_argument("--num_blocks", type=int, default=2, help="encoder blocks")
    g.add_argument("--num_heads", type=int, default=2, help="attention heads")
    g.add_argument("--dqk", type=int, default=32, help="HSTU per-head query/key width")
    g.add_argument("--dv", type=int, default=32, help="HSTU per-head value width")
    g.add_argument("--dropout_rate", type=float, default=0.2, help="dropout on embeddings and block outputs")
    g.add_argument("--attn_dropout", type=float, default=0.0, help="dropout on attention weights")
    g.add_argument("--emb_init_std", type=float, default=1.0, help="below 1: small-init mode, every embedding table "
                   "(ids, features, positions, types, actions, time) starts at N(0, this) and the feature towers' "
                   "biases at 0; 0.02 learns far faster on sparse public data (Beauty), 1.0 is better on the demo data")
    flag("--norm_first", True, "pre-norm blocks")
    g.add_argument("--norm_type", choices=["rmsnorm", "layernorm"], default="rmsnorm", help="normalisation layer")
    g.add_argument("--hstu_attn", choices=["softmax", "silu"], default="softmax",
                   help="HSTU attention: softmax via SDPA, or the paper's pointwise SiLU / #keys")
    flag("--use_rope", False, "rotary position embedding on queries and keys")
    flag("--use_rel_bias", False, "learned relative position and time-gap attention biases")
    g.add_argument("--rel_pos_buckets", type=int, default=32, help="relative position buckets")
    g.add_argument("--rel_time_buckets", type=int, default=32, help="log2 time-gap buckets")
    flag("--use_abs_pos", True, "learned absolute position embedding (from the window start)")
    flag("--use_senet", False, "squeeze-and-excitation gates over feature blocks (user and item sides)")
    flag("--use_user_id", True, "user-id embedding in the user token (off: the token carries user features only)")
    flag("--action_cond", False, "tell the encoder the next action (click at inference)")
    flag("--grad_checkpoint", False, "recompute encoder blocks in the backward pass to save memory")
    p.add_argument("--first_epoch_id_item_dropout", type=float, nargs="?", const=0.5, default=0.0,
                   help="drop user/item id embeddings with this rate in epoch 1, cosine-annealed to 0 by its "
                        "end (bare flag: 0.5; default off)")

    g = p.add_argument_group("objective")
    g.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    g.add_argument("--num_neg", type=int, default=512,
                   help="uniform random negatives per batch (shared); -1 = every item (full softmax)")
    flag("--in_batch_neg", True, "use the batch's other targets as negatives")
    g.add_argument("--in_batch_max", type=int, default=2048,
                   help="at most this many in-batch targets (a random subset) serve as negatives")
    flag("--logq", True, "subtract log expected sampling count (popularity) from every logit")
    g.add_argument("--nce_weight_scheme", choices=["none", "fixed", "cb", "focal"], default="none",
                   help="per-target weights: fixed click/exposure, class-balanced, or focal")
    g.add_argument("--click_weight", type=float, default=2.0, help="weight of click targets for 'fixed'")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal exponent")
    flag("--two_tau", False, "temperature by the target's action (--tau_click, --tau_expo)")
    g.add_argument("--tau_click", type=float, default=0.03, help="temperature for click targets")
    g.add_argument("--tau_expo", type=float, default=0.05, help="temperature for exposure targets")

    flag("--use_rankloss", False, "rank loss over per-target rank packages (positive > clicked > exposed > random)")
    g.add_argument("--rankloss_mode", choices=["pairwise", "listwise"], default="listwise",
                   help="pairwise: BPR over ordered pairs; listwise: softmax cross-entropy with graded targets")
    g.add_argument("--lambda_rank", type=float, default=0.5, help="weight of the rank loss")
    flag("--rank_pkg_as_neg", False, "package items also serve as per-target hard negatives in InfoNCE")

    flag("--use_hard_neg", False, "per-user hard negatives from a cache refreshed during training "
         "(USER_CACHE_PATH/hard_negative_cache.pkl, reused by the next run)")
    g.add_argument("--hard_neg_k", type=int, default=8, help="hard negatives per user")
    g.add_argument("--hard_neg_pool", type=int, default=20000, help="catalogue items scored for the cache")
    g.add_argument("--hard_neg_refresh", type=int, default=100, help="optimizer steps between pool re-embeddings")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=128, help="users per micro-batch (per process)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on norms/biases/embeddings)")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup optimizer steps")
    g.add_argument("--num_epochs", type=int, default=3, help="passes over the training users")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument("--seed", type=int, default=42, help="seed for every RNG")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--patience", type=int, default=0, help="stop after this many epochs without validation gain (0 = off)")
    g.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    g.add_argument("--resume", default="auto",
                   help="auto: continue from the newest complete checkpoint in TRAIN_CKPT_PATH; none: start "
                        "afresh; or a checkpoint path")
    g.add_argument("--ckpt_every_steps", type=int, default=0, help="also checkpoint every N optimizer steps (0 = per epoch only)")
    g.add_argument("--keep_last_ckpts", type=int, default=3, help="keep the newest K checkpoints (+ the best); 0 keeps all")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop after this many optimizer steps in a row with a non-finite loss (each is skipped)")
    return p.parse_args(argv)


def env_paths():
    data = os.environ.get("TRAIN_DATA_PATH", "data/demo/train")
    runs = "runs"
    return {"data": data,
            "log": os.environ.get("TRAIN_LOG_PATH", f"{runs}/logs"),
            "tb": os.environ.get("TRAIN_TF_EVENTS_PATH", f"{runs}/tb"),
            "ckpt": os.environ.get("TRAIN_CKPT_PATH", f"{runs}/ckpt"),
            "cache": os.environ.get("USER_CACHE_PATH", f"{runs}/cache")}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def id_dropout_at(p0, epoch, frac):
    """Epoch 1: p0 * (1 + cos(pi * frac)) / 2 (frac = progress through the epoch); then 0."""
    return p0 * 0.5 * (1 + math.cos(math.pi * frac)) if epoch == 0 and p0 > 0 else 0.0


def resolve_mm(args, data_dir):
    if args.mm_emb_id is None:
        return ["81"] if D._mm_sources(os.path.join(data_dir, "creative_emb"), "81") else []
    return [] if args.mm_emb_id in (["none"], []) else [str(x) for x in args.mm_emb_id]


class TrainingError(Exception):
    """The run cannot go on (e.g. non-finite losses); printed as one line, exit code 3."""


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the next optimizer step, then a clean exit."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled order fixed by (seed, epoch), sharded over ranks, resumable from a position.

    Each rank gets every world-th index of one permutation (padded by wrapping so all ranks have
    the same length, as DistributedSampler does). With `lengths` (bytes per line, a free proxy
    for the number of events), each run of `bucket` batches is sorted by length and the batches
    are shuffled again: a batch then holds sequences of similar length, and PackedCollate drops
    the padding they share."""

    def __init__(self, n, world, rank, seed, batch_size=1, lengths=None, bucket=64):
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.batch_size, self.lengths, self.bucket = batch_size, lengths, bucket
        self.epoch_len = math.ceil(n / world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def order(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        perm = torch.cat([perm, perm[:self.epoch_len * self.world - self.n]])[self.rank::self.world]
        if self.lengths is None:
            return perm
        batches, span = [], self.batch_size * self.bucket
        for i in range(0, len(perm), span):
            chunk = perm[i:i + span]
            batches += chunk[torch.from_numpy(np.argsort(self.lengths[chunk.numpy()], kind="stable"))].split(self.batch_size)
        # a short final batch stays last, so the DataLoader's batches are exactly these
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()] + short
        return torch.cat(batches)

    def __iter__(self):
        return iter(self.order()[self.start:].tolist())

    def __len__(self):
        return self.epoch_len - self.start


def _rng_state():
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(root, model, model_cfg, data_cfg, args, opt, sched, st, extra, keep_last, world):
    """global_step{N}/model.pt written atomically, then meta.json last: only a folder with
    meta.json counts. Holds everything an exact resume needs. Keeps the newest `keep_last`
    folders plus the best by validation."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    d = os.path.join(root, f"global_step{st['step']}")
    state = {"model": model.state_dict(), "model_config": model_cfg.to_dict(), "data_config": D.asdict(data_cfg),
             "args": {k: v for k, v in vars(args).items()}, "global_step": st["step"], **st,
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs, **extra}
    with D.atomic_write(os.path.join(d, "model.pt"), "wb") as f:
        torch.save(state, f)
    D.dump_json({"global_step": st["step"], "epoch": st["epoch"], "micro": st["micro"],
                 **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))}}, os.path.join(d, "meta.json"))
    if st["best"] is not None:
        D.dump_json({"global_step": st["best"][0], "valid_NDCG@10": st["best"][1],
                     "path": f"global_step{st['best'][0]}"}, os.path.join(root, "best.json"))
    if keep_last > 0:
        keep = {f"global_step{st['best'][0]}"} if st["best"] is not None else set()
        done = sorted(_complete_ckpts(root), key=lambda p: int(p.rsplit("global_step", 1)[1]))
        for old in done[:-keep_last]:
            if os.path.basename(old) not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return d


def _complete_ckpts(root):
    return [p for p in glob.glob(os.path.join(root, "global_step*"))
            if p.rsplit("global_step", 1)[1].isdigit() and os.path.exists(os.path.join(p, "meta.json"))]


def find_resume(mode, root):
    """--resume auto: the newest complete checkpoint under TRAIN_CKPT_PATH (None if there is
    none); none: start afresh; else a checkpoint folder or file."""
    if mode == "none":
        return None
    if mode != "auto":
        return mode
    done = _complete_ckpts(root)
    return max(done, key=lambda p: int(p.rsplit("global_step", 1)[1])) if done else None


def load_resume(path, model, opt, sched, model_cfg, rank):
    f = path if os.path.isfile(path) else os.path.join(path, "model.pt")
    try:
        ck = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise D.DataError(f"{f}: cannot resume from this checkpoint ({str(e).splitlines()[0][:120]})") from None
    if ck.get("model_config") != model_cfg.to_dict():
        diff = sorted(k for k in model_cfg.to_dict() if ck.get("model_config", {}).get(k) != model_cfg.to_dict()[k])
        raise D.DataError(f"{f}: checkpoint was trained with other settings ({', '.join(diff[:5])}); "
                          f"pass --resume none or use another TRAIN_CKPT_PATH")
    if "optimizer" not in ck:
        raise D.DataError(f"{f}: holds weights only, no training state to resume from")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    rngs = ck["rng"]
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return ck


def info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop=None, num_items=0, in_batch=True, in_batch_idx=None,
             row_negs=None, row_neg_ids=None):
    """Per-target InfoNCE on L2-normalised vectors -> (loss [N], positive logit [N]).

    Candidates: the positive, the other targets of the batch (in_batch; in_batch_idx picks a
    random subset of them to bound the cost) and shared sampled negatives. Any candidate with the positive's item id (including the target itself among
    the in-batch columns) is masked: an accidental hit is not a negative. row_negs [N, K, d] are
    per-target hard negatives (row_neg_ids 0 = empty slot), masked the same way and not
    popularity-corrected (they are not drawn by popularity). With log_pop, every
    logit (positive included) is corrected by the log of the item's expected count in the
    candidate set, N * p(item) for in-batch plus S / num_items for uniform samples (sampled
    softmax, Yi et al. 2019); without it popular items are over-penalised.
    """
    pos_logit = (q * pos).sum(-1)                                      # [N]
    cols, ids = [], []
    if in_batch:
        sel = slice(None) if in_batch_idx is None else in_batch_idx
        cols.append(pos[sel])
        ids.append(pos_ids[sel])
    if negs is not None:
        cols.append(negs)
        ids.append(neg_ids)
    if not cols and row_negs is None:
        raise ValueError("InfoNCE needs in-batch, sampled or per-target negatives")
    cand = torch.cat(cols) if cols else q.new_zeros(0, q.shape[1])    # [M, d]
    cand_ids = torch.cat(ids) if ids else pos_ids.new_zeros(0)
    n_in = len(ids[0]) if in_batch else 0
    neg_logit = (q @ cand.T).masked_fill(cand_ids.unsqueeze(0) == pos_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1) / tau.unsqueeze(1)   # [N, 1 + M]
    if log_pop is not None:
        def log_expected(i):
            e = torch.zeros(i.shape, device=q.device)
            if in_batch:
                e = e + n_in * log_pop[i].exp()
            if negs is not None:
                e = e + (1.0 if len(neg_ids) >= num_items else len(neg_ids) / max(1, num_items))
            return e.log()
        logits = logits - torch.cat([log_expected(pos_ids).unsqueeze(1),
                                     log_expected(cand_ids).unsqueeze(0).expand(len(q), -1)], 1)
    if row_negs is not None:
        hard = (q.unsqueeze(1) * row_negs).sum(-1)                      # [N, K]
        hard = hard.masked_fill((row_neg_ids == 0) | (row_neg_ids == pos_ids.unsqueeze(1)), float("-inf"))
        logits = torch.cat([logits, hard / tau.unsqueeze(1)], 1)
    return torch.logsumexp(logits, 1) - logits[:, 0], pos_logit


def rank_loss(s_pos, s_pkg, grade, mode):
    """Graded ranking of [positive (grade 4), package items (grade 1-3; 0 = masked)] per target.

    pairwise: mean over ordered pairs (higher grade i, lower grade j) of -log sigmoid(s_i - s_j);
    listwise: cross-entropy between softmax(scores) and targets proportional to 2^grade - 1.
    Returns the mean over targets that have at least one valid package item.
    """
    scores = torch.cat([s_pos.unsqueeze(1), s_pkg], 1)                  # [N, 1 + K]
    g = torch.cat([torch.full_like(grade[:, :1], 4), grade], 1)
    valid = g > 0
    has = valid[:, 1:].any(1)
    if not has.any():
        return scores.sum() * 0.0
    if mode == "pairwise":
        pair = (g.unsqueeze(2) > g.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)   # [N, 1+K, 1+K]
        lp = F.logsigmoid(scores.unsqueeze(2) - scores.unsqueeze(1))
        per = -(lp * pair).sum((1, 2)) / pair.sum((1, 2)).clamp(min=1)
    else:
        target = (2.0 ** g - 1) * valid
        target = target / target.sum(1, keepdim=True)
        logp = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), 1)
        per = -(target * torch.where(valid, logp, torch.zeros_like(logp))).sum(1)
    return per[has].mean()


def nce_weights(scheme, pos_act, loss, click_weight=2.0, gamma=2.0, click_rate=0.1):
    """Per-target weights by the target's action (action ids: 1 exposure, 2 click, 3 conversion).

    fixed: clicks weigh click_weight; cb: class-balanced, 1 / (2 * class share) so both classes
    weigh the same in total; focal: (1 - p_pos)^gamma with p_pos = exp(-loss), detached.
    """
    click = pos_act >= 2
    if scheme == "none":
        return torch.ones_like(loss)
    if scheme == "fixed":
        return torch.where(click, click_weight, 1.0).to(loss.dtype)
    if scheme == "cb":
        r = min(max(click_rate, 1e-6), 1 - 1e-6)
        return torch.where(click, 0.5 / r, 0.5 / (1 - r)).to(loss.dtype)
    if scheme == "focal":
        return (1 - torch.exp(-loss.detach())).clamp(min=0).pow(gamma)
    raise ValueError(f"unknown nce_weight_scheme {scheme!r}")


class Trainer(torch.nn.Module):
    """The whole loss as one forward(), so DistributedDataParallel sees every parameter use."""

    def __init__(self, model, args, log_pop, num_items, click_rate):
        super().__init__()
        self.model, self.args, self.num_items, self.click_rate = model, args, num_items, click_rate
        self.register_buffer("log_pop", log_pop, persistent=False)

    def forward(self, batch):
        m, a = self.model, self.args
        h = m.encode(batch)                                                # [B, T, d]
        valid = (batch["pos_row"] > 0) & (batch["token_type"] != D.PAD)    # [B, T]
        pos_act, pos_ids = batch["pos_action"][valid], batch["pos_row"][valid]
        q = m.query(h[valid], pos_act if m.cfg.action_cond else None)     # [N, d]
        negs = m.embed_items(batch, "neg_") if a.num_neg else None
        full = a.num_neg < 0             # full softmax: nothing is sampled, so no in-batch / logQ
        # full softmax without per-target inputs (leave-one-out CTR, extra negatives) is plain
        # cross-entropy over the catalogue's vectors: no separate target tower, no masks
        fast = full and not m.cfg.use_itemctr and not a.rank_pkg_as_neg and "hard_row" not in batch
        pos = None if fast else m.item_tower({k[4:]: v for k, v in batch.items() if k.startswith("pos_")
                                              and k not in ("pos_row", "pos_action", "pos_inv")})[batch["pos_inv"][valid]]
        tau = torch.full(pos_ids.shape, a.temperature, device=q.device)
        if a.two_tau:
            tau = torch.where(pos_act >= 2, a.tau_click, a.tau_expo).float()
        sub = None
        if len(pos_ids) > a.in_batch_max:
            sub = torch.randperm(len(pos_ids), device=pos_ids.device)[:a.in_batch_max]
        qn = F.normalize(q.float(), dim=-1)
        posn = None if fast else F.normalize(pos.float(), dim=-1)
        pkg = pkg_ids = None
        hard, hard_ids = [], []
        if "pkg_row" in batch:
            pkg = F.normalize(m.embed_items(batch, "pkg_")[batch["pkg_inv"][valid]].float(), dim=-1)   # [N, 5, d]
            pkg_ids = batch["pkg_row"][valid] * (batch["pkg_grade"][valid] > 0)
            if a.rank_pkg_as_neg:
                hard, hard_ids = [pkg], [pkg_ids]
        if "hard_row" in batch:
            B, K = batch["hard_row"].shape
            user_of = torch.arange(B, device=h.device).unsqueeze(1).expand_as(valid)[valid]     # [N]
            hv = F.normalize(m.embed_items(batch, "hard_").float(), dim=-1).view(B, K, -1)
            hard.append(hv[user_of])                                                          # [N, K, d]
            hard_ids.append(batch["hard_row"][user_of])
        if fast:
            # 1/tau folded into the queries: one pass less over the [N, num_items] matrix
            logits = (qn / tau.unsqueeze(1)) @ F.normalize(negs.float(), dim=-1).T    # [N, num_items]
            loss = F.cross_entropy(logits, pos_ids - 1, reduction="none")
            s_pos = logits.gather(1, (pos_ids - 1).unsqueeze(1)).squeeze(1) * tau
        else:
            loss, s_pos = info_nce(qn, posn, pos_ids, None if negs is None else F.normalize(negs.float(), dim=-1),
                                   batch.get("neg_row"), tau, self.log_pop if a.logq and not full else None,
                                   self.num_items, a.in_batch_neg and not full, sub,
                                   torch.cat(hard, 1) if hard else None, torch.cat(hard_ids, 1) if hard else None)
        w = nce_weights(a.nce_weight_scheme, pos_act, loss, a.click_weight, a.focal_gamma, self.click_rate)
        total = (loss * w).sum() / w.sum().clamp(min=1e-9)
        if a.use_rankloss:
            # an accidental hit (package item == target) is masked, not ranked below itself
            grade = batch["pkg_grade"][valid] * (pkg_ids != pos_ids.unsqueeze(1))
            s_pkg = (qn.unsqueeze(1) * pkg).sum(-1)
            total = total + a.lambda_rank * rank_loss(s_pos / tau, s_pkg / tau.unsqueeze(1), grade, a.rankloss_mode)
        # each user's newest-position query, asking for a click: what the hard-negative cache ranks with
        last = F.normalize(m.query(h[:, -1], torch.full_like(batch["user_id"], 2) if m.cfg.action_cond else None)
                           .detach().float(), dim=-1)
        return total, last


class HardNegativeCache:
    """Per-user items the model currently scores high that are not the user's positives.

    Refreshed during training: a random pool of `pool` catalogue items is embedded with the
    current item tower every `refresh` optimizer steps; after each step the batch's users get
    their top-`k` pool items, excluding every item of their training sequence. Persisted (atomic
    write, restricted unpickler on load) to USER_CACHE_PATH/hard_negative_cache.pkl and reused
    by the next run. Training only: inference never reads it.
    """

    def __init__(self, path, k, pool, refresh):
        self.path, self.k, self.pool, self.refresh = path, k, pool, refresh
        self.items = {}
        if os.path.exists(path):
            data = D.load_pickle(path)
            if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
                raise D.DataError(f"{path}: expected a dict user re-id -> list of item re-ids")
            self.items = data
        self.pool_rows = self.pool_vecs = None

    def lookup(self, user_ids):
        out = np.zeros((len(user_ids), self.k), np.int64)
        for i, u in enumerate(user_ids.tolist()):
            v = self.items.get(u, [])[:self.k]
            out[i, :len(v)] = v
        return out

    @torch.no_grad()
    def refresh_pool(self, model, table, num_items, device):
        was = model.training
        model.eval()
        n = min(self.pool, num_items)
        self.pool_rows = torch.randperm(num_items)[:n].numpy() + 1
        vecs = [model.item_vectors({k: v.to(device) for k, v in table.gather(self.pool_rows[i:i + 4096], "p_").items()}, "p_")
                for i in range(0, n, 4096)]
        self.pool_vecs = torch.cat(vecs)
        model.train(was)

    @torch.no_grad()
    def update(self, user_ids, queries, user_items):
        """user_items: each user's every training item (the whole line, not just the window)."""
        scores = queries @ self.pool_vecs.T                                    # [B, pool]
        extra = max((len(s) for s in user_items), default=0)
        top = scores.topk(min(self.k + extra, scores.shape[1]), 1).indices.cpu().numpy()
        for u, idx, own in zip(user_ids.tolist(), top, user_items):
            if u > 0:      # unknown users share id 0: no per-user cache
                own = set(own.tolist())
                self.items[u] = [int(r) for r in self.pool_rows[idx] if int(r) not in own][:self.k]

    def save(self):
        D.dump_pickle(self.items, self.path)


def model_config(args, data_cfg):
    """ModelConfig from the flags, with sizes and feature switches from the data config (which
    wins: e.g. time features are switched off for data without timestamps)."""
    return ModelConfig(**{f.name: getattr(data_cfg, f.name) if hasattr(data_cfg, f.name) else getattr(args, f.name)
                          for f in dataclasses.fields(ModelConfig)})


def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    seed_everything(args.seed + rank)
    paths = env_paths()
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    if args.use_userctr is None:
        args.use_userctr = args.use_ctr
    if args.use_itemctr is None:
        args.use_itemctr = args.use_ctr
    ctr_dir = D.find_ctr_dir(args.ctr_dir, os.path.join(paths["cache"], "ctr"), os.path.join(paths["data"], "ctr"))
    data_cfg = D.DataConfig(maxlen=args.maxlen, use_timefeat=args.use_timefeat, use_userctr=args.use_userctr,
                            use_itemctr=args.use_itemctr, mm_emb_id=resolve_mm(args, paths["data"]))
    if args.use_timefeat and not D.dataset_has_timestamps(paths["data"]):
        say("notice: this dataset has no real timestamps; time features switched off")
        data_cfg.use_timefeat = False
    data_cfg, table, builder, seq_path, offsets = D.load_train_data(
        paths["data"], data_cfg, paths["cache"], ctr_dir, args.limit_users, args.skip_bad_records)
    counts, head_min = D.load_item_pop(paths["data"], ctr_dir, seq_path, paths["cache"], data_cfg.num_items)
    table.set_popularity(counts, head_min)
    builder.rank_packages = args.use_rankloss or args.rank_pkg_as_neg
    builder.keep_items = args.use_hard_neg
    # add-one smoothing: no item has sampling probability 0
    log_pop = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()

    model_cfg = model_config(args, data_cfg)
    raw_model = GenerativeRecommender(model_cfg).to(device)
    click_rate = float(table.ctr_c.sum() / max(1.0, table.ctr_n.sum())) if table.ctr_meta else 0.1
    trainer = Trainer(raw_model, args, log_pop, data_cfg.num_items, click_rate).to(device)
    if ddp:
        trainer = torch.nn.parallel.DistributedDataParallel(
            trainer, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    ds = D.SeqDataset(seq_path, offsets, builder, train=True, seed=args.seed, skip_bad=args.skip_bad_records)
    skipped = set()
    sampler = EpochSampler(len(ds), world, rank, args.seed, args.batch_size,
                           ds.lines.line_bytes() if args.length_bucketing else None)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=args.pin_memory and device.type == "cuda", collate_fn=D.PackedCollate(table),
        worker_init_fn=D.seed_worker, generator=torch.Generator().manual_seed(args.seed),
        persistent_workers=False)
    batches_per_epoch = math.ceil(sampler.epoch_len / args.batch_size)
    full_negs = None
    if args.num_neg < 0:                 # full softmax: the catalogue's inputs never change
        full_negs = {k: v.to(device) for k, v in D.sample_negatives(table, -1, data_cfg.num_items).items()}

    decay, no_decay = [], []
    for n, prm in raw_model.named_parameters():
        (no_decay if prm.dim() < 2 or "emb" in n or "norm" in n else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_epochs
    warmup = min(args.warmup_steps, total_steps // 5)
    if warmup < args.warmup_steps:
        say(f"notice: --warmup_steps {args.warmup_steps} capped to {warmup} (a fifth of the {total_steps} steps)")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    st = {"step": 0, "epoch": 0, "micro": 0, "best": None, "bad_epochs": 0, "nonfinite": 0}
    resume = find_resume(args.resume, paths["ckpt"])
    if resume:
        ck = load_resume(resume, raw_model, opt, sched, model_cfg, rank)
        st.update({k: ck[k] for k in st if k in ck})
        say(f"resumed from {resume}: epoch {st['epoch'] + 1}, batch {st['micro']}, step {st['step']}")

    valid_dir = None if args.valid_dir == "none" else (args.valid_dir or _default_valid(paths["data"]))
    writer, logf = None, None
    if master:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(paths["tb"], purge_step=st["step"] + 1 if resume else None)
        os.makedirs(paths["log"], exist_ok=True)
        logf = open(os.path.join(paths["log"], "train.log"), "a")
        nparams = sum(p.numel() for p in raw_model.parameters())
        say(f"users {len(ds)}  items {data_cfg.num_items}  params {nparams / 1e6:.2f}M  device {device}  "
            f"world {world}  effective batch {args.batch_size * args.gradient_accumulation_steps * world}  "
            f"steps {total_steps}  mm {data_cfg.mm_emb_id}  ctr_dir {ctr_dir if (args.use_userctr or args.use_itemctr) else '-'}"
            f"  valid {valid_dir or '-'}")
        logf.write(json.dumps({"event": "resume" if resume else "start", "args": vars(args), "world": world}) + "\n")

    hardneg = None
    if args.use_hard_neg:
        hardneg = HardNegativeCache(os.path.join(paths["cache"], "hard_negative_cache.pkl"), args.hard_neg_k,
                                    args.hard_neg_pool, args.hard_neg_refresh)
        say(f"hard negatives: {len(hardneg.items)} users cached from a previous run" if hardneg.items else
            "hard negatives: new cache")
    stop = StopFlag()
    def save(extra=None):
        if hardneg is not None and master:
            hardneg.save()
        return save_checkpoint(paths["ckpt"], raw_model, model_cfg, data_cfg, args, opt, sched, st, extra or {},
                               args.keep_last_ckpts, world)
    last_ckpt, t0 = None, time.time()
    while st["epoch"] < args.num_epochs:
        epoch = st["epoch"]
        sampler.set_epoch(epoch, st["micro"] * args.batch_size)
        ds.epoch = epoch                 # workers are forked per epoch and see it
        trainer.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", initial=st["micro"], total=batches_per_epoch,
                   disable=not (master and sys.stderr.isatty()))
        run_loss, run_n, window_ok = 0.0, 0, True
        for batch in bar:
            raw_model.set_id_dropout(id_dropout_at(args.first_epoch_id_item_dropout, epoch, st["micro"] / batches_per_epoch))
            if args.num_neg:
                batch.update(full_negs or D.sample_negatives(table, args.num_neg, data_cfg.num_items))
            if hardneg is not None and hardneg.items:
                rows = hardneg.lookup(batch["user_id"].numpy())
                batch.update(table.gather(rows.reshape(-1), "hard_"))
                batch["hard_row"] = torch.from_numpy(rows)
            user_items = batch.pop("_items", None)
            for msg in batch.pop("_skipped", []):
                if msg and msg not in skipped:
                    skipped.add(msg)
                    if master:
                        with open(os.path.join(paths["log"], "skipped_records.txt"), "a") as f:
                            f.write(msg + "\n")
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with amp:
                loss, last_q = trainer(batch)
            if hardneg is not None:
                if hardneg.pool_vecs is None or st["step"] % args.hard_neg_refresh == 0 and st["micro"] % args.gradient_accumulation_steps == 0:
                    hardneg.refresh_pool(raw_model, table, data_cfg.num_items, device)
                hardneg.update(batch["user_id"], last_q, user_items)
            finite = bool(torch.isfinite(loss))
            if finite:
                (loss / args.gradient_accumulation_steps).backward()
                run_loss, run_n = run_loss + loss.item(), run_n + 1
            window_ok &= finite
            st["micro"] += 1
            if st["micro"] % args.gradient_accumulation_steps and st["micro"] != batches_per_epoch:
                continue
            if not window_ok:
                # a non-finite loss skips the whole optimizer step; too many in a row stop the run
                opt.zero_grad(set_to_none=True)
                st["nonfinite"] += 1
                window_ok = True
                if st["nonfinite"] >= args.max_nonfinite_steps:
                    raise TrainingError(f"stopped at step {st['step'] + 1}: {st['nonfinite']} optimizer steps in a "
                                        f"row had a non-finite loss (lower --lr, check the data)")
                continue
            st["nonfinite"] = 0
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_norm) if args.clip_norm > 0 else torch.tensor(0.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            st["step"] += 1
            if master and run_n and (st["step"] % args.log_every == 0 or st["micro"] == batches_per_epoch):
                rec = {"step": st["step"], "epoch": epoch + 1, "loss": run_loss / run_n, "lr": sched.get_last_lr()[0],
                       "grad_norm": float(gnorm), "id_dropout": raw_model.item_tower.id_dropout,
                       "elapsed_s": round(time.time() - t0, 1)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                for k in ("loss", "lr", "grad_norm", "id_dropout"):
                    writer.add_scalar(f"train/{k}", rec[k], st["step"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                run_loss, run_n = 0.0, 0
            if st["micro"] == batches_per_epoch:
                break
            if stop.requested or (args.ckpt_every_steps and st["step"] % args.ckpt_every_steps == 0):
                last_ckpt = save()
                if stop.requested:
                    say(f"signal {stop.requested}: saved {last_ckpt}; rerun the same command to continue")
                    return last_ckpt
        extra = {}
        if valid_dir and master:
            from infer import evaluate_folder
            m = evaluate_folder(raw_model, data_cfg, table, valid_dir, paths["data"], device)
            extra.update({f"valid_{k}": v for k, v in m.items()})
            for k, v in m.items():
                writer.add_scalar(f"valid/{k}", v, st["step"])
            say(f"epoch {epoch + 1} valid " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
            if st["best"] is None or m["NDCG@10"] > st["best"][1]:
                st["best"], st["bad_epochs"] = [st["step"], m["NDCG@10"]], 0
            else:
                st["bad_epochs"] += 1
        if ddp:
            flag_t = torch.tensor([st["bad_epochs"]], device=device)
            dist.broadcast(flag_t, 0)
            st["bad_epochs"] = int(flag_t.item())
        st["epoch"], st["micro"] = epoch + 1, 0
        last_ckpt = save(extra)
        say(f"epoch {epoch + 1} done  step {st['step']}  {time.time() - t0:.0f}s  -> {last_ckpt}")
        if args.patience and st["bad_epochs"] >= args.patience:
            say(f"early stop: no validation gain for {st['bad_epochs']} epochs")
            break
    if skipped:
        say(f"skipped {len(skipped)} bad line(s); locations in {os.path.join(paths['log'], 'skipped_records.txt')}")
    if master:
        writer.close()
        logf.write(json.dumps({"event": "end", "step": st["step"], "elapsed_s": round(time.time() - t0, 1)}) + "\n")
        logf.close()
    if ddp:
        dist.destroy_process_group()
    return last_ckpt


def _default_valid(data_dir):
    cand = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "valid")
    return cand if os.path.exists(os.path.join(cand, "predict_seq.jsonl")) else None


if __name__ == "__main__":
    D.run_cli(main, {TrainingError: 3})
