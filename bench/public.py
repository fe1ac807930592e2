"""Public benchmark: convert a dataset, train with validation-based selection, score the test split.

    python bench/public.py --format s3rec --input PATH/s3rec-Beauty --out runs/beauty [--seeds 2]
    python bench/public.py --format movielens --input PATH/ml-100k --out runs/ml100k --name hstu -- --encoder_type hstu
    python bench/public.py --format movielens --input PATH/ml-100k --out runs/ml100k-cold --cold_items 0.2 \
        -- --config cold

With --cold_items a share of the items is made cold (convert_public.py's protocol: no event on them
in training, still candidates, with their content vector) and the table adds cold/warm targets and
the content-only baseline (bench/content_baseline.py) beside the model. Semantic ids
(precompute_sid.py) are computed into each run's cache whenever the converted data has content
vectors, so `-- --use_sid 1` finds them.

Protocol (docs/BENCHMARKS_PROTOCOL.md): leave-one-out split (convert_public.py), full ranking over every
item with the user's input history masked, ties counted against the target; the checkpoint is
chosen on validation NDCG@10 (main.py keeps best.json, stops early with --patience), never on
test. Arguments after `--` go to main.py and override the recommended configuration.
Writes DIR/result_test.json (harness format, top-10) per seed and prints a table plus one last
JSON line with the mean test metrics.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The recommended configuration of each data family is a config file (configs/s3rec.toml,
# configs/movielens.toml: chosen on Beauty's and ml-100k's validation splits; the reasons are in
# the files); flags after `--` override it.
CONFIGS = {"s3rec": os.path.join(ROOT, "configs", "s3rec.toml"), "movielens": os.path.join(ROOT, "configs", "movielens.toml")}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["movielens", "s3rec"], required=True, help="input family")
    p.add_argument("--input", required=True, help="dataset folder (or S3Rec .txt file)")
    p.add_argument("--out", required=True, help="output folder (converted data, runs, results)")
    p.add_argument("--seeds", type=int, default=1, help="train and score this many seeds (0, 1, ...)")
    p.add_argument("--first_seed", type=int, default=0, help="seeds run from this one")
    p.add_argument("--name", default="recommended",
                   help="label of this configuration in the output (and of its run folders)")
    p.add_argument("--no_mask_history", action="store_true", help="do not mask the input history when ranking")
    p.add_argument("--cold_items", type=float, default=0.0,
                   help="convert with this share of the items made cold (convert_public.py --cold_items)")
    p.add_argument("--cold_seed", type=int, default=0, help="seed of the cold items' draw (convert_public.py --seed)")
    p.add_argument("main_args", nargs="*", help="extra main.py flags (after --)")
    return p.parse_args()


def run_env(data, run):
    """main.py's environment for one run: train folder of DATA, logs/checkpoints/cache under RUN."""
    return dict(os.environ, TRAIN_DATA_PATH=os.path.join(data, "train"), TRAIN_LOG_PATH=os.path.join(run, "logs"),
                TRAIN_TF_EVENTS_PATH=os.path.join(run, "tb"), TRAIN_CKPT_PATH=os.path.join(run, "ckpt"),
                USER_CACHE_PATH=os.path.join(run, "cache"))


def split_metrics(run, data, split, device, mask_history=True, top_k=0):
    """Full-ranking metrics of RUN's checkpoint (best.json's pick) on DATA/split (with top_k,
    infer.evaluate_folder's (metrics, users, top-k ids)), and the checkpoint's path."""
    import infer
    model, data_cfg, path = infer.load_model(os.path.join(run, "ckpt"), device)
    folder, train = os.path.join(data, split), os.path.join(data, "train")
    table, _, _ = infer.prepare_tables(data_cfg, folder, train, os.path.join(run, "cache"))
    infer.attach_young(model, table)
    trained = model.item_trained.cpu().numpy() if hasattr(model, "item_trained") else None
    return infer.evaluate_folder(model, data_cfg, table, folder, train, device, mask_history=mask_history,
                                 top_k=top_k, trained=trained), path


def test_metrics(run, data, out_json, mask_history):
    """Score the test split with the validation-selected checkpoint; write result_test.json."""
    import torch

    import layout as L
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    (m, users, top10s), path = split_metrics(run, data, "test", device, mask_history, top_k=10)
    L.dump_json({"time": 0, "top10s": top10s, "user": users}, out_json)
    return m, path


def main():
    a = get_args()
    data = os.path.join(a.out, "data")
    if not os.path.exists(os.path.join(data, "test", "ground_truth.jsonl")):
        cold = ["--cold_items", str(a.cold_items), "--seed", str(a.cold_seed)] if a.cold_items else []
        subprocess.run([sys.executable, os.path.join(ROOT, "convert_public.py"), "--format", a.format,
                        "--input", a.input, "--out", data, *cold], check=True)
    rows = []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        run = os.path.join(a.out, f"{a.name}_seed{seed}")
        env = run_env(data, run)
        if os.path.isdir(os.path.join(data, "train", "creative_emb")):
            subprocess.run([sys.executable, os.path.join(ROOT, "precompute_sid.py"), "--data_dir",
                            os.path.join(data, "train"), "--output_dir", os.path.join(run, "cache", "sid"), "--reuse"],
                           check=True, env=env)
        cmd = [sys.executable, "-u", os.path.join(ROOT, "main.py"), "--config", CONFIGS[a.format], "--seed", str(seed),
               "--valid_dir", os.path.join(data, "valid"), *a.main_args]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        m, path = test_metrics(run, data, os.path.join(run, "result_test.json"),
                               not a.no_mask_history)
        m["checkpoint"] = os.path.relpath(path, a.out)
        rows.append(m)
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    summary = {"dataset": a.format, "input": a.input, "config": a.name, "seeds": a.seeds}
    print(f"\n{'metric':<10} {'mean':>8} {'std':>8}")
    for k in keys:
        vals = [r[k] for r in rows]
        mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary[k], summary[k + "_std"] = round(mean, 5), round(std, 5)
        print(f"{k:<10} {mean:>8.4f} {std:>8.4f}")
    if a.cold_items:
        summary["content_only"] = content_baseline(data)
        print("content-only baseline (test): " + "  ".join(f"{k} {v:.4f}" for k, v in summary["content_only"].items()))
    print(json.dumps(summary))


def content_baseline(data) -> dict:
    """bench/content_baseline.py's test HR@10 / NDCG@10, all / cold / warm, and the random HR@10."""
    import content_baseline as CB
    from layout import load_pickle
    train = os.path.join(data, "train")
    indexer = load_pickle(os.path.join(train, "indexer.pkl"))
    cands, users = CB.read_split(os.path.join(data, "test"), indexer)
    rank = CB.ranks(cands, users, CB.load_vectors(train, "81"))
    cold = CB.np.array([tgt not in indexer["i"] for _, tgt in users])
    out = {}
    for name, sel in (("", CB.np.ones(len(users), bool)), ("cold_", cold), ("warm_", ~cold)):
        out[f"{name}HR@10"], out[f"{name}NDCG@10"] = CB.metrics(rank[sel])
    out["random_HR@10"] = 10 / len(cands)
    return out


if __name__ == "__main__":
    main()
