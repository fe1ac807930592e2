"""Train the generative recommender on a TencentGR-layout folder.

Next-item InfoNCE on L2-normalised vectors (objectives.py): every position's query (the encoder
state after that event, optionally told which action comes next) must pick the next item out of
in-batch targets plus uniformly sampled negatives, with a logQ popularity correction and
accidental hits masked. AdamW, linear warmup + cosine decay, gradient accumulation and clipping,
TensorBoard, atomic checkpoints (checkpoint.py), optional per-epoch validation with full
ranking, DDP under torchrun.

Paths come from the seed's environment variables (TRAIN_DATA_PATH, TRAIN_LOG_PATH,
TRAIN_TF_EVENTS_PATH, TRAIN_CKPT_PATH, USER_CACHE_PATH) with defaults under ./data and ./runs.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as C
import config as CF
import layout as L
import retrieval_torch as R
import validation as V
from layout import PAD, ArgumentParser, DataError, atomic_write, run_cli
from training import RunConfig, Setup, TrainState, build_training, id_dropout_at, keep_freed_memory, seed_everything


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {v!r}")


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="a TOML config file, or the name of one in configs/ (demo, taac1m, seed, s3rec, movielens, cold); "
                        "repeatable, later files win, flags on the command line win over every file (config.py)")
    p.add_argument("--preset", default=None,
                   help="a config in configs/ by name, applied before any --config: taac1m is the seed solution's "
                        "full-size model and schedule (10 HSTU blocks, 8 heads, batch 64 x 4, 8 epochs) for "
                        "TencentGR-1M-sized data")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved configuration as a config file and exit")

    def flag(name, default, help):      # a switch in the current group g: true/false, bare = true
        g.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help + f" (default {default})")

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
    flag("--use_sid", False, "semantic ids: the item's RQ-KMeans codes (precompute_sid.py, one embedding table per "
         "level) join its features; cold items get codes from their vectors with the saved codebook")
    g.add_argument("--new_item_events", type=int, default=0,
                   help="an item's first N training events show it as a new item: its id row replaced by the "
                        "learned new-item row (features kept), as cold items are at inference; items with at most "
                        "N training events keep that row at inference (needs --cold_ids mask)")
    g.add_argument("--sid_dir", default=None, help="folder of precompute_sid.py outputs "
                   "(default: USER_CACHE_PATH/sid, then TRAIN_DATA_PATH/sid)")
    g.add_argument("--valid_dir", default=None, help="validation folder in the eval layout, with ground_truth.jsonl "
                   "(default: ../valid beside the train folder when it exists; 'none' disables validation)")
    g.add_argument("--valid_users", type=int, default=5000,
                   help="without a validation folder: users held out of the training data for validation (a seeded "
                        "sample, at most half of them): each one's last click is the target, its history the events "
                        "before it, and neither that click nor what follows trains; 0 = no validation")
    g.add_argument("--valid_seed", type=int, default=0, help="seed of the held-out users' sample (the same for every --seed)")
    g.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    g.add_argument("--prefetch_factor", type=int, default=2, help="batches each DataLoader worker prepares ahead")
    flag("--length_bucketing", False, "batch users of similar sequence length together (sorted within runs of 64 "
         "batches, then shuffled) so the padding they share is dropped: faster epochs, but slower learning per "
         "epoch on Beauty (valid HR@10 0.094 vs 0.103 at epoch 10); 0 = plain shuffle")
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
    g.add_argument("--hstu_silu_norm", choices=["visible", "length"], default="visible",
                   help="SiLU attention weights divided by the keys each query sees (visible), or by the window "
                        "length, as the published HSTU (length)")
    flag("--hstu_qk_scale", True, "scale HSTU's q.k by 1/sqrt(dqk) (off: unscaled, as the published HSTU)")
    g.add_argument("--hstu_dropout", choices=["output", "gate"], default="output",
                   help="HSTU block dropout after the output projection (output), or on norm(AV) * U before it, "
                        "as the published HSTU (gate)")
    g.add_argument("--hstu_init", choices=["torch", "published"], default="torch",
                   help="HSTU linear layers: PyTorch's default init, or the published one (U/V/Q/K weights "
                        "N(0, 0.02) with zero bias, output projection Xavier-uniform)")
    flag("--use_rope", False, "rotary position embedding on queries and keys")
    g.add_argument("--rope_theta", type=float, default=10000.0, help="RoPE base")
    g.add_argument("--rope_dim", type=int, default=0,
                   help="RoPE on the first N dims of each head's queries and keys (even; 0 = all of them)")
    flag("--use_rel_bias", False, "learned relative position and time-gap attention biases")
    g.add_argument("--rel_pos_buckets", type=int, default=32, help="relative position buckets")
    g.add_argument("--rel_time_buckets", type=int, default=32, help="log time-gap buckets (see --rel_time_base)")
    g.add_argument("--rel_time_base", type=float, default=2.0,
                   help="time-gap bucket = floor(log_base(1 + seconds between the query's and the key's events)); "
                        "the published HSTU uses about 1.35 with 128 buckets")
    g.add_argument("--rel_bias_terms", choices=["pos+time", "time", "pos"], default="pos+time",
                   help="which relative attention biases --use_rel_bias learns")
    flag("--use_abs_pos", True, "learned absolute position embedding (from the window start)")
    flag("--use_senet", False, "squeeze-and-excitation gates over feature blocks (user and item sides)")
    g.add_argument("--senet_reduction", type=int, default=2, help="SENet bottleneck: feature blocks // this")
    flag("--use_user_id", True, "user-id embedding in the user token (off: the token carries user features only)")
    flag("--use_item_id", True, "item-id row in the item tower (off: items are their features only; not with "
         "--item_tower id)")
    g.add_argument("--item_tower", choices=["mlp", "add", "id"], default="add",
                   help="item vectors: mlp = an MLP over the id row and every feature block; add = a plain id row "
                        "plus that MLP over the features; id = the plain id row only (SASRec)")
    g.add_argument("--score", choices=["cosine", "dot"], default="cosine",
                   help="cosine: L2-normalised vectors over --temperature; dot: raw inner product (no temperature)")
    flag("--query_head", True, "a linear head turns the encoder state into the query (off: the state is the query)")
    flag("--use_type_emb", True, "token-type and action rows added to every token")
    flag("--use_user_token", True, "a user token (user id and features) leads the sequence")
    flag("--hstu_ffn", False, "a point-wise feed-forward sub-layer (norm, 2 layers, residual) after each HSTU attention")
    flag("--action_cond", False, "tell the encoder the next action (click at inference)")
    flag("--grad_checkpoint", False, "recompute encoder blocks in the backward pass to save memory")
    g.add_argument("--cold_ids", choices=["mask", "keep"], default="mask",
                   help="items without a training event: mask = scored through id row 0, by their features alone, "
                        "in training and at inference; keep = their own (untrained) id rows")
    flag("--item_age", False, "a learned score bias by item age (log2 days since the item's first training event, "
         "at the newest one; a cold item counts as newest); training takes each pair's age at the request "
         "(see --age_unseen). Off without real timestamps")
    g.add_argument("--age_unseen", choices=["mask", "bias"], default="bias",
                   help="with --item_age, in training, an item whose first training event comes after a request: "
                        "mask = no candidate for that request (it did not exist yet: an ad before its launch); bias = "
                        "a candidate with one learned bias of its own (it existed, unrated: a film before its first "
                        "rating in the log)")
    flag("--item_recent", False, "a learned score bias by the item's share of recent events: in training the share of "
         "the calendar day before each request; at inference the share of the served histories' events in the day "
         "after the training data ends (without any, the training's last day). Off without real timestamps")
    g.add_argument("--content_channel", type=int, default=0,
                   help="K > 0: K more score coordinates, a linear map of the item's raw multimodal vectors (no id) "
                        "against a linear map of the query state, the same for items with and without training "
                        "events, so what it learns about tastes carries to cold items (0: off; off without "
                        "--mm_emb_id vectors)")
    g.add_argument("--cold_neighbors", type=int, default=0,
                   help="score a candidate without training events (a cold item) as the mean of the vectors of its "
                        "K nearest trained candidates by multimodal-vector cosine, keeping its own item-age bias; "
                        "saved in the checkpoint, so infer.py does the same (0: its own vector). Needs --mm_emb_id "
                        "vectors")
    g.add_argument("--item_id_dropout", type=float, default=0.0,
                   help="drop item id rows with this rate at every training step, so the features alone learn to "
                        "carry an item, as they must for cold items")
    g.add_argument("--first_epoch_id_item_dropout", type=float, nargs="?", const=0.5, default=0.0,
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
    g.add_argument("--expo_weight", type=float, default=1.0, help="weight of exposure targets for 'fixed'")
    g.add_argument("--weight_cap", type=float, default=0.0,
                   help="'cb': the larger class weight at most this times the smaller (0 = no cap)")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal exponent")
    flag("--two_tau", False, "temperature by the target's action (--tau_click, --tau_expo)")
    g.add_argument("--tau_click", type=float, default=0.03, help="temperature for click targets")
    g.add_argument("--tau_expo", type=float, default=0.05, help="temperature for exposure targets")

    flag("--use_rankloss", False, "rank loss over per-target rank packages (positive > clicked > exposed > random)")
    g.add_argument("--rankloss_mode", choices=["pairwise", "listwise"], default="listwise",
                   help="pairwise: BPR over ordered pairs; listwise: softmax cross-entropy with graded targets")
    g.add_argument("--lambda_rank", type=float, default=0.5, help="weight of the rank loss")
    g.add_argument("--rankloss_tau", type=float, default=0.0,
                   help="temperature of the rank loss's scores (0 = the InfoNCE temperature)")
    g.add_argument("--rankloss_weights", type=CF.rank_weights, default="",
                   help="pairwise rank loss: pair weights by the higher item's level, positive, clicked, exposed, "
                        "random, e.g. 1.0,0.6,0.4,0.2 (default: all 1)")
    flag("--rank_pkg_as_neg", False, "package items also serve as per-target hard negatives in InfoNCE")

    flag("--use_hard_neg", False, "per-user hard negatives from a cache refreshed during training "
         "(USER_CACHE_PATH/hard_negative_cache.pkl, reused by the next run)")
    g.add_argument("--hard_neg_k", type=int, default=8, help="hard negatives per user")
    g.add_argument("--hard_neg_pool", type=int, default=20000, help="catalogue items scored for the cache")
    g.add_argument("--hard_neg_refresh", type=int, default=100, help="optimizer steps between pool re-embeddings")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=128, help="users per micro-batch (per process)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on norms/biases/embeddings)")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup optimizer steps")
    g.add_argument("--lr_schedule", choices=["auto", "cosine", "constant", "plateau"], default="auto",
                   help="after warmup: cosine decay to 0 at the last step; constant; or plateau: constant, cut to "
                        "--plateau_factor of itself whenever validation has not improved for half of --patience; "
                        "auto: cosine when the run's length is fixed (--num_epochs or --max_steps), else plateau")
    g.add_argument("--plateau_factor", type=float, default=0.3, help="LR factor of each plateau cut")
    g.add_argument("--num_epochs", type=int, default=None,
                   help="passes over the training users (default: until validation stops improving, see --patience, "
                        "at most --max_epochs)")
    g.add_argument("--max_epochs", type=int, default=200, help="most passes when --num_epochs is not given")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    g.add_argument("--eval_every", type=int, default=0,
                   help="optimizer steps between validations (0: once per epoch, or about every 1000 steps when an "
                        "epoch is longer); each validation saves a checkpoint")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument("--seed", type=int, default=42, help="seed for every RNG")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many validations without a gain in NDCG@10 (0 = never; default 10, or 0 when "
                        "--num_epochs is given)")
    g.add_argument("--min_gain", type=float, default=0.0,
                   help="a validation counts as a gain for --patience and the plateau schedule only when its NDCG@10 "
                        "beats the last counted gain by this fraction (0.01: one percent); smaller gains still update the "
                        "best checkpoint. 0: any gain")
    g.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    g.add_argument("--resume", default="auto",
                   help="auto: continue from the newest complete checkpoint in TRAIN_CKPT_PATH; none: start "
                        "afresh; or a checkpoint path")
    g.add_argument("--ckpt_every_steps", type=int, default=0,
                   help="also checkpoint every N optimizer steps (0 = at each validation and epoch end only)")
    g.add_argument("--keep_last_ckpts", type=int, default=3, help="keep the newest K checkpoints (+ the best); 0 keeps all")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop after this many optimizer steps in a row with a non-finite loss (each is skipped)")
    CF.add_seed_flags(p)
    return p


def get_args(argv=None):
    """Flags with --preset / --config files applied (config.parse); argv None = sys.argv[1:]."""
    return CF.parse(parser(), sys.argv[1:] if argv is None else list(argv))


# Flag ranges, checked before any work (check_args): name -> (lowest, highest, inclusive lowest)
_INT_MIN = {"maxlen": 1, "hidden_units": 1, "num_blocks": 1, "num_heads": 1, "dqk": 1, "dv": 1, "rel_pos_buckets": 2,
            "rel_time_buckets": 1, "batch_size": 1, "max_epochs": 1, "gradient_accumulation_steps": 1, "log_every": 1,
            "hard_neg_k": 1, "hard_neg_pool": 1, "hard_neg_refresh": 1, "in_batch_max": 1, "max_nonfinite_steps": 1,
            "valid_users": 0, "num_workers": 0, "feat_dim": 0, "new_item_events": 0, "warmup_steps": 0, "max_steps": 0, "eval_every": 0,
            "patience": 0, "ckpt_every_steps": 0, "keep_last_ckpts": 0, "num_neg": -1, "num_epochs": 1,
            "limit_users": 1, "seed": 0, "valid_seed": 0, "senet_reduction": 1, "rope_dim": 0, "prefetch_factor": 1,
            "cold_neighbors": 0, "content_channel": 0}
# Upper bounds: far above any real run, low enough that a typo (an extra zero, 2**63) is a one-line
# error naming the flag instead of an allocation failure or an overflow deep in torch or numpy.
# Every other int flag (step and epoch counts, --patience, ...) stops at _INT_CAP.
_INT_CAP = 10**12
_INT_MAX = {"maxlen": 1_000_000, "hidden_units": 65536, "feat_dim": 65536, "dqk": 65536, "dv": 65536,
            "content_channel": 65536, "num_blocks": 1000, "num_heads": 4096, "rel_pos_buckets": 1_000_000,
            "rel_time_buckets": 1_000_000,
            "batch_size": 1_000_000, "num_neg": 1_000_000, "in_batch_max": 1_000_000, "hard_neg_k": 100_000,
            "hard_neg_pool": 100_000_000, "num_workers": 1024, "gradient_accumulation_steps": 1_000_000,
            "seed": 2**32 - 1 - 65536, "valid_seed": 2**32 - 1}      # numpy seeds are below 2^32 (seed + rank)
_FLOAT_RANGE = {"lr": (0, None, False), "temperature": (0, None, False), "tau_click": (0, None, False),
                "tau_expo": (0, None, False), "emb_init_std": (0, None, False), "click_weight": (0, None, False),
                "weight_decay": (0, None, True), "clip_norm": (0, None, True), "focal_gamma": (0, None, True),
                "lambda_rank": (0, None, True), "dropout_rate": (0, 1, True), "attn_dropout": (0, 1, True),
                "first_epoch_id_item_dropout": (0, 1, True), "item_id_dropout": (0, 1, True),
                "plateau_factor": (0, 1, False),
                "rope_theta": (1, None, False), "expo_weight": (0, None, True), "weight_cap": (0, None, True),
                "rankloss_tau": (0, None, True), "rel_time_base": (1, None, False), "min_gain": (0, 1, True)}


def check_args(args) -> None:
    """Every flag in range, and the combinations the model needs, before any work is done."""
    def bad(flag, value, expected):
        raise DataError(f"--{flag} {value}: expected {expected}")
    for k, lo in _INT_MIN.items():
        v = getattr(args, k)
        if v is not None and v < lo:
            bad(k, v, f"an integer >= {lo}")
    for k, a in vars(args).items():
        hi = _INT_MAX.get(k, _INT_CAP)
        if type(a) is int and a > hi:
            bad(k, a, f"an integer <= {hi}")
    for k, (lo, hi, closed) in _FLOAT_RANGE.items():
        v = getattr(args, k)
        if not (math.isfinite(v) and (v >= lo if closed else v > lo) and (hi is None or v < hi)):
            bad(k, v, f"a number {'>=' if closed else '>'} {lo}" + (f" and < {hi}" if hi is not None else ""))
    if args.encoder_type == "transformer" and args.hidden_units % args.num_heads:
        bad("num_heads", args.num_heads, f"a divisor of --hidden_units {args.hidden_units} (transformer heads split it)")
    if args.use_rope and (args.dqk if args.encoder_type == "hstu" else args.hidden_units // args.num_heads) % 2:
        bad("use_rope", 1, "an even per-head query/key width (--dqk for hstu, --hidden_units / --num_heads for transformer)")
    if args.num_neg == 0 and not args.in_batch_neg and not (args.use_hard_neg or args.rank_pkg_as_neg):
        bad("num_neg", 0, "negatives to train against: --num_neg > 0 or -1, or --in_batch_neg 1")
    if args.mm_emb_id and args.mm_emb_id != ["none"] and not all(str(x).isdigit() for x in args.mm_emb_id):
        bad("mm_emb_id", " ".join(map(str, args.mm_emb_id)), "feature ids such as 81 82, or none")
    if not args.use_item_id and args.item_tower == "id":
        bad("use_item_id", 0, "an item tower with features (--item_tower add or mlp): with --item_tower id the id "
            "row is all there is")
    if args.new_item_events and (args.cold_ids != "mask" or not args.use_item_id):
        bad("new_item_events", args.new_item_events, "0 with --cold_ids keep or --use_item_id 0 (new items are shown "
            "with the new-item row, which only --cold_ids mask has)")
    if args.use_sid and args.item_tower == "id":
        bad("use_sid", 1, "an item tower with features (--item_tower add or mlp): with --item_tower id the codes "
            "would be unused")
    if args.use_rope and args.rope_dim:
        width = args.dqk if args.encoder_type == "hstu" else args.hidden_units // args.num_heads
        if args.rope_dim % 2 or args.rope_dim > width:
            bad("rope_dim", args.rope_dim, f"an even number <= the per-head query/key width ({width})")
    CF.check_seed_actions(args)
    if args.device is not None:
        R.parse_device(args.device)


def check_paths(paths: dict, args) -> None:
    """The data folder readable and every output folder writable, before any work is done."""
    names = {"log": "TRAIN_LOG_PATH", "tb": "TRAIN_TF_EVENTS_PATH", "ckpt": "TRAIN_CKPT_PATH", "cache": "USER_CACHE_PATH"}
    if not os.path.isdir(paths["data"]):
        what = ("folder not found (TRAIN_DATA_PATH), expected" if not os.path.exists(paths["data"]) else
                f"{'a file' if os.path.isfile(paths['data']) else 'not a folder'}, expected a folder "
                f"(TRAIN_DATA_PATH) holding")
        raise DataError(f"{paths['data']}: {what} seq.jsonl, seq_offsets.pkl, indexer.pkl and item_feat_dict.json")
    for key, env in names.items():
        ensure_writable(paths[key], env)
    if args.valid_dir not in (None, "none") and not os.path.isfile(os.path.join(args.valid_dir, "ground_truth.jsonl")):
        raise DataError(f"{args.valid_dir}: no ground_truth.jsonl (--valid_dir), expected a folder in the eval layout")


def ensure_writable(folder: str, what: str) -> None:
    """Create `folder` if needed and prove it takes a file; one-line DataError naming `what` if not."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test."):
            pass
    except OSError as e:
        raise DataError(f"{folder}: cannot write there ({what}: {e.strerror})") from None


def env_paths():
    data = os.environ.get("TRAIN_DATA_PATH", "data/demo/train")
    runs = "runs"
    return {"data": data,
            "log": os.environ.get("TRAIN_LOG_PATH", f"{runs}/logs"),
            "tb": os.environ.get("TRAIN_TF_EVENTS_PATH", f"{runs}/tb"),
            "ckpt": os.environ.get("TRAIN_CKPT_PATH", f"{runs}/ckpt"),
            "cache": os.environ.get("USER_CACHE_PATH", f"{runs}/cache")}


class TrainingError(Exception):
    """The run cannot go on (e.g. non-finite losses); printed as one line, exit code 3."""


# what torch and Python say when an allocation fails (CPU allocator, CUDA, a DataLoader worker's)
_OOM_SIGNS = ("not enough memory", "DefaultCPUAllocator", "out of memory", "can't allocate memory",
              "Cannot allocate memory")


def out_of_memory(e: BaseException, when: str, cfg: RunConfig):
    """A TrainingError for an allocation failure `e` (MemoryError, or torch's RuntimeError) that
    names the flags that size memory; None for any other error."""
    text = str(e).strip()
    if not (isinstance(e, MemoryError) or isinstance(e, RuntimeError) and any(s in text for s in _OOM_SIGNS)):
        return None
    lines = text.splitlines()
    why = next((ln.strip() for ln in reversed(lines) if any(s in ln for s in _OOM_SIGNS)), lines[0] if lines else "")
    why = why.split("DefaultCPUAllocator: ", 1)[-1][:200] or type(e).__name__
    return TrainingError(f"out of memory {when} ({why}); lower --batch_size ({cfg.loop.batch_size}), --maxlen "
                         f"({cfg.data.maxlen}) or --hidden_units ({cfg.model.hidden_units})")


@contextlib.contextmanager
def oom_context(when: str, cfg: RunConfig):
    """An allocation failure inside the block becomes out_of_memory's one line."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        err = out_of_memory(e, when, cfg)
        if err is None:
            raise
        raise err from None


def oom_guard(steps, cfg: RunConfig):
    """train_steps, with an allocation failure inside a step as out_of_memory's one line."""
    with oom_context("in a training step", cfg):
        yield from steps


def diverged_hint(cfg: RunConfig) -> str:
    """What to change when the run diverged (NaN or inf losses or vectors)."""
    lr, clip_norm = cfg.loop.lr, cfg.loop.clip_norm
    clip = "set --clip_norm (e.g. 1.0; now off)" if not clip_norm else f"--clip_norm (now {clip_norm:g})"
    return f"lower --lr (now {lr:g}) or {clip}"


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the next optimizer step, then one line and the
    signal's exit code (layout.run_cli). Before training starts, run_cli's handlers stop the run."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signum


class RunLog:
    """train.log (one JSON line per record) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, paths: dict, master: bool, purge_step=None):
        self.master, self.writer, self.f = master, None, None
        if master:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(paths["tb"], purge_step=purge_step)
            os.makedirs(paths["log"], exist_ok=True)
            self.f = open(os.path.join(paths["log"], "train.log"), "a")

    def record(self, rec: dict, scalars: dict = None, step: int = None) -> None:
        if not self.master:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        for k, v in (scalars or {}).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.master:
            self.writer.close()
            self.f.close()


class Window:
    """Running sums between two log lines: losses, samples, tokens and the time they took."""

    def __init__(self):
        self.loss, self.n, self.parts, self.samples, self.tokens, self.t0 = 0.0, 0, {}, 0, 0, time.time()

    def add(self, total: torch.Tensor, parts: dict, samples: int, tokens: int) -> None:
        self.loss, self.n = self.loss + total.item(), self.n + 1
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v.item()
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens

    def summary(self) -> dict:
        dt = max(time.time() - self.t0, 1e-9)
        return {"loss": self.loss / self.n, **{f"loss_{k}": v / self.n for k, v in self.parts.items()},
                "samples_per_s": round(self.samples / dt, 1), "tokens_per_s": round(self.tokens / dt, 1)}


def train_steps(s: Setup, st: TrainState, log: RunLog, t0: float):
    """Optimizer steps, epoch after epoch, until the epoch budget; yields after each one whether it
    ended an epoch (st then already counts that epoch). Resumes mid-epoch from st.micro."""
    a, b, master = s.cfg.loop, s.budget, s.rank == 0
    while st.epoch < b.epochs:
        epoch = st.epoch
        s.sampler.set_epoch(epoch, st.micro * a.batch_size)
        s.ds.epoch = epoch                 # workers are forked per epoch and see it
        s.trainer.train()
        bar = tqdm(s.loader, desc=f"epoch {epoch + 1}/{b.epochs}", initial=st.micro, total=b.batches_per_epoch,
                   disable=not (master and sys.stderr.isatty()))
        win, window_ok = Window(), True
        for batch in bar:
            s.model.set_id_dropout(id_dropout_at(a.first_epoch_id_item_dropout, epoch, st.micro / b.batches_per_epoch),
                                   a.item_id_dropout)
            s.negatives.add(batch)
            user_items = batch.pop("_items", None)
            log_skipped(s, batch.pop("_skipped", []))
            batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
            with autocast(s.device):
                loss, parts, last_q = s.trainer(batch)
            s.negatives.update(s.model, batch["user_id"], last_q, user_items,
                               st.step % s.cfg.objective.hard_neg_refresh == 0
                               and st.micro % a.gradient_accumulation_steps == 0)
            finite = bool(torch.isfinite(loss))
            if finite:
                (loss / a.gradient_accumulation_steps).backward()
                win.add(loss, parts, len(batch["user_id"]), int((batch["token_type"] != PAD).sum()))
            window_ok &= finite
            st.micro += 1
            if st.micro % a.gradient_accumulation_steps and st.micro != b.batches_per_epoch:
                continue
            if not window_ok:
                # a non-finite loss skips the whole optimizer step; too many in a row stop the run
                s.opt.zero_grad(set_to_none=True)
                st.nonfinite += 1
                window_ok = True
                if st.nonfinite >= a.max_nonfinite_steps:
                    raise TrainingError(f"the run diverged: stopped at step {st.step + 1}, {st.nonfinite} "
                                        f"optimizer steps in a row had a NaN or inf loss; {diverged_hint(s.cfg)}, "
                                        f"or check the data")
                continue
            st.nonfinite = 0
            gnorm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), a.clip_norm) if a.clip_norm > 0 else torch.tensor(0.0)
            s.opt.step()
            s.sched.step()
            s.opt.zero_grad(set_to_none=True)
            st.step += 1
            if master and win.n and (st.step % a.log_every == 0 or st.micro == b.batches_per_epoch):
                rec = {"step": st.step, "epoch": epoch + 1, **win.summary(), "lr": s.sched.get_last_lr()[0],
                       "grad_norm": float(gnorm), "id_dropout": s.model.item_tower.id_dropout,
                       "elapsed_s": round(time.time() - t0, 1)}
                log.record(rec, {f"train/{k}": rec[k] for k in rec if k.startswith("loss") or k in
                                 ("lr", "grad_norm", "id_dropout", "samples_per_s", "tokens_per_s")}, st.step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                win = Window()
            end = st.micro == b.batches_per_epoch
            if end:
                st.epoch, st.micro = epoch + 1, 0
            yield end
            if end:
                break
        bar.close()
        if st.epoch == epoch:        # the epoch's last window was skipped (non-finite): it still ends
            st.epoch, st.micro = epoch + 1, 0
            yield True


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def log_skipped(s: Setup, messages: list) -> None:
    """--skip_bad_records: each newly skipped line's message goes to skipped_records.txt once."""
    for msg in messages:
        if msg and msg not in s.skipped:
            s.skipped.add(msg)
            if s.rank == 0:
                with open(os.path.join(s.paths["log"], "skipped_records.txt"), "a") as f:
                    f.write(msg + "\n")


def validate(s: Setup, st: TrainState, log: RunLog) -> tuple:
    """Full-ranking metrics on the validation folder or the held-out users, scored with and without
    each user's history masked: the better one counts, and is what infer.py --mask_history auto
    applies. Updates the best step and the patience count; returns (metrics, history masked)."""
    try:
        if s.holdout is not None:
            s.holdout_cache = s.holdout_cache or V.BatchCache()
            both = V.holdout_metrics(s.model, s.table, s.holdout, s.cfg.data.num_items, s.device, trained=s.trained,
                                     cache=s.holdout_cache)
        else:
            both = V.evaluate_folder(s.model, s.cfg.data, s.table, s.valid_dir, s.paths["data"], s.device,
                                     mask_history=None, trained=s.trained)
    except V.DivergedError as e:
        raise TrainingError(f"the run diverged: at step {st.step} the model's {e.what} hold NaN or inf "
                            f"(validation); {diverged_hint(s.cfg)}") from None
    except (MemoryError, RuntimeError) as e:
        err = out_of_memory(e, "in validation", s.cfg)
        if err is None:
            raise
        raise err from None
    mask = both["masked"]["NDCG@10"] > both["plain"]["NDCG@10"]
    m = both["masked" if mask else "plain"]
    log.record({"step": st.step, "epoch": st.epoch + (st.micro > 0), "mask_history": mask,
                **{f"valid_{k}": v for k, v in m.items()}}, {f"valid/{k}": v for k, v in m.items()}, st.step)
    ndcg = m["NDCG@10"]
    if st.ref is None and st.best is not None:
        st.ref = st.best[1]          # a checkpoint from before min_gain: its best was the reference
    if st.best is None or ndcg > st.best[1]:
        st.best = [st.step, ndcg, mask]
    if st.ref is None or ndcg > st.ref * (1 + s.cfg.loop.min_gain):
        st.ref, st.bad_evals = ndcg, 0
    else:
        st.bad_evals += 1
    return m, mask


def setup_process(loop):
    """(rank, world, device) from torchrun's environment; seeds every RNG."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = torch.device(loop.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # with more than one thread some CPU kernels accumulate in a varying order (weights then
        # differed by up to 6e-7 between two runs); their deterministic versions cost no
        # measurable time here, so the same command gives the same weights bit for bit
        torch.use_deterministic_algorithms(True)
    keep_freed_memory()
    seed_everything(loop.seed + rank)
    return rank, world, device


def resume_state(s: Setup, st: TrainState, say) -> tuple:
    """(checkpoint resumed from or None, whether that run already finished). Loads the newest
    complete checkpoint of this run into s and st; refuses a folder holding another run's steps."""
    paths = s.paths
    resume = C.find_resume(s.cfg.loop.resume, paths["ckpt"])
    if resume:
        done = C.meta_of(resume if os.path.isdir(resume) else os.path.dirname(resume)).get("done")
        if done:
            f = resume if os.path.isfile(resume) else os.path.join(resume, "model.pt")
            diff = C.settings_diff(C.load_state(f, "resume from"), f, s.cfg.model, s.cfg.data)
            if diff:
                raise DataError(f"{resume}: holds another run, finished, trained with other settings ({diff}); use "
                                f"another TRAIN_CKPT_PATH for a run with these flags")
            say(f"{resume}: this run already finished ({done}); nothing to do. infer.py uses its best checkpoint; "
                f"to train again, use another TRAIN_CKPT_PATH")
            return resume, True
        ck = C.load_resume(resume, s.model, s.opt, s.sched, s.cfg.model, s.cfg.data, s.rank)
        check_same_batches(ck, s.cfg.loop, resume)
        st.restore(ck)
        s.lr_scale[0] = st.lr_scale
        say(f"resumed from {resume}: epoch {st.epoch + 1}, batch {st.micro}, step {st.step}")
    elif C.complete(paths["ckpt"]):
        steps = [os.path.basename(p) for p in C.complete(paths["ckpt"])]
        raise DataError(f"{paths['ckpt']}: holds checkpoints of another run ({steps[0]} .. {steps[-1]}) that a new run "
                        f"would overwrite; use another TRAIN_CKPT_PATH (or --resume auto to continue that run)")
    return resume, False


def check_same_batches(ck: dict, loop, where: str) -> None:
    """A resumed run must cut its epochs into the same batches: the loop position (batches done
    in the epoch) and the LR schedule's length count them. Another --batch_size or
    --gradient_accumulation_steps would skip or repeat users and move the schedule: refused."""
    saved = ck.get("loop_config") or ck.get("args") or {}
    for flag in ("batch_size", "gradient_accumulation_steps"):
        was, now = saved.get(flag), getattr(loop, flag)
        if was is not None and was != now:
            raise DataError(f"{where}: this run was checkpointed with --{flag} {was}, not {now}; resuming with "
                            f"another would skip or repeat users of the epoch and move the LR schedule: resume with "
                            f"--{flag} {was}, or use another TRAIN_CKPT_PATH for a run with {now}")


def say_start(s: Setup, say) -> None:
    """One line describing the run, and a notice when a fixed length gives too few steps."""
    a, b, d = s.cfg.loop, s.budget, s.cfg.data
    nparams = sum(p.numel() for p in s.model.parameters())
    say(f"users {len(s.ds)}  items {d.num_items}  params {nparams / 1e6:.2f}M  device {s.device}  "
        f"world {s.world}  effective batch {a.batch_size * a.gradient_accumulation_steps * s.world}  "
        f"steps/epoch {b.steps_per_epoch}  epochs {'up to ' if a.num_epochs is None else ''}{b.epochs}  "
        f"mm {d.mm_emb_id}  ctr_dir {s.ctr_dir if (d.use_userctr or d.use_itemctr) else '-'}  valid "
        + (s.valid_dir or (f"{len(s.holdout)} held-out users" if s.holdout is not None else "-")))
    if a.num_epochs is not None and b.total_steps < 300:
        say(f"notice: only {b.total_steps} optimizer steps in all: likely too few to train; leave --num_epochs out "
            f"to train until validation stops improving")


def validation_step(s: Setup, st: TrainState, log: RunLog, say) -> tuple:
    """Validate on rank 0 and share the patience count: (checkpoint extras, stop early?). With the
    plateau schedule, every patience/2 validations without gain cut the LR by --plateau_factor."""
    a, b, extra = s.cfg.loop, s.budget, {}
    if s.rank == 0:
        m, mask = validate(s, st, log)
        extra = {**{f"valid_{k}": v for k, v in m.items()}, "valid_mask_history": mask}
        say(f"step {st.step} valid " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
            + ("  (history masked)" if mask else ""))
    if s.world > 1:
        flag_t = torch.tensor([st.bad_evals], device=s.device)
        dist.broadcast(flag_t, 0)
        st.bad_evals = int(flag_t.item())
    early = bool(b.patience and st.bad_evals >= b.patience)
    if b.schedule == "plateau" and not early and st.bad_evals and st.bad_evals % max(1, b.patience // 2) == 0:
        s.lr_scale[0] = st.lr_scale = st.lr_scale * a.plateau_factor
        say(f"plateau: no validation gain for {st.bad_evals} validations; LR x{a.plateau_factor} "
            f"(now {a.lr * st.lr_scale:.3g})")
    return extra, early


def write_config(args, folder: str, say) -> None:
    """The resolved configuration as TRAIN_CKPT_PATH/config.toml (rank 0, atomically)."""
    text = CF.dump_toml(args, parser(), "main.py's resolved configuration of the run whose checkpoints are here;\n"
                                        "python main.py --config THIS_FILE trains it again")
    with atomic_write(os.path.join(folder, "config.toml")) as f:
        f.write(text)


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    if args.print_config:
        print(CF.dump_toml(args, parser(), "resolved configuration (python main.py --config FILE reads it back)"), end="")
        return None
    cfg = CF.from_args(args)
    paths = env_paths()
    check_paths(paths, args)
    # the run owns its checkpoint folder while it lives: a second run into it is refused, not
    # left to overwrite this one's steps and best.json (rank 0 holds it for every rank)
    with L.own_folder(paths["ckpt"], "TRAIN_CKPT_PATH") if int(os.environ.get("RANK", 0)) == 0 \
            else contextlib.nullcontext():
        return train(args, cfg, paths)


def train(args, cfg, paths: dict):
    """The run, once its flags are checked and its checkpoint folder is its own."""
    rank, world, device = setup_process(cfg.loop)
    master = rank == 0
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    for note in getattr(args, "seed_notices", []):
        say(note)
    with oom_context("building the data and model", cfg):
        s = build_training(cfg, paths, device, rank, world, say)
    st = TrainState(run=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if master:
        C.sweep(paths["ckpt"], say)
    resume, done = resume_state(s, st, say)
    if done:
        return resume
    if master:
        write_config(args, paths["ckpt"], say)
    log = RunLog(paths, master, purge_step=st.step + 1 if resume else None)
    validating = s.valid_dir is not None or s.holdout is not None
    say_start(s, say)
    log.record({"event": "resume" if resume else "start", "args": CF.settings(args), "world": world})
    if s.negatives.hard is not None:
        say(f"hard negatives: {len(s.negatives.hard.items)} users cached from a previous run" if s.negatives.hard.items
            else "hard negatives: new cache")
    stop = StopFlag()
    loop = cfg.loop

    def save(extra=None):
        if master:
            s.negatives.save()
        return C.save(paths["ckpt"], s.model, s.cfg.saved(), CF.settings(args), s.opt, s.sched, st.to_dict(),
                      extra or {}, loop.keep_last_ckpts, world)

    last_ckpt, t0, early, final = None, time.time(), False, False
    for epoch_end in oom_guard(train_steps(s, st, log, t0), cfg):
        final = bool(loop.max_steps and st.step >= loop.max_steps)
        in_epoch = st.step - (st.epoch - epoch_end) * s.budget.steps_per_epoch
        extra = {}
        if validating and (epoch_end or final or in_epoch in s.budget.eval_points):
            extra, early = validation_step(s, st, log, say)
        if extra or epoch_end or final or stop.requested or (loop.ckpt_every_steps and st.step % loop.ckpt_every_steps == 0):
            last_ckpt = save(extra)
        if epoch_end:
            say(f"epoch {st.epoch} done  step {st.step}  {time.time() - t0:.0f}s  -> {last_ckpt}")
        if stop.requested:
            # the shell's code for the signal (130, 143): a harness must not read a stopped run as done
            if not master:
                raise SystemExit(128 + stop.requested)
            raise L.Interrupted(stop.requested, f"saved {last_ckpt}; rerun the same command to continue")
        if early or final:
            say(f"early stop: no validation gain for {st.bad_evals} validations" if early else
                f"stopped at --max_steps {loop.max_steps}")
            break
    if master and last_ckpt:
        C.mark_done(last_ckpt, "early stop" if early else f"--max_steps {loop.max_steps}" if final else
                    f"{s.budget.epochs} epochs")
    report_end(s, st, say, validating, early)
    log.record({"event": "end", "step": st.step, "elapsed_s": round(time.time() - t0, 1)})
    log.close()
    if world > 1:
        dist.destroy_process_group()
    return last_ckpt


def report_end(s: Setup, st: TrainState, say, validating: bool, early: bool) -> None:
    """The best validation, and a notice when the budget ended while validation still improved."""
    if s.skipped:
        say(f"skipped {len(s.skipped)} bad line(s); locations in {os.path.join(s.paths['log'], 'skipped_records.txt')}")
    if not validating or st.best is None:
        return
    step, ndcg, mask = (st.best + [None])[:3]
    say(f"best validation NDCG@10 {ndcg:.4f} at step {step} (of {st.step}); infer.py uses it"
        + ("; history masked" if mask else ""))
    if not early and step == st.step:
        say("notice: validation was still improving at the last step; train longer (raise --num_epochs, "
            "--max_epochs or --max_steps)")


if __name__ == "__main__":
    run_cli(main, {TrainingError: 3})
