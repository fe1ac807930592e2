"""Training objectives: next-item InfoNCE, the rank-package loss, per-target weights, the
hard-negative cache, and the Trainer module that turns a batch into named loss parts.

InfoNCE follows sampled softmax with a logQ correction (Yi et al. 2019) on L2-normalised
vectors: each target competes with in-batch targets and uniformly sampled negatives (or, with
num_neg = -1, the whole catalogue: plain cross-entropy), accidental hits masked. The rank loss
orders per-target packages from the user's own history (positive > clicked > exposed > random),
which the seed solution calls rank packages. Objective settings live in ObjectiveConfig, which
every checkpoint stores next to the model and data configs.
"""
import os
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from layout import CLICK, PAD, DataError, dump_pickle, file_fingerprint, load_pickle, same_source


@dataclass(frozen=True)
class ObjectiveConfig:
    temperature: float = 0.05          # InfoNCE temperature on cosine similarities
    num_neg: int = 512                 # shared uniform negatives per batch; -1 = the whole catalogue
    in_batch_neg: bool = True          # the batch's other targets are negatives too
    in_batch_max: int = 2048           # at most this many of them (a random subset)
    logq: bool = True                  # subtract log expected sampling count from every logit
    nce_weight_scheme: str = "none"    # none | fixed | cb | focal
    click_weight: float = 2.0          # fixed: weight of click targets
    expo_weight: float = 1.0           # fixed: weight of exposure targets
    weight_cap: float = 0.0            # cb: the larger class weight at most this times the smaller (0 = no cap)
    focal_gamma: float = 2.0
    two_tau: bool = False              # temperature by the target's action
    tau_click: float = 0.03
    tau_expo: float = 0.05
    use_rankloss: bool = False
    rankloss_mode: str = "listwise"    # pairwise | listwise
    lambda_rank: float = 0.5
    rankloss_tau: float = 0.0          # rank-loss temperature (0 = the InfoNCE one)
    rankloss_weights: str = ""         # pairwise: weights by the higher item's level, e.g. "1.0,0.6,0.4,0.2"
    rank_pkg_as_neg: bool = False      # package items are per-target hard negatives in InfoNCE
    use_hard_neg: bool = False
    hard_neg_k: int = 8
    hard_neg_pool: int = 20000
    hard_neg_refresh: int = 100

    LEGACY: ClassVar[dict] = {}
    RENAMED: ClassVar[dict] = {}
    REMOVED: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def full_softmax(self) -> bool:
        return self.num_neg < 0

    @property
    def rank_level_weights(self):
        """rankloss_weights as floats (positive, clicked, exposed, random), or None (all 1)."""
        return [float(x) for x in self.rankloss_weights.split(",")] if self.rankloss_weights else None


class _InfoNCE(torch.autograd.Function):
    """info_nce's loss per target without per-row hard negatives, in one [N, 1 + M] logit buffer:
    the same operations, in the same order, as the plain autograd form (positive logit, then
    q @ cand.T with hits masked, divided by tau, minus log expected counts, logsumexp minus the
    positive), so loss and gradients are the same bit for bit (a test compares them), but with
    3 full-size temporaries instead of about 15 (each [N, M] is tens of MiB: allocating and
    filling them was most of a CPU training step). The backward works in place on one new
    buffer and forms the two matrix products as autograd's mm backward does."""

    @staticmethod
    def forward(ctx, q, cand, pos_logit, hit, tau, le_pos, le_cand, dense=False, cand_bias=None):
        N, M = hit.shape
        logits = q.new_empty(N, 1 + M)
        logits[:, 0] = pos_logit
        torch.mm(q, cand.T, out=logits[:, 1:])
        if cand_bias is not None:
            logits[:, 1:].add_(cand_bias)
        if dense:                                   # hits and unavailable items: a mask pass
            logits[:, 1:].masked_fill_(hit, float("-inf"))
            hit = (hit,)
        else:
            hit = hit.nonzero(as_tuple=True)       # accidental hits are few: index them, not a pass
            hit = (hit[0], hit[1] + 1)
            logits.index_put_(hit, logits.new_tensor(float("-inf")))
        logits.div_(tau.unsqueeze(1))
        if le_pos is not None:
            logits[:, 0].sub_(le_pos)
            logits[:, 1:].sub_(le_cand.unsqueeze(0))
        lse = torch.logsumexp(logits, 1)
        ctx.save_for_backward(q, cand, *hit, tau, logits, lse)
        return lse - logits[:, 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, cand, *hit, tau, logits, lse = ctx.saved_tensors
        grad = (logits - lse.unsqueeze(1)).exp_().mul_(g.unsqueeze(1))     # d lse: exp(logit - lse) * g
        grad[:, 0].sub_(g)                                                 # d (-positive logit)
        grad.div_(tau.unsqueeze(1))
        if len(hit) == 1:
            grad[:, 1:].masked_fill_(hit[0], 0.0)
        else:
            grad.index_put_(tuple(hit), grad.new_tensor(0.0))            # masked_fill's +0 at the hits
        grad_neg = grad[:, 1:]
        # mm's backward for q @ cand.T (q row-major, cand.T column-major), as autograd forms it
        grad_q = grad_neg.mm(cand) if ctx.needs_input_grad[0] else None
        grad_cand = grad_neg.t().mm(q) if ctx.needs_input_grad[1] else None
        grad_bias = grad_neg if ctx.needs_input_grad[8] else None
        return grad_q, grad_cand, grad[:, 0], None, None, None, None, None, grad_bias


def info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop=None, num_items=0, in_batch=True, in_batch_idx=None,
             row_negs=None, row_neg_ids=None, fused=True, available=None, bias=None, pos_bias=None):
    """Per-target InfoNCE on L2-normalised vectors -> (loss [N], positive logit [N]).

    Candidates: the positive, the other targets of the batch (in_batch; in_batch_idx picks a
    random subset of them to bound the cost) and shared sampled negatives. Any candidate with the
    positive's item id (including the target itself among the in-batch columns) is masked: an
    accidental hit is not a negative. row_negs [N, K, d] are per-target hard negatives
    (row_neg_ids 0 = empty slot), masked the same way and not popularity-corrected (they are not
    drawn by popularity). With log_pop, every logit (positive included) is corrected by the log
    of the item's expected count in the candidate set, N * p(item) for in-batch plus
    S / num_items for uniform samples (sampled softmax, Yi et al. 2019); without it popular
    items are over-penalised.

    available (item ids [M] -> bool [N, M]): the candidates each target's request could have been
    shown; the rest are masked like hits (item_age: an item first seen after the request).
    bias (item ids [M] -> [N, M], or [N, K] -> [N, K]) and pos_bias [N]: added to each dot product
    before the temperature (item_age, item_recent: the item's bias at the request's time).

    fused (CPU, no autocast, no row_negs): the same numbers through _InfoNCE's single buffer;
    False: the plain autograd form.
    """
    pos_logit = (q * pos).sum(-1)                                      # [N]
    if pos_bias is not None:
        pos_logit = pos_logit + pos_bias
    cols, ids = [], []
    if in_batch:
        sel = slice(None) if in_batch_idx is None else in_batch_idx
        cols.append(pos[sel])
        ids.append(pos_ids[sel])
    if negs is not None:
        cols.append(negs)
        ids.append(neg_ids)
    if not cols and row_negs is None:
        raise ValueError("InfoNCE needs in-batch, sampled or per-target negatives")
    cand = torch.cat(cols) if cols else q.new_zeros(0, q.shape[1])    # [M, d]
    cand_ids = torch.cat(ids) if ids else pos_ids.new_zeros(0)
    n_in = len(ids[0]) if in_batch else 0
    hit = cand_ids.unsqueeze(0) == pos_ids.unsqueeze(1)                # [N, M]
    if available is not None:
        hit |= ~available(cand_ids)

    def log_expected(i):
        e = torch.zeros(i.shape, device=q.device)
        if in_batch:
            e = e + n_in * log_pop[i].exp()
        if negs is not None:
            e = e + (1.0 if len(neg_ids) >= num_items else len(neg_ids) / max(1, num_items))
        return e.log()
    le_pos, le_cand = (log_expected(pos_ids), log_expected(cand_ids)) if log_pop is not None else (None, None)
    if row_negs is None and fused and q.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return _InfoNCE.apply(q, cand, pos_logit, hit, tau, le_pos, le_cand, available is not None,
                              None if bias is None else bias(cand_ids)), pos_logit
    neg_logit = q @ cand.T
    if bias is not None:
        neg_logit = neg_logit + bias(cand_ids)
    neg_logit = neg_logit.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1) / tau.unsqueeze(1)   # [N, 1 + M]
    if log_pop is not None:
        logits = logits - torch.cat([le_pos.unsqueeze(1), le_cand.unsqueeze(0).expand(len(q), -1)], 1)
    if row_negs is not None:
        hard = (q.unsqueeze(1) * row_negs).sum(-1)                      # [N, K]
        if bias is not None:
            hard = hard + bias(row_neg_ids)
        hard = hard.masked_fill((row_neg_ids == 0) | (row_neg_ids == pos_ids.unsqueeze(1)), float("-inf"))
        logits = torch.cat([logits, hard / tau.unsqueeze(1)], 1)
    return torch.logsumexp(logits, 1) - logits[:, 0], pos_logit


def rank_loss(s_pos, s_pkg, grade, mode, level_weights=None):
    """Graded ranking of [positive (grade 4), package items (grade 1-3; 0 = masked)] per target.

    pairwise: mean over ordered pairs (higher grade i, lower grade j) of -log sigmoid(s_i - s_j),
    each pair weighted by level_weights[4 - grade_i] when given (the seed's --rankloss_weights:
    positive, clicked, exposed, random); listwise: cross-entropy between softmax(scores) and
    targets proportional to 2^grade - 1. Returns the mean over targets that have at least one
    valid package item.
    """
    scores = torch.cat([s_pos.unsqueeze(1), s_pkg], 1)                  # [N, 1 + K]
    g = torch.cat([torch.full_like(grade[:, :1], 4), grade], 1)
    valid = g > 0
    has = valid[:, 1:].any(1)
    if not has.any():
        return scores.sum() * 0.0
    if mode == "pairwise":
        pair = (g.unsqueeze(2) > g.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)   # [N, 1+K, 1+K]
        lp = F.logsigmoid(scores.unsqueeze(2) - scores.unsqueeze(1))
        if level_weights is not None:
            w = scores.new_tensor(level_weights + [0.0] * (5 - len(level_weights)))[(4 - g).clamp(0, 4)]   # [N, 1+K]
            lp = lp * w.unsqueeze(2)
        per = -(lp * pair).sum((1, 2)) / pair.sum((1, 2)).clamp(min=1)
    else:
        target = (2.0 ** g - 1) * valid
        target = target / target.sum(1, keepdim=True)
        logp = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), 1)
        per = -(target * torch.where(valid, logp, torch.zeros_like(logp))).sum(1)
    return per[has].mean()


def nce_weights(scheme, pos_act, loss, click_weight=2.0, gamma=2.0, click_rate=0.1, expo_weight=1.0, cap=0.0):
    """Per-target weights by the target's action (action ids: 1 exposure, 2 click, 3 conversion).

    fixed: clicks weigh click_weight, exposures expo_weight; cb: class-balanced, 1 / (2 * class
    share) so both classes weigh the same in total, the larger weight at most `cap` times the
    smaller when cap > 0; focal: (1 - p_pos)^gamma with p_pos = exp(-loss), detached.
    """
    click = pos_act >= CLICK
    if scheme == "none":
        return torch.ones_like(loss)
    if scheme == "fixed":
        return torch.where(click, click_weight, expo_weight).to(loss.dtype)
    if scheme == "cb":
        r = min(max(click_rate, 1e-6), 1 - 1e-6)
        wc, we = 0.5 / r, 0.5 / (1 - r)
        if cap > 0:
            wc, we = min(wc, cap * we), min(we, cap * wc)
        return torch.where(click, wc, we).to(loss.dtype)
    if scheme == "focal":
        return (1 - torch.exp(-loss.detach())).clamp(min=0).pow(gamma)
    raise ValueError(f"unknown nce_weight_scheme {scheme!r}")


class Trainer(torch.nn.Module):
    """The whole loss as one forward(), so DistributedDataParallel sees every parameter use.

    forward(batch) -> (total, parts, last): parts maps each loss term's name ("nce", and "rank"
    with the rank loss) to its value, total is their sum weighted by `weights`, and last holds
    each user's newest-position query asking for a click (what the hard-negative cache ranks
    with), detached.
    """

    def __init__(self, model, cfg: ObjectiveConfig, log_pop: torch.Tensor, num_items: int, click_rate: float):
        super().__init__()
        self.model, self.cfg, self.num_items, self.click_rate = model, cfg, num_items, click_rate
        self.weights = {"nce": 1.0, "rank": cfg.lambda_rank}
        self.register_buffer("log_pop", log_pop, persistent=False)

    def forward(self, batch: dict):
        m, c = self.model, self.cfg
        h = m.encode(batch)                                                # [B, T, d]
        valid = (batch["pos_row"] > 0) & (m.token_types(batch) != PAD)    # [B, T]
        pos_act, pos_ids = batch["pos_action"][valid], batch["pos_row"][valid]
        q = m.query(h[valid], pos_act if m.cfg.action_cond else None)     # [N, d + content]
        negs = m.scored_items(batch, "neg_") if c.num_neg else None
        # full softmax without per-target inputs (leave-one-out CTR, extra negatives) is plain
        # cross-entropy over the catalogue's vectors: no separate target tower, no masks
        # (a target shown as a new item has its own input too: see dataset_packed.PackedCollate)
        fast = (c.full_softmax and not m.data.use_itemctr and not c.rank_pkg_as_neg and "hard_row" not in batch
                and not m.data.new_item_events)
        pos = None if fast else m.scored_items(batch, "pos_")[batch["pos_inv"][valid]]
        # dot scoring has no temperature: the vectors' norms set the logits' scale
        cosine = m.cfg.score == "cosine"
        tau = torch.full(pos_ids.shape, c.temperature if cosine else 1.0, device=q.device)
        if c.two_tau and cosine:
            tau = torch.where(pos_act >= CLICK, c.tau_click, c.tau_expo).float()
        sub = None
        if len(pos_ids) > c.in_batch_max:
            sub = torch.randperm(len(pos_ids), device=pos_ids.device)[:c.in_batch_max]
        qn = m.normalize(q)
        posn = None if fast else m.normalize(pos)
        bias = pos_bias = avail = None
        if m.has_pair_bias():
            pos_ts = batch["pos_ts"][valid]

            def bias(ids):
                return m.pair_bias(ids, pos_ts)

            def avail(ids):
                return m.available(ids, pos_ts)
            if m.cfg.age_unseen == "bias" or not m.cfg.item_age:
                avail = None                     # unseen items stay candidates, with pair_bias's unseen bias
            pos_bias = bias(pos_ids.unsqueeze(1)).squeeze(1)
        pkg = pkg_ids = None
        hard, hard_ids = [], []
        if "pkg_row" in batch:
            pkg = m.normalize(m.scored_items(batch, "pkg_")[batch["pkg_inv"][valid]])             # [N, 5, d + content]
            pkg_ids = batch["pkg_row"][valid] * (batch["pkg_grade"][valid] > 0)
            if c.rank_pkg_as_neg:
                hard, hard_ids = [pkg], [pkg_ids]
        if "hard_row" in batch:
            B, K = batch["hard_row"].shape
            user_of = torch.arange(B, device=h.device).unsqueeze(1).expand_as(valid)[valid]     # [N]
            hv = m.normalize(m.scored_items(batch, "hard_")).view(B, K, -1)                     # [B, K, d + content]
            hard.append(hv[user_of])                                                          # [N, K, d + content]
            hard_ids.append(batch["hard_row"][user_of])
        if fast:
            # 1/tau folded into the queries: one pass less over the [N, num_items] matrix
            if bias is None:
                logits = (qn / tau.unsqueeze(1)) @ m.normalize(negs).T              # [N, num_items]
            else:
                logits = (qn @ m.normalize(negs).T + bias(batch["neg_row"])) / tau.unsqueeze(1)
                if avail is not None:
                    logits = logits.masked_fill(~avail(batch["neg_row"]), float("-inf"))
            loss = F.cross_entropy(logits, pos_ids - 1, reduction="none")
            s_pos = logits.gather(1, (pos_ids - 1).unsqueeze(1)).squeeze(1) * tau
        else:
            loss, s_pos = info_nce(qn, posn, pos_ids, None if negs is None else m.normalize(negs),
                                   batch.get("neg_row"), tau, self.log_pop if c.logq and not c.full_softmax else None,
                                   self.num_items, c.in_batch_neg and not c.full_softmax, sub,
                                   torch.cat(hard, 1) if hard else None, torch.cat(hard_ids, 1) if hard else None,
                                   available=avail, bias=bias, pos_bias=pos_bias)
        w = nce_weights(c.nce_weight_scheme, pos_act, loss, c.click_weight, c.focal_gamma, self.click_rate,
                        c.expo_weight, c.weight_cap)
        parts = {"nce": (loss * w).sum() / w.sum().clamp(min=1e-9)}
        if c.use_rankloss:
            # an accidental hit (package item == target) is masked, not ranked below itself
            grade = batch["pkg_grade"][valid] * (pkg_ids != pos_ids.unsqueeze(1))
            s_pkg = (qn.unsqueeze(1) * pkg).sum(-1)                                            # [N, 5]
            if bias is not None:
                s_pkg = s_pkg + bias(batch["pkg_row"][valid])
            rt = tau if c.rankloss_tau <= 0 or not cosine else torch.full_like(tau, c.rankloss_tau)
            parts["rank"] = rank_loss(s_pos / rt, s_pkg / rt.unsqueeze(1), grade, c.rankloss_mode,
                                      c.rank_level_weights)
        total = sum(self.weights[name] * value for name, value in parts.items())
        nxt = torch.full_like(batch["user_id"], CLICK) if m.cfg.action_cond else None
        last = m.score_queries(m.query(h[:, -1], nxt).detach())                              # [B, d + content + bias]
        return total, parts, last


class HardNegativeCache:
    """Per-user items the model currently scores high that are not the user's positives.

    Refreshed during training: a random pool of `pool` catalogue items is embedded with the
    current item tower every `refresh` optimizer steps; after each step the batch's users get
    their top-`k` pool items, excluding every item of their training sequence. Persisted (atomic
    write, restricted unpickler on load) to USER_CACHE_PATH/hard_negative_cache.pkl and reused
    by the next run on the same data: the file records the training sequence file it was built
    from (size and time) and the catalogue size; a cache of other data, or of none recorded, is
    set aside with a notice and a new one started. Training only: inference never reads it.
    """

    def __init__(self, path: str, k: int, pool: int, refresh: int, source: str = None, num_items: int = 0,
                 say=print):
        self.path, self.k, self.pool, self.refresh = path, k, pool, refresh
        self.stamp = {"seq": file_fingerprint(source) if source else None, "num_items": int(num_items)}
        self.items = {}
        if os.path.exists(path):
            data = load_pickle(path)
            if not isinstance(data, dict) or not isinstance(data.get("items"), dict) \
                    or not all(isinstance(v, list) for v in data["items"].values()):
                if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                    say(f"notice: {path} records no data it was built from (an older cache): starting a new one")
                    return
                raise DataError(f"{path}: expected a dict with 'source' and 'items' (user re-id -> list of item re-ids)")
            if not self._same(data.get("source")):
                say(f"notice: {path} was built from other data than {source} ({self.num_items_of(data)} items, "
                    f"now {num_items}, or the sequence file changed): starting a new one")
                return
            self.items = data["items"]
        self.pool_rows = self.pool_vecs = None

    @staticmethod
    def num_items_of(data) -> str:
        src = data.get("source")
        return str(src.get("num_items")) if isinstance(src, dict) else "unknown"

    def _same(self, recorded) -> bool:
        if not isinstance(recorded, dict) or recorded.get("num_items") != self.stamp["num_items"]:
            return False
        if self.stamp["seq"] is None:
            return recorded.get("seq") is None
        return same_source(recorded.get("seq"), self.stamp["seq"]["path"])

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(user_ids), self.k), np.int64)
        for i, u in enumerate(user_ids.tolist()):
            v = self.items.get(u, [])[:self.k]
            out[i, :len(v)] = v
        return out

    @torch.no_grad()
    def refresh_pool(self, model, table, num_items: int, device) -> None:
        was = model.training
        model.eval()
        n = min(self.pool, num_items)
        self.pool_rows = torch.randperm(num_items)[:n].numpy() + 1
        vecs = [model.item_vectors({k: v.to(device) for k, v in table.gather(self.pool_rows[i:i + 4096], "p_").items()}, "p_")
                for i in range(0, n, 4096)]
        self.pool_vecs = torch.cat(vecs)
        model.train(was)

    @torch.no_grad()
    def update(self, user_ids: torch.Tensor, queries: torch.Tensor, user_items: list) -> None:
        """user_items: each user's every training item (the whole line, not just the window)."""
        scores = queries @ self.pool_vecs.T                                    # [B, pool]
        extra = max((len(s) for s in user_items), default=0)
        top = scores.topk(min(self.k + extra, scores.shape[1]), 1).indices.cpu().numpy()
        for u, idx, own in zip(user_ids.tolist(), top, user_items):
            if u > 0:      # unknown users share id 0: no per-user cache
                own = set(own.tolist())
                self.items[u] = [int(r) for r in self.pool_rows[idx] if int(r) not in own][:self.k]

    def save(self) -> None:
        dump_pickle({"source": self.stamp, "items": self.items}, self.path)


class Negatives:
    """The objective's negatives for each batch, as ObjectiveConfig asks: shared uniform samples
    (num_neg > 0) or the whole catalogue (num_neg = -1, its inputs built once), and per-user hard
    negatives from a HardNegativeCache (use_hard_neg) refreshed every hard_neg_refresh optimizer
    steps. The training loop calls add() before the forward pass and update() after it."""

    def __init__(self, cfg: ObjectiveConfig, table, num_items: int, device, cache_dir: str, source: str = None,
                 say=print):
        from dataset_packed import sample_negatives
        self.cfg, self.table, self.num_items, self.device = cfg, table, num_items, device
        self._sample = sample_negatives
        self.full = None
        if cfg.full_softmax:             # the catalogue's inputs never change
            self.full = {k: v.to(device) for k, v in sample_negatives(table, -1, num_items).items()}
        self.hard = None
        if cfg.use_hard_neg:
            self.hard = HardNegativeCache(os.path.join(cache_dir, "hard_negative_cache.pkl"), cfg.hard_neg_k,
                                          cfg.hard_neg_pool, cfg.hard_neg_refresh, source, num_items, say)

    def add(self, batch: dict) -> None:
        """Put this batch's negatives into `batch` (prefixes neg_ and hard_)."""
        if self.cfg.num_neg:
            batch.update(self.full or self._sample(self.table, self.cfg.num_neg, self.num_items))
        if self.hard is not None and self.hard.items:
            rows = self.hard.lookup(batch["user_id"].numpy())
            batch.update(self.table.gather(rows.reshape(-1), "hard_"))
            batch["hard_row"] = torch.from_numpy(rows)

    def update(self, model, user_ids: torch.Tensor, last_q: torch.Tensor, user_items: list, refresh: bool) -> None:
        """After a forward pass: re-embed the hard-negative pool when `refresh` (or never done),
        then give the batch's users their current hard negatives."""
        if self.hard is None:
            return
        if self.hard.pool_vecs is None or refresh:
            self.hard.refresh_pool(model, self.table, self.num_items, self.device)
        self.hard.update(user_ids, last_q, user_items)

    def save(self) -> None:
        if self.hard is not None:
            self.hard.save()
