"""Content-only baseline on a converted folder: rank every candidate by the cosine between its
content vector and the mean of the user's history content vectors; HR@10 / NDCG@10 overall, on
cold targets (target not in the training indexer) and on warm ones, beside the random expectation.

    python convert_public.py --format movielens --input PATH/ml-100k --out data/ml100k-cold --cold_items 0.2
    python bench/content_baseline.py --data data/ml100k-cold [--split test]

Numpy only (no torch). Reads DATA/train/indexer.pkl and the content vectors
DATA/train/creative_emb/emb_{fid}_*.pkl, and DATA/SPLIT/predict_seq.jsonl (histories: every item
event, re-ids or raw creative ids), predict_set.jsonl (the candidates) and ground_truth.jsonl.
Protocol (BENCHMARKS_PROTOCOL.md): full ranking over the candidates, the user's history items
masked (--no_mask keeps them), ties counted against the target. A candidate without a vector
scores 0; a user without any history vector scores every candidate 0 (so ranks the target last
among its ties). Random expectation: HR@10 = 10 / candidates, NDCG@10 = HR@10's share spread
evenly over ranks 1..10.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from layout import ArgumentParser, DataError, iter_jsonl, load_pickle, run_cli  # noqa: E402


def load_vectors(train_dir, fid):
    """{creative id: float64 vector} from train/creative_emb/emb_{fid}_*.pkl (pickled dicts)."""
    d = os.path.join(train_dir, "creative_emb")
    files = sorted(n for n in os.listdir(d) if n.startswith(f"emb_{fid}_") and n.endswith(".pkl")) \
        if os.path.isdir(d) else []
    if not files:
        raise DataError(f"{d}: no emb_{fid}_*.pkl; convert with --content on (or --cold_items)")
    vecs = {}
    for name in files:
        path = os.path.join(d, name)
        table = load_pickle(path)
        if not isinstance(table, dict):
            raise DataError(f"{path}: a pickled {type(table).__name__}, expected a dict creative id -> vector")
        for cid, v in table.items():
            a = np.asarray(v, np.float64).reshape(-1)
            if type(cid) is not int or a.size == 0 or not np.isfinite(a).all():
                raise DataError(f"{path}: creative id {cid!r}: expected an int key and a finite vector")
            vecs[cid] = a
    dims = {len(v) for v in vecs.values()}
    if len(dims) != 1:
        raise DataError(f"{d}: feature {fid} vectors have several lengths {sorted(dims)}, expected one")
    return vecs


def read_split(split_dir, indexer):
    """(candidate creative ids, [(history creative ids, target creative id)]) of one split."""
    cands = [obj["creative_id"] if isinstance(obj, dict) and type(obj.get("creative_id")) is int
             else _bad(split_dir, "predict_set.jsonl", n, "an object with an int creative_id")
             for n, obj in iter_jsonl(os.path.join(split_dir, "predict_set.jsonl"))]
    gt = {}
    for n, obj in iter_jsonl(os.path.join(split_dir, "ground_truth.jsonl")):
        if not isinstance(obj, dict) or type(obj.get("creative_id")) is not int or "user_id" not in obj:
            _bad(split_dir, "ground_truth.jsonl", n, "an object with user_id and an int creative_id")
        gt[str(obj["user_id"])] = obj["creative_id"]
    inv_u = {v: k for k, v in indexer["u"].items()}
    inv_i = {v: k for k, v in indexer["i"].items()}
    n_items, users = len(indexer["i"]), []
    for n, line in iter_jsonl(os.path.join(split_dir, "predict_seq.jsonl")):
        if not isinstance(line, list) or not line or not all(isinstance(r, list) and len(r) == 6 for r in line):
            _bad(split_dir, "predict_seq.jsonl", n, "a list of 6-element records")
        u = line[0][0]
        raw = inv_u.get(u) if type(u) is int else u
        hist = [inv_i.get(r[1]) if 0 < r[1] <= n_items else r[1] for r in line if type(r[1]) is int]
        if str(raw) in gt:
            users.append(([h for h in hist if h is not None], gt[str(raw)]))
    if not users:
        raise DataError(f"{split_dir}: no user of predict_seq.jsonl has a line in ground_truth.jsonl")
    return cands, users


def _bad(split_dir, name, lineno, expected):
    raise DataError(f"{os.path.join(split_dir, name)}:{lineno}: expected {expected}")


def ranks(cands, users, vecs, mask=True, batch=512):
    """1-based rank of each user's target among the candidates (ties against the target; a
    target outside the candidates or masked as a history item gets len(cands) + 1)."""
    dim = len(next(iter(vecs.values())))
    C = np.zeros((len(cands), dim))
    for r, c in enumerate(cands):
        if c in vecs:
            C[r] = vecs[c] / max(np.linalg.norm(vecs[c]), 1e-12)
    row = {c: r for r, c in enumerate(cands)}
    out = np.empty(len(users), np.int64)
    for b in range(0, len(users), batch):
        part = users[b:b + batch]
        Q = np.zeros((len(part), dim))
        for q, (hist, _) in enumerate(part):
            hv = [vecs[h] for h in hist if h in vecs]
            if hv:
                m = np.mean(hv, axis=0)
                n = np.linalg.norm(m)
                Q[q] = m / n if n > 0 else 0.0
        S = Q @ C.T
        for q, (hist, tgt) in enumerate(part):
            s = S[q]
            if mask:
                s[[row[h] for h in set(hist) if h in row]] = -np.inf
            t = row.get(tgt)
            if t is None or s[t] == -np.inf:
                out[b + q] = len(cands) + 1
            else:
                out[b + q] = int((s >= s[t]).sum())   # itself and every tie above it
    return out


def metrics(rank, k=10):
    hit = rank <= k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 1), 0.0)
    return float(hit.mean()) if len(rank) else float("nan"), float(ndcg.mean()) if len(rank) else float("nan")


def parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder written by convert_public.py (train/, valid/, test/)")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="which split to score")
    p.add_argument("--fid", default="81", help="multimodal feature id of the content vectors")
    p.add_argument("--no_mask", action="store_true", help="keep the user's history items among the candidates")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    train = os.path.join(args.data, "train")
    indexer = load_pickle(os.path.join(train, "indexer.pkl"))
    if not isinstance(indexer, dict) or not {"u", "i"} <= indexer.keys():
        raise DataError(f"{train}/indexer.pkl: expected a dict with 'u' and 'i'")
    vecs = load_vectors(train, args.fid)
    cands, users = read_split(os.path.join(args.data, args.split), indexer)
    rank = ranks(cands, users, vecs, mask=not args.no_mask)
    cold = np.array([tgt not in indexer["i"] for _, tgt in users])
    n = len(cands)
    rnd_hr = 10 / n
    rnd_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / n
    print(f"{args.data} {args.split}: {len(users)} users ({int(cold.sum())} cold targets), {n} candidates "
          f"({sum(c not in indexer['i'] for c in cands)} cold), {len(vecs)} content vectors")
    print(f"{'targets':<8} {'users':>6} {'HR@10':>8} {'NDCG@10':>8}")
    for name, sel in (("all", np.ones(len(users), bool)), ("cold", cold), ("warm", ~cold)):
        hr, ndcg = metrics(rank[sel])
        print(f"{name:<8} {int(sel.sum()):>6} {hr:>8.4f} {ndcg:>8.4f}")
    print(f"{'random':<8} {'':>6} {rnd_hr:>8.4f} {rnd_ndcg:>8.4f}")


if __name__ == "__main__":
    run_cli(main)
