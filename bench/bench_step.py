"""Training throughput at the official TAAC baseline's size on real TencentGR sample data: where a
step's time goes, and main.py's own samples/s, optionally beside another revision of the code.

    python bench/bench_step.py --shared DIR [--repeats 3] [--ref REV]

Data: the real TencentGR_1k fragment (88 users' sequences, their items' features, the 32-wide
multimodal vectors; DIR holds it as distributed: seq_head88.jsonl, seq_offsets.pkl, indexer.pkl,
creative_emb/emb_81_32/part-00000_head479) written 10 times over into a temporary training folder
(880 users): read from DIR, never copied into the repository. Size: d = 32, one block, one head,
maxlen 101, one sampled negative, batch 128 (the baseline's), main.py's defaults otherwise.

Profile (main.py's loop body with a timer around each phase, in a fresh process per run; with
--ref, this script runs inside REV's code too, alternating with the working tree's):
  loader wait    time blocked on the DataLoader (main.py's worker count)
  batch prep     shared negatives, the batch's tensors to the device
  forward        the encoder (model.encode: item tower over the history, blocks)
  loss           the rest of Trainer.forward: target and negative towers, InfoNCE
  backward       loss.backward()
  optimiser      gradient clipping, AdamW, schedule, zero_grad
Reported as ms per step (median over the timed steps of all runs) and share of the step. The
profile process sets up as main.py does on the CPU (deterministic algorithms; the allocator
setting of training.keep_freed_memory where the code has it).

Throughput: main.py itself, as a user runs it (fresh process, its worker, no validation),
samples/s = users trained / wall time between the first and the last log line (so start-up and
the first step are left out). With --ref REV the same command also runs on REV's code (a `git
archive` of it in a temporary folder), interleaved run by run with the working tree's, and the
table gives both medians side by side.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import benchlib as B
import layout as L
import training as TR

SIZE = ["--hidden_units", "32", "--num_blocks", "1", "--num_heads", "1", "--dqk", "32", "--dv", "32",
        "--maxlen", "101", "--num_neg", "1", "--batch_size", "128"]


def taac_x10(shared, out, copies=10):
    """A training folder of the real 88-line fragment written `copies` times (offsets, features
    rebuilt from the records, indexer and vectors linked); returns its path."""
    d = os.path.join(out, "train")
    if os.path.exists(os.path.join(d, "seq_offsets.pkl")):
        return d
    for name in ("seq_head88.jsonl", "indexer.pkl", "seq_offsets.pkl"):
        if not os.path.isfile(os.path.join(shared, name)):
            raise L.DataError(f"{shared}/{name}: not found, expected the TencentGR_1k sample (--shared)")
    shutil.rmtree(d, ignore_errors=True)                               # an earlier, unfinished build
    os.makedirs(os.path.join(d, "creative_emb", "emb_81_32"))
    with open(os.path.join(shared, "seq_head88.jsonl"), "rb") as f:
        lines = [ln.rstrip(b"\n") + b"\n" for ln in f.read().splitlines() if ln.strip()]
    offsets, pos, feats = [], 0, {}
    with open(os.path.join(d, "seq.jsonl"), "wb") as f:
        for _ in range(copies):
            for ln in lines:
                offsets.append(pos)
                f.write(ln)
                pos += len(ln)
    for ln in lines:
        for r in json.loads(ln):
            if r[1] is not None:
                feats[str(r[1])] = r[3]
    L.dump_json(feats, os.path.join(d, "item_feat_dict.json"))
    os.symlink(os.path.join(shared, "indexer.pkl"), os.path.join(d, "indexer.pkl"))
    os.symlink(os.path.join(shared, "creative_emb", "emb_81_32", "part-00000_head479"),
               os.path.join(d, "creative_emb", "emb_81_32", "part-00000"))
    L.dump_pickle(offsets, os.path.join(d, "seq_offsets.pkl"))          # last: marks the folder complete
    return d


def profile(train, cache, flags, steps, warmup):
    """ms per phase of each timed step (dict of lists) and the step's samples."""
    s = B.build_training(flags, train, cache)
    m, loop = s.model, s.cfg.loop
    phases = {k: [] for k in ("loader wait", "batch prep", "forward", "loss", "backward", "optimiser")}
    enc_time = []
    encode = m.encode

    def timed_encode(batch):
        t = time.perf_counter()
        h = encode(batch)
        enc_time.append(time.perf_counter() - t)
        return h
    m.encode = timed_encode
    s.trainer.train()
    it = iter(s.loader)
    n = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:                                  # a new epoch, as main.py starts one
            it = iter(s.loader)
            batch = next(it)
        t1 = time.perf_counter()
        s.negatives.add(batch)
        batch.pop("_items", None)
        batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
        t2 = time.perf_counter()
        enc_time.clear()
        loss, parts, last = s.trainer(batch)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(m.parameters(), loop.clip_norm)
        s.opt.step()
        s.sched.step()
        s.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i >= warmup:
            n += len(batch["user_id"])
            for k, v in zip(phases, (t1 - t0, t2 - t1, enc_time[0], t3 - t2 - enc_time[0], t4 - t3, t5 - t4)):
                phases[k].append(1e3 * v)
    return phases, n


def main_py_rate(code_dir, train, cache, flags, epochs, n_users, env_base):
    """(overall, per-step) samples/s of `python main.py` in code_dir, from its train.log with a
    line per step: overall = users trained after the first step over the time from the first
    line to the last (epoch starts and checkpoints included); per-step = the median of the
    lines' own samples/s."""
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        env = dict(env_base, TRAIN_DATA_PATH=train, USER_CACHE_PATH=cache, TRAIN_LOG_PATH=os.path.join(tmp, "log"),
                   TRAIN_TF_EVENTS_PATH=os.path.join(tmp, "tb"), TRAIN_CKPT_PATH=os.path.join(tmp, "ckpt"))
        r = subprocess.run([sys.executable, "main.py", *flags, "--num_epochs", str(epochs), "--valid_users", "0",
                            "--log_every", "1"], cwd=code_dir, env=env, capture_output=True, text=True)
        if r.returncode:
            raise L.DataError(f"main.py in {code_dir} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        with open(os.path.join(tmp, "log", "train.log")) as f:
            recs = [x for x in map(json.loads, f) if "samples_per_s" in x]
    bs = int(flags[flags.index("--batch_size") + 1])
    overall = (epochs * n_users - bs) / max(recs[-1]["elapsed_s"] - recs[0]["elapsed_s"], 1e-9)
    return overall, statistics.median(x["samples_per_s"] for x in recs)


def seeded_run(code_dir, train, cache, flags, env_base):
    """One seeded main.py run with validation (4 epochs, 100 held-out users): (the log's losses,
    its validation records, every tensor of the last checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="bench_step_same_") as tmp:
        env = dict(env_base, TRAIN_DATA_PATH=train, USER_CACHE_PATH=cache, TRAIN_LOG_PATH=os.path.join(tmp, "log"),
                   TRAIN_TF_EVENTS_PATH=os.path.join(tmp, "tb"), TRAIN_CKPT_PATH=os.path.join(tmp, "ckpt"))
        r = subprocess.run([sys.executable, "main.py", *flags, "--num_epochs", "4", "--valid_users", "100",
                            "--log_every", "1", "--seed", "0"], cwd=code_dir, env=env, capture_output=True, text=True)
        if r.returncode:
            raise L.DataError(f"main.py in {code_dir} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        with open(os.path.join(tmp, "log", "train.log")) as f:
            recs = [json.loads(ln) for ln in f]
        steps = sorted(int(d.rsplit("global_step", 1)[1]) for d in os.listdir(os.path.join(tmp, "ckpt"))
                       if d.startswith("global_step"))
        ck = torch.load(os.path.join(tmp, "ckpt", f"global_step{steps[-1]}", "model.pt"), map_location="cpu",
                        weights_only=True)
    losses = [x["loss"] for x in recs if "loss" in x]
    valid = [{k: v for k, v in x.items() if k.startswith("valid_")} for x in recs if any(k.startswith("valid_") for k in x)]
    return losses, valid, {k: v for k, v in ck["model"].items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", required=True,
                   help="the TencentGR_1k sample folder (seq_head88.jsonl, seq_offsets.pkl, indexer.pkl, creative_emb/)")
    p.add_argument("--work", default="/tmp/bench_step", help="folder for the x10 training folder and caches")
    p.add_argument("--steps", type=int, default=14, help="timed steps of the profile")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the profile")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each main.py throughput run (7 steps each)")
    p.add_argument("--repeats", type=int, default=3, help="main.py runs per code version (the median is reported)")
    p.add_argument("--ref", default=None, help="a git revision to run beside the working tree (before/after)")
    p.add_argument("--flags", default="", help="extra main.py flags for every run (shlex-split)")
    p.add_argument("--profile_runs", type=int, default=2, help="phase-profile processes per code version, alternating")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the profile and of the main.py runs (OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--same_run", action="store_true",
                   help="with --ref: one seeded run with validation on each version, compared (losses, validation, weights)")
    p.add_argument("--profile_json", default=None, help=argparse.SUPPRESS)   # child mode: profile only, to this file
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args()
    flags = SIZE + shlex.split(a.flags)
    train = taac_x10(a.shared, a.work)
    cache = os.path.join(a.work, "cache")
    if a.profile_json:
        torch.use_deterministic_algorithms(True)              # as main.py sets up the process on the CPU
        if hasattr(TR, "keep_freed_memory"):                  # (absent before it existed)
            TR.keep_freed_memory()
        if a.threads:
            torch.set_num_threads(a.threads)
        phases, n = profile(train, cache, flags, a.steps, a.warmup)
        L.dump_json({"phases": phases, "samples": n}, a.profile_json)
        return
    versions = {"working tree": B.ROOT}
    if a.ref:
        tmp = tempfile.mkdtemp(prefix="bench_step_ref_")
        archive = subprocess.run(["git", "-C", B.ROOT, "archive", a.ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        shutil.copy(os.path.abspath(__file__), os.path.join(tmp, "bench", "bench_step.py"))
        rev = subprocess.run(["git", "-C", B.ROOT, "rev-parse", "--short", a.ref], capture_output=True, text=True,
                             check=True).stdout.strip()
        versions = {f"{a.ref} ({rev})": tmp, **versions}
    sections = []
    if a.profile_runs:
        phases = {k: {} for k in versions}
        for r in range(a.profile_runs):
            for name, code in versions.items():
                out = os.path.join(a.work, "profile.json")
                subprocess.run([sys.executable, os.path.join(code, "bench", "bench_step.py"), "--shared", a.shared,
                                "--work", a.work, "--steps", str(a.steps), "--warmup", str(a.warmup), "--flags",
                                a.flags, "--threads", str(a.threads), "--profile_json", out], check=True)
                got = L.read_json(out)
                for k, v in got["phases"].items():
                    phases[name].setdefault(k, []).extend(v)
                print(f"profile run {r + 1} {name}: {sum(statistics.median(v) for v in got['phases'].values()):.0f} "
                      f"ms per step", flush=True)
        med = {name: {k: statistics.median(v) for k, v in ph.items()} for name, ph in phases.items()}
        names = list(versions)
        rows = []
        for k in med[names[0]]:
            rows.append([k] + [f"{med[n][k]:.1f} ({100 * med[n][k] / sum(med[n].values()):.0f}%)" for n in names])
        totals = [sum(med[n].values()) for n in names]
        rows.append(["step (sum of the medians)"] + [f"{t:.1f} = {128e3 / t:.0f} samples/s" for t in totals])
        if len(names) == 2:
            rows.append(["ratio (ref / working tree)", "", f"{totals[0] / totals[1]:.2f}x"])
        threads = a.threads or torch.get_num_threads()
        sections.append(f"Phase profile (in-process, main.py's loop body with a timer per phase; {threads} torch "
                        f"thread(s); {a.profile_runs} processes per version x {a.steps} steps after {a.warmup} "
                        f"untimed): median ms per step and share.\n\n"
                        + B.table_md(["phase"] + names, rows))
        print(sections[-1], flush=True)
    if a.same_run and len(versions) == 2:
        runs = {name: seeded_run(code, train, cache, flags, dict(os.environ)) for name, code in versions.items()}
        (n0, (l0, v0, w0)), (n1, (l1, v1, w1)) = runs.items()
        dl = max(abs(x - y) for x, y in zip(l0, l1))
        dw = max(float((w0[k].double() - w1[k].double()).abs().max()) for k in w0 if w0[k].is_floating_point())
        same_w = w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
        last = lambda v: ", ".join(f"{k[6:]} {x:.4f}" for k, x in v[-1].items() if k in ("valid_HR@10", "valid_NDCG@10",
                                                                                          "valid_HR@200"))
        rows = [["training losses (one per step)", f"{len(l0)} / {len(l1)}", "identical" if l0 == l1 else
                 f"max abs difference {dl:.1e}"],
                ["validation records", f"{len(v0)} / {len(v1)}", "identical" if v0 == v1 else
                 f"differ; last: {last(v0)} vs {last(v1)}"],
                ["weights of the last checkpoint", f"{len(w0)} tensors", "bit-identical" if same_w else
                 f"max abs difference {dw:.1e}"]]
        sections.append(f"The same seeded run (`--seed 0 --num_epochs 4 --valid_users 100`) on {n0} and {n1}:\n\n"
                        + B.table_md(["what", "count", "comparison"], rows))
        print(sections[-1], flush=True)
    if a.repeats > 0:
        n_users = len(L.read_offsets(os.path.join(train, "seq_offsets.pkl")))
        rates = {k: [] for k in versions}
        for r in range(a.repeats):
            for name, code in versions.items():
                env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
                rates[name].append(main_py_rate(code, train, cache, flags, a.epochs, n_users, env))
                print(f"run {r + 1} {name}: {rates[name][-1][0]:.1f} samples/s overall, {rates[name][-1][1]:.1f} "
                      f"per step (median)", flush=True)
        med = {name: [statistics.median(x[i] for x in v) for i in (0, 1)] for name, v in rates.items()}
        rows = [[name, f"{med[name][0]:.1f}", f"{med[name][1]:.1f}", " / ".join(f"{x[0]:.1f}" for x in v),
                 " / ".join(f"{x[1]:.1f}" for x in v)] for name, v in rates.items()]
        if len(versions) == 2:
            (_, m0), (_, m1) = med.items()
            rows.append(["ratio (working tree / ref)", f"{m1[0] / m0[0]:.2f}x", f"{m1[1] / m0[1]:.2f}x", "", ""])
        sections.append(f"main.py samples/s ({a.threads or 'default'} torch threads; {a.epochs} epochs of {n_users} "
                        f"users per run, no validation, a log line "
                        f"per step; runs interleaved). Overall: users after the first step over the time from the "
                        f"first log line to the last (epoch starts and checkpoints included); per step: median of "
                        f"the log lines' samples/s.\n\n"
                        + B.table_md(["code", "overall samples/s (median of runs)",
                                      "per-step samples/s (median of runs)", "overall, runs", "per step, runs"], rows))
        print(sections[-1])
    body = (f"Real TencentGR_1k fragment x 10 (880 users, {a.work}), flags `{' '.join(flags)}` (main.py defaults "
            f"otherwise: HSTU, time features, 1 loader worker), CPU fp32.\n\n" + "\n\n".join(sections)
            + "\n\n" + B.load_line())
    if not a.no_record:
        B.append_benchmarks("Training step at the official baseline's size, TencentGR sample (bench/bench_step.py)", body)


if __name__ == "__main__":
    L.run_cli(main)
