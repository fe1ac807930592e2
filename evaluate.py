"""Offline metrics for the TencentGR task and full-ranking benchmarks, plus reference baselines.

HR@K = 1[target in the top K], NDCG@K = 1/log2(rank + 1) for the target's 1-based rank within
the top K (else 0), both averaged over every user in the ground truth (a user missing from the
result counts as a miss). Score = 0.31 * HR@10 + 0.69 * NDCG@10 (docs/DATA_FORMAT.md).

    python evaluate.py --result result.json --ground_truth ground_truth.jsonl \
        [--k 10] [--train_dir DIR --eval_dir DIR]

prints a table (the model, and the most-popular / random baselines when the data folders are
given) and, as its last line, the model's metrics as JSON.

With the data folders it also splits the metrics by cold and warm targets (cold_warm_metrics): an
item is cold when no item record of the training seq.jsonl holds it, and a target is cold when
its creative is. Beside that: the share of cold targets, the share of recommended slots holding
cold items, catalogue coverage@K over the predict_set.jsonl pool, and HR@K by the target's
popularity tercile (training events; see pop_terciles for the tie rule).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from layout import ArgumentParser, DataError, iter_jsonl, load_pickle, os_error, read_json, show_json
from precompute_ctr import count_events

W_HR, W_NDCG = 0.31, 0.69


def _cid(x):
    """Creative ids compare as ints; JSON may carry them as numbers or digit strings."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return str(x)


def hr_ndcg(top_lists, user_list, gt, k=10):
    """{"HR@k", "NDCG@k", "Score", "users"} of per-user top lists against gt (user -> target).

    Averaged over all users of gt; a user absent from user_list scores 0; a repeated item in a
    top list is not counted twice (the target's rank is its first position); a repeated user
    keeps its first list. Score = 0.31 * HR@k + 0.69 * NDCG@k (the TAAC score at k = 10).
    """
    if len(top_lists) != len(user_list):
        raise DataError(f"result: {len(top_lists)} top lists for {len(user_list)} users")
    first = {}
    for u, top in zip(user_list, top_lists):
        first.setdefault(str(u), top)
    hr = ndcg = 0.0
    for u, target in gt.items():
        top = [_cid(x) for x in list(first.get(str(u), ()))[:k]]
        t = _cid(target)
        if t in top:
            hr += 1.0
            ndcg += 1.0 / math.log2(top.index(t) + 2)
    n = max(len(gt), 1)
    hr, ndcg = hr / n, ndcg / n
    return {f"HR@{k}": hr, f"NDCG@{k}": ndcg, "Score": W_HR * hr + W_NDCG * ndcg,
            "users": len(gt)}


def _at(r, k):
    """(HR@k, NDCG@k) of an array of 1-based ranks."""
    if r.size == 0:
        return 0.0, 0.0
    inside = r <= k
    return float(inside.mean()), float((inside / np.log2(np.where(inside, r, 1.0) + 1.0)).mean())


def metrics_from_ranks(ranks, ks=(10, 50, 200)):
    """HR@k and NDCG@k (1/log2(rank + 1) if rank <= k) for each k, and Score (at k = 10), from
    1-based target ranks (e.g. retrieval_torch.target_ranks); inf or a huge rank is a miss."""
    r = np.asarray(ranks, dtype=np.float64).ravel()
    if r.size and (np.isnan(r).any() or r.min() < 1):
        raise DataError("ranks must be 1-based (>= 1), got a value below 1 or NaN")
    out = {}
    for k in ks:
        out[f"HR@{k}"], out[f"NDCG@{k}"] = _at(r, k)
    hr, ndcg = _at(r, 10)
    out["Score"] = W_HR * hr + W_NDCG * ndcg
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _id_problem(v, what):
    """Why a parsed JSON value is not an id, or None. Ids are ints or digit strings (raw ids);
    user ids may also be other non-empty strings. Floats (5.0), booleans, null, arrays and
    objects are refused: str(5.0) or str(True) would silently never match."""
    if type(v) is int and (v >= 0 or what == "user id"):
        return None
    if what == "user id" and type(v) is str and v:
        return None
    if what == "creative id" and type(v) is str and v.strip().isascii() and v.strip().isdigit():
        return None
    kind = "a string or an int" if what == "user id" else "a non-negative int or a digit string"
    return f"is {show_json(v)}, expected a {what} ({kind})"


def read_ground_truth(path):
    """jsonl {"user_id": ..., "creative_id": ...} -> {raw user id str: creative id}.

    Every line must name a user (a string or an int) and a creative id (an int or a digit
    string); a file without any line is refused (a score over no users would read as 0)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected the ground_truth.jsonl file")
    gt = {}
    for n, rec in iter_jsonl(path, unique_keys=True):
        if not isinstance(rec, dict) or "user_id" not in rec or "creative_id" not in rec:
            raise DataError(f"{path}:{n}: expected an object with user_id and creative_id")
        for key, what in (("user_id", "user id"), ("creative_id", "creative id")):
            msg = _id_problem(rec[key], what)
            if msg is not None:
                raise DataError(f"{path}:{n}: {key} {msg}")
        u = str(rec["user_id"])
        if u in gt:
            raise DataError(f"{path}:{n}: user {u} appears twice; one target per user")
        gt[u] = _cid(rec["creative_id"])
    if not gt:
        raise DataError(f"{path}: no lines, expected one {{\"user_id\", \"creative_id\"}} object per line")
    return gt


def read_result(path):
    """result.json {"time": s, "top10s": [[...]], "user": [...]} -> (top10s, users, time).

    Users must be strings or ints, creative ids ints or digit strings: a float, a boolean, null
    or a nested list would never match the ground truth and score a silent 0, so it is refused
    with its index."""
    path = os.fspath(path)
    res = read_json(path, unique_keys=True)
    if not isinstance(res, dict) or "top10s" not in res or "user" not in res:
        raise DataError(f"{path}: expected an object with keys top10s and user")
    tops, users = res["top10s"], res["user"]
    if not isinstance(tops, list) or not isinstance(users, list):
        raise DataError(f"{path}: top10s and user must be lists")
    if len(tops) != len(users):
        raise DataError(f"{path}: {len(tops)} top lists but {len(users)} users")
    for i, u in enumerate(users):
        msg = _id_problem(u, "user id")
        if msg is not None:
            raise DataError(f"{path}: user[{i}] {msg}")
    for i, t in enumerate(tops):
        if not isinstance(t, list):
            raise DataError(f"{path}: top10s[{i}] is {type(t).__name__}, expected a list")
        for j, c in enumerate(t):
            msg = _id_problem(c, "creative id")
            if msg is not None:
                raise DataError(f"{path}: top10s[{i}][{j}] {msg}")
    return tops, [str(u) for u in users], res.get("time")


def coverage(users, gt, result_path, gt_path):
    """Refuse a result that answers none of the ground-truth users; warn (stderr) when it
    answers only some (the others count as misses), repeats users or holds only empty lists."""
    answered = set(users)
    hit = sum(u in answered for u in gt)
    if hit == 0:
        raise DataError(f"{result_path}: none of its {len(answered)} users is among the {len(gt)} users of "
                        f"{gt_path}; expected the same users (raw ids, as in predict_seq.jsonl)")
    if hit < len(gt):
        print(f"warning: {result_path}: answers {hit} of the {len(gt)} users of {gt_path}; the other "
              f"{len(gt) - hit} count as misses", file=sys.stderr)
    if len(answered) < len(users):
        print(f"warning: {result_path}: {len(users) - len(answered)} repeated users; each one's first "
              f"top list is scored", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def _indexer(train_dir, eval_dir):
    for d in (train_dir, eval_dir):
        p = os.path.join(d, "indexer.pkl")
        if os.path.isfile(p):
            ix = load_pickle(p)
            if not isinstance(ix, dict) or "i" not in ix or "u" not in ix:
                raise DataError(f"{p}: expected a dict with keys 'i' and 'u'")
            return ix
    raise DataError(f"{os.path.join(train_dir, 'indexer.pkl')}: file not found")


def predict_pool(eval_dir):
    """Candidate creative ids of eval_dir/predict_set.jsonl, in file order."""
    path = os.path.join(eval_dir, "predict_set.jsonl")
    pool = []
    for n, rec in iter_jsonl(path, unique_keys=True):
        if not isinstance(rec, dict) or "creative_id" not in rec:
            raise DataError(f"{path}:{n}: expected an object with creative_id")
        msg = _id_problem(rec["creative_id"], "creative id")
        if msg is not None:
            raise DataError(f"{path}:{n}: creative_id {msg}")
        pool.append(_cid(rec["creative_id"]))
    return pool


def predict_users(eval_dir, indexer):
    """Raw user id strings of eval_dir/predict_seq.jsonl, in file order (re-ids mapped back)."""
    path = os.path.join(eval_dir, "predict_seq.jsonl")
    reid2user = {v: str(u) for u, v in indexer["u"].items()}
    users = []
    for n, seq in iter_jsonl(path):
        if not isinstance(seq, list) or not seq or not isinstance(seq[0], list) or not seq[0]:
            raise DataError(f"{path}:{n}: expected a non-empty array of records [user_id, ...]")
        u = seq[0][0]
        if isinstance(u, bool) or not isinstance(u, (int, str)):
            raise DataError(f"{path}:{n}: user id {u!r} is neither a re-id int nor a raw string")
        users.append(u if isinstance(u, str) else reid2user.get(u, str(u)))
    return users


def item_popularity(train_dir: str, indexer: dict) -> dict:
    """{creative id: (clicks, events)} over the item records of train_dir/seq.jsonl, counted by
    precompute_ctr.count_events (streamed, every record checked). A click is action 1 (or a
    deeper action 2); a null action is an exposure."""
    c = count_events(os.path.join(train_dir, "seq.jsonl"))
    reid2cid = {v: _cid(cid) for cid, v in indexer["i"].items()}
    return {reid2cid[i]: (clicks, events) for i, clicks, events in
            zip(c["item_ids"].tolist(), c["item_clicks"].tolist(), c["item_events"].tolist()) if i in reid2cid}


def popular_list(pop: dict, pool, k=10) -> list:
    """The k items of pool with the most clicks in pop ({creative id: (clicks, events)}; events
    break ties, then the lower creative id)."""
    def rank_key(c):
        clicks, events = pop.get(c, (0, 0))
        return -clicks, -events, isinstance(c, str), c if isinstance(c, int) else 0, str(c)
    return sorted(dict.fromkeys(pool), key=rank_key)[:k]


def most_popular_topk(train_dir, eval_dir, k=10):
    """(top_lists, user_list): the k pool items with the most clicks (events break ties, then
    the lower creative id), the same list for every user of predict_seq.jsonl, in its order."""
    ix = _indexer(train_dir, eval_dir)
    pop = item_popularity(train_dir, ix)
    top = popular_list(pop, predict_pool(eval_dir), k)
    users = predict_users(eval_dir, ix)
    return [list(top) for _ in users], users


def random_expectation(gt, pool, k=10):
    """Expected HR@k / NDCG@k / Score of k distinct items drawn uniformly from the pool for each
    user (no RNG): a target in the pool lands at each of the k ranks with probability 1/|pool|."""
    pool = set(_cid(c) for c in pool)
    n = max(len(pool), 1)
    covered = sum(_cid(t) in pool for t in gt.values()) / max(len(gt), 1)
    hr = covered * min(k, n) / n
    ndcg = covered * sum(1.0 / math.log2(r + 1) for r in range(1, min(k, n) + 1)) / n
    return {f"HR@{k}": hr, f"NDCG@{k}": ndcg, "Score": W_HR * hr + W_NDCG * ndcg,
            "users": len(gt)}


# ---------------------------------------------------------------------------------------------
# Cold and warm items
# ---------------------------------------------------------------------------------------------

TERCILES = ("low", "mid", "high")


def pop_terciles(pool_counts):
    """(low_max, mid_max): the popularity tercile boundaries of a pool given as its items' counts
    (one per distinct item), or None for an empty pool.

    The counts are sorted ascending and the boundaries are the counts at 1-based ranks ceil(n/3)
    and ceil(2n/3). A count <= low_max is low, <= mid_max mid, else high. Tie rule:
    equal counts always share a tercile, the lower one, so the low tercile may hold more than a
    third of the pool and mid or high fewer (even none; with many cold items often so)."""
    c = sorted(pool_counts)
    if not c:
        return None
    n = len(c)
    return c[-(-n // 3) - 1], c[-(-2 * n // 3) - 1]


def _tercile(count, bounds):
    return TERCILES[0] if count <= bounds[0] else TERCILES[1] if count <= bounds[1] else TERCILES[2]


def cold_warm_metrics(top_lists, user_list, gt, train_counts, pool, k=10) -> dict:
    """Cold/warm split of one ranking, from in-memory data (no files, no torch).

    top_lists / user_list / gt as hr_ndcg (a repeated user keeps its first list); train_counts:
    {creative id: training event count} (an item missing or at 0 is cold); pool: the candidate
    creative ids (predict_set.jsonl). Returns
      "cold", "warm": hr_ndcg's dict over the users whose target is cold / warm (metrics None
          when the group has no user; a user without a list counts as a miss, as overall),
      "cold_target_share": cold targets / ground-truth users,
      "cold_slot_share": slots holding a cold item / all slots (None without any), where the
          slots are the first k entries of each user's list, for every user of the result
          (in the ground truth or not; a list shorter than k has fewer slots),
      "slots": that number of slots,
      "coverage@k": distinct pool items among the slots / distinct pool items (None for an
          empty pool; a recommended item outside the pool is not counted),
      "pool_size": distinct pool items, "pool_cold_items": the cold ones among them,
      "HR@k_by_pop_tercile": {"bounds": [low_max, mid_max] (pop_terciles), and per tercile
          {"HR@k", "users" (targets in it), "items" (pool items in it)}}; a target is placed by
          its own count, in the pool or not; None for an empty pool.
    """
    if len(top_lists) != len(user_list):
        raise DataError(f"result: {len(top_lists)} top lists for {len(user_list)} users")
    counts = {_cid(c): int(n) for c, n in train_counts.items()}
    first = {}
    for u, top in zip(user_list, top_lists):
        first.setdefault(str(u), top)
    hk, nk = f"HR@{k}", f"NDCG@{k}"
    ranks = {}
    for u, t in gt.items():
        top = [_cid(x) for x in list(first.get(str(u), ()))[:k]]
        t = _cid(t)
        ranks[u] = top.index(t) + 1 if t in top else math.inf

    def group(users):
        if not users:
            return {hk: None, nk: None, "Score": None, "users": 0}
        hr, ndcg = _at(np.array([ranks[u] for u in users], np.float64), k)
        return {hk: hr, nk: ndcg, "Score": W_HR * hr + W_NDCG * ndcg, "users": len(users)}

    def count(c):
        return counts.get(_cid(c), 0)

    cold = [u for u, t in gt.items() if count(t) <= 0]
    warm = [u for u, t in gt.items() if count(t) > 0]
    slots = cold_slots = 0
    shown = set()
    for top in first.values():
        top = [_cid(x) for x in list(top)[:k]]
        slots += len(top)
        cold_slots += sum(count(x) <= 0 for x in top)
        shown.update(top)
    items = list(dict.fromkeys(_cid(x) for x in pool))
    bounds = pop_terciles([count(x) for x in items])
    by_pop = None
    if bounds is not None:
        by_pop = {"bounds": list(bounds)}
        for name in TERCILES:
            sub = [u for u, t in gt.items() if _tercile(count(t), bounds) == name]
            by_pop[name] = {hk: group(sub)[hk], "users": len(sub),
                            "items": sum(_tercile(count(x), bounds) == name for x in items)}
    return {"cold": group(cold), "warm": group(warm),
            "cold_target_share": len(cold) / max(len(gt), 1),
            "cold_slot_share": cold_slots / slots if slots else None, "slots": slots,
            f"coverage@{k}": len(shown.intersection(items)) / len(items) if items else None,
            "pool_size": len(items), "pool_cold_items": sum(count(x) <= 0 for x in items),
            f"HR@{k}_by_pop_tercile": by_pop}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--result", required=True, help="result.json with top10s and user lists")
    ap.add_argument("--ground_truth", required=True,
                    help="jsonl of {user_id, creative_id}: one target per user")
    ap.add_argument("--k", type=int, default=10, help="cut-off K of HR@K / NDCG@K")
    ap.add_argument("--train_dir", help="training folder (seq.jsonl, indexer.pkl): adds the "
                                        "most-popular baseline, and the cold/warm split, cold slot "
                                        "share, coverage and HR by popularity tercile")
    ap.add_argument("--eval_dir", help="evaluation folder (predict_seq.jsonl, predict_set.jsonl)")
    return ap


def _num(v, width=9):
    return f"{v:{width}.4f}" if v is not None else f"{'-':>{width}s}"


def _print_table(rows, cold_warm, k):
    """The metrics table; with cold_warm ({row name: cold_warm_metrics}) the cold/warm rows under
    each named row, then slot share, coverage and HR by popularity tercile."""
    hk, nk = f"HR@{k}", f"NDCG@{k}"
    print(f"{'':18s} {hk:>9s} {nk:>9s} {'Score':>9s} {'users':>8s}")
    for name, m in rows:
        print(f"{name:18s} {_num(m[hk])} {_num(m[nk])} {_num(m['Score'])} {m['users']:8d}")
        for part in ("cold", "warm"):
            if name in cold_warm:
                g = cold_warm[name][part]
                print(f"{'  ' + part + ' targets':18s} {_num(g[hk])} {_num(g[nk])} {_num(g['Score'])} {g['users']:8d}")
    if not cold_warm:
        return
    first = next(iter(cold_warm.values()))
    print()
    print(f"{'':18s} {'cold slot share':>15s} {'coverage@' + str(k):>12s}" +
          "".join(f"{hk + ' ' + x + '-pop':>16s}" for x in TERCILES))
    for name, c in cold_warm.items():
        t = c[f"HR@{k}_by_pop_tercile"]
        print(f"{name:18s} {_num(c['cold_slot_share'], 15)} {_num(c[f'coverage@{k}'], 12)}" +
              "".join(_num(t[x][hk] if t else None, 16) for x in TERCILES))
    cold_n = first["cold"]["users"]
    total = cold_n + first["warm"]["users"]
    print(f"cold targets (no training event): {cold_n} of {total} users ({100 * first['cold_target_share']:.1f}%); "
          f"candidate pool: {first['pool_size']} items, {first['pool_cold_items']} of them cold")
    t = first[f"HR@{k}_by_pop_tercile"]
    if t:
        lo, mid = t["bounds"]
        print(f"popularity terciles of the pool by training events (equal counts share the lower tercile): "
              f"low <= {lo} ({t['low']['items']} items, {t['low']['users']} targets), "
              f"{lo} < mid <= {mid} ({t['mid']['items']} items, {t['mid']['users']} targets), "
              f"high > {mid} ({t['high']['items']} items, {t['high']['users']} targets)")


def main(argv=None):
    args = parser().parse_args(argv)
    cold_warm = {}
    try:
        if args.k < 1:
            raise DataError(f"--k must be >= 1, got {args.k}")
        if bool(args.train_dir) != bool(args.eval_dir):
            raise DataError("--train_dir and --eval_dir go together")
        gt = read_ground_truth(args.ground_truth)
        tops, users, _ = read_result(args.result)
        coverage(users, gt, args.result, args.ground_truth)
        empty = sum(not t for t in tops)
        if empty:
            print(f"warning: {args.result}: {empty} of {len(tops)} top lists are empty", file=sys.stderr)
        rows = [("model", hr_ndcg(tops, users, gt, args.k))]
        if args.train_dir:
            # one pass over seq.jsonl feeds the baseline and the cold/warm split
            ix = _indexer(args.train_dir, args.eval_dir)
            pop = item_popularity(args.train_dir, ix)
            pool = predict_pool(args.eval_dir)
            p_users = predict_users(args.eval_dir, ix)
            p_top = popular_list(pop, pool, args.k)
            p_tops = [list(p_top) for _ in p_users]
            hit = len(set(p_users) & set(gt))
            if hit < len(gt):
                print(f"warning: {os.path.join(args.eval_dir, 'predict_seq.jsonl')}: {hit} of the {len(gt)} users of "
                      f"{args.ground_truth} are among its users; the baselines count the other {len(gt) - hit} "
                      f"as misses", file=sys.stderr)
            rows.append(("most-popular", hr_ndcg(p_tops, p_users, gt, args.k)))
            rows.append(("random (expected)", random_expectation(gt, pool, args.k)))
            events = {c: e for c, (_, e) in pop.items()}
            cold_warm = {"model": cold_warm_metrics(tops, users, gt, events, pool, args.k),
                         "most-popular": cold_warm_metrics(p_tops, p_users, gt, events, pool, args.k)}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 2
    _print_table(rows, cold_warm, args.k)
    hk, nk = f"HR@{args.k}", f"NDCG@{args.k}"
    last = {k: rows[0][1][k] for k in (hk, nk, "Score", "users")}
    last.update(cold_warm.get("model", {}))
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
