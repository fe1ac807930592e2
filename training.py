"""Assemble a training run from its frozen configs: data, loader, negatives, model, loss, optimiser.

The run's settings live in four frozen dataclasses: DataConfig (layout.py: the schema and feature
switches, shared with the model), ModelConfig (model.py), ObjectiveConfig (objectives.py: the
losses and their negatives) and LoopConfig (here: loader, validation, schedule, checkpoints),
bundled as RunConfig. config.py builds them from flags and config files; nothing else reads the
flags. build_training() is what main.py trains and what bench/ times, so the benchmarks cannot
drift from the product. The loop itself, validation and checkpoints stay in main.py.
"""
import ctypes
import dataclasses
import math
import os
import platform
import random
from typing import ClassVar

import numpy as np
import torch

import dataset as D
import dataset_packed as P
from layout import DataConfig, DataError, children_die_with_me, iter_jsonl, load_pickle
from model import GenerativeRecommender, ModelConfig
from objectives import Negatives, ObjectiveConfig, Trainer


def keep_freed_memory() -> bool:
    """glibc only: serve large host allocations from the heap and keep freed memory in the process
    (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2^31 - 1); True when applied. Numbers are unchanged.

    By default glibc maps each block above 32 MiB afresh and unmaps it when freed, and returns
    freed heap tops to the system: every training step then page-faults its large temporaries
    (InfoNCE's [targets, candidates] matrices) into fresh zeroed pages. At the baseline's size
    on TencentGR data that was half the step on one core (bench/bench_step.py). The cost: the
    process keeps its peak heap instead of shrinking after it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))   # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int, schedule: str = "cosine", scale: list = None):
    """LR factor by optimizer step: linear warmup, then cosine decay to 0 at `total`, or constant
    (times scale[0], which plateau cuts lower during the run)."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule != "cosine":
            return scale[0] if scale else 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def id_dropout_at(p0, epoch, frac):
    """Epoch 1: p0 * (1 + cos(pi * frac)) / 2 (frac = progress through the epoch); then 0."""
    return p0 * 0.5 * (1 + math.cos(math.pi * frac)) if epoch == 0 and p0 > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How a run reads its data and trains: loader, validation, schedule, length, checkpoints.
    Saved in every checkpoint beside the data, model and objective configs."""
    ctr_dir: str = None                # precompute_ctr.py outputs (None: USER_CACHE_PATH/ctr, then TRAIN_DATA_PATH/ctr)
    valid_dir: str = None              # eval-layout validation folder; None: ../valid when present; "none": off
    valid_users: int = 5000            # else: users held out of the training data for validation
    valid_seed: int = 0
    num_workers: int = 1
    prefetch_factor: int = 2           # batches each loader worker prepares ahead
    length_bucketing: bool = False
    pin_memory: bool = False
    limit_users: int = None
    skip_bad_records: bool = False
    first_epoch_id_item_dropout: float = 0.0
    item_id_dropout: float = 0.0       # every step: item id rows dropped at this rate (features must carry items)
    sid_dir: str = None                # precompute_sid.py outputs (None: USER_CACHE_PATH/sid, then TRAIN_DATA_PATH/sid)
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_schedule: str = "auto"          # auto | cosine | constant | plateau
    plateau_factor: float = 0.3
    num_epochs: int = None             # None: until validation stops improving, at most max_epochs
    max_epochs: int = 200
    max_steps: int = 0
    eval_every: int = 0
    gradient_accumulation_steps: int = 1
    clip_norm: float = 1.0
    seed: int = 42
    device: str = None
    patience: int = None               # None: 10, or 0 with num_epochs
    min_gain: float = 0.0              # relative NDCG@10 gain a validation needs to reset the patience count
    log_every: int = 20
    resume: str = "auto"
    ckpt_every_steps: int = 0
    keep_last_ckpts: int = 3
    max_nonfinite_steps: int = 20

    LEGACY: ClassVar[dict] = {}
    RENAMED: ClassVar[dict] = {}
    REMOVED: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The four configs of a run, built once from the flags (config.from_args) and never changed;
    only these travel from the command line into the run."""
    data: DataConfig
    model: ModelConfig
    objective: ObjectiveConfig
    loop: LoopConfig

    def saved(self) -> dict:
        """The configs a checkpoint stores (data with its schema filled in)."""
        return {"model": self.model, "data": self.data, "objective": self.objective, "loop": self.loop}


@dataclasses.dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint and restored on resume."""
    step: int = 0                      # optimizer steps done
    epoch: int = 0                     # epochs done
    micro: int = 0                     # micro-batches done in the current epoch
    best: list = None                  # [step, valid NDCG@10, history masked] of the best validation
    bad_evals: int = 0                 # validations in a row without gain
    ref: float = None                  # valid NDCG@10 that gains are measured against (the best without min_gain)
    nonfinite: int = 0                 # optimizer steps in a row with a non-finite loss
    lr_scale: float = 1.0              # plateau cuts so far
    run: str = ""                      # this run's id (checkpoints of other runs are never touched)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def restore(self, ck: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in ck:
                setattr(self, f.name, ck[f.name])
        if "bad_epochs" in ck:          # checkpoints from before validations could fall mid-epoch
            self.bad_evals = ck["bad_epochs"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """The run's length and validation plan, derived from LoopConfig and the epoch's size."""
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int                        # the epoch budget: num_epochs, else max_epochs
    total_steps: int                   # the step budget (the cosine schedule's horizon)
    eval_points: frozenset             # optimizer steps within an epoch (1-based) that validate
    patience: int
    schedule: str                      # lr_schedule with auto resolved


def plan(loop: LoopConfig, epoch_len: int) -> Budget:
    bpe = math.ceil(epoch_len / loop.batch_size)
    spe = math.ceil(bpe / loop.gradient_accumulation_steps)
    epochs = loop.num_epochs if loop.num_epochs is not None else loop.max_epochs
    total = spe * epochs if not loop.max_steps else min(spe * epochs, loop.max_steps)
    n_evals = max(1, math.ceil(spe / (loop.eval_every or 1000)))       # validations per epoch, evenly spread
    points = frozenset(math.ceil(j * spe / n_evals) for j in range(1, n_evals + 1))
    patience = loop.patience if loop.patience is not None else (0 if loop.num_epochs is not None else 10)
    schedule = loop.lr_schedule
    if schedule == "auto":
        schedule = "cosine" if loop.num_epochs is not None or loop.max_steps else "plateau"
    return Budget(bpe, spe, epochs, total, points, patience, schedule)


def resolve_data(cfg: DataConfig, data_dir: str, say=print) -> DataConfig:
    """The DataConfig as this folder allows, before the data is read (load_train_data fills in the
    schema): multimodal ids chosen (81 when present), time features off without timestamps."""
    mm = cfg.mm_emb_id                   # as the flag gave it: None = 81 when present
    if mm is None:
        mm = ["81"] if D.mm_sources(os.path.join(data_dir, "creative_emb"), "81") else []
    else:
        mm = [] if mm in (["none"], []) else [str(x) for x in mm]
    use_timefeat = cfg.use_timefeat
    if use_timefeat and not D.dataset_has_timestamps(data_dir):
        say("notice: this dataset has no real timestamps; time features switched off")
        use_timefeat = False
    return dataclasses.replace(cfg, mm_emb_id=mm, use_timefeat=use_timefeat)


@dataclasses.dataclass
class Setup:
    """Everything the training loop uses, built once by build_training."""
    cfg: RunConfig                        # data config with the schema filled in
    paths: dict
    device: torch.device
    rank: int
    world: int
    budget: Budget
    ctr_dir: str
    table: D.ItemTable
    ds: D.SeqDataset
    sampler: P.EpochSampler
    loader: torch.utils.data.DataLoader
    log_pop: torch.Tensor                 # log popularity of every item (logQ correction)
    click_rate: float
    valid_dir: str                        # a validation folder, or None
    holdout: P.HoldoutDataset             # else the users held out of the training data, or None
    negatives: Negatives = None
    model: GenerativeRecommender = None   # the bare model (checkpoints, validation)
    trainer: torch.nn.Module = None       # the loss module, wrapped in DDP when world > 1
    opt: torch.optim.Optimizer = None
    sched: torch.optim.lr_scheduler.LambdaLR = None
    lr_scale: list = dataclasses.field(default_factory=lambda: [1.0])   # plateau cuts so far (in TrainState too)
    skipped: set = dataclasses.field(default_factory=set)   # messages of lines skipped so far
    trained: np.ndarray = None            # bool by item re-id: occurs in the training sequences (cold: False)
    holdout_cache: object = None          # validation.BatchCache of the held-out users' batches (main.py)


def build_training(cfg: RunConfig, paths: dict, device: torch.device, rank: int = 0, world: int = 1, say=print,
                   with_model: bool = True) -> Setup:
    """Data, loader, negatives, model, loss, optimizer and schedule of a run, as main() trains them
    and the benchmarks time them (with_model=False stops after the data and loader). The global
    RNGs must be seeded first: the model's init draws from them."""
    loop, obj = cfg.loop, cfg.objective
    ctr_dir = D.find_ctr_dir(loop.ctr_dir, os.path.join(paths["cache"], "ctr"), os.path.join(paths["data"], "ctr"))
    sid_dir = loop.sid_dir or next((d for d in (os.path.join(paths["cache"], "sid"), os.path.join(paths["data"], "sid"))
                                    if os.path.isdir(d)), None)
    data_cfg, table, builder, seq_path, offsets = D.load_train_data(
        paths["data"], resolve_data(cfg.data, paths["data"], say), paths["cache"], ctr_dir, loop.limit_users,
        loop.skip_bad_records, rank_packages=obj.use_rankloss or obj.rank_pkg_as_neg, keep_items=obj.use_hard_neg,
        sid_dir=sid_dir)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    if (cfg.model.item_age or cfg.model.item_recent) and not D.dataset_has_timestamps(paths["data"]):
        say("notice: this dataset has no real timestamps; the item-age and recent-activity biases switched off")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, item_age=False, item_recent=False))
    if cfg.model.content_channel and not data_cfg.mm_emb_id:
        say("notice: --content_channel maps multimodal vectors, and this run reads none: switched off")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, content_channel=0))
    if cfg.model.cold_neighbors and not data_cfg.mm_emb_id:
        say("notice: --cold_neighbors compares multimodal vectors, and this run reads none: switched off")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cold_neighbors=0))
    counts, head_min = D.load_item_pop(paths["data"], ctr_dir, seq_path, paths["cache"], data_cfg.num_items,
                                       loop.skip_bad_records)
    table.set_popularity(counts, head_min)
    # add-one smoothing: no item has sampling probability 0
    log_pop = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
    click_rate = float(table.ctr_c.sum() / max(1.0, table.ctr_n.sum())) if table.ctr_meta else 0.1

    valid_dir = None if loop.valid_dir == "none" else (loop.valid_dir or _default_valid(paths["data"]))
    if valid_dir is not None:
        check_valid_known(valid_dir, paths["data"], table, say)
    cut = {}
    if valid_dir is None and loop.valid_dir != "none" and loop.valid_users > 0:
        cut = D.holdout_last_clicks(seq_path, offsets, loop.valid_users, loop.valid_seed, loop.skip_bad_records)
        if not cut:
            say("notice: no training user has a click after an earlier event, so none can be held out: "
                "training without validation")
    ds = D.SeqDataset(seq_path, offsets, builder, train=True, seed=loop.seed, skip_bad=loop.skip_bad_records, cut=cut)
    holdout = P.HoldoutDataset(seq_path, offsets, cut, builder) if cut else None
    sampler, loader = make_loader(ds, table, loop, device, rank, world)
    budget = plan(loop, sampler.epoch_len)
    s = Setup(cfg, paths, device, rank, world, budget, ctr_dir, table, ds, sampler, loader, log_pop, click_rate,
              valid_dir, holdout)
    if not with_model:
        return s
    s.negatives = Negatives(obj, table, data_cfg.num_items, device, paths["cache"], seq_path, say)
    s.model, s.trainer, s.opt, s.sched = build_model(cfg, budget, log_pop, click_rate, device, world, s.lr_scale, say)
    s.trained = D.trained_items(counts, seq_path, offsets, cut)
    if data_cfg.new_item_events > 0:
        until = D.young_until(seq_path, offsets, cut, data_cfg.num_items, data_cfg.new_item_events)
        table.set_young(until)
        s.model.set_trained_items(torch.from_numpy(until < D.NEVER), torch.from_numpy(until))
    else:
        s.model.set_trained_items(torch.from_numpy(s.trained))
    if cfg.model.item_age or cfg.model.item_recent:
        first, end, days, lo = D.item_time_stats(seq_path, offsets, cut, data_cfg.num_items, cfg.model.item_recent)
        s.model.set_first_seen(torch.from_numpy(np.where(first < D.NEVER, first, -1)), end)
        if cfg.model.item_recent:
            s.model.set_recent(torch.from_numpy(days), lo, end)
    return s


# Shares of a validation folder's users and target items the training data knows: below REFUSE
# it is another dataset (every validation would score near 0 and pick the "best" checkpoint on
# noise); below WARN a notice. Cold users and items are normal in a folder, a few in ten at most.
VALID_KNOWN_REFUSE, VALID_KNOWN_WARN = 0.2, 0.5


def check_valid_known(valid_dir: str, data_dir: str, table: D.ItemTable, say=print) -> None:
    """Refuse a validation folder whose users or target items the training data mostly does not
    know; a notice when many are unknown."""
    gt = os.path.join(valid_dir, "ground_truth.jsonl")
    users = load_pickle(os.path.join(data_dir, "indexer.pkl")).get("u") or {}
    n = known_u = known_i = 0
    for _, rec in iter_jsonl(gt):
        if isinstance(rec, dict):
            n += 1
            known_u += str(rec.get("user_id")) in users
            cid = rec.get("creative_id")
            known_i += (int(cid) if isinstance(cid, str) and cid.isdigit() else cid) in table.row_of_cid
    if not n:
        return
    share = min(known_u, known_i) / n
    what = (f"{known_u} of {n} validation users and {known_i} of {n} target items are known to the training "
            f"data ({data_dir})")
    if share < VALID_KNOWN_REFUSE:
        raise DataError(f"{valid_dir}: only {what}; below {VALID_KNOWN_REFUSE:.0%} validation cannot pick a "
                        f"checkpoint: is --valid_dir from another dataset?")
    if share < VALID_KNOWN_WARN:
        say(f"notice: {valid_dir}: only {what}; the unknown ones score as cold users and items")


def make_loader(ds: D.SeqDataset, table: D.ItemTable, loop: LoopConfig, device: torch.device, rank: int = 0,
                world: int = 1, num_workers: int = None, batch_size: int = None) -> tuple:
    """(EpochSampler, DataLoader) of the training users: this rank's shard, length-bucketed when
    loop.length_bucketing, packed by PackedCollate in `num_workers` workers (default the config's)."""
    bs = batch_size or loop.batch_size
    nw = loop.num_workers if num_workers is None else num_workers
    sampler = P.EpochSampler(len(ds), world, rank, loop.seed, bs, ds.lines.line_bytes() if loop.length_bucketing else None)
    if nw > 0:
        children_die_with_me()
    loader = torch.utils.data.DataLoader(
        ds, batch_size=bs, sampler=sampler, num_workers=nw,
        pin_memory=loop.pin_memory and device.type == "cuda", collate_fn=P.PackedCollate(table),
        worker_init_fn=P.seed_worker, generator=torch.Generator().manual_seed(loop.seed),
        persistent_workers=False, **({"prefetch_factor": loop.prefetch_factor} if nw > 0 else {}))
    return sampler, loader


def build_model(cfg: RunConfig, budget: Budget, log_pop: torch.Tensor, click_rate: float, device: torch.device,
                world: int = 1, lr_scale: list = None, say=print) -> tuple:
    """(model, loss module (in DDP when world > 1), AdamW, warmup + cosine/constant schedule)."""
    loop = cfg.loop
    model = GenerativeRecommender(cfg.model, cfg.data).to(device)
    trainer = Trainer(model, cfg.objective, log_pop, cfg.data.num_items, click_rate).to(device)
    if world > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(
            trainer, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (no_decay if prm.dim() < 2 or "emb" in n or "norm" in n else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": loop.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=loop.lr, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    warmup = min(loop.warmup_steps, budget.total_steps // 5)
    if warmup < loop.warmup_steps:
        say(f"notice: --warmup_steps {loop.warmup_steps} capped to {warmup} (a fifth of the {budget.total_steps} steps)")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, budget.total_steps, budget.schedule,
                                                             lr_scale if lr_scale is not None else [1.0]))
    return model, trainer, opt, sched


def _default_valid(data_dir: str):
    cand = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "valid")
    return cand if os.path.exists(os.path.join(cand, "predict_seq.jsonl")) else None
