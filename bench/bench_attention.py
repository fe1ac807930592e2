"""The encoder's two attention paths on CPU: masked (an explicit [B, 1, T, T] mask, what
relative bias and SiLU attention need) against mask-free (tokens in causal order, real tokens
first, and scaled_dot_product_attention with is_causal=True and no mask: see model.causal_order).

    python bench/bench_attention.py [--data /tmp/bench_demo] [--repeats 5] [--steps 3]

Three timings, each with both paths interleaved run by run (the machine is shared, so load hits
them alike), median of --repeats runs:
  attention alone   forward + backward of model.attention on [batch, heads, T, width] tensors with
                    the demo batches' own padding: the masked call (mask built per call, as
                    encode does) vs the mask-free call with the two reorderings it needs, and vs
                    is_causal with no reordering (the kernel's floor, not a valid path on padded rows)
  encoder           forward + backward of GenerativeRecommender.encode on real demo batches
  training step     main.py's step (forward, InfoNCE, backward, clipping, AdamW) on the same batches
Before timing, the two paths' losses on the first batch are compared (dropout off for that check).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import benchlib as B
import layout as L
import model as Mo

CONFIGS = {
    "baseline size, HSTU (d32 x1, 1 head)": B.HSTU_SMALL,
    "baseline model (transformer d32 x1, 1 head)": B.BASELINE_MODEL,
    "recommended without rel bias (HSTU d64 x2, 2 heads, ctr, action cond)": ["--use_ctr", "--action_cond"],
}


def timed(fn, repeats):
    """Median seconds of `repeats` calls of fn (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def attention_fns(real, heads, width):
    """Closures: forward + backward of the masked call, the mask-free call and bare is_causal."""
    Bsz, T = real.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bsz, heads, T, width, generator=g, requires_grad=True) for _ in range(3))
    idx = torch.arange(T)

    def masked():
        allowed = ((idx.view(1, T) <= idx.view(T, 1)) & real.unsqueeze(1) & real.unsqueeze(2)) | torch.eye(T, dtype=torch.bool)
        Mo.attention(q, k, v, allowed.unsqueeze(1), None, "softmax", 0.0).sum().backward()

    def mask_free():
        to, back, real_c = Mo.causal_order(real)
        ctx = {"order": (to, back)}
        perm = lambda t, c: Mo.to_causal_order(t.transpose(1, 2).reshape(Bsz, T, -1), c).view(Bsz, T, heads, -1).transpose(1, 2)
        a = Mo.attention(perm(q, ctx), perm(k, ctx), perm(v, ctx), None, None, "softmax", 0.0, real_c.view(Bsz, 1, T, 1))
        Mo.from_causal_order(a.transpose(1, 2).reshape(Bsz, T, -1), ctx).sum().backward()

    def bare():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return masked, mask_free, bare


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/bench_demo", help="demo data folder (made by make_demo_data.py if absent)")
    p.add_argument("--cache", default="/tmp/bench_cache", help="USER_CACHE_PATH for CTR priors and mm tables")
    p.add_argument("--batch_size", type=int, default=128, help="users per batch")
    p.add_argument("--steps", type=int, default=3, help="batches per timed run (encoder and training step)")
    p.add_argument("--repeats", type=int, default=5, help="runs per path (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, batches and negatives")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)                  # as main.py trains on the CPU
    train = B.ensure_demo(a.data)
    B.ensure_ctr(train, a.cache)
    rows, notes = [], []
    for name, flags in CONFIGS.items():
        torch.manual_seed(a.seed)
        s = B.build_training(flags + ["--batch_size", str(a.batch_size), "--seed", str(a.seed)], train, a.cache)
        m, c = s.model, s.cfg.model
        it = iter(B.packed_loader(s, 0, a.batch_size))
        batches = [B.add_negatives(s, next(it)) for _ in range(a.steps)]
        T = batches[0]["token_type"].shape[1]
        real = batches[0]["token_type"] != L.PAD
        pad_share = 1 - float(real.float().mean())

        m.eval()                                               # dropout off: the paths must agree
        losses = []
        for mf in (True, False):
            m.mask_free = mf
            torch.manual_seed(a.seed)                         # the same in-batch subset both times
            with torch.no_grad():
                losses.append(float(s.trainer(batches[0])[0]))
        m.train()
        notes.append(f"{name}: loss on the first batch {losses[0]:.6f} mask-free vs {losses[1]:.6f} masked "
                     f"(|diff| {abs(losses[0] - losses[1]):.1e}).")

        heads, width = c.num_heads, (c.dqk if c.encoder_type == "hstu" else c.hidden_units // c.num_heads)
        fns = attention_fns(real, heads, width)
        att = {k: [] for k in ("masked", "mask-free", "bare")}
        enc = {True: [], False: []}
        step = {True: [], False: []}

        def encode_all():
            for b in batches:
                m.encode(b).sum().backward()
            m.zero_grad(set_to_none=True)

        def step_all():
            for b in batches:
                B.train_step(s, b)
        for r in range(a.repeats):
            for key, fn in zip(att, fns):
                att[key].append(timed(fn, 3)[0])
            for mf in (True, False):
                m.mask_free = mf
                enc[mf].append(timed(encode_all, 1)[0])
                step[mf].append(timed(step_all, 1)[0])
            print(f"run {r + 1} {name}: attention {att['masked'][-1] * 1e3:.2f} / {att['mask-free'][-1] * 1e3:.2f} ms, "
                  f"encoder {enc[False][-1]:.3f} / {enc[True][-1]:.3f} s, step {step[False][-1]:.3f} / "
                  f"{step[True][-1]:.3f} s (masked / mask-free)", flush=True)
        md = {k: statistics.median(v) for k, v in att.items()}
        me, ms = {k: statistics.median(v) for k, v in enc.items()}, {k: statistics.median(v) for k, v in step.items()}
        sps = {k: a.steps * a.batch_size / v for k, v in ms.items()}
        rows.append([name, f"{a.batch_size} x {heads} x {T} x {width}, {100 * pad_share:.0f}% padding",
                     f"{md['masked'] * 1e3:.2f} / {md['mask-free'] * 1e3:.2f} / {md['bare'] * 1e3:.2f}",
                     f"{md['masked'] / md['mask-free']:.2f}x",
                     f"{me[False] / a.steps * 1e3:.1f} / {me[True] / a.steps * 1e3:.1f}", f"{me[False] / me[True]:.2f}x",
                     f"{sps[False]:.1f} / {sps[True]:.1f}", f"{sps[True] / sps[False]:.2f}x"])
        print(rows[-1], flush=True)
    body = (f"Demo data `{a.data}` (make_demo_data.py defaults), batch {a.batch_size}, CPU fp32; median of "
            f"{a.repeats} interleaved runs ({a.steps} batches per encoder / step run). Attention alone: one "
            f"block's attention, forward + backward, on the first batch's padding (masked: mask built and "
            f"passed; mask-free: causal order there and back, is_causal; bare: is_causal on the unordered "
            f"tensors, the kernel's floor). Encoder: encode forward + backward per batch. Step: main.py's "
            f"training step. Deterministic algorithms on, as main.py runs on the CPU. Ratios are masked time / mask-free time (> 1: mask-free is faster).\n\n"
            + B.table_md(["configuration", "attention shape", "attention ms masked / mask-free / bare",
                          "attention ratio", "encoder ms per batch masked / mask-free", "encoder ratio",
                          "step samples/s masked / mask-free", "step ratio"], rows)
            + "\n\n" + "\n".join(notes)
            + "\n" + B.load_line())
    print(body)
    if not a.no_record:
        B.append_benchmarks("Attention: masked vs mask-free on CPU (bench/bench_attention.py)", body)


if __name__ == "__main__":
    L.run_cli(main)
