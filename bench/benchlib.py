"""Shared helpers of the speed/scale benchmarks: machine description, demo data and CTR priors,
the training setup of main.py rebuilt in-process, one optimizer step, timing and the
BENCHMARKS.md appender.

`build_training` is training.build_training itself (schema, item table, popularity, sampler
and loader, model, Trainer, AdamW groups, schedule) without DDP, logging or checkpoints, so a
benchmark times exactly what main.py trains.
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

import torch  # noqa: E402

import config as CF  # noqa: E402
import dataset_packed as P  # noqa: E402
import layout as L  # noqa: E402
import main as M  # noqa: E402
import training as TR  # noqa: E402

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
        raise L.DataError(f"make_demo_data.py --out {out} {' '.join(map(str, extra))}: exit {r.returncode}")
    return os.path.join(out, "train")


def ensure_ctr(train_dir, cache_dir):
    """precompute_ctr.py into CACHE/ctr as run.sh does (skipped when ctr_meta.json exists)."""
    ctr = os.path.join(cache_dir, "ctr")
    if not os.path.exists(os.path.join(ctr, "ctr_meta.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "precompute_ctr.py"), "--seq_path",
                        os.path.join(train_dir, "seq.jsonl"), "--output_dir", ctr, "--prior", "auto",
                        "--k_clip", "10,10000"], check=True, stdout=subprocess.DEVNULL)
    return ctr


def build_training(argv, data_dir, cache_dir, device="cpu", with_model=True):
    """training.build_training for the flags `argv` on DATA_DIR with CACHE_DIR (no logging, no
    checkpoints, no DDP): exactly the run main.py would train, its RNGs seeded the same way."""
    cfg = CF.from_args(M.get_args(list(argv)))
    TR.seed_everything(cfg.loop.seed)
    paths = {"data": data_dir, "cache": cache_dir}
    return TR.build_training(cfg, paths, torch.device(device), say=lambda *a: None, with_model=with_model)


def packed_loader(s, num_workers, batch_size=None):
    """main.py's DataLoader (training.make_loader: EpochSampler, PackedCollate) in `num_workers` workers."""
    return TR.make_loader(s.ds, s.table, s.cfg.loop, s.device, num_workers=num_workers, batch_size=batch_size)[1]


def add_negatives(s, batch):
    """What main.py's loop adds to each batch in the training process before the step."""
    if s.cfg.objective.num_neg:
        batch.update(P.sample_negatives(s.table, s.cfg.objective.num_neg, s.cfg.data.num_items))
    batch.pop("_items", None)
    return batch


def train_step(s, batch, step_fn=None):
    """One optimizer step of main.py's loop (no accumulation); returns the loss."""
    batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
    loss = (s.trainer if step_fn is None else step_fn)(batch)[0]
    loss.backward()
    if s.cfg.loop.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.loop.clip_norm)
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


def load_line(note=" (shared machine)"):
    """The closing line of a benchmark's record: the machine's load averages when it ended."""
    return f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}{note}."


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
