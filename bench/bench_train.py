"""Training throughput on CPU: tokens/s and model FLOP utilisation (MFU) of the recommended
configuration against a GEMM peak measured in the same run, and samples/s beside the official
baseline's model size (SASRec-style transformer, d=32, one block) and HSTU at that size.

    python bench/bench_train.py [--data /tmp/bench_demo] [--repeats 3] [--compile]

Each configuration trains on the same demo batches (loaded before timing, so this measures the
model step: forward, InfoNCE with sampled negatives, backward, clipping, AdamW); repeats are
interleaved across configurations so that load from other processes hits them alike.

Model FLOPs, counted analytically per batch from its real shapes (matmuls only; embedding
lookups, norms and element-wise ops are not counted), with 2*m*n*k for an [m, k] x [k, n]
product:
  item tower, per distinct item row (history rows U_seq, target rows U_pos, S sampled negatives):
      2*f*sum(mm dims) + 2*f*[item CTR] + 2*(n_blocks*f)*d + 2*d*d   (mm, CTR, two-layer projection)
  user tower, per user: 2*(n_user_blocks*f)*d + 2*d*d
  event inputs, per position: 2*d*[time features] + 2*d*[user CTR]
  HSTU block, per position: 2*d*h*(2*dv + 2*dqk) + 2*h*dv*d; per sequence: 2*T*T*h*(dqk + dv)
  transformer block, per position: 2*d*3d + 2*d*d + 2*(2*d*d); per sequence: 2*T*T*2*d
  head: 2*d*d per valid target N and per user (newest-position query)
  InfoNCE: 2*N*M*d + 2*N*d, M = min(N, in_batch_max) + S
Attention is counted over the full padded T x T (the masked SDPA computes all of it on CPU).
Training FLOPs = 3 x forward (backward ~ 2 x forward). MFU = training FLOPs / step time /
measured fp32 GEMM peak (a 2048^3 torch.mm, median of 5, same process and threads).
"""
import argparse
import time

import torch

import benchlib as B
import layout as L

CONFIGS = {
    "recommended (HSTU d64 x2, ctr, rel bias, action cond)": B.RECOMMENDED,
    "baseline model (transformer d32 x1, 1 head)": B.BASELINE_MODEL,
    "HSTU d32 x1, 1 head (baseline features)": B.HSTU_SMALL,
}


def forward_flops(s, batch):
    """Analytic forward FLOPs of one training batch (see the module docstring)."""
    c, a, dc = s.cfg.model, s.cfg.objective, s.cfg.data
    d, f, h = c.hidden_units, c.feat_dim or c.hidden_units, c.num_heads
    Bsz, T = batch["token_type"].shape
    P = Bsz * T
    valid = (batch["pos_row"] > 0) & (batch["token_type"] != L.PAD)
    N = int(valid.sum())
    S = a.num_neg if a.num_neg >= 0 else dc.num_items
    M = (min(N, a.in_batch_max) if a.in_batch_neg else 0) + S
    n_item_blocks = 1 + len(dc.item_sparse) + len(dc.item_array) + len(dc.mm_dims) + int(dc.use_itemctr)
    item = 2 * f * sum(dc.mm_dims.values()) + 2 * f * int(dc.use_itemctr) + 2 * n_item_blocks * f * d + 2 * d * d
    rows = len(batch["seq_id"]) + len(batch["pos_id"]) + S
    user = 2 * (1 + len(dc.user_sparse) + len(dc.user_array)) * f * d + 2 * d * d
    events = 2 * d * (int(dc.use_timefeat) + int(dc.use_userctr))
    if c.encoder_type == "hstu":
        blk_pos = 2 * d * h * (2 * c.dv + 2 * c.dqk) + 2 * h * c.dv * d
        blk_seq = 2 * T * T * h * (c.dqk + c.dv)
    else:
        blk_pos = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * d
        blk_seq = 2 * T * T * 2 * d
    enc = c.num_blocks * (P * blk_pos + Bsz * blk_seq)
    head = 2 * d * d * (N + Bsz)
    nce = 2 * N * M * d + 2 * N * d
    return rows * item + Bsz * user + P * events + enc + head + nce, N, int((batch["token_type"] != L.PAD).sum()), P


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/bench_demo", help="demo data folder (made by make_demo_data.py if absent)")
    p.add_argument("--cache", default="/tmp/bench_cache", help="USER_CACHE_PATH for CTR priors and mm tables")
    p.add_argument("--batch_size", type=int, default=128, help="users per batch")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (the median is reported)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(Trainer) on the recommended configuration")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, batches and negatives")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    train = B.ensure_demo(a.data)
    B.ensure_ctr(train, a.cache)
    peak = B.gemm_peak()
    print(f"fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s")

    runs = {}
    for name, flags in CONFIGS.items():
        s = B.build_training(flags + ["--batch_size", str(a.batch_size), "--seed", str(a.seed)], train, a.cache)
        it = iter(B.packed_loader(s, 0, a.batch_size))
        batches = [B.add_negatives(s, next(it)) for _ in range(a.steps + 1)]
        flops = [forward_flops(s, b) for b in batches[1:]]
        nparams = sum(x.numel() for x in s.model.parameters())
        runs[name] = {"s": s, "batches": batches, "flops": flops, "params": nparams, "times": []}
    torch.manual_seed(a.seed)
    for r in range(a.repeats):
        for name, run in runs.items():
            s = run["s"]
            B.train_step(s, run["batches"][0])                      # warm-up: allocator, lazy init
            t = time.perf_counter()
            for b in run["batches"][1:]:
                B.train_step(s, b)
            run["times"].append(time.perf_counter() - t)
            print(f"run {r + 1} {name}: {run['times'][-1]:.2f}s for {a.steps} steps", flush=True)

    rows = []
    for name, run in runs.items():
        dt = B.med(run["times"])
        F = sum(x[0] for x in run["flops"])
        real = sum(x[2] for x in run["flops"])
        pos = sum(x[3] for x in run["flops"])
        samples = a.steps * a.batch_size / dt
        run.update(samples=samples, mfu=3 * F / dt / peak)
        rows.append([name, f"{run['params'] / 1e6:.2f}M", f"{3 * F / a.steps / 1e9:.1f}", B.fmt(samples, 1),
                     B.fmt(real / dt, 0), B.fmt(pos / dt, 0), f"{3 * F / dt / 1e9:.2f}", f"{100 * run['mfu']:.1f}%",
                     " / ".join(f"{a.steps * a.batch_size / x:.1f}" for x in run["times"])])
        print(rows[-1])
    rec, base, small = (runs[k] for k in CONFIGS)

    compile_line = "torch.compile: not tried (run with --compile)."
    if a.compile:
        s = rec["s"]
        try:
            comp = torch.compile(s.trainer, dynamic=True)
            t = time.perf_counter()
            B.train_step(s, rec["batches"][0], comp)
            first = time.perf_counter() - t
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                for b in rec["batches"][1:]:
                    B.train_step(s, b, comp)
                times.append(time.perf_counter() - t)
            cs = a.steps * a.batch_size / B.med(times)
            per_run = ", ".join(f"{a.steps * a.batch_size / x:.1f}" for x in times)
            compile_line = (f"torch.compile(Trainer, dynamic=True) on the recommended configuration: first step "
                            f"(compilation) {first:.0f}s, then {cs:.1f} samples/s vs {rec['samples']:.1f} eager "
                            f"({cs / rec['samples']:.2f}x; runs {per_run}).")
        except Exception as e:       # report the failure, it is a result too
            compile_line = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(compile_line)

    body = (f"Demo data `{a.data}` (make_demo_data.py defaults), batch {a.batch_size}, maxlen "
            f"{rec['s'].cfg.data.maxlen} (T = {rec['s'].cfg.data.maxlen + 1} tokens), {rec['s'].cfg.objective.num_neg} sampled "
            f"negatives, CPU fp32. Model step only (batches loaded before timing). Median of {a.repeats} interleaved "
            f"runs of {a.steps} steps. Measured fp32 GEMM peak (2048^3 torch.mm): **{peak / 1e9:.1f} GFLOP/s**. "
            f"FLOPs: analytic, matmuls only, training = 3 x forward (formula in the script's docstring). "
            f"Real tokens = non-padding; positions = batch x T (what the encoder computes).\n\n"
            + B.table_md(["configuration", "params", "GFLOP/step", "samples/s", "real tokens/s", "positions/s",
                          "GFLOP/s", "MFU", "samples/s per run"], rows)
            + f"\n\nAt equal width and depth (d=32, 1 block, 1 head, same features) HSTU trains at "
              f"{small['samples'] / base['samples']:.2f}x the baseline transformer's samples/s; the recommended "
              f"configuration runs at {rec['samples'] / base['samples']:.2f}x the baseline model's samples/s "
              f"({rec['params'] / base['params']:.1f}x its parameters).\n{compile_line}\n"
              + B.load_line())
    print(body)
    if not a.no_record:
        B.append_benchmarks("Training throughput and MFU on CPU (bench/bench_train.py)", body)


if __name__ == "__main__":
    L.run_cli(main)
