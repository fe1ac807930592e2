"""CUDA checks and GPU throughput (run through bench/gpu_check.sh).

Compares each CUDA path with the CPU fp32 result on the same inputs and weights, then records
GPU throughput in BENCHMARKS.md. Exit code 1 on any mismatch, 0 when everything agrees or when
there is no CUDA device (skipped).

  training step   recommended flags, dropout 0, one batch of demo data: loss and gradients of
                  the CUDA step (fp32/TF32, then bf16 autocast as main.py runs it) vs the CPU
                  fp32 step. fp32: loss within 5e-3 relative, gradient cosine >= 0.999;
                  bf16: loss within 3e-2 relative, gradient cosine >= 0.98 (bf16 keeps 8
                  mantissa bits: ~4e-3 relative per value, amplified by 1/temperature in the logits).
                  The same without relative bias, where the device runs the mask-free path
                  (causal order, is_causal) and the CPU reference the masked one.
  attention       model.attention (masked SDPA with relative bias, and HSTU's SiLU form) in fp32
                  and bf16 vs CPU fp32: |err| <= atol + rtol |ref| with (1e-3, 5e-3) for fp32/TF32
                  and (1e-2, 3e-2) for bf16 (its 2^-8 rounding of scores, weights and outputs);
                  the mask-free path (model.causal_order, is_causal, no mask) on left- and
                  right-padded rows vs the CPU masked path, same tolerances.
  retrieval       retrieval_torch.search on CUDA (half-precision shortlist + fp32 re-rank) vs the
                  exact CPU search, with history exclusion: recall@10 >= 0.999, scores within 1e-4
                  (TF32 off, as infer.py runs); with TF32 on (main.py's validation): 0.99, 2e-3.
  faiss-gpu       when faiss has GPU support: backend faiss on CUDA vs the exact CPU search.
  throughput      training tokens/s (model step, bf16, batches preloaded on the device) and
                  end-to-end samples/s (packed loader + step); the model step without relative
                  bias on the masked and the mask-free attention path; attention alone (forward +
                  backward, bf16) on both paths at T = 101 and 512; retrieval queries/s at 1M items.

--cpu-dry-run runs every comparison with the CPU standing in for the device (bf16 autocast on
CPU, topk_half_rerank on CPU, faiss on CPU), on smaller sizes, and records nothing: it tests
this script's logic on a machine without CUDA.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import benchlib as B
import layout as L
import model as Mo
import retrieval_torch as R

CHECK_FLAGS = B.RECOMMENDED + ["--dropout_rate", "0", "--in_batch_max", "1000000", "--num_workers", "0"]


class Results:
    def __init__(self):
        self.rows, self.failed = [], 0

    def add(self, name, ok, detail):
        self.rows.append([name, "ok" if ok else "**MISMATCH**", detail])
        self.failed += not ok
        print(f"[{'ok' if ok else 'MISMATCH'}] {name}: {detail}", flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().reshape(-1)
                      for p in model.parameters()])


def loss_and_grads(s, batch, amp_dtype):
    s.model.zero_grad(set_to_none=True)
    b = {k: v.to(s.device) for k, v in batch.items()}
    ctx = torch.autocast(s.device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(s.device.type, enabled=False)
    with ctx:
        loss = s.trainer(b)[0]
    loss.backward()
    return loss.detach().float().item(), grads(s.model)


def check_train(res, dev, train, cache, batch_size, flags=CHECK_FLAGS, what=""):
    ref = B.build_training(flags + ["--batch_size", str(batch_size)], train, cache, "cpu")
    tst = B.build_training(flags + ["--batch_size", str(batch_size)], train, cache, dev)
    tst.model.load_state_dict(ref.model.state_dict())
    ref.model.mask_free = False                  # the reference is always the masked path
    batch = B.add_negatives(ref, next(iter(B.packed_loader(ref, 0, batch_size))))
    l0, g0 = loss_and_grads(ref, batch, None)
    for label, dtype, ltol, gtol in (("fp32" + ("/TF32" if dev.type == "cuda" else ""), None, 5e-3, 0.999),
                                     ("bf16 autocast", torch.bfloat16, 3e-2, 0.98)):
        l1, g1 = loss_and_grads(tst, batch, dtype)
        rel = abs(l1 - l0) / max(abs(l0), 1e-12)
        cos = float(torch.nn.functional.cosine_similarity(g0, g1, dim=0))
        ok = np.isfinite(l1) and rel <= ltol and cos >= gtol
        res.add(f"training step{what}, {label}", ok, f"loss {l1:.5f} vs CPU {l0:.5f} (rel {rel:.1e}, tol {ltol:g}); "
                f"gradient cosine {cos:.5f} (min {gtol})")


def check_attention(res, dev):
    g = torch.Generator().manual_seed(0)
    Bsz, H, T, dh = 8, 2, 101, 32
    q, k, v = (torch.randn(Bsz, H, T, dh, generator=g) for _ in range(3))
    real = torch.arange(T).unsqueeze(0) >= torch.randint(0, T // 2, (Bsz, 1), generator=g)     # left padding
    idx = torch.arange(T)
    allowed = ((idx.view(1, T) <= idx.view(T, 1)) & real.unsqueeze(1)) | torch.eye(T, dtype=torch.bool)
    allowed = allowed.unsqueeze(1)
    bias = 0.5 * torch.randn(Bsz, H, T, T, generator=g)
    for kind in ("softmax", "silu"):
        for b in (None, bias):
            ref = Mo.attention(q, k, v, allowed, b, kind, 0.0)
            for label, dtype, atol, rtol in (("fp32", torch.float32, 1e-3, 5e-3), ("bf16", torch.bfloat16, 1e-2, 3e-2)):
                out = Mo.attention(*(t.to(dev, dtype) for t in (q, k, v)), allowed.to(dev),
                                   None if b is None else b.to(dev, dtype), kind, 0.0)
                diff = (out.float().cpu() - ref).abs()
                worst = float((diff / (atol + rtol * ref.abs())).max())
                ok = bool(torch.isfinite(out).all()) and worst <= 1.0
                res.add(f"attention {kind}{' + rel bias' if b is not None else ''}, {label}", ok,
                        f"max abs error {float(diff.max()):.1e} (abs(ref) up to {float(ref.abs().max()):.1f}); "
                        f"max abs(err) / ({atol:g} + {rtol:g} abs(ref)) = {worst:.2f} (max 1)")


def padded(Bsz, T, g, right=False):
    """bool [Bsz, T]: real tokens, left-padded (the readers' layout) or right-padded."""
    n = torch.randint(1, T + 1, (Bsz, 1), generator=g)
    idx = torch.arange(T).unsqueeze(0)
    return idx < n if right else idx >= T - n


def masked_allowed(real):
    T = real.shape[1]
    idx = torch.arange(T, device=real.device)
    causal = idx.view(1, T) <= idx.view(T, 1)
    return ((causal & real.unsqueeze(1) & real.unsqueeze(2)) | torch.eye(T, dtype=torch.bool, device=real.device)).unsqueeze(1)


def mask_free_attention(q, k, v, real):
    """model.attention on the mask-free path: q/k/v [B, H, T, dh] into causal order and back."""
    Bsz, H, T, _ = q.shape
    to, back, real_c = Mo.causal_order(real)
    ctx = {"order": (to, back)}
    perm = lambda t: Mo.to_causal_order(t.transpose(1, 2).reshape(Bsz, T, -1), ctx).view(Bsz, T, H, -1).transpose(1, 2)
    a = Mo.attention(perm(q), perm(k), perm(v), None, None, "softmax", 0.0, real_c.view(Bsz, 1, T, 1))
    return Mo.from_causal_order(a.transpose(1, 2).reshape(Bsz, T, -1), ctx).view(Bsz, T, H, -1).transpose(1, 2)


def check_mask_free(res, dev):
    g = torch.Generator().manual_seed(3)
    Bsz, H, T, dh = 8, 2, 101, 32
    q, k, v = (torch.randn(Bsz, H, T, dh, generator=g) for _ in range(3))
    for side in ("left", "right"):
        real = padded(Bsz, T, g, side == "right")
        ref = Mo.attention(q, k, v, masked_allowed(real), None, "softmax", 0.0)
        for label, dtype, atol, rtol in (("fp32", torch.float32, 1e-3, 5e-3), ("bf16", torch.bfloat16, 1e-2, 3e-2)):
            out = mask_free_attention(*(t.to(dev, dtype) for t in (q, k, v)), real.to(dev))
            diff = (out.float().cpu() - ref).abs()
            worst = float((diff / (atol + rtol * ref.abs())).max())
            ok = bool(torch.isfinite(out).all()) and worst <= 1.0
            res.add(f"attention mask-free vs masked, {side}-padded, {label}", ok,
                    f"max abs error {float(diff.max()):.1e} (abs(ref) up to {float(ref.abs().max()):.1f}); "
                    f"max abs(err) / ({atol:g} + {rtol:g} abs(ref)) = {worst:.2f} (max 1)")


def attention_throughput(dev, shapes, dtype, reps):
    """(shape, masked ms, mask-free ms) for forward + backward of one attention call, left padding."""
    g = torch.Generator().manual_seed(4)
    out = []
    for Bsz, H, T, dh in shapes:
        q, k, v = (torch.randn(Bsz, H, T, dh, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
        real = padded(Bsz, T, g).to(dev)
        fns = {"masked": lambda: Mo.attention(q, k, v, masked_allowed(real), None, "softmax", 0.0),
               "mask-free": lambda: mask_free_attention(q, k, v, real)}
        times = {key: [] for key in fns}
        for r in range(reps + 1):
            for key, fn in fns.items():
                sync(dev)
                t = time.perf_counter()
                for _ in range(5):
                    fn().float().sum().backward()
                sync(dev)
                if r:                                   # the first round warms up both
                    times[key].append((time.perf_counter() - t) / 5)
        out.append(((Bsz, H, T, dh), 1e3 * B.med(times["masked"]), 1e3 * B.med(times["mask-free"])))
    return out


def check_retrieval(res, dev, dry, nq, nb, d=64, k=10):
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).numpy()
    base = torch.nn.functional.normalize(torch.randn(nb, d, generator=g), dim=1).numpy()
    excl = [np.random.default_rng(i).choice(nb, 20, replace=False) for i in range(nq)]
    v0, i0 = R.search(q, base, k, exclude=excl, device="cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    # infer.py runs with TF32 off; main.py's validation search runs in a process that turned it on
    for on in ((False, True) if dev.type == "cuda" else (False,)):
        torch.backends.cuda.matmul.allow_tf32 = on
        if dry:
            v1, i1 = R.topk_half_rerank(q, base, k, exclude=excl, device="cpu")
        else:
            v1, i1 = R.search(q, base, k, exclude=excl, device=dev)
        compare_topk(res, f"retrieval torch half shortlist + fp32 re-rank{', TF32 on' if on else ''}",
                     v0, i0, v1, i1, excl, *((0.99, 2e-3) if on else (0.999, 1e-4)))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        import faiss
    except ImportError:
        res.rows.append(["faiss", "skipped", "faiss not installed"])
        return
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if not gpu and not dry:
        res.rows.append(["faiss-gpu", "skipped", "faiss has no GPU support here"])
        return
    v1, i1 = R.search(q, base, k, backend="faiss", exclude=excl, device=dev if gpu else "cpu")
    compare_topk(res, f"retrieval faiss ({'GPU' if gpu else 'CPU'})", v0, i0, v1, i1, excl)


def compare_topk(res, name, v0, i0, v1, i1, excl, min_recall=0.999, tol=1e-4):
    i0, i1, v0, v1 = (np.asarray(x) for x in (i0, i1, v0, v1))
    recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(i0.tolist(), i1.tolist())])
    err = float(np.abs(v0 - v1).max())
    leaked = sum(len(set(b) & set(e.tolist())) for b, e in zip(i1.tolist(), excl))
    ok = recall >= min_recall and err <= tol and leaked == 0
    res.add(name, ok, f"recall@{i0.shape[1]} vs exact CPU {recall:.4f} (min {min_recall}); max score error "
            f"{err:.1e} (tol {tol:g}); excluded items returned: {leaked}")


def train_throughput(dev, train, cache, steps, batch_size, workers, flags=B.RECOMMENDED, mask_free=True):
    """(real tokens/s, samples/s) of the model step on preloaded batches, and end-to-end samples/s
    with the packed loader (None when workers is None)."""
    s = B.build_training(flags + ["--batch_size", str(batch_size)], train, cache, dev)
    s.model.mask_free = mask_free
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    it = iter(B.packed_loader(s, 0, batch_size))
    pre = [{k: v.to(dev) for k, v in B.add_negatives(s, next(it)).items()} for _ in range(4)]

    def step(b):
        with amp:
            loss = s.trainer(b)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.loop.clip_norm)
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
    for b in pre[:2]:
        step(b)
    sync(dev)
    t = time.perf_counter()
    for i in range(steps):
        step(pre[i % len(pre)])
    sync(dev)
    dt = time.perf_counter() - t
    tokens = sum(int((pre[i % len(pre)]["token_type"] != L.PAD).sum()) for i in range(steps))
    if workers is None:
        return tokens / dt, steps * batch_size / dt, None
    loader = B.packed_loader(s, workers, batch_size)
    it = iter(loader)
    step({k: v.to(dev, non_blocking=True) for k, v in B.add_negatives(s, next(it)).items()})
    sync(dev)
    t, n = time.perf_counter(), 0
    for batch in it:
        step({k: v.to(dev, non_blocking=True) for k, v in B.add_negatives(s, batch).items()})
        n += len(batch["user_id"])
        if n >= steps * batch_size:
            break
    sync(dev)
    return tokens / dt, steps * batch_size / dt, n / (time.perf_counter() - t)


def retrieval_throughput(dev, nq, nb, d=64, k=10, dry=False):
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).numpy()
    base = torch.nn.functional.normalize(torch.randn(nb, d, generator=g), dim=1).numpy()
    fn = (lambda: R.topk_half_rerank(q, base, k, device="cpu")) if dry else (lambda: R.search(q, base, k, device=dev))
    fn()
    times = []
    for _ in range(3):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return nq / B.med(times)


def shell_command():
    """The gpu_check.sh command line that ran this (its --tmp folder left out)."""
    argv, out = sys.argv[1:], []
    while argv:
        x = argv.pop(0)
        if x == "--tmp":
            argv.pop(0)
        else:
            out.append(x)
    return " ".join(["bash bench/gpu_check.sh"] + out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", dest="dry", action="store_true",
                   help="run the comparisons with the CPU as the device (tests this script without CUDA)")
    p.add_argument("--tmp", default=None, help="work folder for demo data (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 30 on CUDA, 2 dry)")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--record_dry_run", action="store_true",
                   help="with --cpu-dry-run: append the check table (no throughput) to BENCHMARKS.md")
    a = p.parse_args()
    if not a.dry and not torch.cuda.is_available():
        print("no CUDA device: skipped (bench/gpu_check.sh checks the CUDA paths only; --cpu-dry-run tests the "
              "script on the CPU)")
        return 0
    t_start = time.time()
    dev = torch.device("cpu" if a.dry else "cuda")
    if dev.type == "cuda":               # as main.py runs on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tmp = a.tmp or tempfile.mkdtemp(prefix="gpu_check_")
    demo = ["--users", "400", "--items", "500", "--eval_users", "50"] if a.dry else []
    train = B.ensure_demo(os.path.join(tmp, "demo"), *demo)
    cache = os.path.join(tmp, "cache")
    B.ensure_ctr(train, cache)
    torch.manual_seed(0)
    res = Results()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    print(f"device: {gpu}; torch {torch.__version__}")
    check_train(res, dev, train, cache, 16 if a.dry else 64)
    no_bias = [f for f in CHECK_FLAGS if f != "--use_rel_bias"]
    check_train(res, dev, train, cache, 16 if a.dry else 64, no_bias, " without rel bias (device: mask-free)")
    check_attention(res, dev)
    check_mask_free(res, dev)
    check_retrieval(res, dev, a.dry, 100 if a.dry else 2000, 5000 if a.dry else 200000)
    steps = a.steps or (2 if a.dry else 30)
    tok, sps, e2e = train_throughput(dev, train, cache, steps, 32 if a.dry else 128,
                                     0 if a.dry else min(4, os.cpu_count() or 1))
    # the attention paths side by side: the recommended flags without relative bias (mask-free
    # on the device by default), then the same model forced onto the masked path
    no_bias = [f for f in B.RECOMMENDED if f != "--use_rel_bias"]
    paths = {mf: train_throughput(dev, train, cache, steps, 32 if a.dry else 128, None, no_bias, mf)
             for mf in (False, True)}
    shapes = [(8, 2, 101, 32), (8, 2, 256, 32)] if a.dry else [(128, 2, 101, 32), (128, 2, 512, 32), (32, 4, 2048, 64)]
    att = attention_throughput(dev, shapes, torch.float32 if a.dry else torch.bfloat16, 2 if a.dry else 10)
    nq, nb = (200, 20000) if a.dry else (10000, 1000000)
    qps = retrieval_throughput(dev, nq, nb, dry=a.dry)
    thr = [["training, model step (bf16, recommended flags)", f"{tok:,.0f} real tokens/s, {sps:,.1f} samples/s"],
           ["training, end to end (packed loader + step)", f"{e2e:,.1f} samples/s"]]
    thr += [[f"training, model step (bf16, recommended flags without rel bias), {'mask-free' if mf else 'masked'} "
             f"attention", f"{t:,.0f} real tokens/s, {x:,.1f} samples/s"] for mf, (t, x, _) in paths.items()]
    thr += [["training, mask-free speed-up (masked step time / mask-free step time)",
             f"{paths[True][1] / paths[False][1]:.2f}x"]]
    thr += [[f"attention forward + backward ({'fp32' if a.dry else 'bf16'}), B x H x T x dh = {' x '.join(map(str, sh))}, "
             f"left-padded", f"masked {m:.2f} ms, mask-free {f:.2f} ms ({m / f:.2f}x)"] for sh, m, f in att]
    thr += [[f"retrieval top-10, {nq:,} queries x {nb:,} items, d=64", f"{qps:,.0f} queries/s"]]
    print(B.table_md(["throughput", "value"], thr))
    print(f"{res.failed} mismatches; {time.time() - t_start:.0f}s")
    if not a.dry and not a.no_record:
        body = (f"Device: {gpu} ({torch.cuda.device_count()} visible), torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}. {res.failed} mismatches.\n\n"
                + B.table_md(["check", "result", "detail"], res.rows) + "\n\n"
                + B.table_md(["throughput", "value"], thr))
        B.append_benchmarks("GPU check (bench/gpu_check.sh)", body, shell_command())
    elif a.dry and a.record_dry_run:
        body = (f"No CUDA device in this session: `bash bench/gpu_check.sh` prints \"no CUDA device: skipped\" "
                f"and exits 0. The same comparisons with the CPU standing in for the device (bf16 autocast on "
                f"CPU, topk_half_rerank on CPU, faiss on CPU), smaller sizes; {res.failed} mismatches. These are "
                f"not GPU results: run the script on a CUDA machine for those and for the throughput.\n\n"
                + B.table_md(["check", "result", "detail"], res.rows))
        B.append_benchmarks("GPU check, CPU dry run (bench/gpu_check.sh --cpu-dry-run)", body, shell_command())
    return 1 if res.failed else 0


if __name__ == "__main__":
    L.run_cli(lambda: sys.exit(main()))
