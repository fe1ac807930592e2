"""Cold-item ablation: how items without a training event are represented, cold and warm columns.

    python bench/cold.py --data data/demo --seeds 2 --max_epochs 15
    python bench/cold.py --data runs/ml100k-cold/data --base movielens --seeds 2

Rows, each added to the one before: `id only` (the plain id row: a cold item is noise), `+ content`
(the item tower adds features and multimodal / content vectors, cold ids keep their untrained rows),
`+ semantic ids` (precompute_sid.py's codes join the features), `+ cold rule` (configs/cold.toml's
rule, semantic ids kept: cold ids masked to the new-item row, item ids dropped in training so the
features learn to carry an item alone); `content + item age` is `+ content` with the item-age bias
(a cold item counts as the newest). Every run is the product's own commands: precompute_ctr.py /
precompute_sid.py, main.py (the base config, its validation picks the checkpoint), infer.py, then
evaluate.py --train_dir, whose cold/warm split (cold: no event in train/seq.jsonl) is reported.
--data is a demo folder (train/, eval/: validation held out of the training users, the eval folder
scored) or a convert_public.py folder (train/, valid/, test/: validation on valid/, test/ scored).
Prints a table (mean over seeds) and appends it to BENCHMARKS.md with the command, date and machine.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = {
    "id only": ["--item_tower", "id", "--cold_ids", "keep", "--use_sid", "0", "--item_id_dropout", "0"],
    "+ content": ["--item_tower", "add", "--cold_ids", "keep", "--use_sid", "0", "--item_id_dropout", "0"],
    "+ semantic ids": ["--item_tower", "add", "--cold_ids", "keep", "--use_sid", "1", "--item_id_dropout", "0"],
    "+ cold rule": ["--item_tower", "add", "--config", "cold", "--use_sid", "1"],
    "content + item age": ["--item_tower", "add", "--cold_ids", "keep", "--use_sid", "0", "--item_id_dropout", "0",
                           "--item_age", "1"],
}
COLS = [("Score", "Score"), ("HR@10", "HR@10"), ("cold HR@10", ("cold", "HR@10")), ("warm HR@10", ("warm", "HR@10")),
        ("cold NDCG@10", ("cold", "NDCG@10")), ("warm NDCG@10", ("warm", "NDCG@10")),
        ("cold slots", "cold_slot_share")]


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="demo folder (train/, eval/) or convert_public.py folder")
    p.add_argument("--base", default="demo", help="main.py --config the rows start from (demo, movielens, s3rec)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (0, 1, ...)")
    p.add_argument("--max_epochs", type=int, default=None, help="cap on epochs (default: the config's)")
    p.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    p.add_argument("--out", default=None, help="runs folder (default: runs/cold/<data folder name>)")
    p.add_argument("--no_append", action="store_true", help="do not append the table to BENCHMARKS.md")
    return p.parse_args()


def sh(args, env, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        r = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"error: {' '.join(args[:3])} exited with {r.returncode}; see {log}")


def run_row(name, flags, seed, a, out):
    public = os.path.isdir(os.path.join(a.data, "valid"))
    scored = os.path.join(a.data, "test" if public else "eval")
    run = os.path.join(out, f"{name.strip('+ ').replace(' ', '_')}_seed{seed}")
    cache = os.path.join(out, "cache")
    train = os.path.join(a.data, "train")
    env = dict(os.environ, TRAIN_DATA_PATH=train, EVAL_DATA_PATH=scored, USER_CACHE_PATH=cache,
               TRAIN_CKPT_PATH=os.path.join(run, "ckpt"), TRAIN_LOG_PATH=os.path.join(run, "logs"),
               TRAIN_TF_EVENTS_PATH=os.path.join(run, "tb"), MODEL_OUTPUT_PATH=os.path.join(run, "ckpt"),
               EVAL_RESULT_PATH=os.path.join(run, "result"))
    os.makedirs(run, exist_ok=True)
    log = os.path.join(run, "log.txt")
    py = [sys.executable, "-u"]
    sh(py + ["precompute_ctr.py", "--seq_path", os.path.join(train, "seq.jsonl"), "--output_dir",
             os.path.join(cache, "ctr"), "--prior", "auto", "--k_clip", "10,10000", "--reuse"], env, log)
    sh(py + ["precompute_sid.py", "--data_dir", train, "--output_dir", os.path.join(cache, "sid"), "--reuse"], env, log)
    cmd = py + ["main.py", "--config", a.base, "--seed", str(seed), "--ctr_dir", os.path.join(cache, "ctr"), *flags]
    if public:
        cmd += ["--valid_dir", os.path.join(a.data, "valid")]
    if a.max_epochs:
        cmd += ["--max_epochs", str(a.max_epochs)]
    t0 = time.time()
    sh(cmd, env, log)
    sh(py + ["infer.py"], env, log)
    res = subprocess.run(py + ["evaluate.py", "--result", os.path.join(run, "result", "result.json"),
                               "--ground_truth", os.path.join(scored, "ground_truth.jsonl"), "--train_dir", train,
                               "--eval_dir", scored], env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"error: evaluate.py: {res.stderr.strip()}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    m["seconds"] = time.time() - t0
    return m


def value(m, key):
    v = m[key[0]][key[1]] if isinstance(key, tuple) else m[key]
    return float("nan") if v is None else v


def main():
    a = get_args()
    out = a.out or os.path.join(ROOT, "runs", "cold", os.path.basename(os.path.normpath(a.data)))
    rows = {k: v for k, v in ROWS.items() if a.only is None or k.strip("+ ") in a.only.split(",") or k in a.only}
    results = {}
    for name, flags in rows.items():
        results[name] = [run_row(name, flags, s, a, out) for s in range(a.seeds)]
        ms = results[name]
        print(f"{name}: " + "  ".join(f"{c} {statistics.mean(value(m, k) for m in ms):.4f}" for c, k in COLS), flush=True)
    first = next(iter(results.values()))[0]
    head = (f"{first['cold_target_share']:.1%} of the targets and {first['pool_cold_items']} of the "
            f"{first['pool_size']} candidates are cold (no training event)")
    lines = ["| row | " + " | ".join(c for c, _ in COLS) + " | min/run |", "|---" * (len(COLS) + 2) + "|"]
    for name, ms in results.items():
        cells = [f"{statistics.mean(value(m, k) for m in ms):.4f}" for _, k in COLS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(m['seconds'] for m in ms) / 60:.1f} |")
    table = "\n".join(lines)
    print(head)
    print(table)
    if not a.no_append:
        cmd = "python bench/cold.py " + " ".join(sys.argv[1:])
        machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, CPU"
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write(f"\n### Cold-item ablation: {os.path.basename(os.path.normpath(a.data))} "
                    f"({datetime.date.today()})\n\n`{cmd}` ({machine}; mean of {a.seeds} seed(s); "
                    f"evaluate.py's metrics on the scored split). {head}.\n\n{table}\n")


if __name__ == "__main__":
    main()
