"""Synthetic TencentGR-layout demo data with a planted, learnable signal.

Writes OUT/train (seq.jsonl, seq_offsets.pkl, item_feat_dict.json, indexer.pkl, creative_emb/)
and OUT/eval (predict_seq.jsonl, predict_seq_offsets.pkl, predict_set.jsonl, ground_truth.jsonl)
in the layout of docs/DATA_FORMAT.md, quirks included (null actions, repeated items,
unseen users / items / feature values in the eval files, items without multimodal vectors).

The world: items live in a latent taste space (clusters + noise); each step a user picks the next
item with probability ~ softmax(taste + short-term momentum + drifting popularity + hour-of-day),
approximated by an importance-corrected sampled softmax over a few hundred proposed candidates;
clicks follow affinity and a per-item quality. Sparse features, user features and multimodal
vectors are noisy views of the latent variables. Users are simulated in chunks and streamed to
disk, so memory does not grow with --users. Eval target: a user's first click after the cutoff.

    python make_demo_data.py --out data/demo
"""
import argparse
import collections
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

import layout
from layout import TZ_OFFSET, DataError

T0 = 1745769600          # 2025-04-28 00:00 China time, near the real data's start
DAY = 86400
CHUNK = 1024             # users simulated together; fixed so output does not depend on it
ITEM_FEATS = ["112", "117", "118", "119", "120", "100", "101", "102", "122", "114", "115", "116",
              "121", "111"]   # the key order of the real records
USER_SPARSE = ["103", "104", "105", "109"]
USER_ARRAY = ["106", "107", "108", "110"]
# Cardinalities in the real TencentGR_1k indexer (58,734 items); item ones are scaled to --items.
REAL_CARD = {"100": 6, "101": 44, "102": 11136, "112": 25, "114": 17, "115": 187, "116": 18,
             "117": 285, "118": 745, "119": 1745, "120": 1343, "121": 49079, "122": 11151,
             "103": 67, "104": 2, "105": 7, "106": 13, "107": 17, "108": 4, "109": 3, "110": 2}
REAL_ITEMS = 58734
OUTPUT_FILES = ["train/seq.jsonl", "train/seq_offsets.pkl", "train/item_feat_dict.json",
                "train/indexer.pkl", "train/creative_emb/emb_81_32.pkl", "eval/predict_seq.jsonl",
                "eval/predict_seq_offsets.pkl", "eval/predict_set.jsonl", "eval/ground_truth.jsonl"]
# Generative constants: strong enough that the task is learnable, weak enough that it is not easy.
BETA_TASTE, BETA_MOM, GAMMA_HOUR, MOM_HALF = 5.0, 3.5, 1.2, 1800.0
CLICK_BIAS, CLICK_AFF, P_NULL, P_REPEAT = -4.05, 2.5, 0.013, 0.01
SEEN_PENALTY, SEEN_BITS = 3.0, 4096   # ads rarely re-show a creative the user has seen


def item_card(fid, n_items):
    """Real cardinality, scaled to the catalogue size but never below min(real, 50)."""
    real = REAL_CARD[fid]
    return int(min(real, max(round(real * n_items / REAL_ITEMS), min(real, 50))))


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _skewed(rng, card, size, power=2.0):
    """Values 0..card-1, low ones more frequent (features in real data are long-tailed)."""
    return np.minimum((card * rng.random(size) ** power).astype(np.int64), card - 1)


def _noisy(rng, signal, card, frac):
    """Replace a fraction `frac` of `signal` by long-tailed random values."""
    noise = _skewed(rng, card, len(signal))
    return np.where(rng.random(len(signal)) < frac, noise, signal)


def _affine(rng, modulus):
    """A random bijection i -> (a*i + b) % modulus, for unique ids without a full permutation."""
    while True:
        a = int(rng.integers(modulus // 3 + 1, modulus)) if modulus > 2 else 1
        if math.gcd(a, modulus) == 1:
            return a, int(rng.integers(modulus))


class World:
    """Everything that is not a user: clusters, the item catalogue, features, indexers."""

    def __init__(self, args, rng):
        K, D, M = args.clusters, args.latent_dim, args.items
        self.args = args
        self.T = T0 + args.cutoff * args.days * DAY
        self.centers = _normalize(rng.normal(size=(K, D)))
        self.peak = rng.uniform(0, 24, K)
        self.cluster_p = rng.dirichlet(np.full(K, 3.0))
        cl = rng.choice(K, M, p=self.cluster_p)
        cl[:K] = np.arange(K)   # no empty cluster (--items >= --clusters)
        self.cluster = cl
        noise = rng.normal(size=(M, D)) / math.sqrt(D)
        self.V = _normalize(self.centers[cl] + 0.7 * noise).astype(np.float32)
        # Launch times: some before the timeline, ~10% after the cutoff (cold items).
        self.launch = rng.uniform(T0 - 10 * DAY, T0 + args.days * DAY, M)
        self.launch[:max(1, M // 10)] -= 12 * DAY   # the first popularity bucket is never empty
        self.launch = T0 + DAY * np.ceil((self.launch - T0) / DAY)   # items go live at midnight
        self.tau = DAY * np.exp(rng.normal(math.log(5.0), 0.5, M))
        n_adv = item_card("102", M)
        adv_cluster = rng.choice(K, n_adv, p=self.cluster_p)
        adv_cluster[:min(K, n_adv)] = np.arange(min(K, n_adv))
        adv_q, adv_pop = rng.normal(0, 0.6, n_adv), rng.normal(0, 0.6, n_adv)
        self.logpop = rng.normal(0, 1.0, M)
        # Advertisers belong to a cluster; items mostly pick an advertiser of their own cluster.
        by_cl = [np.flatnonzero(adv_cluster == k) for k in range(K)]
        adv = rng.integers(n_adv, size=M)
        for k in range(K):
            idx = np.flatnonzero(cl == k)
            if len(by_cl[k]) and len(idx):
                own = by_cl[k][_skewed(rng, len(by_cl[k]), len(idx), 1.5)]
                adv[idx] = np.where(rng.random(len(idx)) < 0.9, own, adv[idx])
        self.new = self.launch >= self.T
        fresh = self.new & (rng.random(M) < 0.3)   # new items from never-seen advertisers
        adv_val = np.where(fresh, n_adv + rng.integers(1, 10**6, M), adv)
        self.logpop += np.where(fresh, 0.0, adv_pop[adv])
        self.quality = 0.8 * rng.normal(size=M) + np.where(fresh, 0.0, adv_q[adv])
        vals = {}
        c = {f: item_card(f, M) for f in REAL_CARD}
        vals["100"] = _noisy(rng, rng.integers(c["100"], size=K)[cl], c["100"], 0.05)
        sub = rng.integers(c["101"], size=(K, 3))
        vals["101"] = _noisy(rng, sub[cl, rng.integers(3, size=M)], c["101"], 0.1)
        vals["102"] = adv_val
        acct = rng.integers(c["122"], size=n_adv)
        vals["122"] = np.where(fresh, c["122"] + adv_val, _noisy(rng, acct[adv], c["122"], 0.1))
        a, b = _affine(rng, M)
        vals["111"] = (a * np.arange(M, dtype=np.int64) + b) % M
        vals["121"] = rng.integers(c["121"], size=M)
        for f in ("112", "114", "118", "120"):
            vals[f] = _skewed(rng, c[f], M)
        for f, frac in (("115", 0.5), ("116", 0.4), ("117", 0.2)):
            width = max(1, c[f] // K)
            vals[f] = _noisy(rng, (cl * width + _skewed(rng, width, M)) % c[f], c[f], frac)
        adv119 = rng.integers(c["119"], size=n_adv)
        vals["119"] = _noisy(rng, adv119[adv], c["119"], 0.3)
        present = {f: np.ones(M, bool) for f in ITEM_FEATS}
        present["115"] = rng.random(M) < 1 / 3
        no_group = rng.random(M) < 0.1          # like real items lacking the 112/117..120 group
        for f in ("112", "117", "118", "119", "120"):
            present[f] = ~no_group
        self.raw = {f: int(f) * 10**7 + vals[f] for f in ITEM_FEATS}
        self.present = present
        # Multimodal vectors: noisy random projections of the latent, unit norm like the real ones.
        self.has_mm = rng.random(M) < np.where(self.new, 0.7, 0.85)
        self.mm = {}
        for fid, dim, sigma in ((81, 32, 0.35), (82, args.mm_dim, 0.25)):
            R = rng.normal(size=(D, dim)) / math.sqrt(D)
            z = rng.normal(size=(M, dim)) / math.sqrt(dim)
            self.mm[fid] = _normalize(self.V @ R + sigma * z).astype(np.float32)
        # Raw ids and re-ids.
        a, b = _affine(rng, 10**7)
        self.cid = 20000000000 + (a * np.arange(M, dtype=np.int64) + b) % 10**7
        known = np.flatnonzero(~self.new)
        self.reid = np.zeros(M, np.int64)
        self.reid[known] = rng.permutation(len(known)) + 1
        self.by_reid = known[np.argsort(self.reid[known])]
        self.indexer_f = collections.defaultdict(dict)
        for f in ITEM_FEATS:
            v = self.raw[f][self.by_reid][present[f][self.by_reid]]
            _, first = np.unique(v, return_index=True)
            self.indexer_f[f] = {int(x): r + 1 for r, x in enumerate(v[np.sort(first)])}
        for f in sorted(USER_SPARSE + USER_ARRAY):   # user values: all of them are in use
            perm = rng.permutation(REAL_CARD[f]) + 1
            self.indexer_f[f] = {int(f) * 10**7 + v: int(perm[v]) for v in range(REAL_CARD[f])}
        self.indexer_f = collections.defaultdict(dict, sorted(self.indexer_f.items()))
        self.user_maps = {"103": rng.integers(REAL_CARD["103"], size=(K, 3)),
                          "104": rng.uniform(0.1, 0.9, K), "105": rng.integers(7, size=K),
                          "106": rng.integers(REAL_CARD["106"], size=K)}
        self.feat_json = [self._feat_json(i) for i in range(M)]
        self.slot = [str(self.reid[i]) if not self.new[i] else str(self.cid[i]) for i in range(M)]
        # Candidate proposals: per-cluster item lists and a per-day popularity table.
        order = np.argsort(cl, kind="stable")
        self.cl_items = order
        self.cl_count = np.bincount(cl, minlength=K)
        self.cl_start = np.concatenate([[0], np.cumsum(self.cl_count)[:-1]])
        # Per day: log-popularity at midnight and a fixed buffer of draws from it (proposals).
        # Launches are at midnight too, so log_pop(t) = lp_day[day(t)] - (t - midnight) / tau.
        self.n_buckets = int(args.days * 1.6) + 2
        self.bucket_t = T0 + DAY * np.arange(self.n_buckets)
        self.lp_day = np.zeros((self.n_buckets, M), np.float32)
        self.logZ = np.zeros(self.n_buckets, np.float32)
        self.pop_draws = np.zeros((self.n_buckets, 4096), np.int64)
        for b, tb in enumerate(self.bucket_t):
            lp = self.log_pop(tb, np.arange(M))
            self.lp_day[b] = lp
            self.logZ[b] = np.log(np.exp(lp).sum())
            cum = np.cumsum(np.exp(lp - self.logZ[b]))
            self.pop_draws[b] = np.minimum(np.searchsorted(cum / cum[-1], rng.random(4096)), M - 1)
        self.inv_tau = (1 / self.tau).astype(np.float32)
        hours = np.arange(144) / 6.0
        phase = 2 * np.pi * (hours[None, :] - self.peak[:, None]) / 24
        self.hour_tab = (GAMMA_HOUR * np.cos(phase)).astype(np.float32)

    def _feat_json(self, i):
        """The item's feature dict as JSON text; values missing from the indexer (only items
        launched after the cutoff have them) are written as strings of the raw value."""
        parts = []
        for f in ITEM_FEATS:
            if not self.present[f][i]:
                continue
            raw = int(self.raw[f][i])
            rid = self.indexer_f[f].get(raw)
            parts.append(f'"{f}": {rid}' if rid is not None else f'"{f}": "{raw}"')
        return "{" + ", ".join(parts) + "}"

    def log_pop(self, t, items):
        lp = self.logpop[items] - np.maximum(t - self.launch[items], 0) / self.tau[items]
        return np.where(self.launch[items] <= t, lp, -np.inf)

    def hour_term(self, t, items):
        """Clusters have peak hours (China time), in 10-minute steps."""
        slot = ((np.asarray(t) + TZ_OFFSET) % DAY // 600).astype(np.int64)
        return self.hour_tab[self.cluster[items], slot]

    def score_terms(self, c, items, v):
        """The terms of the true log-probability that eval case `c`'s target click is each of
        `items` (latents `v`): next-item logit terms, log P(click) split into affinity/quality."""
        t = c["t"]
        lp = self.log_pop(t, items)
        aff = v @ c["taste"]
        click = CLICK_BIAS + CLICK_AFF * aff
        with_q = click + self.quality[items]
        return {"launched": np.where(np.isfinite(lp), 0, -np.inf), "taste": BETA_TASTE * aff,
                "momentum": _mom_weight(c["gap"]) * (v @ self.V[c["prev"]]),
                "popularity": np.where(np.isfinite(lp), lp, 0), "hour": self.hour_term(t, items),
                "seen": -SEEN_PENALTY * np.isin(items & (SEEN_BITS - 1), c["seen"]),
                "click": -np.logaddexp(0, -click),
                "quality": np.logaddexp(0, -click) - np.logaddexp(0, -with_q)}


def _mom_weight(gap):
    return BETA_MOM * (0.25 + 0.75 * np.exp(-np.asarray(gap, np.float64) / MOM_HALF))


def _diurnal(rng, c):
    """Snap times `c` to a session start on the same China-time day, at a plausible hour."""
    u = rng.random(len(c))
    hour = np.where(u < 0.3, rng.normal(12.5, 1.2, len(c)),
                    np.where(u < 0.75, rng.normal(20.5, 1.5, len(c)), rng.uniform(7, 24, len(c))))
    day = np.floor((c + TZ_OFFSET) / DAY)
    return day * DAY - TZ_OFFSET + (hour % 24) * 3600


def _timelines(W, rng, n_pre, new_users):
    """Event times: about n_pre[u] events before the cutoff, then every event up to the end of the
    timeline (at most --max_events of them). Sessions of minutes-apart events start at
    plausible hours of the day; breaks between sessions last about a day (user-dependent)."""
    a = W.args
    B = len(n_pre)
    brk = 0.5 * DAY * np.exp(rng.normal(0, 0.4, B))
    p_new_session = 0.5
    span = n_pre * (p_new_session * brk + 300)
    t0 = _diurnal(rng, W.T - 2 * span - (0.3 if new_users else 2) * DAY)
    end = T0 + a.days * DAY
    cols = [t0]
    for _ in range(2 * int(n_pre.max()) + 3 * a.max_events):
        prev = cols[-1]
        if prev.min() > end:
            break
        s = _diurnal(rng, prev + 1800 + rng.exponential(brk))
        s = np.where(s < prev + 1800, s + DAY, s)
        cols.append(np.floor(np.where(rng.random(B) < p_new_session, s,
                                      prev + 5 + rng.exponential(300, B))))
    g = np.stack(cols, 1)
    before = np.sum(g < W.T, 1)
    keep = np.minimum(before, n_pre)
    post = np.minimum(np.sum((g >= W.T) & (g <= end), 1), a.max_events)
    n = keep + post
    L = int(n.max())
    idx = np.minimum((before - keep)[:, None] + np.arange(L)[None, :], g.shape[1] - 1)
    t = np.take_along_axis(g, idx, 1).astype(np.int64)
    t[np.arange(L)[None, :] >= n[:, None]] = 0
    return t, n


def simulate_users(W, rng, B, new_users):
    """Simulate B users end to end (before and after the cutoff); return a dict of arrays."""
    a = W.args
    if new_users:
        n_pre = rng.integers(0, 8, B)
    else:
        extra = rng.exponential(max(a.mean_events - a.min_events, 1), B)
        n_pre = np.clip(np.round(a.min_events + extra), a.min_events, a.max_events).astype(np.int64)
    t, n = _timelines(W, rng, n_pre, new_users)
    order = np.argsort(-n, kind="stable")   # users are i.i.d.; sorting lets each step use a prefix
    t, n = t[order], n[order]
    L = int(n[0])
    K = a.clusters
    k1 = rng.choice(K, B, p=W.cluster_p)
    k2 = np.where(rng.random(B) < 0.5, rng.choice(K, B, p=W.cluster_p), k1)
    w1 = np.where(k2 == k1, 1.0, rng.uniform(0.55, 0.9, B))
    taste = w1[:, None] * W.centers[k1] + (1 - w1)[:, None] * W.centers[k2]
    taste = _normalize(taste + 0.5 * rng.normal(size=(B, a.latent_dim)) / math.sqrt(a.latent_dim))
    items = np.full((B, L), -1, np.int64)
    click = np.zeros((B, L), bool)
    null = np.zeros((B, L), bool)
    C = a.cands
    cp, ct = C * 2 // 5, C * 2 // 5
    cv = C - cp - ct
    taste32 = taste.astype(np.float32)
    seen = np.zeros((B, SEEN_BITS), bool)   # hashed set of the items each user has seen
    # Proposal weight of each cluster: taste draws follow the user's cluster mixture.
    p_cl = np.zeros((B, K), np.float32)
    np.add.at(p_cl, (np.arange(B), k1), ct * w1)
    np.add.at(p_cl, (np.arange(B), k2), ct * (1 - w1))
    for j in range(L):
        na = int(np.sum(n > j))
        rows = np.arange(na)
        tj = t[:na, j]
        if j:
            prev = items[:na, j - 1]
            mw = _mom_weight(tj - t[:na, j - 1]).astype(np.float32)
            kv = W.cluster[prev]
        else:
            prev, mw, kv = np.zeros(na, np.int64), np.zeros(na, np.float32), k1[:na]
        b = np.clip((tj - T0) // DAY, 0, W.n_buckets - 1)
        nd = W.pop_draws.shape[1]
        c_pop = np.take(W.pop_draws, (b * nd)[:, None] + rng.integers(0, nd, (na, cp)))
        ks = np.where(rng.random((na, ct)) < w1[:na, None], k1[:na, None], k2[:na, None])
        c_taste = W.cl_items[W.cl_start[ks] + (rng.random((na, ct)) * W.cl_count[ks]).astype(int)]
        kvv = np.broadcast_to(kv[:, None], (na, cv))
        c_prev = W.cl_items[W.cl_start[kvv] + (rng.random((na, cv)) * W.cl_count[kvv]).astype(int)]
        cand = np.concatenate([c_pop, c_taste, c_prev], axis=1)
        kc = np.take(W.cluster, cand)
        lp = np.take(W.lp_day, (b * a.items)[:, None] + cand)
        # Importance correction: q = the proposal mixture's probability of each candidate.
        qk = p_cl[:na].copy()
        qk[rows, kv] += cv
        qk /= W.cl_count * C
        q = np.exp(lp - W.logZ[b][:, None]) * (cp / C) + np.take_along_axis(qk, kc, 1)
        w = BETA_TASTE * taste32[:na] + mw[:, None] * W.V[prev]
        vc = np.take(W.V, cand.ravel(), axis=0).reshape(na, C, -1)
        s = np.matmul(vc, w[:, :, None])[:, :, 0]
        s += lp - (tj - W.bucket_t[b]).astype(np.float32)[:, None] * np.take(W.inv_tau, cand)
        s += W.hour_tab[kc, ((tj + TZ_OFFSET) % DAY // 600)[:, None]]
        s -= SEEN_PENALTY * np.take(seen, (rows * SEEN_BITS)[:, None] + (cand & (SEEN_BITS - 1)))
        # Gumbel-max sampling of softmax(s - log q), written as an exponential race.
        s -= np.log(np.maximum(q * rng.standard_exponential(q.shape, dtype=np.float32), 1e-37))
        choice = cand[np.arange(na), np.argmax(s, axis=1)]
        if j:
            rep = rng.random(na) < P_REPEAT
            old = items[np.arange(na), (rng.random(na) * j).astype(int)]
            choice = np.where(rep, old, choice)
        items[:na, j] = choice
        seen[rows, choice & (SEEN_BITS - 1)] = True
        logit = CLICK_BIAS + CLICK_AFF * np.sum(W.V[choice] * taste[:na], 1) + W.quality[choice]
        click[:na, j] = rng.random(na) < 1 / (1 + np.exp(-logit))
        # Null actions only hide exposures (so ~1.3% of all records), never a click.
        null[:na, j] = ~click[:na, j] & (rng.random(na) < P_NULL / 0.9)
    return dict(n=n, t=t, items=items, click=click, null=null, taste=taste,
                feats=_user_feats(W, rng, B, k1, k2), order=rng.permutation(B))


def _user_feats(W, rng, B, k1, k2):
    """Profile dicts (re-ids) correlated with the user's clusters."""
    f = W.indexer_f
    m = W.user_maps
    v103 = _noisy(rng, m["103"][k1, rng.integers(3, size=B)], REAL_CARD["103"], 0.3)
    v104 = (rng.random(B) < m["104"][k1]).astype(int)
    v105 = np.clip(m["105"][k1] + rng.integers(-1, 2, B), 0, 6)
    v109 = _skewed(rng, 3, B)
    a106 = np.stack([m["106"][k1], m["106"][k2], rng.integers(13, size=B)], 1)
    r = rng.random((B, 6))
    out = []
    for u in range(B):
        d = {"103": v103[u], "104": v104[u]}
        if r[u, 0] < 0.85:
            d["105"] = v105[u]
        d["109"] = v109[u]
        if r[u, 1] < 0.9:
            d["106"] = list(dict.fromkeys(a106[u, :1 + int(r[u, 5] * 3)]))
        for fid, p in (("107", 0.35), ("108", 0.2), ("110", 0.4)):
            if r[u, {"107": 2, "108": 3, "110": 4}[fid]] < p:
                card = REAL_CARD[fid]
                d[fid] = list(dict.fromkeys(rng.integers(card, size=int(rng.integers(1, 4)))))
        out.append({k: ([f[k][int(k) * 10**7 + int(x)] for x in v] if isinstance(v, list)
                        else f[k][int(k) * 10**7 + int(v)]) for k, v in d.items()})
    return out


def _records(W, uid, its, acts, ts):
    feats, slot = W.feat_json, W.slot
    return [f"[{uid}, {slot[i]}, null, {feats[i]}, {a}, {s}]" for i, a, s in zip(its, acts, ts)]


def _profile(uid, feats, ts):
    return f"[{uid}, null, {json.dumps(feats)}, null, null, {ts}]"


_WORLD = None   # the World of this process (main or pool worker)


def _init_world(args):
    global _WORLD
    _WORLD = World(args, np.random.default_rng([args.seed, 0]))
    return _WORLD


def _user_ids(args):
    """Bijections user index -> raw id (8 digits) and -> re-id (1..users)."""
    ua, ub = _affine(np.random.default_rng([args.seed, 4]), 10**8)
    ra, rb = _affine(np.random.default_rng([args.seed, 5]), args.users)
    return (lambda i: "user_%08d" % ((ua * i + ub) % 10**8),
            lambda i: (ra * i + rb) % args.users + 1)


def _chunk(job):
    """Simulate one chunk of users. Returns its seq.jsonl lines (none for new users), train
    click/exposure counts, and the first `quota` users that qualify for the eval set."""
    c, new_users, quota = job
    W, a = _WORLD, _WORLD.args
    raw_id, re_id = _user_ids(a)
    rng = np.random.default_rng([a.seed, 2 if new_users else 1, c])
    B = min(CHUNK, 4 * quota) if new_users else min(CHUNK, a.users - c * CHUNK)
    sim = simulate_users(W, rng, B, new_users)
    lines, picked, stats = [], [], np.zeros(3, np.int64)
    clicked, exposed = [], []
    for k, u in enumerate(sim["order"]):
        idx = (a.users if new_users else 0) + c * CHUNK + k
        uid = f'"{raw_id(idx)}"' if new_users else re_id(idx)
        n, t, its, clk, nul = (sim[x][u] for x in ("n", "t", "items", "click", "null"))
        if not new_users:
            m = int(np.searchsorted(t[:n], W.T))
            acts = np.where(nul[:m], "null", clk[:m].astype(int).astype(str))
            recs = _records(W, uid, its[:m], acts, t[:m])
            ts = int(t[m - 1]) + 3600 + int(rng.exponential(2 * DAY))
            recs.append(_profile(uid, sim["feats"][u], ts))
            lines.append("[" + ", ".join(recs) + "]\n")
            clicked.append(its[:m][clk[:m]])
            exposed.append(its[:m])
            stats += (m, clk[:m].sum(), nul[:m].sum())
        after = np.flatnonzero(clk[:n] & (t[:n] >= W.T))
        if len(after) and after[0] > 0 and len(picked) < quota:   # predict users have history
            j = int(after[0])
            ts = int(t[j]) + 3600 + int(rng.exponential(2 * DAY))   # leaks the target's time
            picked.append(dict(uid=uid, raw_uid=raw_id(idx), its=its[:j + 1], t=t[:j + 1],
                               click=clk[:j], null=nul[:j], taste=sim["taste"][u],
                               feats=sim["feats"][u], profile_ts=ts))
    counts = [np.bincount(np.concatenate(x or [np.zeros(0, np.int64)]), minlength=a.items)
              for x in (clicked, exposed)]
    return "".join(lines).encode(), [len(x) for x in lines], counts, stats, picked


def _case(W, p, spill):
    """An eval user: the predict_seq line (history before the target click), oracle inputs.

    The line goes to the `spill` file at once (its place is kept), so memory holds only the
    small oracle inputs per eval user, not every history: eval users are shuffled before
    predict_seq.jsonl is written, which needs them all."""
    its, t, j = p["its"], p["t"], len(p["its"]) - 1
    acts = np.where(p["null"], "null", p["click"].astype(int).astype(str))
    recs = _records(W, p["uid"], its[:j], acts, t[:j])
    recs.append(_profile(p["uid"], p["feats"], p["profile_ts"]))
    line = ("[" + ", ".join(recs) + "]\n").encode()
    at = spill.seek(0, os.SEEK_END)
    spill.write(line)
    return dict(line=(at, len(line)), raw_uid=p["raw_uid"], target=int(its[j]),
                t=int(t[j]), prev=int(its[j - 1]), gap=float(t[j] - t[j - 1]),
                seen=np.unique(its[:j] & (SEEN_BITS - 1)), taste=p["taste"])


def generate(args):
    """Write the demo data under args.out; return {'summary': ..., 'sanity': ...}."""
    t_start = time.time()
    W = _init_world(args)
    N, M = args.users, args.items
    train, ev = os.path.join(args.out, "train"), os.path.join(args.out, "eval")
    os.makedirs(train, exist_ok=True)
    os.makedirs(ev, exist_ok=True)
    raw_id, re_id = _user_ids(args)
    ucold = max(1, round(args.eval_users * args.cold_user_frac)) if args.eval_users else 0
    quota = args.eval_users - ucold
    cases = []
    train_clicks, train_expo = np.zeros(M, np.int64), np.zeros(M, np.int64)
    stats = np.zeros(3, np.int64)
    offsets = []
    n_chunks = (N + CHUNK - 1) // CHUNK
    jobs = [(c, False, quota) for c in range(n_chunks)]
    procs = None
    spill = tempfile.TemporaryFile(dir=ev)   # unnamed: gone however the run ends
    if args.workers > 1:
        procs = multiprocessing.get_context("spawn").Pool(args.workers, _init_world, (args,))
    try:
        results = procs.imap(_chunk, jobs) if procs else map(_chunk, jobs)
        with layout.atomic_write(os.path.join(train, "seq.jsonl"), "wb") as fseq:
            pos = 0
            for blob, lens, (clk, expo), st, picked in tqdm(
                    results, total=n_chunks, desc="users", disable=not sys.stderr.isatty()):
                fseq.write(blob)
                offsets.extend((pos + np.concatenate([[0], np.cumsum(lens)[:-1]])).tolist())
                pos += len(blob)
                train_clicks += clk
                train_expo += expo
                stats += st
                cases += [_case(W, p, spill) for p in picked[:quota - len(cases)]]
    finally:
        if procs:
            procs.terminate()
    n_warm = len(cases)
    if n_warm < quota:
        share = args.cold_user_frac / (1 - args.cold_user_frac)
        ucold = min(ucold, max(1, round(n_warm * share)))
    for c in range(1000 if ucold else 0):
        if len(cases) >= n_warm + ucold:
            break
        picked = _chunk((c, True, ucold))[-1]
        cases += [_case(W, p, spill) for p in picked[:n_warm + ucold - len(cases)]]
    n_cold = len(cases) - n_warm
    cases = [cases[i] for i in np.random.default_rng([args.seed, 3]).permutation(len(cases))]

    layout.dump_pickle(offsets, os.path.join(train, "seq_offsets.pkl"))
    with layout.atomic_write(os.path.join(train, "item_feat_dict.json"), "w",
                              encoding="utf-8") as f:
        f.write("{" + ", ".join(f'"{W.reid[i]}": {W.feat_json[i]}' for i in W.by_reid) + "}")
    u_order = np.argsort([re_id(i) for i in range(N)])
    indexer = {"u": {raw_id(int(i)): r + 1 for r, i in enumerate(u_order)},
               "i": {int(W.cid[i]): int(W.reid[i]) for i in W.by_reid},
               "f": W.indexer_f, "a": {1: 1, 0: 2}}
    layout.dump_pickle(indexer, os.path.join(train, "indexer.pkl"))
    _write_mm(W, os.path.join(train, "creative_emb"))

    targets = np.array([c["target"] for c in cases], np.int64)
    if args.pool and args.pool < M:
        prng = np.random.default_rng([args.seed, 6])
        others = np.setdiff1d(np.arange(M), targets)
        extra = prng.choice(others, max(0, args.pool - len(np.unique(targets))), replace=False)
        pool = np.union1d(np.unique(targets), extra)
    else:
        pool = np.arange(M)
    pool = pool[np.random.default_rng([args.seed, 7]).permutation(len(pool))]
    with layout.atomic_write(os.path.join(ev, "predict_set.jsonl"), "w", encoding="utf-8") as f:
        for r, i in enumerate(pool):
            f.write(f'{{"creative_id": {W.cid[i]}, "retrieval_id": {r}, '
                    f'"features": {W.feat_json[i]}}}\n')
    poffs, pos = [], 0
    with layout.atomic_write(os.path.join(ev, "predict_seq.jsonl"), "wb") as f:
        for c in cases:
            at, n = c["line"]
            spill.seek(at)
            poffs.append(pos)
            f.write(spill.read(n))
            pos += n
    spill.close()
    layout.dump_pickle(poffs, os.path.join(ev, "predict_seq_offsets.pkl"))
    with layout.atomic_write(os.path.join(ev, "ground_truth.jsonl"), "w", encoding="utf-8") as f:
        for c in cases:
            gt = {"user_id": c["raw_uid"], "creative_id": int(W.cid[c["target"]])}
            f.write(json.dumps(gt) + "\n")

    # the oracle scores the whole pool per eval user: a seeded sample (cases are shuffled) keeps
    # a 1M-user run from spending hours on a check whose estimate is already tight at 2,000
    sanity = sanity_check(W, cases[:args.sanity_users], pool, train_clicks, train_expo)
    summary = dict(users=N, items=M, known_items=int((~W.new).sum()), new_items=int(W.new.sum()),
                   train_events=int(stats[0]), click_rate=round(stats[1] / max(stats[0], 1), 4),
                   null_rate=round(stats[2] / max(stats[0], 1), 4), eval_users=len(cases),
                   cold_users=n_cold, pool=len(pool), new_items_in_pool=int(W.new[pool].sum()),
                   new_item_targets=int(W.new[targets].sum()) if len(cases) else 0,
                   sanity_users=min(len(cases), args.sanity_users),
                   pool_without_mm=int((~W.has_mm[pool]).sum()))
    return dict(summary=summary, sanity=sanity, seconds=round(time.time() - t_start, 1))


def _write_mm(W, root):
    """emb_81_32.pkl (dict) and a Spark-style emb_82_{dim}/ folder, both keyed by creative_id."""
    have = np.flatnonzero(W.has_mm)
    layout.dump_pickle({int(W.cid[i]): W.mm[81][i].copy() for i in have},
                        os.path.join(root, "emb_81_32.pkl"))
    dim = W.mm[82].shape[1]
    final = os.path.join(root, f"emb_82_{dim}")
    tmp = os.path.join(root, f".emb_82_{dim}.tmp")   # not matched by the emb_82_ prefix
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for p, part in enumerate(np.array_split(have, 4)):
        with open(os.path.join(tmp, "part-%05d" % p), "w", encoding="utf-8") as f:
            for i in part:
                rec = {"anonymous_cid": int(W.cid[i]), "emb": W.mm[82][i].tolist()}
                f.write(json.dumps(rec) + "\n")
    open(os.path.join(tmp, "_SUCCESS"), "w").close()
    for name in os.listdir(root):   # a stale emb_82_* from an earlier run of ours with another dim
        if name.startswith("emb_82_"):
            shutil.rmtree(os.path.join(root, name))
    os.replace(tmp, final)


def _metrics(ranks):
    ranks = np.asarray(ranks)
    hit = ranks <= 10
    hr = float(hit.mean()) if len(ranks) else 0.0
    ndcg = float(np.where(hit, 1 / np.log2(ranks + 1), 0).mean()) if len(ranks) else 0.0
    return dict(hr10=round(hr, 4), ndcg10=round(ndcg, 4), score=round(0.31 * hr + 0.69 * ndcg, 4))


def sanity_check(W, cases, pool, train_clicks, train_expo):
    """HR@10 / NDCG@10 / Score on the eval set of a most-popular ranking (train clicks) and of
    the oracle (true generative log-probability of the target click), and the oracle's score
    with one term left out at a time."""
    pop_key = train_clicks[pool] * (train_expo.max() + 1) + train_expo[pool]
    pop_rank = np.empty(len(pool), np.int64)
    pop_rank[np.lexsort((np.arange(len(pool)), -pop_key))] = np.arange(1, len(pool) + 1)
    where = {int(i): r for r, i in enumerate(pool)}
    v = W.V[pool]
    ablate = ["taste", "momentum", "popularity", "hour", "quality"]
    mp, ranks = [], {k: [] for k in ["oracle"] + ablate}
    for c in cases:
        tpos = where[c["target"]]
        mp.append(pop_rank[tpos])
        terms = W.score_terms(c, pool, v)
        full = sum(terms.values())
        for k in ranks:
            s = full - terms[k] if k != "oracle" else full
            ranks[k].append(1 + int(np.sum(s > s[tpos])))
    out = {"most_popular": _metrics(mp), "oracle": _metrics(ranks["oracle"]),
           "random_hr10": round(min(1.0, 10 / max(len(pool), 1)), 4)}
    ratio = out["oracle"]["score"] / max(out["most_popular"]["score"], 1e-9)
    out["oracle_over_most_popular"] = round(ratio, 2)
    out["oracle_score_without"] = {k: _metrics(ranks[k])["score"] for k in ablate}
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (docs/FLAGS.md is generated from it)."""
    p = layout.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--out", required=True, help="output folder; gets train/, eval/ and demo_meta.json")
    add("--users", type=int, default=3000, help="users in the training data")
    add("--items", type=int, default=2500,
        help="catalogue size, items launched after the cutoff included")
    add("--eval_users", type=int, default=1000,
        help="predict users wanted (fewer if not enough users qualify)")
    add("--seed", type=int, default=0, help="fixes every random choice: same seed, same bytes")
    add("--min_events", type=int, default=20, help="fewest training events per user (about)")
    add("--max_events", type=int, default=100,
        help="most training events per user, and most events after the cutoff")
    add("--mean_events", type=float, default=50,
        help="mean training events per user (before clipping)")
    add("--days", type=float, default=30, help="length of the timeline in days")
    add("--cutoff", type=float, default=0.85,
        help="train/eval cutoff as a fraction of the timeline")
    add("--cold_user_frac", type=float, default=0.03,
        help="share of predict users that are new users (not in the indexer)")
    add("--mm_dim", type=int, default=64, help="dimension of the emb_82_{dim} vectors")
    add("--cands", type=int, default=300,
        help="candidates proposed per step of the sampled softmax (fewer is faster)")
    add("--pool", type=int, default=0,
        help="candidate pool size in predict_set (0: the whole catalogue)")
    add("--clusters", type=int, default=16, help="taste clusters")
    add("--latent_dim", type=int, default=16, help="dimension of the latent taste space")
    add("--workers", type=int, default=1,
        help="processes simulating users in parallel (the output does not depend on it)")
    add("--sanity_users", type=int, default=2000,
        help="eval users (a seeded sample) the most-popular / oracle sanity check scores")
    add("--force", action="store_true",
        help="write even if OUT/train/seq.jsonl exists and was not made by this script")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # a full disk, an unwritable --out: one line, no traceback
        print(f"error: {layout.os_error(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:
        why = f" ({e})" if str(e) else ""
        print(f"error: out of memory{why}; lower --users, --items, --cands or --max_events", file=sys.stderr)
        return 2


def _check_args(a):
    """Every flag in range before any work; DataError naming the first flag that is not."""
    def bad(flag, expected):
        raise DataError(f"--{flag} {getattr(a, flag)}: expected {expected}")
    for flag, lo in (("users", 1), ("clusters", 1), ("eval_users", 0), ("seed", 0), ("min_events", 1),
                     ("cands", 5), ("mm_dim", 1), ("latent_dim", 1), ("pool", 0), ("workers", 1),
                     ("sanity_users", 0)):
        if getattr(a, flag) < lo:
            bad(flag, f"an integer >= {lo}")
    for flag, hi in (("mm_dim", 8192), ("latent_dim", 1024), ("cands", 10000)):   # memory grows with each
        if getattr(a, flag) > hi:
            bad(flag, f"an integer <= {hi}")
    if not a.clusters <= a.items < 10**7:
        bad("items", f"an integer from --clusters ({a.clusters}) to 10^7 - 1")
    if a.max_events < a.min_events:
        bad("max_events", f"an integer >= --min_events ({a.min_events})")
    if not (math.isfinite(a.mean_events) and a.mean_events > 0):
        bad("mean_events", "a number > 0")
    if not (math.isfinite(a.days) and 0 < a.days <= 36500):
        bad("days", "a number > 0 and <= 36500 (a century of timestamps)")
    if not 0 < a.cutoff < 1:
        bad("cutoff", "a number > 0 and < 1")
    if not 0 <= a.cold_user_frac < 1:
        bad("cold_user_frac", "a number >= 0 and < 1")


def _run(args):
    _check_args(args)
    layout.check_writable(args.out, "--out")
    # one build per folder at a time: a second one (two `bash run.sh` at once) waits, then reuses
    with layout.own_folder(args.out, "--out", wait=True):
        return _build(args)


def _build(args):
    meta_path = os.path.join(args.out, "demo_meta.json")
    key = {k: v for k, v in vars(args).items() if k not in ("out", "force", "workers")}
    with open(os.path.abspath(__file__), "rb") as f:   # a changed generator makes new data
        key["generator_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    meta = None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        pass
    complete = all(os.path.exists(os.path.join(args.out, p)) for p in OUTPUT_FILES)
    if isinstance(meta, dict) and meta.get("args") == key and complete and not meta.get("building"):
        print(f"demo data in {args.out} already generated with these args: reused")
        print(json.dumps(meta.get("summary")), json.dumps(meta.get("sanity")), sep="\n")
        return 0
    if meta is None and os.path.exists(os.path.join(args.out, "train", "seq.jsonl")) \
            and not args.force:
        raise DataError(f"{args.out}/train/seq.jsonl exists and was not made by make_demo_data"
                        f".py; refusing to overwrite it (use --force or another --out)")
    # until the build ends, the marker says one of ours is under way: a build killed midway is
    # then neither reused as complete nor taken for someone else's data by the next run
    layout.dump_json({"generator": "make_demo_data.py", "building": True}, meta_path)
    res = generate(args)
    meta = {"generator": "make_demo_data.py", "args": key, "summary": res["summary"],
            "sanity": res["sanity"]}   # no timings: same args -> same bytes
    layout.dump_json(meta, meta_path, indent=1)
    s, q = res["summary"], res["sanity"]
    print(f"wrote {args.out} in {res['seconds']} s: {s['users']} users, {s['items']} items "
          f"({s['new_items']} launched after the cutoff), {s['train_events']} train events, "
          f"click rate {s['click_rate']:.3f}, null actions {s['null_rate']:.3f}")
    print(f"eval: {s['eval_users']} users ({s['cold_users']} new), pool {s['pool']} "
          f"({s['new_items_in_pool']} new items, {s['pool_without_mm']} without mm vectors), "
          f"{s['new_item_targets']} targets are new items")
    mp, orc = q["most_popular"], q["oracle"]
    print(f"sanity: most-popular HR@10 {mp['hr10']:.4f} Score {mp['score']:.4f} | oracle HR@10 "
          f"{orc['hr10']:.4f} Score {orc['score']:.4f} | random HR@10 {q['random_hr10']:.4f}")
    print("oracle Score without each term: " + ", ".join(
        f"{k} {v:.4f}" for k, v in q["oracle_score_without"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
