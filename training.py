"""Assemble a training run from main.py's flags: configs, data, loader, model, loss, optimiser.

build_training() is what main.py trains and what bench/ times, so the benchmarks cannot drift
from the product. The loop itself, validation and checkpoints stay in main.py.
"""
import argparse
import dataclasses
import math
import os
import random

import numpy as np
import torch

import dataset as D
import dataset_packed as P
from dataset import DataConfig
from model import GenerativeRecommender, ModelConfig
from objectives import ObjectiveConfig, Trainer


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


def resolve_mm(args, data_dir):
    if args.mm_emb_id is None:
        return ["81"] if D.mm_sources(os.path.join(data_dir, "creative_emb"), "81") else []
    return [] if args.mm_emb_id in (["none"], []) else [str(x) for x in args.mm_emb_id]


def data_config(args, data_dir: str, say=print) -> DataConfig:
    """The run's DataConfig before the data is read (the schema is filled in by load_train_data)."""
    use_timefeat = args.use_timefeat
    if use_timefeat and not D.dataset_has_timestamps(data_dir):
        say("notice: this dataset has no real timestamps; time features switched off")
        use_timefeat = False
    return DataConfig(maxlen=args.maxlen, use_timefeat=use_timefeat, use_userctr=args.use_userctr,
                      use_itemctr=args.use_itemctr, mm_emb_id=resolve_mm(args, data_dir))


def model_config(args, data_cfg: DataConfig) -> ModelConfig:
    """ModelConfig from the flags, with sizes and feature switches from the data config (which
    wins: e.g. time features are switched off for data without timestamps)."""
    return ModelConfig(**{f.name: getattr(data_cfg, f.name) if hasattr(data_cfg, f.name) else getattr(args, f.name)
                          for f in dataclasses.fields(ModelConfig)})


def objective_config(args) -> ObjectiveConfig:
    return ObjectiveConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ObjectiveConfig)})


@dataclasses.dataclass
class Setup:
    """Everything the training loop uses, built once by build_training."""
    args: argparse.Namespace
    paths: dict
    device: torch.device
    rank: int
    world: int
    data_cfg: DataConfig
    model_cfg: ModelConfig
    obj_cfg: ObjectiveConfig
    ctr_dir: str
    table: D.ItemTable
    ds: D.SeqDataset
    sampler: P.EpochSampler
    loader: torch.utils.data.DataLoader
    full_negs: dict                       # the catalogue's inputs for the full softmax, else None
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int                           # the epoch budget: --num_epochs, else --max_epochs
    total_steps: int                      # the step budget (the cosine schedule's horizon)
    log_pop: torch.Tensor                 # log popularity of every item (logQ correction)
    click_rate: float
    valid_dir: str                        # a validation folder, or None
    holdout: P.HoldoutDataset             # else the users held out of the training data, or None
    eval_points: set                      # optimizer steps within an epoch (1-based) that validate
    patience: int
    model: GenerativeRecommender = None   # the bare model (checkpoints, validation)
    trainer: torch.nn.Module = None       # the loss module, wrapped in DDP when world > 1
    opt: torch.optim.Optimizer = None
    sched: torch.optim.lr_scheduler.LambdaLR = None
    schedule: str = None                  # the LR schedule in use (--lr_schedule with auto resolved)
    lr_scale: list = dataclasses.field(default_factory=lambda: [1.0])   # plateau cuts so far (in st too)
    skipped: set = dataclasses.field(default_factory=set)   # messages of lines skipped so far

    def configs(self) -> dict:
        return {"model": self.model_cfg, "data": self.data_cfg, "objective": self.obj_cfg}


def build_training(args, paths: dict, device: torch.device, rank: int = 0, world: int = 1, say=print,
                   with_model: bool = True) -> Setup:
    """Data, loader, model, loss, optimizer and schedule of a run, as main() trains them and the
    benchmarks time them (with_model=False stops after the data and loader). The global RNGs
    must be seeded first: the model's init draws from them."""
    ctr_dir = D.find_ctr_dir(args.ctr_dir, os.path.join(paths["cache"], "ctr"), os.path.join(paths["data"], "ctr"))
    obj_cfg = objective_config(args)
    data_cfg, table, builder, seq_path, offsets = D.load_train_data(
        paths["data"], data_config(args, paths["data"], say), paths["cache"], ctr_dir, args.limit_users,
        args.skip_bad_records, rank_packages=obj_cfg.use_rankloss or obj_cfg.rank_pkg_as_neg,
        keep_items=obj_cfg.use_hard_neg)
    counts, head_min = D.load_item_pop(paths["data"], ctr_dir, seq_path, paths["cache"], data_cfg.num_items,
                                       args.skip_bad_records)
    table.set_popularity(counts, head_min)
    # add-one smoothing: no item has sampling probability 0
    log_pop = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
    click_rate = float(table.ctr_c.sum() / max(1.0, table.ctr_n.sum())) if table.ctr_meta else 0.1

    valid_dir = None if args.valid_dir == "none" else (args.valid_dir or _default_valid(paths["data"]))
    cut = {}
    if valid_dir is None and args.valid_dir != "none" and args.valid_users > 0:
        cut = D.holdout_last_clicks(seq_path, offsets, args.valid_users, args.valid_seed, args.skip_bad_records)
        if not cut:
            say("notice: no training user has a click after an earlier event, so none can be held out: "
                "training without validation")
    ds = D.SeqDataset(seq_path, offsets, builder, train=True, seed=args.seed, skip_bad=args.skip_bad_records, cut=cut)
    holdout = P.HoldoutDataset(seq_path, offsets, cut, builder) if cut else None
    sampler, loader = make_loader(ds, table, args, device, rank, world)
    batches_per_epoch = math.ceil(sampler.epoch_len / args.batch_size)
    full_negs = None
    if obj_cfg.full_softmax:             # the catalogue's inputs never change
        full_negs = {k: v.to(device) for k, v in P.sample_negatives(table, -1, data_cfg.num_items).items()}

    spe = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    epochs = args.num_epochs if args.num_epochs is not None else args.max_epochs
    total_steps = spe * epochs if not args.max_steps else min(spe * epochs, args.max_steps)
    n_evals = max(1, math.ceil(spe / (args.eval_every or 1000)))       # validations per epoch, evenly spread
    eval_points = {math.ceil(j * spe / n_evals) for j in range(1, n_evals + 1)}
    patience = args.patience if args.patience is not None else (0 if args.num_epochs is not None else 10)
    s = Setup(args, paths, device, rank, world, data_cfg, model_config(args, data_cfg), obj_cfg, ctr_dir, table, ds,
              sampler, loader, full_negs, batches_per_epoch, spe, epochs, total_steps, log_pop, click_rate,
              valid_dir, holdout, eval_points, patience)
    return add_model(s, say) if with_model else s


def make_loader(ds: D.SeqDataset, table: D.ItemTable, args, device: torch.device, rank: int = 0, world: int = 1,
                num_workers: int = None, batch_size: int = None) -> tuple:
    """(EpochSampler, DataLoader) of the training users: this rank's shard, length-bucketed unless
    --length_bucketing 0, packed by PackedCollate in `num_workers` workers (default the flag's)."""
    bs = batch_size or args.batch_size
    sampler = P.EpochSampler(len(ds), world, rank, args.seed, bs, ds.lines.line_bytes() if args.length_bucketing else None)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=bs, sampler=sampler, num_workers=args.num_workers if num_workers is None else num_workers,
        pin_memory=args.pin_memory and device.type == "cuda", collate_fn=P.PackedCollate(table),
        worker_init_fn=P.seed_worker, generator=torch.Generator().manual_seed(args.seed),
        persistent_workers=False)
    return sampler, loader


def add_model(s: Setup, say=print) -> Setup:
    """The model, the loss module (in DDP when world > 1), AdamW and the warmup + cosine schedule."""
    a, device = s.args, s.device
    s.model = GenerativeRecommender(s.model_cfg).to(device)
    s.trainer = Trainer(s.model, s.obj_cfg, s.log_pop, s.data_cfg.num_items, s.click_rate).to(device)
    if s.world > 1:
        s.trainer = torch.nn.parallel.DistributedDataParallel(
            s.trainer, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    decay, no_decay = [], []
    for n, prm in s.model.named_parameters():
        (no_decay if prm.dim() < 2 or "emb" in n or "norm" in n else decay).append(prm)
    s.opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98),
                              fused=device.type == "cuda")
    warmup = min(a.warmup_steps, s.total_steps // 5)
    if warmup < a.warmup_steps:
        say(f"notice: --warmup_steps {a.warmup_steps} capped to {warmup} (a fifth of the {s.total_steps} steps)")
    s.schedule = a.lr_schedule
    if s.schedule == "auto":
        s.schedule = "cosine" if a.num_epochs is not None or a.max_steps else "plateau"
    s.sched = torch.optim.lr_scheduler.LambdaLR(s.opt, lr_lambda(warmup, s.total_steps, s.schedule, s.lr_scale))
    return s


def _default_valid(data_dir: str):
    cand = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "valid")
    return cand if os.path.exists(os.path.join(cand, "predict_seq.jsonl")) else None
