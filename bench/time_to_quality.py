"""Time to quality: how long a recommended configuration takes to reach 95% of its best
validation NDCG@10, and its best, in this revision and beside another one.

    python bench/time_to_quality.py --data runs/beauty/data --config s3rec --ref 408f154
    python bench/time_to_quality.py --data runs/ml100k/data --config movielens --seeds 2

--data is a convert_public.py folder (train/, valid/): main.py trains on train/ and validates on
valid/ (full ranking, the configuration's own schedule and early stopping), exactly as
bench/public.py runs it; test/ is never read. Each run is a fresh main.py process; the times are
its own wall clock as it prints them ("epoch E done  step S  Ts", validation included), so the
time to a validation is the time of the epoch it closes. With --ref REV the same runs also go
through REV's code (a `git archive` of it in a temporary folder), alternating run by run with the
working tree's, so both sides see the same machine load. Prints a table (median over seeds) and
appends it to BENCHMARKS.md.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import benchlib as B

STEP = re.compile(r"^step (\d+) valid .*?NDCG@10 ([0-9.]+)")
EPOCH = re.compile(r"^epoch (\d+) done\s+step (\d+)\s+(\d+)s")


def curve(log_text: str) -> list:
    """[(step, seconds, validation NDCG@10)] from main.py's output: each validation line paired
    with the time printed when its epoch closed (a validation without an epoch line after it,
    e.g. the run was cut, is dropped)."""
    pending, out = {}, []
    for line in log_text.splitlines():
        m = STEP.match(line)
        if m:
            pending[int(m.group(1))] = float(m.group(2))
            continue
        m = EPOCH.match(line)
        if m and int(m.group(2)) in pending:
            out.append((int(m.group(2)), float(m.group(3)), pending.pop(int(m.group(2)))))
    return out


def summarise(points: list, frac: float = 0.95) -> dict:
    """best NDCG@10 and when it came, the first validation at or above frac x best, the total."""
    if not points:
        raise SystemExit("error: the run printed no validation (see its log)")
    best = max(points, key=lambda p: p[2])
    first = next(p for p in points if p[2] >= frac * best[2])
    return {"best": best[2], "best_step": best[0], "t_best": best[1], "t95": first[1], "step95": first[0],
            "total": points[-1][1], "steps": points[-1][0]}


def run_once(code_dir: str, data: str, config: str, seed: int, out: str, extra: list) -> dict:
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, TRAIN_DATA_PATH=os.path.join(data, "train"), TRAIN_LOG_PATH=os.path.join(out, "logs"),
               TRAIN_TF_EVENTS_PATH=os.path.join(out, "tb"), TRAIN_CKPT_PATH=os.path.join(out, "ckpt"),
               USER_CACHE_PATH=os.path.join(out, "cache"))
    cmd = [sys.executable, "-u", os.path.join(code_dir, "main.py"), "--config", config, "--seed", str(seed),
           "--valid_dir", os.path.join(data, "valid"), *extra]
    p = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    with open(os.path.join(out, "main.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} exited {p.returncode} (log: {out}/main.log)")
    return summarise(curve(p.stdout))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="convert_public.py output folder with train/ and valid/")
    p.add_argument("--config", required=True, help="main.py --config (a name in configs/ or a TOML file)")
    p.add_argument("--seeds", type=int, default=1, help="runs per side, seeds 0..N-1")
    p.add_argument("--ref", default=None, help="also run this git revision's code, alternating with the working tree")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder, removed)")
    p.add_argument("--no_append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("main_args", nargs="*", help="extra main.py flags (after --)")
    a = p.parse_args()
    if not os.path.isdir(os.path.join(a.data, "train")) or not os.path.isdir(os.path.join(a.data, "valid")):
        raise SystemExit(f"error: {a.data}: expected train/ and valid/ (convert_public.py output)")
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        sides = {"this tree": B.ROOT}
        if a.ref:
            ref_dir = os.path.join(tmp, "ref")
            os.makedirs(ref_dir)
            archive = subprocess.run(["git", "-C", B.ROOT, "archive", a.ref], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", ref_dir], input=archive, check=True)
            sides = {a.ref: ref_dir, **sides}
        res = {name: [] for name in sides}
        for seed in range(a.seeds):
            for name, code in sides.items():
                d = os.path.join(out, f"{name.replace(' ', '_')}_seed{seed}")
                r = run_once(code, os.path.abspath(a.data), a.config, seed, d, a.main_args)
                print(f"{name} seed {seed}: best NDCG@10 {r['best']:.4f} at step {r['best_step']} ({r['t_best']:.0f} s), "
                      f"95% at {r['t95']:.0f} s, total {r['total']:.0f} s", flush=True)
                res[name].append(r)
    rows = []
    for name, rs in res.items():
        m = {k: B.med([r[k] for r in rs]) for k in rs[0]}
        rows.append([name, f"{m['best']:.4f}", B.fmt(m["best_step"], 0), B.fmt(m["t95"], 0), B.fmt(m["t_best"], 0),
                     B.fmt(m["total"], 0), B.fmt(m["total"] / max(1, m["steps"]) * 1000, 0)])
    table = B.table_md(["code", "best valid NDCG@10", "at step", "s to 95% of best", "s to best", "s total",
                        "ms per step (incl. validation)"], rows)
    print(table)
    if not a.no_append:
        B.append_benchmarks(f"Time to quality: {a.config} on {os.path.basename(os.path.abspath(a.data))} "
                            f"(bench/time_to_quality.py)", table + f"\n\nMedian over {a.seeds} seed(s) per side; "
                            "each run validates every epoch and stops by its configuration's own rule.")


if __name__ == "__main__":
    main()
