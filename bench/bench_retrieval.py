"""Exact top-k inner-product search on CPU: retrieval_torch vs FAISS (and a plain torch loop).

Queries/s (median of --reps interleaved rounds, so a busy machine slows every method alike),
the ratio to FAISS IndexFlatIP, the peak RSS increase of one search (each method in a fresh
subprocess, base already in memory), and recall@k of the approximate FAISS indexes against
the exact answer. Prints a table and appends it to BENCHMARKS.md.

    python bench/bench_retrieval.py                 # 1M x 64 base, 4096 queries, k=10
    python bench/bench_retrieval.py --big           # 4M x 128
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import retrieval_torch as R  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None


def plain_torch(q, b, k, chunk=65536):
    """The obvious version: one matmul per base chunk, torch.topk, merge (intra-op threads)."""
    best_v = best_i = None
    for s in range(0, b.shape[0], chunk):
        v, i = torch.topk(q @ b[s:s + chunk].T, k, dim=1)
        i += s
        if best_v is not None:
            v, p = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, p)
        best_v, best_i = v, i
    return best_v, best_i


def make_method(name, q, b, k, args):
    """(build seconds, search callable) for a method name."""
    t0 = time.perf_counter()
    if name == "retrieval_torch":
        fn = lambda: R.topk_inner_product(q, b, k)  # noqa: E731
    elif name == "plain torch":
        qt, bt = torch.from_numpy(q), torch.from_numpy(b)
        fn = lambda: plain_torch(qt, bt, k)  # noqa: E731
    else:
        d = b.shape[1]
        if name == "faiss flat":
            index = faiss.IndexFlatIP(d)
        elif name == "faiss ivf":
            nlist = max(1, min(int(4 * np.sqrt(len(b))), len(b) // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(args.seed)
            index.cp.seed = args.seed
            index.train(b[np.sort(rng.choice(len(b), min(len(b), 64 * nlist), replace=False))])
            index.nprobe = args.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = args.ef_construction
            index.hnsw.efSearch = args.ef_search
        index.add(b)
        fn = lambda: index.search(q, k)  # noqa: E731
    return time.perf_counter() - t0, fn


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def worker(args):
    """Child process: load the data, then one build + search; report the peak RSS increase."""
    q = R.read_fbin(os.path.join(args.worker_dir, "q.fbin"))
    b = R.read_fbin(os.path.join(args.worker_dir, "b.fbin"))
    base = rss_kib()
    try:  # reset the high-water mark so data loading does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    _, fn = make_method(args.worker, q, b, args.k, args)
    fn()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), torch {torch.__version__}" + \
        (f", faiss {faiss.__version__}" if faiss else ", no faiss")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="base rows")
    ap.add_argument("--dim", type=int, default=64, help="vector dimension")
    ap.add_argument("--queries", type=int, default=4096, help="number of queries")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query")
    ap.add_argument("--big", action="store_true", help="4M x 128 base (sets --n and --dim)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss threads")
    ap.add_argument("--approx", choices=["auto", "yes", "no"], default="auto",
                    help="also time faiss IVF/HNSW (auto: not with --big, their build is slow)")
    ap.add_argument("--plain", choices=["auto", "yes", "no"], default="auto",
                    help="also time a plain chunked torch matmul + topk (auto: not with --big)")
    ap.add_argument("--nprobe", type=int, default=64, help="faiss IVF lists probed")
    ap.add_argument("--ef_search", type=int, default=128, help="faiss HNSW search beam")
    ap.add_argument("--hnsw_m", type=int, default=16, help="faiss HNSW links per node")
    ap.add_argument("--ef_construction", type=int, default=40,
                    help="faiss HNSW build beam (the build dominates: 1M rows take minutes)")
    ap.add_argument("--no_memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--seed", type=int, default=0, help="data and IVF training seed")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"),
                    help="markdown file the results are appended to ('' to skip)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.big:
        args.n, args.dim = 4_000_000, 128
    torch.set_num_threads(args.threads)
    if faiss:
        faiss.omp_set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    load0 = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    b = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    names = ["retrieval_torch"]
    if faiss:
        names.append("faiss flat")
    if args.plain == "yes" or (args.plain == "auto" and not args.big):
        names.append("plain torch")
    if faiss and (args.approx == "yes" or (args.approx == "auto" and not args.big)):
        names += ["faiss ivf", "faiss hnsw"]
    built = {}
    for name in names:
        built[name] = make_method(name, q, b, args.k, args)
        print(f"built {name} in {built[name][0]:.1f}s", file=sys.stderr, flush=True)
    qps = {n: [] for n in names}
    answers = {}
    for rep in range(args.reps):
        for name in names:
            t0 = time.perf_counter()
            answers[name] = built[name][1]()
            qps[name].append(args.queries / (time.perf_counter() - t0))
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n} {qps[n][-1]:.0f}"
              for n in names), file=sys.stderr, flush=True)
    exact = answers["retrieval_torch"][1].numpy()
    recall = {}
    for name in names:
        got = np.asarray(answers[name][1])
        recall[name] = float((got[:, :, None] == exact[:, None, :]).any(2).mean())
    peak = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as d:
            R.write_fbin(os.path.join(d, "q.fbin"), q)
            R.write_fbin(os.path.join(d, "b.fbin"), b)
            del b
            for name in names:
                if name in ("faiss ivf", "faiss hnsw"):
                    continue  # their index memory is the build, not the search
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker_dir",
                       d, "--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k),
                       "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode == 0:
                    peak[name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    load1 = os.getloadavg()

    ref = np.median(qps["faiss flat"]) if "faiss flat" in qps else None
    head = "| method | queries/s (median) | runs | vs faiss flat | peak RSS +MiB | " \
           "recall@%d | build s |" % args.k
    lines = [head, "|" + "---|" * 7]
    for name in names:
        med = np.median(qps[name])
        runs = " ".join(f"{x:.0f}" for x in qps[name])
        ratio = f"{med / ref:.2f}x" if ref else "-"
        pk = f"{peak[name]:.0f}" if name in peak else "-"
        lines.append(f"| {name} | {med:.0f} | {runs} | {ratio} | {pk} | {recall[name]:.4f} | "
                     f"{built[name][0]:.1f} |")
    cmd = "python bench/bench_retrieval.py " + " ".join(sys.argv[1:])
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    note = (f"base {args.n:,} x {args.dim}, {args.queries} queries, k={args.k}, Gaussian "
            f"vectors (seed {args.seed}), {args.threads} threads, {args.reps} interleaved rounds; "
            f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
            f"({platform.node()} is shared with other jobs: compare medians and ratios)")
    print("\n".join(lines))
    print(note)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmarks\n")
            f.write(f"\n## retrieval_torch: exact top-k vs FAISS ({when})\n\n"
                    f"`{cmd.strip()}`  \nmachine: {machine()}  \n{note}\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
