"""Inference at scale: users/s, candidates/s and peak memory of `infer.py` as the predict set grows.

    python bench/bench_infer.py [--users 20000 200000] [--items 200000] [--tmp /tmp]

For each size, make_demo_data.py writes a folder whose eval split holds every qualifying user
(`--eval_users` = users) and the whole catalogue as candidates (`--pool 0`). A checkpoint of the
recommended architecture is written with freshly initialised weights (speed and memory do not
depend on training), then `python infer.py` runs in a fresh process: it reads the checkpoint's
configs, embeds every candidate and every user, writes query.fbin / embedding.fbin and retrieves
the top 10. Reported: the throughput lines infer.py prints, its wall time, and the peak resident
memory of the process (ru_maxrss of the child). The outputs themselves (users x d and candidates
x d float32) are the floor any exporter needs; the table shows how far above it the peak is.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time


import benchlib as B
import checkpoint as C
import layout as L

RECOMMENDED = ["--use_ctr", "--use_timefeat", "--use_rel_bias=1", "--norm_first", "--norm_type=rmsnorm",
               "--encoder_type=hstu", "--action_cond", "--maxlen", "64"]


def write_checkpoint(train_dir, cache_dir, root):
    """A project checkpoint (checkpoint.save: weights, configs, training state) of the recommended
    flags, untrained, as ROOT/global_step0."""
    B.ensure_ctr(train_dir, cache_dir)
    s = B.build_training(RECOMMENDED, train_dir, cache_dir)
    st = {"step": 0, "epoch": 0, "micro": 0, "best": None, "bad_epochs": 0, "nonfinite": 0}
    C.save(root, s.model, s.cfg.saved(), {}, s.opt, s.sched, st, {}, 0, 1)
    return s.cfg.model.hidden_units


def run_infer(data, cache, ckpt, result):
    env = dict(os.environ, EVAL_DATA_PATH=os.path.join(data, "eval"), TRAIN_DATA_PATH=os.path.join(data, "train"),
               USER_CACHE_PATH=cache, MODEL_OUTPUT_PATH=ckpt, EVAL_RESULT_PATH=result)
    # infer.py's own peak, read inside its process (the children's ru_maxrss here would also
    # count make_demo_data.py); its DataLoader worker is a separate, smaller process
    probe = ("import resource, runpy, sys; sys.argv = ['infer.py', '--num_workers', '1']; "
             "runpy.run_path(%r, run_name='__main__'); "
             "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % os.path.join(B.ROOT, "infer.py"))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True,
                         cwd=B.ROOT).stdout
    wall = time.time() - t0
    peak = int(re.search(r"PEAK_KIB (\d+)", out)[1])
    m = re.search(r"candidates: (\d+) in ([\d.]+)s \((\d+)/s\); users: (\d+) in ([\d.]+)s \((\d+)/s\)", out)
    if m is None:
        raise SystemExit(f"infer.py printed no throughput line:\n{out}")
    return {"cands": int(m[1]), "cand_s": float(m[2]), "cand_rate": int(m[3]), "users": int(m[4]),
            "user_s": float(m[5]), "user_rate": int(m[6]), "wall": wall,
            "peak_mib": peak / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[20000, 200000], help="users per demo folder (ascending)")
    p.add_argument("--items", type=int, default=200000, help="catalogue size = candidates per folder")
    p.add_argument("--eval_users", type=int, default=None,
                   help="predict users wanted per folder (default: as many as its users)")
    p.add_argument("--demo_args", default="", help="extra make_demo_data.py flags, one string "
                   "(e.g. \"--min_events 50 --mean_events 100\" for TencentGR-1M-like lengths)")
    p.add_argument("--workers", type=int, default=2, help="make_demo_data.py worker processes")
    p.add_argument("--tmp", default="/tmp", help="where the demo folders and outputs go")
    p.add_argument("--no_append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args()
    rows, res = [], {}
    for n in sorted(a.users):
        root = os.path.join(a.tmp, f"bench_infer_{n // 1000}k")
        data = os.path.join(root, "data")
        t0 = time.time()
        ev = n if a.eval_users is None else a.eval_users
        train = B.ensure_demo(data, "--users", n, "--items", a.items, "--eval_users", ev, "--cands", 64,
                              "--workers", a.workers, *shlex.split(a.demo_args))
        gen_s = time.time() - t0
        cache, ckpt = os.path.join(root, "cache"), os.path.join(root, "ckpt")
        d = write_checkpoint(train, cache, ckpt)
        r = run_infer(data, cache, ckpt, os.path.join(root, "result"))
        floor = (r["users"] + r["cands"]) * d * 4 / 2**20
        res[n] = r
        rows.append([f"{n:,}", f"{gen_s:.0f}", f"{r['users']:,}", f"{r['user_rate']:,}", f"{r['cands']:,}",
                     f"{r['cand_rate']:,}", f"{r['wall']:.0f}", f"{r['peak_mib']:,.0f}", f"{floor:,.0f}"])
        print(rows[-1], flush=True)
    table = B.table_md(["users in folder", "generate s", "predict users", "users/s", "candidates", "candidates/s",
                        "infer.py wall s", "peak RSS MiB", "vectors MiB (floor)"], rows)
    ns = sorted(res)
    body = (f"Recommended architecture (`{' '.join(RECOMMENDED)}`), untrained weights; `infer.py --num_workers 1` "
            f"in a fresh process per row; demo folders from `make_demo_data.py --users N --items {a.items} "
            f"--eval_users {'N' if a.eval_users is None else a.eval_users} --cands 64 {a.demo_args}`"
            f" (the eval split keeps users with events after the cutoff).\n\n{table}")
    if len(ns) > 1:
        lo, hi = res[ns[0]], res[ns[-1]]
        body += (f"\n\n{hi['users'] / lo['users']:.1f}x the predict users: peak RSS "
                 f"{hi['peak_mib'] / lo['peak_mib']:.2f}x, users/s {hi['user_rate'] / lo['user_rate']:.2f}x.")
    print(body)
    if not a.no_append:
        B.append_benchmarks("Inference at scale (bench/bench_infer.py)", body,
                            "python bench/bench_infer.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    L.run_cli(main)
