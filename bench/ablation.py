"""Ablations: each model option / objective on and off, mean over seeds.

    python bench/ablation.py --data data/demo --seeds 2 [--only base,no_time,...] [--epochs 6]
    python bench/ablation.py --public movielens --data runs/ml100k/data --seeds 2 --epochs 15

Every run trains with the same budget from the same data and scores Score / HR@10 / NDCG@10.
Demo data: run.sh's recommended flags as the base, inference on the eval folder, evaluate.py's
metric. Public data (`--public FORMAT`, a convert_public.py folder): bench/public.py's
recommended configuration for that format as the base, a fixed number of epochs (no early
stopping), full ranking of the VALIDATION split with the input history masked (the test split is
left for bench/public.py's reported numbers). Prints a table and appends it to BENCHMARKS.md
with the command, date and machine.
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

BASE = ["--use_ctr", "--use_timefeat", "--use_rel_bias=1", "--norm_first", "--norm_type=rmsnorm",
        "--encoder_type=hstu", "--action_cond", "--maxlen", "64", "--lr", "2e-3"]
# name -> flags appended to BASE (later flags override earlier ones)
CONFIGS = {
    "base": [],
    "transformer": ["--encoder_type", "transformer"],
    "no_rel_bias": ["--use_rel_bias", "0"],
    "rope": ["--use_rope"],
    "no_time": ["--use_timefeat", "0"],
    "no_ctr": ["--use_ctr", "0", "--use_userctr", "0", "--use_itemctr", "0"],
    "no_mm": ["--mm_emb_id", "none"],
    "senet": ["--use_senet"],
    "id_dropout": ["--first_epoch_id_item_dropout"],
    "no_action_cond": ["--action_cond", "0"],
    "silu_attn": ["--hstu_attn", "silu"],
    "no_logq": ["--logq", "0"],
    "rank_listwise": ["--use_rankloss=1", "--rankloss_mode=listwise", "--lambda_rank", "0.6"],
    "rank_pairwise": ["--use_rankloss=1", "--rankloss_mode=pairwise", "--lambda_rank", "0.6"],
    "pkg_as_neg": ["--use_rankloss=1", "--rankloss_mode=listwise", "--lambda_rank", "0.6", "--rank_pkg_as_neg"],
    "hard_neg": ["--use_hard_neg"],
    "nce_fixed": ["--nce_weight_scheme", "fixed"],
    "nce_cb": ["--nce_weight_scheme", "cb"],
    "nce_focal": ["--nce_weight_scheme", "focal"],
    "two_tau": ["--two_tau", "--tau_click", "0.03", "--tau_expo", "0.05"],
    "neg_2048": ["--num_neg", "2048"],
    "seed_full": ["--use_rankloss=1", "--rankloss_mode=listwise", "--lambda_rank", "0.6", "--nce_weight_scheme",
                  "focal", "--two_tau", "--tau_click", "0.03", "--tau_expo", "0.05", "--first_epoch_id_item_dropout"],
}

# Public data: every run uses the full softmax of the base unless it says otherwise, so options
# that only act on sampled / in-batch negatives (logQ) are measured with --num_neg 256.
PUBLIC_CONFIGS = {
    "base": [],
    "transformer": ["--encoder_type", "transformer"],
    "rel_bias": ["--use_rel_bias", "1"],
    "rope": ["--use_rope"],
    "no_time": ["--use_timefeat", "0"],
    "senet": ["--use_senet"],
    "id_dropout": ["--first_epoch_id_item_dropout"],
    "silu_attn": ["--hstu_attn", "silu"],
    "unit_init": ["--emb_init_std", "1.0"],
    "rank_listwise": ["--use_rankloss=1", "--rankloss_mode=listwise", "--lambda_rank", "0.6"],
    "hard_neg": ["--use_hard_neg"],
    "neg_256": ["--num_neg", "256"],
    "neg_256_no_logq": ["--num_neg", "256", "--logq", "0"],
}


def public_run(name, flags, seed, data, out, epochs, fmt):
    """Train the public base + flags for a fixed number of epochs; full-ranking metrics on valid."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import public
    run = os.path.join(out, f"{name}_s{seed}")
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", public.CONFIGS[fmt], *flags, "--num_epochs",
                    str(epochs), "--valid_dir", "none", "--seed", str(seed), "--resume", "none"],
                   env=public.run_env(data, run), check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t0
    m = public.split_metrics(run, data, "valid", torch.device("cpu"))[0]
    m["train_s"] = train_s
    return m


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}"


def one_run(name, flags, seed, data, out, epochs):
    run = os.path.join(out, f"{name}_s{seed}")
    cache = os.path.join(out, "cache")
    env = dict(os.environ, TRAIN_DATA_PATH=os.path.join(data, "train"), EVAL_DATA_PATH=os.path.join(data, "eval"),
               TRAIN_LOG_PATH=os.path.join(run, "logs"), TRAIN_TF_EVENTS_PATH=os.path.join(run, "tb"),
               TRAIN_CKPT_PATH=os.path.join(run, "ckpt"), MODEL_OUTPUT_PATH=os.path.join(run, "ckpt"),
               USER_CACHE_PATH=cache, EVAL_RESULT_PATH=os.path.join(run, "result"))
    if not os.path.exists(os.path.join(cache, "ctr", "ctr_meta.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "precompute_ctr.py"), "--seq_path",
                        os.path.join(data, "train", "seq.jsonl"), "--output_dir", os.path.join(cache, "ctr"),
                        "--prior", "auto", "--k_clip", "10,10000"], env=env, check=True, stdout=subprocess.DEVNULL)
    hard = os.path.join(cache, "hard_negative_cache.pkl")
    if os.path.exists(hard):            # each run starts cold: no hard negatives from another seed
        os.remove(hard)
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *BASE, *flags, "--num_epochs", str(epochs),
                    "--seed", str(seed), "--resume", "none"], env=env, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - t0
    subprocess.run([sys.executable, os.path.join(ROOT, "infer.py")], env=env, check=True, stdout=subprocess.DEVNULL)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--result",
                          os.path.join(run, "result", "result.json"), "--ground_truth",
                          os.path.join(data, "eval", "ground_truth.jsonl")], env=env, check=True,
                         capture_output=True, text=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    m["train_s"] = train_s
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "demo"), help="demo data folder (train/, eval/)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"), help="run folder")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    p.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    p.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--public", choices=["movielens", "s3rec"], default=None,
                   help="--data is a convert_public.py folder of this format: public base, validation metrics")
    p.add_argument("--no_append", action="store_true", help="do not append to BENCHMARKS.md")
    a = p.parse_args()
    configs = PUBLIC_CONFIGS if a.public else CONFIGS
    if a.public and not os.path.exists(os.path.join(a.data, "valid", "ground_truth.jsonl")):
        raise SystemExit(f"error: {a.data}/valid/ground_truth.jsonl not found; run convert_public.py --out {a.data}")
    if not a.public and not os.path.exists(os.path.join(a.data, "train", "seq.jsonl")):
        subprocess.run([sys.executable, os.path.join(ROOT, "make_demo_data.py"), "--out", a.data], check=True)
    names = a.only.split(",") if a.only else list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"error: unknown configuration(s) {', '.join(unknown)}; expected some of {', '.join(configs)}")
    rows = []
    for name in names:
        ms = [public_run(name, configs[name], s, a.data, a.out, a.epochs, a.public) if a.public else
              one_run(name, configs[name], s, a.data, a.out, a.epochs) for s in range(a.seeds)]
        row = {"config": name, "flags": " ".join(configs[name]) or "(base)"}
        for k in ("Score", "HR@10", "NDCG@10", "train_s"):
            vals = [m[k] for m in ms]
            row[k] = statistics.mean(vals)
            row[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
        print(f"{name:<15} Score {row['Score']:.4f}±{row['Score_sd']:.4f}  HR@10 {row['HR@10']:.4f}  "
              f"NDCG@10 {row['NDCG@10']:.4f}  train {row['train_s']:.0f}s", flush=True)
    base = next((r["Score"] for r in rows if r["config"] == "base"), None)
    lines = ["| config | flags vs base | Score (mean ± sd) | vs base | HR@10 | NDCG@10 | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['Score'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['config']} | `{r['flags']}` | {r['Score']:.4f} ± {r['Score_sd']:.4f} | {rel} | "
                     f"{r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['train_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if not a.no_append:
        cmd = "python bench/ablation.py " + " ".join(sys.argv[1:])
        if a.public:
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            import public
            title, what = (f"Ablations on public data `{a.data}` ({a.public}, validation split)",
                           f"Base flags: `--config {os.path.relpath(public.CONFIGS[a.public], ROOT)}` with "
                           f"`--num_epochs {a.epochs}` and no early stopping; full ranking of the validation split, "
                           f"input history masked")
        else:
            title, what = "Ablations on demo data", (f"Base flags: `{' '.join(BASE)}`, {a.epochs} epochs; demo data "
                                                     f"from `make_demo_data.py` defaults")
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write(f"\n## {title} ({datetime.date.today()})\n\nCommand: `{cmd}`  \n"
                    f"Machine: {machine()}, CPU only. {what}; {a.seeds} seeds (0..{a.seeds - 1}).\n\n{table}\n")


if __name__ == "__main__":
    main()
