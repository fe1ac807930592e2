"""End to end on generated data: demo data -> CTR -> train -> infer -> evaluate, plus
reproducibility, a non-default checkpoint round trip and a 2-process torchrun run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--hidden_units", "16", "--feat_dim", "8", "--num_blocks", "1", "--num_heads", "2", "--dqk", "8", "--dv", "8",
        "--maxlen", "20", "--batch_size", "32", "--num_neg", "32", "--num_workers", "0", "--log_every", "1"]


def run(cmd, env, check=True):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, TRAIN_DATA_PATH=str(d / "data/train"), EVAL_DATA_PATH=str(d / "data/eval"),
               USER_CACHE_PATH=str(d / "cache"), TRAIN_LOG_PATH=str(d / "log"), TRAIN_TF_EVENTS_PATH=str(d / "tb"),
               TRAIN_CKPT_PATH=str(d / "ckpt"), MODEL_OUTPUT_PATH=str(d / "ckpt"), EVAL_RESULT_PATH=str(d / "result"))
    run([PY, "make_demo_data.py", "--out", d / "data", "--users", "160", "--items", "150", "--eval_users", "40"], env)
    run([PY, "-u", "precompute_ctr.py", "--seq_path", d / "data/train/seq.jsonl", "--output_dir", d / "cache/ctr",
         "--prior", "auto", "--k_clip", "10,10000"], env)
    return d, env


def test_train_infer_evaluate(demo):
    d, env = demo
    run([PY, "main.py", "--num_epochs", "2", "--use_ctr", "--action_cond", "--use_rel_bias", *TINY], env)
    assert (d / "ckpt/global_step10/meta.json").exists() and (d / "log/train.log").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (d / "tb").iterdir())
    steps = [json.loads(l) for l in open(d / "log/train.log") if '"loss"' in l]
    # each loss term is logged beside the total, with throughput
    assert all(r["loss"] == pytest.approx(r["loss_nce"]) and r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
               for r in steps) and len(steps) == 10
    run([PY, "infer.py"], env)
    res = json.loads((d / "result/result.json").read_text())
    users = [json.loads(l)["user_id"] for l in open(d / "data/eval/ground_truth.jsonl")]
    assert res["user"] == users                               # predict_seq order, raw user ids
    pool = {json.loads(l)["creative_id"] for l in open(d / "data/eval/predict_set.jsonl")}
    assert all(len(set(t)) == 10 and set(t) <= pool for t in res["top10s"])
    for name in ("query.fbin", "embedding.fbin", "id.u64bin", "retrive_id2creative_id.json"):
        assert (d / "result" / name).exists()
    out = run([PY, "evaluate.py", "--result", d / "result/result.json", "--ground_truth",
               d / "data/eval/ground_truth.jsonl", "--train_dir", d / "data/train", "--eval_dir", d / "data/eval"], env)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["users"] == len(users) and 0 <= last["Score"] <= 1


def test_same_command_twice_gives_identical_weights(demo):
    """Default model flags, two threads, a DataLoader worker: bit-identical weights (README's promise;
    without deterministic kernels two such runs differed by up to 6e-7)."""
    d, env = demo
    sds = []
    for k in range(2):
        e = dict(env, TRAIN_CKPT_PATH=str(d / f"rep{k}"), OMP_NUM_THREADS="2")
        run([PY, "main.py", "--num_epochs", "1", "--use_ctr", "--first_epoch_id_item_dropout", "--batch_size", "32",
             "--num_workers", "1", "--log_every", "1"], e)
        final = max((d / f"rep{k}").glob("global_step*"), key=lambda p: int(p.name[len("global_step"):]))
        sds.append(torch.load(final / "model.pt", weights_only=True)["model"])
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_non_default_checkpoint_loads_without_flags(demo):
    d, env = demo
    e = dict(env, TRAIN_CKPT_PATH=str(d / "nd"), MODEL_OUTPUT_PATH=str(d / "nd"), EVAL_RESULT_PATH=str(d / "nd_res"))
    run([PY, "main.py", "--num_epochs", "1", "--encoder_type", "transformer", "--use_rope", "--use_senet",
         "--norm_type", "layernorm", "--use_timefeat", "0", "--mm_emb_id", "81", "82", "--two_tau",
         "--nce_weight_scheme", "focal", *TINY], e)
    run([PY, "infer.py", "--retrieval_backend", "faiss"], e)            # falls back to torch if faiss is absent
    assert len(json.loads((d / "nd_res/result.json").read_text())["top10s"]) == 40
    # the same item gets the same vector as a training target and as an inference candidate
    sys.path.insert(0, str(ROOT))
    import infer
    import dataset as D
    import dataset_packed as P
    import layout as L
    model, dcfg, _ = infer.load_model(str(d / "nd"), torch.device("cpu"))
    table, builder, indexer = infer.prepare_tables(dcfg, str(d / "data/eval"), str(d / "data/train"), str(d / "cache"))
    ds = D.SeqDataset(d / "data/train/seq.jsonl", L.read_offsets(d / "data/train/seq_offsets.pkl"), builder)
    batch = P.PackedCollate(table)([ds[0], ds[1]])
    with torch.no_grad():
        as_target = model.item_tower({k[4:]: v for k, v in batch.items() if k.startswith("pos_")})
        rows = [int(r) for r in batch["pos_id"]]
        as_cand = model.embed_items(table.gather(torch.tensor(rows).numpy(), "cand_"), "cand_")
    torch.testing.assert_close(as_target, as_cand)


@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(PY)), reason="torchrun not installed")
def test_torchrun_two_processes_train_and_infer(demo):
    d, env = demo
    e = dict(env, TRAIN_CKPT_PATH=str(d / "ddp"), MODEL_OUTPUT_PATH=str(d / "ddp"), EVAL_RESULT_PATH=str(d / "ddp_res"),
             OMP_NUM_THREADS="1")
    out = run([os.path.join(os.path.dirname(PY), "torchrun"), "--standalone", "--nproc_per_node", "2", "main.py",
               "--num_epochs", "1", "--use_ctr", *TINY], e)
    assert "world 2" in out.stdout and "effective batch 64" in out.stdout
    assert (d / "ddp/global_step3/meta.json").exists()
    run([PY, "infer.py"], e)
    assert len(json.loads((d / "ddp_res/result.json").read_text())["top10s"]) == 40


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_identical_weights(demo, sig):
    """Kill training at a random step, rerun the same command: the final weights equal those of
    an uninterrupted run (exact resume of model, optimizer, scheduler, RNGs and data position)."""
    import random
    import signal
    import time
    d, env = demo
    cmd = [PY, "main.py", "--num_epochs", "2", "--use_ctr", "--first_epoch_id_item_dropout", "--ckpt_every_steps", "1",
           "--gradient_accumulation_steps", "2", *TINY, "--batch_size", "16"]
    ref = dict(env, TRAIN_CKPT_PATH=str(d / f"ref_{sig}"), TRAIN_TF_EVENTS_PATH=str(d / f"tb_ref_{sig}"))
    run(cmd, ref)
    e = dict(env, TRAIN_CKPT_PATH=str(d / f"kill_{sig}"), TRAIN_TF_EVENTS_PATH=str(d / f"tb_kill_{sig}"))
    kill_at = random.Random(sig).randint(2, 8)
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (d / f"kill_{sig}/global_step{kill_at}/meta.json").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    p.send_signal(getattr(signal, sig))
    rc = p.wait(60)
    assert rc == (-9 if sig == "SIGKILL" else 143)      # SIGTERM: checkpoint, then the shell's code for it
    out = run(cmd, e)
    assert "resumed from" in out.stdout
    a = torch.load(d / f"ref_{sig}/global_step10/model.pt", weights_only=True)["model"]
    b = torch.load(d / f"kill_{sig}/global_step10/model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hard_negative_cache_persisted_reused_and_never_a_positive(demo):
    sys.path.insert(0, str(ROOT))
    import layout as L
    d, env = demo
    e = dict(env, TRAIN_CKPT_PATH=str(d / "hn"), USER_CACHE_PATH=str(d / "hn_cache"))
    shutil.copytree(d / "cache/ctr", d / "hn_cache/ctr")
    cmd = [PY, "main.py", "--num_epochs", "1", "--use_hard_neg", "--hard_neg_k", "4", "--hard_neg_refresh", "2",
           "--use_rankloss", "--rank_pkg_as_neg", *TINY]
    assert "new cache" in run(cmd, e).stdout
    saved = L.load_pickle(d / "hn_cache/hard_negative_cache.pkl")
    assert saved["source"]["seq"]["path"] == str(d / "data/train/seq.jsonl")
    cache = saved["items"]
    assert len(cache) > 50 and all(len(v) == 4 for v in cache.values())
    for line in open(d / "data/train/seq.jsonl"):
        recs = json.loads(line)
        u = recs[0][0]
        own = {r[1] for r in recs if r[1] is not None}
        assert not own & set(cache.get(u, []))
    assert "cached from a previous run" in run(cmd, dict(e, TRAIN_CKPT_PATH=str(d / "hn2"))).stdout


def test_skip_bad_records_counts_and_logs_skipped_lines(demo):
    import pickle
    d, env = demo
    bad = d / "bad_train"
    shutil.copytree(d / "data/train", bad)
    lines = (bad / "seq.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = b'{"not": "an array"}\n'
    (bad / "seq.jsonl").write_bytes(b"".join(lines))
    offsets = [sum(len(l) for l in lines[:i]) for i in range(len(lines))]
    (bad / "seq_offsets.pkl").write_bytes(pickle.dumps(offsets))
    e = dict(env, TRAIN_DATA_PATH=str(bad), TRAIN_CKPT_PATH=str(d / "skip_ck"), TRAIN_LOG_PATH=str(d / "skip_log"))
    strict = run([PY, "main.py", "--num_epochs", "1", *TINY], e, check=False)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr and "seq.jsonl:3" in strict.stderr
    out = run([PY, "main.py", "--num_epochs", "2", "--skip_bad_records", *TINY], e)
    assert "skipped 1 bad line(s)" in out.stdout
    logged = (d / "skip_log/skipped_records.txt").read_text().splitlines()
    assert len(logged) == 1 and "seq.jsonl:3" in logged[0]


def test_length_bucketing_sampler_is_a_shuffled_partition():
    """Each rank's epoch is its shard of one permutation; batches hold similar lengths; same
    (seed, epoch) -> same order; a resumed position continues the same order."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from dataset_packed import EpochSampler
    n, bs = 1003, 16
    lengths = np.random.default_rng(0).integers(1, 500, n)
    plain = [EpochSampler(n, 2, r, seed=3) for r in range(2)]
    buck = [EpochSampler(n, 2, r, seed=3, batch_size=bs, lengths=lengths, bucket=8) for r in range(2)]
    for r in range(2):
        got = list(buck[r])
        assert sorted(got) == sorted(plain[r])                 # the same shard, reordered
        assert got == list(EpochSampler(n, 2, r, seed=3, batch_size=bs, lengths=lengths, bucket=8))
        spread = np.mean([np.ptp(lengths[got[i:i + bs]]) for i in range(0, len(got) - bs, bs)])
        naive = np.mean([np.ptp(lengths[list(plain[r])[i:i + bs]]) for i in range(0, len(got) - bs, bs)])
        assert spread < naive / 3
        buck[r].set_epoch(0, start=5 * bs)
        assert list(buck[r]) == got[5 * bs:]
    buck[0].set_epoch(0)
    buck[1].set_epoch(0)
    assert set(buck[0]) | set(buck[1]) == set(range(n))
    first = list(buck[0])
    buck[0].set_epoch(1)
    assert list(buck[0]) != first                              # a new order each epoch


def test_trimmed_batch_gives_the_same_loss(demo):
    """PackedCollate drops the left padding all samples share: the loss (and the last-position
    query) equal those of the untrimmed batch."""
    d, env = demo
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import dataset as D
    import dataset_packed as P
    import config
    import main as M
    from model import GenerativeRecommender
    from objectives import Trainer
    cfg = D.DataConfig(maxlen=200, use_userctr=True, use_itemctr=True, mm_emb_id=["81"])
    cfg, table, builder, seq, offsets = D.load_train_data(d / "data/train", cfg, d / "cache", str(d / "cache/ctr"))
    counts, head_min = D.load_item_pop(d / "data/train", str(d / "cache/ctr"), seq, d / "cache", cfg.num_items)
    table.set_popularity(counts, head_min)
    builder = D.SequenceBuilder(cfg, table, {}, strict_items=True, rank_packages=True)
    ds = D.SeqDataset(seq, offsets, builder, train=True, seed=0)
    samples = [ds[i] for i in range(6)]
    args = M.get_args(["--use_ctr", "--use_rel_bias", "--use_rankloss=1", "--action_cond", "--maxlen", "200",
                       "--hidden_units", "16", "--feat_dim", "8", "--dqk", "8", "--dv", "8", "--num_heads", "2",
                       "--dropout_rate", "0"])
    run_cfg = config.from_args(args)
    torch.manual_seed(0)
    model = GenerativeRecommender(run_cfg.model, cfg).eval()
    log_pop = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(counts)))).float()
    trainer = Trainer(model, run_cfg.objective, log_pop, cfg.num_items, 0.1)
    negs = P.sample_negatives(table, 16, cfg.num_items, torch.Generator().manual_seed(0))
    out = []
    for trim in (True, False):
        batch = P.PackedCollate(table, trim=trim)(samples)
        batch.update(negs)
        total, parts, last = trainer(batch)
        assert set(parts) == {"nce", "rank"}
        torch.testing.assert_close(total, parts["nce"] + 0.5 * parts["rank"])     # --lambda_rank 0.5
        out.append((batch["token_type"].shape[1], total, last))
    assert out[0][0] < out[1][0] == 201                       # something was trimmed
    torch.testing.assert_close(out[0][1], out[1][1])
    torch.testing.assert_close(out[0][2], out[1][2])


def test_candidates_keep_features_only_for_cold_items(demo):
    d, _ = demo
    sys.path.insert(0, str(ROOT))
    import dataset_packed as P
    lines = [json.loads(l) for l in open(d / "data/eval/predict_set.jsonl")]
    known = {lines[0]["creative_id"], lines[2]["creative_id"]}
    cids, rids, feats = P.read_candidates(d / "data/eval", known)
    assert cids.tolist() == [o["creative_id"] for o in lines]
    assert [f is None for f in feats] == [o["creative_id"] in known for o in lines]
    assert feats[1] == (lines[1]["features"] or {})
