"""Shared helpers of the speed/scale benchmarks: machine description, demo data and CTR priors,
the training setup of main.py rebuilt in-process, one optimizer step, timing and the
BENCHMARKS.md appender.

`build_training` follows main.main's setup (schema, item table, popularity, model, Trainer,
AdamW groups, schedule) without DDP, logging or checkpoints, so a benchmark times exactly the
loop body of main.py. ModelConfig comes from main.model_config (data config first, then the
parsed flags), so a flag added to both main.py and ModelConfig needs no change here.
"""
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dataset as D  # noqa: E402
import main as M  # noqa: E402
from model import GenerativeRecommender  # noqa: E402

# run.sh's recommended feature set (the rest are main.py defaults)
RECOMMENDED = ["--use_ctr", "--use_rel_bias", "--action_cond"]
# The official baseline's model at its size: SASRec-style, d=32, one block, one head, layer norm,
# id + sparse/array features + multimodal 81, no time or CTR features.
BASELINE_MODEL = ["--encoder_type", "transformer", "--hidden_units", "32", "--feat_dim", "32", "--num_blocks", "1",
                  "--num_heads", "1", "--norm_type", "layernorm", "--use_timefeat", "0"]
HSTU_SMALL = ["--encoder_type", "hstu", "--hidden_units", "32", "--feat_dim", "32", "--num_blocks", "1",
              "--num_heads", "1", "--dqk", "32", "--dv", "32", "--use_timefeat", "0"]


def machine():
    """One line: cores, CPU model, memory, python/torch versions and torch threads."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores (nproc), {cpu}{mem}; python {platform.python_version()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads")


def ensure_demo(out, *extra):
    """make_demo_data.py --out OUT (reused when already generated with the same arguments)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "make_demo_data.py"), "--out", out, *map(str, extra)],
                       stdout=subprocess.DEVNULL)
    if r.returncode:   # its own one-line reason is already on stderr
        raise D.DataError(f"make_demo_data.py --out {out} {' '.join(map(str, extra))}: exit {r.returncode}")
    return os.path.join(out, "train")


def ensure_ctr(train_dir, cache_dir):
    """precompute_ctr.py into CACHE/ctr as run.sh does (skipped when ctr_meta.json exists)."""
    ctr = os.path.join(cache_dir, "ctr")
    if not os.path.exists(os.path.join(ctr, "ctr_meta.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "precompute_ctr.py"), "--seq_path",
                        os.path.join(train_dir, "seq.jsonl"), "--output_dir", ctr, "--prior", "auto",
                        "--k_clip", "10,10000"], check=True, stdout=subprocess.DEVNULL)
    return ctr


class Setup:
    """Everything main.main builds before its loop (attributes named as there)."""


def build_training(argv, data_dir, cache_dir, device="cpu"):
    s = Setup()
    args = M.get_args(list(argv))
    if args.use_userctr is None:
        args.use_userctr = args.use_ctr
    if args.use_itemctr is None:
        args.use_itemctr = args.use_ctr
    ctr_dir = D.find_ctr_dir(args.ctr_dir, os.path.join(cache_dir, "ctr"), os.path.join(data_dir, "ctr"))
    data_cfg = D.DataConfig(maxlen=args.maxlen, use_timefeat=args.use_timefeat, use_userctr=args.use_userctr,
                            use_itemctr=args.use_itemctr, mm_emb_id=M.resolve_mm(args, data_dir))
    data_cfg, table, builder, seq_path, offsets = D.load_train_data(data_dir, data_cfg, cache_dir, ctr_dir,
                                                                    args.limit_users)
    counts, head_min = D.load_item_pop(data_dir, ctr_dir, seq_path, cache_dir, data_cfg.num_items)
    table.set_popularity(counts, head_min)
    builder.rank_packages = args.use_rankloss or args.rank_pkg_as_neg
    builder.keep_items = args.use_hard_neg
    log_pop = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
    model_cfg = M.model_config(args, data_cfg)
    torch.manual_seed(args.seed)
    model = GenerativeRecommender(model_cfg).to(device)
    click_rate = float(table.ctr_c.sum() / max(1.0, table.ctr_n.sum())) if table.ctr_meta else 0.1
    trainer = M.Trainer(model, args, log_pop, data_cfg.num_items, click_rate).to(device)
    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (no_decay if prm.dim() < 2 or "emb" in n or "norm" in n else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                            fused=torch.device(device).type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, M.lr_lambda(args.warmup_steps, 10**6))
    s.__dict__.update(args=args, data_cfg=data_cfg, model_cfg=model_cfg, table=table, builder=builder,
                      seq_path=seq_path, offsets=offsets, model=model, trainer=trainer, opt=opt, sched=sched,
                      device=torch.device(device))
    s.ds = D.SeqDataset(seq_path, offsets, builder, train=True, seed=args.seed)
    return s


def packed_loader(s, num_workers, batch_size=None, seed=0):
    """main.py's DataLoader: SeqDataset + PackedCollate in `num_workers` workers."""
    return torch.utils.data.DataLoader(
        s.ds, batch_size=batch_size or s.args.batch_size, shuffle=True, num_workers=num_workers,
        collate_fn=D.PackedCollate(s.table), worker_init_fn=D.seed_worker,
        generator=torch.Generator().manual_seed(seed))


def add_negatives(s, batch):
    """What main.py's loop adds to each batch in the training process before the step."""
    if s.args.num_neg:
        batch.update(D.sample_negatives(s.table, s.args.num_neg, s.data_cfg.num_items))
    batch.pop("_items", None)
    return batch


def train_step(s, batch, step_fn=None):
    """One optimizer step of main.py's loop (no accumulation); returns the loss."""
    batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
    loss, _ = (s.trainer if step_fn is None else step_fn)(batch)
    loss.backward()
    if s.args.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.args.clip_norm)
    s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    return loss.detach().item()


def gemm_peak(n=2048, reps=5, dtype=torch.float32):
    """Measured GEMM rate in FLOP/s: the median of `reps` timed n x n x n torch.mm (2 n^3 each)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def med(xs):
    return statistics.median(xs)


def fmt(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def table_md(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def append_benchmarks(title, body, command=None, path=os.path.join(ROOT, "BENCHMARKS.md")):
    """Append one section (title, date, machine, command, body) to BENCHMARKS.md; creates the file
    with a '# Benchmarks' title when absent. One O_APPEND write, so concurrent appenders do not
    interleave. The command defaults to this process's own command line."""
    command = command or "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    text = (f"\n## {title}\n\n- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {machine()}\n- command: `{command}`\n\n{body.rstrip()}\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            text = "# Benchmarks\n" + text
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    print(f"appended '{title}' to {path}")


def rss_mib():
    """Current and peak resident memory of this process, anonymous and file-backed, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) / 1024
    return out
