"""Loader throughput: the official TAAC baseline's data path against the packed loader, and
end-to-end training samples/s of the recommended configuration.

    python bench/bench_loader.py [--data /tmp/bench_demo] [--repeats 3]

Baseline-style (a re-implementation of the official baseline's MyDataset + collate_fn +
BaselineModel.feat2tensor, kept to its structure): per sample, parse the line, build one
Python dict per position for the sequence, the next-item target and a random negative
(fill_missing_feat: every user/item feature id filled in, multimodal vectors looked up by
creative id in a {cid: ndarray} dict, _random_neq negatives); collate stacks the id arrays and
keeps the dicts; then, in the main process, each feature of seq / pos / neg is turned into a
tensor by loops over samples and positions (feat2tensor), as the official model's forward does.
It also carries per-position actions and timestamps, so it holds what the packed batch holds:
item ids, every sparse/array feature, multimodal vectors, actions, timestamps, next-item targets.

Packed (dataset.SeqDataset + dataset.PackedCollate in DataLoader workers): numpy arrays per
sample, one table gather per distinct item; the training process only adds the shared sampled
negatives (dataset.sample_negatives), as main.py does. It computes more than the baseline
(time features, CTR values, 512 negatives instead of one per position).

Both run on the same users with 0, 1 and 2 workers; batches/s is the median over --repeats runs
of --batches batches each, timed after the first batch (worker start-up excluded). Before
timing, a parity check confirms both give the same item ids, features, mm vectors and targets.
End-to-end: main.py's loop body (packed loader with main.py's default worker count, sampled
negatives, forward, backward, clip, AdamW step) on the same data, in samples/s.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import benchlib as B
import dataset as D
import dataset_packed as P
import layout as L


class BaselineDataset(torch.utils.data.Dataset):
    """The official baseline's MyDataset: per-position feature dicts, filled and padded per sample.

    Feature ids come from the schema derived for the packed loader (the official code hard-codes
    the same competition ids), so both loaders carry the same features.
    """

    def __init__(self, data_dir, cfg, mm_emb_ids):
        self.data_dir, self.maxlen = data_dir, cfg.maxlen
        self.data_file, self.pid = None, None
        self.seq_offsets = L.read_offsets(os.path.join(data_dir, "seq_offsets.pkl"))
        with open(os.path.join(data_dir, "item_feat_dict.json")) as f:
            self.item_feat_dict = json.load(f)
        indexer = L.load_pickle(os.path.join(data_dir, "indexer.pkl"))
        self.itemnum, self.usernum = len(indexer["i"]), len(indexer["u"])
        self.indexer_i_rev = {v: k for k, v in indexer["i"].items()}
        emb_dir = os.path.join(data_dir, "creative_emb")
        self.mm_emb_dict = {fid: {cid: vec for cid, vec, _ in D.iter_mm_vectors(emb_dir, fid)} for fid in mm_emb_ids}
        self.feature_types = {"user_sparse": list(cfg.user_sparse), "item_sparse": list(cfg.item_sparse),
                              "user_array": list(cfg.user_array), "item_array": list(cfg.item_array),
                              "item_emb": list(mm_emb_ids), "user_continual": [], "item_continual": []}
        self.feature_default_value = {}
        for t in ("user_sparse", "item_sparse"):
            self.feature_default_value.update({k: 0 for k in self.feature_types[t]})
        for t in ("user_array", "item_array"):
            self.feature_default_value.update({k: [0] for k in self.feature_types[t]})
        for k in mm_emb_ids:
            self.feature_default_value[k] = np.zeros(len(next(iter(self.mm_emb_dict[k].values()))), np.float32)

    def __len__(self):
        return len(self.seq_offsets)

    def _load_user_data(self, uid):
        # one handle per process: the official opens it once in __init__ and runs without workers;
        # forked workers sharing that handle's file offset would read each other's lines
        if self.data_file is None or self.pid != os.getpid():
            self.data_file, self.pid = open(os.path.join(self.data_dir, "seq.jsonl"), "rb"), os.getpid()
        self.data_file.seek(self.seq_offsets[uid])
        return json.loads(self.data_file.readline())

    def _random_neq(self, lo, hi, s):
        t = np.random.randint(lo, hi)
        while t in s or str(t) not in self.item_feat_dict:
            t = np.random.randint(lo, hi)
        return t

    def fill_missing_feat(self, feat, item_id):
        if feat is None:
            feat = {}
        filled = {k: v for k, v in feat.items()}
        all_ids = [k for ids in self.feature_types.values() for k in ids]
        for k in set(all_ids) - set(feat.keys()):
            filled[k] = self.feature_default_value[k]
        for k in self.feature_types["item_emb"]:
            if item_id != 0 and self.indexer_i_rev[item_id] in self.mm_emb_dict[k]:
                filled[k] = self.mm_emb_dict[k][self.indexer_i_rev[item_id]]
        return filled

    def __getitem__(self, uid):
        ext = []
        for u, i, user_feat, item_feat, act, ts in self._load_user_data(uid):
            if u and user_feat:
                ext.insert(0, (u, user_feat, 2, act, ts))
            if i and item_feat:
                ext.append((i, item_feat, 1, act, ts))
        n = self.maxlen + 1
        seq, pos, neg = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        token_type, next_token_type = np.zeros(n, np.int32), np.zeros(n, np.int32)
        action, next_action, tstamp = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64)
        seq_feat, pos_feat, neg_feat = (np.empty(n, dtype=object) for _ in range(3))
        nxt, idx = ext[-1], self.maxlen
        ts_set = {r[0] for r in ext if r[2] == 1 and r[0]}
        for rec in reversed(ext[:-1]):
            i, feat, type_, act, t = rec
            next_i, next_feat, next_type, next_act, _ = nxt
            seq[idx], token_type[idx], next_token_type[idx] = i, type_, next_type
            # the official passes the user id here too and so looks up an item vector for the
            # user token (a KeyError when the user re-id exceeds the item count); 0 skips it
            seq_feat[idx] = self.fill_missing_feat(feat, i if type_ == 1 else 0)
            if type_ == 1:
                action[idx], tstamp[idx] = (act or 0) + 1, t
            if next_act is not None:
                next_action[idx] = next_act
            if next_type == 1 and next_i != 0:
                pos[idx] = next_i
                pos_feat[idx] = self.fill_missing_feat(next_feat, next_i)
                neg_id = self._random_neq(1, self.itemnum + 1, ts_set)
                neg[idx] = neg_id
                neg_feat[idx] = self.fill_missing_feat(self.item_feat_dict[str(neg_id)], neg_id)
            nxt = rec
            idx -= 1
            if idx == -1:
                break
        seq_feat = np.where(seq_feat == None, self.feature_default_value, seq_feat)  # noqa: E711
        pos_feat = np.where(pos_feat == None, self.feature_default_value, pos_feat)  # noqa: E711
        neg_feat = np.where(neg_feat == None, self.feature_default_value, neg_feat)  # noqa: E711
        return (seq, pos, neg, token_type, next_token_type, next_action, action, tstamp,
                seq_feat, pos_feat, neg_feat)

    @staticmethod
    def collate_fn(batch):
        cols = list(zip(*batch))
        ids = [torch.from_numpy(np.array(c)) for c in cols[:8]]
        return (*ids, list(cols[8]), list(cols[9]), list(cols[10]))


def feat2tensor(seq_feature, k, is_array):
    """The official BaselineModel.feat2tensor: one feature of a [B][T] list of dicts -> tensor."""
    batch_size = len(seq_feature)
    if is_array:
        max_array_len, max_seq_len = 0, 0
        for i in range(batch_size):
            seq_data = [item[k] for item in seq_feature[i]]
            max_seq_len = max(max_seq_len, len(seq_data))
            max_array_len = max(max_array_len, max(len(x) for x in seq_data))
        data = np.zeros((batch_size, max_seq_len, max_array_len), dtype=np.int64)
        for i in range(batch_size):
            for j, item_data in enumerate(item[k] for item in seq_feature[i]):
                n = min(len(item_data), max_array_len)
                data[i, j, :n] = item_data[:n]
        return torch.from_numpy(data)
    max_seq_len = max(len(seq_feature[i]) for i in range(batch_size))
    data = np.zeros((batch_size, max_seq_len), dtype=np.int64)
    for i in range(batch_size):
        data[i] = [item[k] for item in seq_feature[i]]
    return torch.from_numpy(data)


def mm2tensor(seq_feature, k, dim):
    """The official feat2emb's multimodal loop: one [T, dim] slot at a time."""
    data = np.zeros((len(seq_feature), len(seq_feature[0]), dim), dtype=np.float32)
    for i, seq in enumerate(seq_feature):
        for j, item in enumerate(seq):
            if k in item:
                data[i, j] = item[k]
    return torch.from_numpy(data)


def baseline_tensors(ds, batch):
    """What the official model's forward builds from a batch before any embedding lookup:
    feat2emb(seq, include_user=True), feat2emb(pos), feat2emb(neg)."""
    seq, pos, neg, token_type, next_token_type, next_action, action, ts, seq_feat, pos_feat, neg_feat = batch
    ft = ds.feature_types
    out = {"seq": seq, "pos": pos, "neg": neg, "token_type": token_type, "next_token_type": next_token_type,
           "next_action": next_action, "action": action, "ts": ts}
    for name, feats, with_user in (("seq", seq_feat, True), ("pos", pos_feat, False), ("neg", neg_feat, False)):
        groups = [("item_sparse", False), ("item_array", True)]
        if with_user:
            groups += [("user_sparse", False), ("user_array", True)]
        for g, is_array in groups:
            for k in ft[g]:
                out[f"{name}_{k}"] = feat2tensor(feats, k, is_array)
        for k in ft["item_emb"]:
            out[f"{name}_mm_{k}"] = mm2tensor(feats, k, len(ds.feature_default_value[k]))
    return out


def parity(s, bds, users):
    """Both loaders hold the same item ids, features, mm vectors, actions, timestamps and targets."""
    packed = P.PackedCollate(s.table, trim=False)([s.ds[u] for u in users])  # the baseline keeps all padding
    base = baseline_tensors(bds, bds.collate_fn([bds[u] for u in users]))
    tt = packed["token_type"].numpy()
    item = tt == L.ITEM_TOKEN
    seq_rows = packed["seq_id"].numpy()[packed["seq_inv"].numpy()]
    assert np.array_equal(base["token_type"].numpy() == 1, item), "item positions differ"
    assert np.array_equal(base["seq"].numpy()[item], seq_rows[item]), "history item ids differ"
    sp = packed["seq_sparse"].numpy()[packed["seq_inv"].numpy()]
    for j, k in enumerate(s.cfg.data.item_sparse):
        assert np.array_equal(base[f"seq_{k}"].numpy()[item], sp[..., j][item]), f"item feature {k} differs"
    for fid in s.cfg.data.mm_emb_id:
        mm = packed[f"seq_mm_{fid}"].numpy()[packed["seq_inv"].numpy()]
        assert np.allclose(base[f"seq_mm_{fid}"].numpy()[item], mm[item]), f"mm {fid} differs"
    assert np.array_equal(base["action"].numpy()[item], packed["action"].numpy()[item]), "actions differ"
    assert np.array_equal(base["ts"].numpy()[item], packed["ts"].numpy()[item]), "timestamps differ"
    tgt = item & (base["pos"].numpy() > 0)
    assert np.array_equal(base["pos"].numpy()[tgt], packed["pos_row"].numpy()[tgt]), "targets differ"
    return int(item.sum())


def time_loader(make_iter, step, batches):
    """batches/s of one run: `batches` batches after a first, untimed one (worker start-up)."""
    it = make_iter()
    step(next(it))
    t = time.perf_counter()
    for _ in range(batches):
        step(next(it))
    return batches / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/bench_demo", help="demo data folder (made by make_demo_data.py if absent)")
    p.add_argument("--cache", default="/tmp/bench_cache", help="USER_CACHE_PATH for CTR priors and mm tables")
    p.add_argument("--batch_size", type=int, default=128, help="users per batch (the baseline's and main.py's default)")
    p.add_argument("--batches", type=int, default=4, help="timed batches per run of the baseline-style loader")
    p.add_argument("--packed_batches", type=int, default=12, help="timed batches per run of the packed loader")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (the median is reported)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--train_steps", type=int, default=3, help="timed optimizer steps per end-to-end run")
    p.add_argument("--mm_emb_id", nargs="*", default=["81"], help="multimodal features both loaders carry")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and sampling")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    train = B.ensure_demo(a.data)
    B.ensure_ctr(train, a.cache)
    s = B.build_training(B.RECOMMENDED + ["--mm_emb_id", *a.mm_emb_id, "--batch_size", str(a.batch_size),
                                          "--seed", str(a.seed)], train, a.cache)
    bds = BaselineDataset(train, s.cfg.data, [str(x) for x in a.mm_emb_id])
    checked = parity(s, bds, list(range(0, len(s.ds), max(1, len(s.ds) // 16)))[:16])
    print(f"parity: {checked} item positions of 16 users identical in both loaders")

    def base_iter(w):
        return lambda: iter(torch.utils.data.DataLoader(bds, batch_size=a.batch_size, shuffle=True, num_workers=w,
                                                        collate_fn=bds.collate_fn, worker_init_fn=P.seed_worker))

    def packed_iter(w):
        return lambda: iter(B.packed_loader(s, w, a.batch_size))
    rates = {(kind, w): [] for w in a.workers for kind in ("baseline", "packed")}
    for r in range(a.repeats):          # interleaved, so load from other processes hits all alike
        for w in a.workers:
            rates["baseline", w].append(time_loader(base_iter(w), lambda batch: baseline_tensors(bds, batch),
                                                    a.batches))
            rates["packed", w].append(time_loader(packed_iter(w), lambda batch: B.add_negatives(s, batch),
                                                  a.packed_batches))
            print(f"run {r + 1}, {w} workers: baseline {rates['baseline', w][-1]:.2f}, packed "
                  f"{rates['packed', w][-1]:.2f} batches/s", flush=True)
    rows, res = [], {}
    for w in a.workers:
        b_all, k_all = rates["baseline", w], rates["packed", w]
        b, k = B.med(b_all), B.med(k_all)
        res[w] = (b, k)
        rows.append([w, B.fmt(b, 2), B.fmt(k, 2), f"{k / b:.1f}x", B.fmt(b * a.batch_size, 0),
                     B.fmt(k * a.batch_size, 0), " / ".join(f"{x:.2f}" for x in b_all),
                     " / ".join(f"{x:.2f}" for x in k_all)])
        print(rows[-1], flush=True)

    e2e = []
    for _ in range(a.repeats):
        it = iter(B.packed_loader(s, s.cfg.loop.num_workers, a.batch_size))
        B.train_step(s, B.add_negatives(s, next(it)))
        t = time.perf_counter()
        for _ in range(a.train_steps):
            B.train_step(s, B.add_negatives(s, next(it)))
        e2e.append(a.train_steps * a.batch_size / (time.perf_counter() - t))
        del it
    print(f"end-to-end samples/s: {e2e}")

    best_base = max(b for b, _ in res.values())
    best_packed = max(k for _, k in res.values())
    body = (f"Demo data `{a.data}` (make_demo_data.py defaults: {len(s.ds)} users, {s.cfg.data.num_items} items, "
            f"maxlen {s.cfg.data.maxlen}), batch {a.batch_size}, multimodal {a.mm_emb_id}. Baseline-style = the "
            f"official baseline's per-position feature dicts, tensorised feature by feature in the main process "
            f"(feat2tensor); packed = dataset.SeqDataset + PackedCollate in workers, plus main.py's sampled negatives. "
            f"Parity checked on {checked} item positions. Median of {a.repeats} runs ({a.batches} baseline / "
            f"{a.packed_batches} packed batches each, after one untimed batch); per-run rates in the last columns.\n\n"
            + B.table_md(["workers", "baseline batches/s", "packed batches/s", "packed / baseline",
                          "baseline samples/s", "packed samples/s", "baseline runs", "packed runs"], rows)
            + f"\n\nBest packed ({best_packed:.2f} batches/s) over best baseline ({best_base:.2f}): "
              f"**{best_packed / best_base:.1f}x** (goal >= 5x).\n\n"
              f"End-to-end training (recommended flags `{' '.join(B.RECOMMENDED)}`, defaults otherwise: HSTU "
              f"d={s.cfg.model.hidden_units}, {s.cfg.model.num_blocks} blocks, {s.cfg.objective.num_neg} sampled negatives, "
              f"{s.cfg.loop.num_workers} loader worker): **{B.med(e2e):.1f} samples/s** (median of {a.repeats} runs of "
              f"{a.train_steps} steps; runs {', '.join(f'{x:.1f}' for x in e2e)}); the loader alone delivers "
              f"{res.get(s.cfg.loop.num_workers, (0, 0))[1] * a.batch_size:.0f} samples/s, so training is compute-bound.\n"
              + B.load_line())
    print(body)
    if not a.no_record:
        B.append_benchmarks("Loader: baseline-style vs packed (bench/bench_loader.py)", body)


if __name__ == "__main__":
    L.run_cli(main)
