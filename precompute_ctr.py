r"""Precompute smoothed user and item CTR features (feature ids 150/151) and item popularity.

Streams the training seq.jsonl once (memory grows with the number of users and items, not
events), counts clicks c and events n per user and per item over item records (the profile
record, item_reid null, is ignored; a null action_type is an exposure; action >= 1, click or
conversion, is a click), fits a Beta(alpha, beta) prior per side by the method of moments, and
stores the shrunk rate p = (c + alpha) / (n + alpha + beta), optionally as logit(p), then
standardised over the side's entities: z = (x - mean) / std.

Outputs in --output_dir (atomic writes; ctr_meta.json last; one run at a time: a second is refused,
or with --reuse waits and then reuses):
  user_ctr.json, item_ctr.json  {"<reid>": [clicks, events, z]}, entities with >= 1 event
  ctr_meta.json                 {"user": {alpha, beta, logit, mean, std, prior_value, ...},
                                 "item": {...}, "k_clip", "seq_path", "num_users", ...}
  item_pop.json                 {"head_quantile": q, "head_min_count": H, "counts": {...}}
ctr_value(c, n, meta[side]) reproduces the stored z exactly; the training reader uses it for a
leave-one-out value, ctr_value(c - is_click, n - 1, meta[side]). Uses numpy and layout.py; no
torch import. Records are checked by layout.record_problem, like every other reader.

  python -u precompute_ctr.py --seq_path $TRAIN_DATA_PATH/seq.jsonl \
      --output_dir $USER_CACHE_PATH/ctr --prior auto --k_clip 10,10000 --logit
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from layout import (ArgumentParser, DataError, check_writable, dump_json, file_fingerprint, json_type, own_folder,
                    read_json, record_problem, run_cli, same_source)

# The moments fit uses entities with at least MIN_EVENTS events (rates of 1-4 events are mostly
# binomial noise and would inflate the variance); if fewer than MIN_ENTITIES qualify, all
# entities with >= 1 event are used instead.
MIN_EVENTS = 5
MIN_ENTITIES = 10
STD_FLOOR = 1e-6  # all entities equal -> z = 0 instead of a division by zero
MEAN_EPS = 1e-6  # keeps alpha, beta > 0 when nobody (or everybody) clicks, so logit stays finite
FLUSH_RECORDS = 1 << 21
TABLE_FILES = {"user": "user_ctr.json", "item": "item_ctr.json"}
META_FILE = "ctr_meta.json"
ITEM_POP_FILE = "item_pop.json"


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

class _Counts:
    """Clicks and events per id, kept as sorted unique ids: memory grows with distinct ids, and
    a stray huge id cannot trigger a huge dense allocation."""

    def __init__(self):
        self.ids = np.zeros(0, np.int64)
        self.n = np.zeros(0, np.int64)
        self.c = np.zeros(0, np.int64)

    def add(self, ids, clicked):
        if len(ids) == 0:
            return
        uniq, inv = np.unique(ids, return_inverse=True)
        n = np.bincount(inv, minlength=len(uniq))
        c = np.bincount(inv[clicked], minlength=len(uniq))
        ids = np.concatenate([self.ids, uniq])
        order = np.argsort(ids, kind="stable")  # two sorted runs: timsort merges in linear time
        ids = ids[order]
        start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        self.ids = ids[start]
        self.n = np.add.reduceat(np.concatenate([self.n, n])[order], start)
        self.c = np.add.reduceat(np.concatenate([self.c, c])[order], start)


def count_events(seq_path, skip_bad=False):
    """Stream seq.jsonl and count clicks and events per user and per item.

    Returns a dict: user_ids, user_clicks, user_events, item_ids, item_clicks, item_events
    (int64 arrays, ids ascending, entities with >= 1 item event), num_lines, bad_lines,
    bad_records, first_bad (the first skipped problem's message, or None).
    A bad line (not JSON, not an array) or record raises DataError("<file>:<line>: ...");
    with skip_bad the line, or only the bad record inside a valid array, is skipped and counted.
    """
    path = os.fspath(seq_path)
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, expected the training seq.jsonl file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found, expected the training seq.jsonl")
    users, items = _Counts(), _Counts()
    ub, ib, kb = [], [], []
    num_lines = bad_lines = bad_records = 0
    first_bad = None

    def flush():
        clicked = np.asarray(kb, bool)
        users.add(np.asarray(ub, np.int64), clicked)
        items.add(np.asarray(ib, np.int64), clicked)
        ub.clear()
        ib.clear()
        kb.clear()

    with open(path, "rb") as f:
        bar = tqdm(f, desc="seq.jsonl", unit=" lines", disable=not sys.stderr.isatty())
        for lineno, raw in enumerate(bar, 1):
            num_lines = lineno
            msg = None
            if not raw.strip():
                msg = "empty line, expected a JSON array of records"
            else:
                try:
                    recs = json.loads(raw)
                except ValueError as e:
                    msg = f"invalid JSON ({str(e)[:80]}), expected a JSON array of records"
                else:
                    if type(recs) is not list:
                        msg = f"line is a JSON {json_type(recs)}, expected a JSON array of records"
            if msg is not None:
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: {msg}")
                bad_lines += 1
                first_bad = first_bad or f"{path}:{lineno}: {msg}"
                continue
            for k, rec in enumerate(recs, 1):
                msg = record_problem(rec, f"record {k} of {len(recs)}", raw_user_ids=False)
                if msg is not None:
                    if not skip_bad:
                        raise DataError(f"{path}:{lineno}: {msg}")
                    bad_records += 1
                    first_bad = first_bad or f"{path}:{lineno}: {msg}"
                    continue
                if rec[1] is None:  # the user profile record
                    continue
                ub.append(rec[0])
                ib.append(rec[1])
                kb.append(rec[4] is not None and rec[4] >= 1)
            if len(ub) >= FLUSH_RECORDS:
                flush()
    flush()
    return {"user_ids": users.ids, "user_clicks": users.c, "user_events": users.n,
            "item_ids": items.ids, "item_clicks": items.c, "item_events": items.n,
            "num_lines": num_lines, "bad_lines": bad_lines, "bad_records": bad_records,
            "first_bad": first_bad}


# ---------------------------------------------------------------------------------------------
# Prior, shrinkage, standardisation
# ---------------------------------------------------------------------------------------------

def fit_beta_prior(clicks, events, k_clip=(10.0, 10000.0), min_events=MIN_EVENTS,
                   min_entities=MIN_ENTITIES):
    """Method-of-moments Beta prior over per-entity rates c/n.

    Uses entities with n >= min_events, or every entity with n >= 1 when fewer than
    min_entities qualify. m = mean rate, v = population variance (ddof 0);
    k = alpha + beta = m(1-m)/v - 1 (v <= 0 -> k = k_clip[1]), clipped to k_clip;
    alpha = m k, beta = (1 - m) k. m is clipped to [MEAN_EPS, 1 - MEAN_EPS].
    Returns {"alpha", "beta", "k_raw", "m", "v", "n_fit"}.
    """
    c = np.asarray(clicks, np.float64)
    n = np.asarray(events, np.float64)
    keep = n >= min_events
    if keep.sum() < min_entities:
        keep = n >= 1
    if not keep.any():
        raise DataError("no item events to fit a CTR prior on, expected at least one "
                                "item record in seq.jsonl (or use --prior A,B)")
    rate = c[keep] / n[keep]
    m = float(np.clip(rate.mean(), MEAN_EPS, 1.0 - MEAN_EPS))
    v = float(rate.var())
    k_raw = m * (1.0 - m) / v - 1.0 if v > 0 else float("inf")
    k = float(np.clip(k_raw, k_clip[0], k_clip[1]))
    return {"alpha": m * k, "beta": (1.0 - m) * k, "k_raw": k_raw, "m": m, "v": v,
            "n_fit": int(keep.sum())}


def _transform(clicks, events, alpha, beta, logit):
    p = (np.asarray(clicks, np.float64) + alpha) / (np.asarray(events, np.float64) + alpha + beta)
    return np.log(p) - np.log1p(-p) if logit else p


def ctr_value(clicks, events, stats):
    """Standardised shrunk CTR for counts (numpy arrays or scalars, broadcast).

    stats is one side of ctr_meta.json (meta["user"] or meta["item"]). (0, 0) gives the prior
    value; a leave-one-out value for a target event is ctr_value(c - is_click, n - 1, stats).
    """
    x = _transform(clicks, events, stats["alpha"], stats["beta"], stats["logit"])
    return (x - stats["mean"]) / stats["std"]


def side_stats(clicks, events, alpha, beta, logit):
    """The ctr_meta.json entry for one side: prior, transform and standardisation constants."""
    x = _transform(clicks, events, alpha, beta, logit)
    stats = {"alpha": float(alpha), "beta": float(beta), "logit": bool(logit),
             "mean": float(x.mean()) if x.size else 0.0,
             "std": max(float(x.std()), STD_FLOOR) if x.size else 1.0}
    stats["prior_value"] = float(ctr_value(0, 0, stats))
    return stats


def item_popularity(item_ids, item_events, head_quantile):
    """Head/tail split: H = the q-quantile of the items' event counts, taking the next actual
    count above the quantile position ("higher"), so about the top (1 - q) of items, ties
    included, have count >= H and are hot. Items absent from training have count 0: tail."""
    counts = np.asarray(item_events, np.int64)
    h = int(np.quantile(counts, head_quantile, method="higher")) if counts.size else 1
    return {"head_quantile": float(head_quantile), "head_min_count": h,
            "counts": dict(zip(map(str, np.asarray(item_ids).tolist()), counts.tolist()))}


def load_ctr(ctr_dir, sides=("user", "item")):
    """Read precompute_ctr.py outputs -> (user_table, item_table, meta); tables map
    int reid -> (clicks, events, z). A side not in `sides` is not read (its table is None):
    the per-user file grows with the users. DataError naming the file if one is missing or broken."""
    out = []
    for name in (TABLE_FILES["user"], TABLE_FILES["item"], META_FILE):
        path = os.path.join(os.fspath(ctr_dir), name)
        if name != META_FILE and name not in (TABLE_FILES[s] for s in sides):
            out.append(None)
            continue
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found, expected the output of precompute_ctr.py")
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: invalid JSON ({str(e)[:80]}), expected the output "
                                    f"of precompute_ctr.py") from None
        if type(obj) is not dict:
            raise DataError(f"{path}: a JSON {json_type(obj)}, expected an object")
        out.append(obj)
    tables = []
    for path_name, obj in zip(TABLE_FILES.values(), out[:2]):
        if obj is None:
            tables.append(None)
            continue
        try:
            tables.append({int(k): (int(v[0]), int(v[1]), float(v[2])) for k, v in obj.items()})
        except (ValueError, TypeError, IndexError):
            raise DataError(f"{os.path.join(os.fspath(ctr_dir), path_name)}: bad entry, "
                                    f"expected \"<reid>\": [clicks, events, z]") from None
    meta = out[2]
    for side in ("user", "item"):
        if not isinstance(meta.get(side), dict) or not {"alpha", "beta", "logit", "mean", "std"} <= meta[side].keys():
            raise DataError(f"{os.path.join(os.fspath(ctr_dir), META_FILE)}: no complete "
                                    f"\"{side}\" entry, expected alpha, beta, logit, mean, std")
    return tables[0], tables[1], meta


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _pair(text, name):
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} {text!r}: expected two numbers 'A,B'") from None
    if not (0 < a < float("inf") and 0 < b < float("inf")):
        raise argparse.ArgumentTypeError(f"{name} {text!r}: expected two positive finite numbers")
    return a, b


def _prior(text):
    return "auto" if text == "auto" else _pair(text, "--prior")


def _k_clip(text):
    lo, hi = _pair(text, "--k_clip")
    if lo > hi:
        raise argparse.ArgumentTypeError(f"--k_clip {text!r}: expected LO <= HI")
    return lo, hi


def _quantile(text):
    try:
        q = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head_quantile {text!r}: expected a number in [0, 1]") from None
    if not 0.0 <= q <= 1.0:
        raise argparse.ArgumentTypeError(f"--head_quantile {text!r}: expected a number in [0, 1]")
    return q


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_path", required=True, help="training seq.jsonl (read only)")
    p.add_argument("--output_dir", required=True,
                   help="folder for user_ctr.json, item_ctr.json, ctr_meta.json (and item_pop.json)")
    p.add_argument("--prior", type=_prior, default="auto",
                   help="'auto': Beta prior fitted by the method of moments, per side, on entities "
                        f"with >= {MIN_EVENTS} events (all if fewer than {MIN_ENTITIES} qualify); "
                        "'A,B': fixed alpha, beta for users and items, used as given (no k_clip)")
    p.add_argument("--k_clip", type=_k_clip, default=(10.0, 10000.0),
                   help="'LO,HI': clip the fitted prior strength alpha+beta to [LO, HI], keeping "
                        "the prior mean")
    p.add_argument("--logit", action="store_true",
                   help="standardise log(p/(1-p)) instead of the shrunk rate p")
    p.add_argument("--item_pop_path", default=None,
                   help="where to write item_pop.json (default: inside --output_dir)")
    p.add_argument("--head_quantile", type=_quantile, default=0.8,
                   help="q: an item is hot (head) when its event count >= H, H = the q-quantile "
                        "of the training items' counts (next actual count up), so roughly the "
                        "top 1-q of items are hot; unseen items count 0 (tail)")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="skip malformed lines/records and report how many, instead of stopping "
                        "with exit code 2 at the first one")
    p.add_argument("--eps", type=float, default=None,
                   help="the seed's clamp of rates to [eps, 1 - eps]: accepted and ignored with a notice (the shrunk "
                        "rates here never reach 0 or 1: alpha, beta > 0)")
    p.add_argument("--reuse", action="store_true",
                   help="do nothing when the outputs exist and were computed from this seq.jsonl (same size "
                        "and time) with the same options")
    return p


def get_args(argv=None):
    return parser().parse_args(argv)


def _check_not_input(out_path, seq_path):
    if os.path.exists(out_path) and os.path.samefile(out_path, seq_path):
        raise DataError(f"{out_path}: output path is the input seq.jsonl, expected a "
                                f"different path (inputs are never overwritten)")


def _options(args) -> dict:
    return {"k_clip": list(args.k_clip), "prior": "auto" if args.prior == "auto" else list(args.prior),
            "logit": bool(args.logit), "head_quantile": args.head_quantile}


def up_to_date(args) -> bool:
    """--reuse: the outputs exist and were computed from this seq.jsonl, as it is now, with the same options."""
    paths = [os.path.join(args.output_dir, f) for f in (*TABLE_FILES.values(), META_FILE)]
    pop = args.item_pop_path or os.path.join(args.output_dir, ITEM_POP_FILE)
    if not all(os.path.isfile(p) for p in paths + [pop]):
        return False
    try:
        meta, pop_meta = read_json(paths[-1]), read_json(pop)
    except DataError:
        return False
    return (isinstance(meta, dict) and isinstance(pop_meta, dict) and meta.get("options") == _options(args)
            and same_source(meta.get("seq_fingerprint"), args.seq_path)
            and same_source(pop_meta.get("seq_fingerprint"), args.seq_path))


def degenerate(counts, seq_path) -> list:
    """Warnings for priors fitted on nothing to learn from: no item event at all, or no click
    (every event an exposure or a null action): every user and item then gets the same value."""
    events, clicks = int(counts["item_events"].sum()), int(counts["item_clicks"].sum())
    skipped = (f" ({counts['bad_lines']} bad lines and {counts['bad_records']} bad records skipped)"
               if counts["bad_lines"] or counts["bad_records"] else "")
    if events == 0:
        return [f"{seq_path}: no item events{skipped}; the CTR priors are the --prior as given and every "
                f"user and item gets the same value"]
    if clicks == 0:
        return [f"{seq_path}: none of its {events} item events is a click (all exposures or null actions)"
                f"{skipped}; every CTR is 0 before smoothing and the features carry no signal"]
    return []


def run(args):
    counts = count_events(args.seq_path, skip_bad=args.skip_bad_records)
    if args.prior == "auto" and not counts["item_events"].sum():
        skipped = counts["bad_lines"] + counts["bad_records"]
        raise DataError(f"{args.seq_path}: no item events to fit a CTR prior on"
                        + (f" ({skipped} bad lines or records skipped)" if skipped else "")
                        + ", expected at least one item record (or use --prior A,B)")
    for w in degenerate(counts, args.seq_path):
        print(f"warning: {w}", file=sys.stderr, flush=True)
    meta = {"k_clip": list(args.k_clip), "seq_path": os.path.abspath(args.seq_path),
            "prior": "auto" if args.prior == "auto" else list(args.prior),
            "seq_fingerprint": file_fingerprint(args.seq_path), "options": _options(args)}
    tables = {}
    for side in ("user", "item"):
        c, n, ids = counts[f"{side}_clicks"], counts[f"{side}_events"], counts[f"{side}_ids"]
        if args.prior == "auto":
            fit = fit_beta_prior(c, n, args.k_clip)
        else:
            fit = {"alpha": args.prior[0], "beta": args.prior[1], "k_raw": None, "n_fit": 0}
        stats = side_stats(c, n, fit["alpha"], fit["beta"], args.logit)
        stats.update(k_raw=fit["k_raw"], n_fit=fit["n_fit"], min_events=MIN_EVENTS)
        meta[side] = stats
        z = ctr_value(c, n, stats)
        tables[side] = dict(zip(map(str, ids.tolist()), map(list, zip(c.tolist(), n.tolist(), z.tolist()))))
    meta.update(num_users=len(counts["user_ids"]), num_items=len(counts["item_ids"]),
                num_events=int(counts["item_events"].sum()), num_clicks=int(counts["item_clicks"].sum()),
                bad_lines=counts["bad_lines"], bad_records=counts["bad_records"])
    pop = item_popularity(counts["item_ids"], counts["item_events"], args.head_quantile)
    pop["seq_fingerprint"] = meta["seq_fingerprint"]

    pop_path = args.item_pop_path or os.path.join(args.output_dir, ITEM_POP_FILE)
    paths = [os.path.join(args.output_dir, f) for f in (*TABLE_FILES.values(), META_FILE)] + [pop_path]
    for path in paths:
        _check_not_input(path, args.seq_path)
    # ctr_meta.json vouches for the tables: it goes first and comes back last, so a run killed in
    # between leaves no meta describing tables it did not write (readers then find no CTR folder)
    if os.path.exists(paths[2]):
        os.unlink(paths[2])
    for obj, path in ((tables["user"], paths[0]), (tables["item"], paths[1]), (pop, paths[3]), (meta, paths[2])):
        dump_json(obj, path)
    return meta, pop, counts, paths


def _summary(meta, pop, counts, paths):
    ev, cl = meta["num_events"], meta["num_clicks"]
    print(f"lines {counts['num_lines']}, users {meta['num_users']}, items {meta['num_items']}, "
          f"events {ev}, clicks {cl} (rate {cl / max(ev, 1):.4f})")
    for side in ("user", "item"):
        s = meta[side]
        how = "fixed" if s["k_raw"] is None else f"fitted on {s['n_fit']}, raw alpha+beta {s['k_raw']:.4g}"
        print(f"{side} prior: alpha {s['alpha']:.4g}, beta {s['beta']:.4g} ({how}); "
              f"{'logit ' if s['logit'] else ''}mean {s['mean']:.4g}, std {s['std']:.4g}, "
              f"prior z {s['prior_value']:.4g}")
    hot = sum(v >= pop["head_min_count"] for v in pop["counts"].values())
    print(f"item_pop: head_min_count {pop['head_min_count']} (q {pop['head_quantile']}), "
          f"{hot} of {len(pop['counts'])} items hot")
    if counts["bad_lines"] or counts["bad_records"]:
        print(f"skipped {counts['bad_lines']} bad lines and {counts['bad_records']} bad records "
              f"(first: {counts['first_bad']})")
    print("wrote " + ", ".join(paths))


def main(argv=None):
    """The command line. Bad input raises DataError; as a script (layout.run_cli) it is one
    "error: ..." line on stderr and exit 2, as is an unreadable input or unwritable output."""
    args = get_args(argv)
    if args.eps is not None:
        print(f"notice: --eps {args.eps:g} (a seed flag) is accepted and ignored: the shrunk rates never reach 0 or 1",
              flush=True)
    if args.reuse and up_to_date(args):
        print(f"{args.output_dir}: up to date with {args.seq_path}; nothing to do")
        return
    if not os.path.exists(args.seq_path) or os.path.isdir(args.seq_path):
        count_events(args.seq_path)           # the one message for a missing input
    check_writable(args.output_dir, "--output_dir", create=False)
    if args.item_pop_path:
        check_writable(os.path.dirname(os.path.abspath(args.item_pop_path)), "--item_pop_path", create=False)
    for path in [os.path.join(args.output_dir, f) for f in (*TABLE_FILES.values(), META_FILE)] + [
            args.item_pop_path or os.path.join(args.output_dir, ITEM_POP_FILE)]:
        if os.path.isdir(path):
            raise DataError(f"{path}: a folder, expected the output file's path (or nothing there)")
        _check_not_input(path, args.seq_path)
    # one run writes the folder at a time; with --reuse (run.sh) a second one waits, then reuses
    with own_folder(args.output_dir, "--output_dir", wait=args.reuse):
        if args.reuse and up_to_date(args):
            print(f"{args.output_dir}: up to date with {args.seq_path}; nothing to do")
            return
        _summary(*run(args))


if __name__ == "__main__":
    run_cli(main)
