"""HSTU generative retrieval model (and a SASRec-style transformer for comparison).

Tokens are [user token] + the user's item events. An item token fuses item id, sparse and array
features, multimodal vectors and item CTR through one feature tower (the same function embeds
history items, training targets, negatives and inference candidates); event-level inputs (action,
hour/weekday/week, gap to the previous event, running user CTR) are added to the token. The
encoder output at each position, optionally told which action to predict next, is the query for
the next item; retrieval is by cosine similarity. With item_age, a learned bias by the item's age
(time since its first training event, measured at the newest one) joins the score as one more
vector coordinate: popularity in ad and news logs decays with age, and a cold item is the newest.
In training an item first seen after a request is, for that request, either no candidate
(age_unseen "mask") or a candidate with one learned bias of its own ("bias", the default). With
item_recent, a learned bias by the item's share of recent events joins the same coordinate: in
training the share of the calendar day before each request, at inference the share of the events
the served histories hold in the day after the training data ends (the training's last day
without any), so a new item that users have already met on the serving side is not scored as
unknown. With content_channel, K more coordinates score a linear map of the query state against a
linear map of the item's raw multimodal vectors, outside the cosine: the tower's output leans on id
rows a cold item does not have, this term is the same for items with and without training events.

Differences from the HSTU paper: softmax attention is the default (the paper's pointwise SiLU
is `hstu_attn="silu"`, normalised by the number of visible keys rather than the padded length so
that padding changes nothing); relative position/time biases are per head, on log buckets of the
distance and of the time gap between the query's own event and the key's (the published code
takes the query's time from the next event: the target's own timestamp); no FFN after HSTU
blocks, as in the paper. The published block's other choices are options (hstu_silu_norm,
hstu_qk_scale, hstu_dropout, hstu_init, rel_time_base). The model knows tensors only: readers
build the batch dict (see dataset_packed.PackedCollate).

Attention: softmax without relative bias runs with no mask: each block's attention takes its
tokens in causal order (each row's real tokens first, padding after; see causal_order), where
is_causal alone is exact, so SDPA may use its flash kernels. Relative bias and SiLU attention
keep the explicit mask. Both give the same outputs at every position (tests/test_model.py).
"""
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layout import CLICK, ITEM_TOKEN, PAD, RECENT_BUCKETS, TIME_VOCAB, USER_TOKEN, DataConfig

# item_age: under a day, then one bucket per doubling of days (the last: 2^14 days and older)
AGE_BUCKETS = 16


@dataclass(frozen=True)
class ModelConfig:
    encoder_type: str = "hstu"        # hstu | transformer
    hidden_units: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    dqk: int = 32                     # per-head query/key width (HSTU)
    dv: int = 32                      # per-head value width (HSTU)
    dropout_rate: float = 0.2
    attn_dropout: float = 0.0         # on attention weights; non-zero forces SDPA's slow math path on CPU
    emb_init_std: float = 1.0         # < 1: small-init mode (every embedding table, zero tower biases)
    norm_first: bool = True
    norm_type: str = "rmsnorm"        # rmsnorm | layernorm
    hstu_attn: str = "softmax"        # softmax | silu
    hstu_silu_norm: str = "visible"   # silu weights over: visible = the keys each query sees; length = the window (published)
    hstu_qk_scale: bool = True        # q.k / sqrt(dqk) (off: unscaled, as published)
    hstu_dropout: str = "output"      # output: after the output projection; gate: on norm(AV) * U before it (published)
    hstu_init: str = "torch"          # torch: nn.Linear's default; published: U/V/Q/K N(0, 0.02), output Xavier
    use_rope: bool = False
    use_rel_bias: bool = False
    rel_pos_buckets: int = 32
    rel_time_buckets: int = 32
    rel_time_base: float = 2.0        # time bucket = floor(log_base(1 + gap seconds)); the published HSTU: ~1.35
    rel_bias_terms: str = "pos+time"  # pos+time | time | pos: which relative biases use_rel_bias learns
    use_abs_pos: bool = True
    use_senet: bool = False
    action_cond: bool = False
    use_user_id: bool = True          # user-id embedding in the user token (off: features only)
    item_tower: str = "add"           # mlp | add | id (FeatureTower)
    score: str = "cosine"             # cosine: L2-normalised vectors over a temperature; dot: raw inner product
    query_head: bool = True           # a linear head on the encoder state (off: the state is the query)
    use_type_emb: bool = True         # token-type and action rows added to every token
    use_user_token: bool = True       # the user token leads the sequence (off: item events only)
    hstu_ffn: bool = False            # a point-wise feed-forward sub-layer after each HSTU attention
    grad_checkpoint: bool = False
    feat_dim: int = 32                # width of each feature embedding; 0 = hidden_units
    use_item_id: bool = True          # item-id row in the item tower (off: features only)
    senet_reduction: int = 2          # SENet bottleneck: blocks // this
    rope_theta: float = 10000.0       # RoPE base
    rope_dim: int = 0                 # RoPE on the first rope_dim dims of each head (0 = all)
    cold_ids: str = "mask"            # mask: items without a training event use id row 0 (features only); keep
    item_age: bool = False            # a learned score bias by item age (time since its first training event)
    cold_neighbors: int = 0           # a cold candidate scored as the mean of its K nearest trained items by content
    age_unseen: str = "bias"          # item_age, training: an item first seen after a request is mask = no candidate; bias = one with a learned bias
    item_recent: bool = False         # a learned score bias by the item's share of recent events (the day before a request)
    content_channel: int = 0          # K > 0: K more score coordinates matching the query to the item's raw multimodal vectors, no id

    # Fields added after checkpoints were first written, each with the value that reproduces a
    # checkpoint written before it existed; renamed, removed and moved fields
    # (checkpoint.config_from_dict). The data's sizes and feature switches live in DataConfig
    # (layout.py) only: earlier checkpoints also kept a copy here, which is dropped on load.
    LEGACY: ClassVar[dict] = {"item_tower": "mlp", "score": "cosine", "query_head": True, "use_type_emb": True,
                              "use_user_token": True, "hstu_ffn": False, "cold_ids": "keep", "age_unseen": "mask"}
    RENAMED: ClassVar[dict] = {}
    REMOVED: ClassVar[dict] = {}
    MOVED: ClassVar[tuple] = ("maxlen", "num_users", "num_items", "user_sparse", "user_array", "item_sparse",
                              "item_array", "mm_dims", "use_timefeat", "use_userctr", "use_itemctr")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def small_init_(emb: nn.Embedding, std: float) -> None:
    """Rows N(0, std), the padding row (if any) kept at zero: small-init mode's embedding init."""
    nn.init.normal_(emb.weight, std=std)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].zero_()


def make_norm(kind: str, d: int) -> nn.Module:
    return RMSNorm(d) if kind == "rmsnorm" else nn.LayerNorm(d)


class SENet(nn.Module):
    """Squeeze-and-excitation over feature blocks: one learned gate per block and example."""

    def __init__(self, num_blocks, reduction=2):
        super().__init__()
        h = max(1, num_blocks // reduction)
        self.fc = nn.Sequential(nn.Linear(num_blocks, h), nn.ReLU(), nn.Linear(h, num_blocks))

    def forward(self, blocks):                    # [..., n_blocks, f]
        gate = torch.sigmoid(self.fc(blocks.mean(-1)))
        return blocks * gate.unsqueeze(-1) * 2.0   # x2 so gates start near identity (sigmoid(0)=.5)


class FeatureTower(nn.Module):
    """Embeds one entity (item or user) from id, sparse, array, multimodal and CTR inputs.

    kind "mlp": each input is one block of width f; blocks are optionally gated by SENet,
    concatenated and projected to hidden_units by a 2-layer MLP. kind "add": the id row (width
    hidden_units) plus that MLP over the other blocks, so the id keeps a plain row of its own.
    kind "id": the plain id row only (features unused), as in SASRec. `id_dropout` (set by the
    trainer) zeroes the id block of random examples so the tower learns to rely on features for
    cold ids.
    """

    def __init__(self, num_ids, sparse, array, mm_dims, use_ctr, d, f, use_senet, init_std=1.0, kind="mlp",
                 senet_reduction=2, sid_vocab=(), new_row=False):
        super().__init__()
        self.kind = kind
        if kind == "id":
            sparse, array, mm_dims, use_ctr, sid_vocab = {}, {}, {}, False, ()
        # new_row: one more learned row, num_ids + 1, shared by every entity shown without its id
        # (new and cold items, dropped ids)
        self.new_id = num_ids + 1 if new_row else None
        self.id_emb = nn.Embedding(num_ids + 1 + int(new_row), d if kind != "mlp" else f, padding_idx=0)
        self.sparse = nn.ModuleList(nn.Embedding(v, f, padding_idx=0) for v in sparse.values())
        self.array = nn.ModuleList(nn.Embedding(v, f, padding_idx=0) for v in array.values())
        self.mm_fids = list(mm_dims)
        self.mm = nn.ModuleList(nn.Linear(dim, f) for dim in mm_dims.values())
        self.mm_missing = nn.Parameter(torch.zeros(len(mm_dims), f)) if mm_dims else None
        self.ctr = nn.Linear(1, f) if use_ctr else None
        # one table per semantic-id column (code 0: no code), each a feature block like a sparse one
        self.sid = nn.ModuleList(nn.Embedding(v, f, padding_idx=0) for v in sid_vocab)
        n_blocks = (int(kind == "mlp") + len(self.sparse) + len(self.array) + len(self.mm) + int(use_ctr)
                    + len(self.sid))
        self.senet = SENet(n_blocks, senet_reduction) if use_senet and n_blocks else None
        self.proj = nn.Sequential(nn.Linear(n_blocks * f, d), nn.SiLU(), nn.Linear(d, d)) if n_blocks else None
        self.id_dropout = 0.0
        if init_std != 1.0:
            # small-init mode (see GenerativeRecommender): rows N(0, init_std), zero biases, so
            # the tower's output starts item-specific instead of one shared bias vector
            for emb in [self.id_emb, *self.sparse, *self.array, *self.sid]:
                small_init_(emb, init_std)
            for lin in [*(self.proj or []), *self.mm, self.ctr]:
                if isinstance(lin, nn.Linear):
                    nn.init.zeros_(lin.bias)

    def forward(self, x):
        ids = x["id"]
        if self.training and self.id_dropout > 0 and self.new_id is not None:
            drop = (torch.rand(ids.shape, device=ids.device) < self.id_dropout) & (ids > 0)
            ids = ids.masked_fill(drop, self.new_id)
        e = self.id_emb(ids)
        if self.training and self.id_dropout > 0 and self.new_id is None:
            keep = (torch.rand(ids.shape, device=ids.device) >= self.id_dropout).to(e.dtype)
            e = e * keep.unsqueeze(-1)
        blocks = [e] if self.kind == "mlp" else []
        blocks += [emb(x["sparse"][..., j]) for j, emb in enumerate(self.sparse)]
        for j, emb in enumerate(self.array):
            v = x["array"][..., j, :]                            # [..., A]
            cnt = (v > 0).sum(-1, keepdim=True).clamp(min=1).to(e.dtype)
            blocks.append(emb(v).sum(-2) / cnt)                  # mean over present values
        for j, (fid, lin) in enumerate(zip(self.mm_fids, self.mm)):
            present = x["mm_mask"][..., j].unsqueeze(-1).to(e.dtype)
            blocks.append(lin(x[f"mm_{fid}"].to(e.dtype)) * present + self.mm_missing[j] * (1 - present))
        if self.ctr is not None:
            blocks.append(self.ctr(x["ctr"].unsqueeze(-1).to(e.dtype)))
        blocks += [emb(x["sid"][..., j]) for j, emb in enumerate(self.sid)]
        if not blocks:
            return e                                              # kind "id": [..., d]
        b = torch.stack(blocks, -2)                               # [..., n_blocks, f]
        if self.senet is not None:
            b = self.senet(b)
        out = self.proj(b.flatten(-2))                            # [..., d]
        return out if self.kind == "mlp" else e + out


def rel_pos_bucket(dist: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of a non-negative distance: exact below num_buckets/2, log-spaced above (to 1024)."""
    exact = num_buckets // 2
    dist = dist.clamp(min=0)
    log_b = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(1024 / exact)
                     * (num_buckets - exact)).long()
    return torch.where(dist < exact, dist, log_b.clamp(max=num_buckets - 1))


def rel_time_bucket(gap: torch.Tensor, num_buckets: int, base: float = 2.0) -> torch.Tensor:
    """floor(log_base(1 + gap seconds)), capped at num_buckets - 1; negative gaps count as 0."""
    g = 1.0 + gap.clamp(min=0).double()
    lg = torch.log2(g) if base == 2.0 else torch.log(g) / math.log(base)
    return torch.floor(lg).long().clamp(max=num_buckets - 1)


def rope(x, cos, sin):                             # x [B, H, T, dh]; cos/sin [B, 1, T, r/2], r <= dh
    r = 2 * cos.shape[-1]
    if r < x.shape[-1]:                            # rope_dim: rotate the first r dims, pass the rest
        return torch.cat([rope(x[..., :r], cos, sin), x[..., r:]], -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class RelativeBias(nn.Module):
    """Learned per-head bias over bucketed relative positions and time gaps (query - key). The
    time gap is the query's own event time minus the key's: the query position's request time is
    taken as its newest event, never the next (target) event's time, which the published HSTU
    uses and which is unknown when the prediction is made."""

    def __init__(self, cfg):
        super().__init__()
        terms = cfg.rel_bias_terms.split("+")
        self.pos = nn.Embedding(cfg.rel_pos_buckets, cfg.num_heads) if "pos" in terms else None
        self.time = nn.Embedding(cfg.rel_time_buckets, cfg.num_heads) if "time" in terms else None
        for emb in (self.pos, self.time):
            if emb is not None:
                nn.init.zeros_(emb.weight)

    def forward(self, pos_b, time_b):              # [T, T] and [B, T, T] -> [B, H, T, T]
        out = 0
        if self.pos is not None:
            # the position term depends on (query, key) only: look it up once, not per example
            out = self.pos(pos_b).permute(2, 0, 1).unsqueeze(0)
        if self.time is not None:
            out = out + self.time(time_b).permute(0, 3, 1, 2)
        return out


class HSTUBlock(nn.Module):
    """One HSTU layer: pointwise projection to U, V, Q, K (SiLU), attention, norm(A V) * U."""

    def __init__(self, cfg):
        super().__init__()
        d, h = cfg.hidden_units, cfg.num_heads
        self.cfg, self.h, self.dqk, self.dv = cfg, h, cfg.dqk, cfg.dv
        self.norm = make_norm(cfg.norm_type, d)
        self.uvqk = nn.Linear(d, h * (2 * cfg.dv + 2 * cfg.dqk))
        self.attn_norm = make_norm(cfg.norm_type, h * cfg.dv)
        self.out = nn.Linear(h * cfg.dv, d)
        self.drop = nn.Dropout(cfg.dropout_rate)
        self.rel = RelativeBias(cfg) if cfg.use_rel_bias else None
        self.ffn = FeedForward(cfg) if cfg.hstu_ffn else None
        if cfg.hstu_init == "published":
            nn.init.normal_(self.uvqk.weight, std=0.02)
            nn.init.zeros_(self.uvqk.bias)
            nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        y = self.norm(x) if self.cfg.norm_first else x
        y = to_causal_order(y, ctx)
        u, v, q, k = torch.split(F.silu(self.uvqk(y)), [self.h * self.dv, self.h * self.dv,
                                                         self.h * self.dqk, self.h * self.dqk], -1)
        q = q.view(B, T, self.h, self.dqk).transpose(1, 2)     # [B, H, T, dqk]
        k = k.view(B, T, self.h, self.dqk).transpose(1, 2)
        v = v.view(B, T, self.h, self.dv).transpose(1, 2)      # [B, H, T, dv]
        if ctx.get("rope") is not None:
            q, k = rope(q, *ctx["rope"]), rope(k, *ctx["rope"])
        if not self.cfg.hstu_qk_scale:
            q = q * math.sqrt(self.dqk)                        # attention() divides by it again
        bias = self.rel(ctx["pos_b"], ctx["time_b"]).to(q.dtype) if self.rel is not None else None
        silu_div = ctx["window"] if self.cfg.hstu_silu_norm == "length" else None
        a = attention(q, k, v, ctx["allowed"], bias, self.cfg.hstu_attn,
                      self.cfg.attn_dropout if self.training else 0.0, ctx.get("real"), silu_div)
        a = a.transpose(1, 2).reshape(B, T, self.h * self.dv)  # [B, T, H*dv]
        # back in the batch's order before dropout, so each token draws the same dropout mask
        # on either path
        gated = from_causal_order(self.attn_norm(a) * u, ctx)
        if self.cfg.hstu_dropout == "gate":
            x = x + self.out(self.drop(gated))
        else:
            x = x + self.drop(self.out(gated))
        x = x if self.cfg.norm_first else self.norm(x)
        return x if self.ffn is None else self.ffn(x)


class FeedForward(nn.Module):
    """Point-wise feed-forward sub-layer with its own norm and residual (HSTU blocks with hstu_ffn)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_units
        self.cfg, self.norm = cfg, make_norm(cfg.norm_type, d)
        self.net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout_rate), nn.Linear(d, d))
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x):
        y = self.norm(x) if self.cfg.norm_first else x
        x = x + self.drop(self.net(y))
        return x if self.cfg.norm_first else self.norm(x)


class TransformerBlock(nn.Module):
    """SASRec-style block: multi-head softmax attention + point-wise FFN, residuals."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_units
        self.cfg, self.h = cfg, cfg.num_heads
        self.norm1, self.norm2 = make_norm(cfg.norm_type, d), make_norm(cfg.norm_type, d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout_rate), nn.Linear(d, d))
        self.drop = nn.Dropout(cfg.dropout_rate)
        self.rel = RelativeBias(cfg) if cfg.use_rel_bias else None

    def forward(self, x, ctx):
        B, T, d = x.shape
        y = to_causal_order(self.norm1(x) if self.cfg.norm_first else x, ctx)
        q, k, v = (t.view(B, T, self.h, d // self.h).transpose(1, 2) for t in self.qkv(y).chunk(3, -1))
        if ctx.get("rope") is not None:
            q, k = rope(q, *ctx["rope"]), rope(k, *ctx["rope"])
        bias = self.rel(ctx["pos_b"], ctx["time_b"]).to(q.dtype) if self.rel is not None else None
        a = attention(q, k, v, ctx["allowed"], bias, "softmax", self.cfg.attn_dropout if self.training else 0.0,
                      ctx.get("real"))
        x = x + self.drop(self.o(from_causal_order(a.transpose(1, 2).reshape(B, T, d), ctx)))
        if not self.cfg.norm_first:
            x = self.norm1(x)
        y = self.norm2(x) if self.cfg.norm_first else x
        x = x + self.drop(self.ffn(y))
        return x if self.cfg.norm_first else self.norm2(x)


def causal_order(real: torch.Tensor):
    """Token order in which causal attention alone equals the encoder's mask (a real query sees
    the real keys up to itself, a padding query itself), for any padding layout: each row's real
    tokens first, in their order, then its padding. A real query then sees exactly the real
    tokens up to itself; attention() gives a padding query its own value.
    Returns flat row indices into [B*T] to that order and back, and `real` in that order."""
    B, T = real.shape
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices         # [B, T]
    back = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=real.device).expand(B, T))
    base = (torch.arange(B, device=real.device) * T).unsqueeze(1)
    return (order + base).reshape(-1), (back + base).reshape(-1), real.gather(1, order)


class _Reorder(torch.autograd.Function):
    """Rows of a [N, c] tensor in the order `to`; `back` is its inverse, so the gradient is a
    gather too (index_select's own backward is a scatter-add: slower, and atomic on CUDA)."""

    @staticmethod
    def forward(ctx, x, to, back):
        ctx.save_for_backward(back)
        return x.index_select(0, to)

    @staticmethod
    def backward(ctx, grad):
        back, = ctx.saved_tensors
        return grad.index_select(0, back), None, None


def to_causal_order(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """[B, T, c] tokens into causal order (unchanged on the masked path)."""
    if ctx.get("order") is None:
        return x
    to, back = ctx["order"]
    return _Reorder.apply(x.reshape(-1, x.shape[-1]), to, back).view(x.shape)


def from_causal_order(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """[B, T, c] tokens from causal order back to the batch's order."""
    if ctx.get("order") is None:
        return x
    to, back = ctx["order"]
    return _Reorder.apply(x.reshape(-1, x.shape[-1]), back, to).view(x.shape)


def attention(q, k, v, allowed, bias, kind: str, dropout_p: float, real=None, silu_div=None) -> torch.Tensor:
    """Masked attention. allowed: bool [B, 1, T, T] (a real query: the real keys up to itself; a
    padding query: itself).

    softmax goes through scaled_dot_product_attention (flash / memory-efficient kernels on GPU);
    masked keys get exactly zero weight. silu is HSTU's pointwise form divided by the number of
    visible keys, or by silu_div (the published form: the window length) where given.

    allowed None (softmax without bias only): the tokens are in causal order (see causal_order:
    real tokens first, padding after), where causal attention alone is the same as the mask, so
    no mask is passed and SDPA may pick its flash kernel. real: bool [B, 1, T, 1] in that order;
    a padding query attends to itself alone under the mask, so its output is its own value.
    """
    if allowed is None:
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return a if real is None else torch.where(real, a, v)
    if kind == "softmax":
        if bias is None:
            mask = allowed
        else:
            mask = bias.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    w = F.silu(s) * allowed
    w = w / (allowed.sum(-1, keepdim=True).clamp(min=1) if silu_div is None else silu_div)
    if dropout_p:
        w = F.dropout(w, dropout_p)
    return w @ v


def sid_vocab(data: DataConfig) -> list:
    """Table sizes of the semantic-id columns: codes 1..K of each level, 0 for none."""
    return [len(c) + 1 for c in data.sid.get("centroids", ())] if data.use_sid else []


class GenerativeRecommender(nn.Module):
    """The encoder with its item and user towers. cfg: the model's own settings; data: the data's
    schema and feature switches (table sizes, feature ids, time and CTR channels)."""

    def __init__(self, cfg: ModelConfig, data: DataConfig):
        super().__init__()
        self.cfg, self.data = cfg, data
        d, f = cfg.hidden_units, cfg.feat_dim or cfg.hidden_units
        self.item_tower = FeatureTower(data.num_items if cfg.use_item_id else 0, data.item_sparse, data.item_array,
                                       data.mm_dims, data.use_itemctr, d, f, cfg.use_senet, cfg.emb_init_std,
                                       cfg.item_tower, cfg.senet_reduction, sid_vocab(data),
                                       new_row=cfg.cold_ids == "mask" and cfg.use_item_id)
        if cfg.cold_ids == "mask" or cfg.cold_neighbors:
            # Set by the trainer, saved with the weights: which item ids have an id row worth using
            # (an event in training past the item's first new_item_events), and the time before
            # which an event shows its item as new (SequenceBuilder rebuilds those flags from it at
            # inference). The rest are embedded with the new-item row plus their features, in
            # training and at inference alike: an id row that never got a gradient is noise.
            self.register_buffer("item_trained", torch.ones(data.num_items + 1, dtype=torch.bool))
            self.register_buffer("item_young_until", torch.zeros(data.num_items + 1, dtype=torch.long))
        if cfg.item_age:
            # Set by the trainer, saved with the weights: each item's first training event (-1: none)
            # and the newest training event, the time ages are measured at (see age_bucket).
            self.register_buffer("item_first_seen", torch.full((data.num_items + 1,), -1, dtype=torch.long))
            self.register_buffer("age_ref", torch.zeros((), dtype=torch.long))
            self.age_bias = nn.Parameter(torch.zeros(AGE_BUCKETS))
            if cfg.age_unseen == "bias":
                # training only: the bias of an item at a request before its first training event
                # (inference ages every item at age_ref, where none is unseen)
                self.unseen_bias = nn.Parameter(torch.zeros(()))
        if cfg.item_recent:
            # Set by the trainer: each item's bucket (dataset.recent_buckets) on each training day,
            # column 0 the day before the first (training only, rebuilt from the data, not saved);
            # and, saved, the newest training event and the buckets of its day, which inference
            # scores when the served histories hold no later event.
            self.register_buffer("recent_days", torch.zeros((data.num_items + 1, 1), dtype=torch.uint8),
                                 persistent=False)
            self.recent_first_day = 0
            self.register_buffer("recent_ref", torch.zeros((), dtype=torch.long))
            self.register_buffer("recent_bucket", torch.zeros(data.num_items + 1, dtype=torch.uint8))
            self.recent_bias = nn.Parameter(torch.zeros(RECENT_BUCKETS))
        if cfg.content_channel:
            # The content channel: a linear map of the item's raw multimodal vectors (no id, no
            # tower) scored against a linear map of the query state. Its K coordinates are the
            # same function for an item with training events and for one without, so what training
            # learns there about tastes and content carries to cold items whole; the tower's
            # output is dominated by id rows that a cold item does not have. The query side
            # starts at zero: the channel opens as training finds it useful.
            mm_total = sum(data.mm_dims.values())
            self.content_item = nn.Linear(mm_total, cfg.content_channel, bias=False)
            self.content_query = nn.Linear(d, cfg.content_channel, bias=False)
            nn.init.zeros_(self.content_query.weight)
        self.user_tower = FeatureTower(data.num_users if cfg.use_user_id else 0, data.user_sparse, data.user_array, {},
                                       False, d, f, cfg.use_senet, cfg.emb_init_std, senet_reduction=cfg.senet_reduction)
        self.type_emb = nn.Embedding(3, d) if cfg.use_type_emb else None
        self.action_emb = nn.Embedding(4, d, padding_idx=0) if cfg.use_type_emb else None
        self.pos_emb = nn.Embedding(data.maxlen + 2, d, padding_idx=0) if cfg.use_abs_pos else None
        if data.use_timefeat:
            self.time_emb = nn.ModuleDict({k: nn.Embedding(v, d, padding_idx=0) for k, v in TIME_VOCAB.items()})
            self.gap_proj = nn.Linear(1, d)
        self.user_ctr_proj = nn.Linear(1, d) if data.use_userctr else None
        self.emb_drop = nn.Dropout(cfg.dropout_rate)
        block = HSTUBlock if cfg.encoder_type == "hstu" else TransformerBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.num_blocks))
        self.final_norm = make_norm(cfg.norm_type, d)
        self.next_action_emb = nn.Embedding(4, d, padding_idx=0) if cfg.action_cond else None
        self.head = nn.Linear(d, d) if cfg.query_head else None
        # False forces the masked attention path everywhere (tests and benchmarks compare the two)
        self.mask_free = True
        if cfg.emb_init_std != 1.0:
            # Small-init mode. With nn.Embedding's unit rows, the position/type/action rows added
            # to each token (norm ~sqrt(d)) drown the item's own vector, and items start as one
            # shared tower bias: on Beauty the model then sat at popularity level for 8+ epochs
            # (valid HR@10 0.019 at epoch 4 vs 0.052 in this mode). Adam also moves small rows
            # relatively faster. The demo data prefers unit rows (BENCHMARKS.md), hence a flag.
            for emb in [self.type_emb, self.action_emb, self.pos_emb, self.next_action_emb,
                        *(self.time_emb.values() if data.use_timefeat else [])]:
                if emb is not None:
                    small_init_(emb, cfg.emb_init_std)
        if cfg.use_rope:
            dh = cfg.rope_dim or (cfg.dqk if cfg.encoder_type == "hstu" else d // cfg.num_heads)
            self.register_buffer("rope_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, dh, 2).float() / dh),
                                 persistent=False)

    def set_id_dropout(self, p: float, item_p: float = 0.0) -> None:
        """Id dropout of both towers (p), the item tower's at least item_p."""
        self.user_tower.id_dropout = p
        self.item_tower.id_dropout = max(p, item_p)

    def set_trained_items(self, trained: torch.Tensor, young_until: torch.Tensor = None) -> None:
        """trained: bool [num_items + 1], the item ids whose id rows training uses; young_until:
        dataset.young_until (None: no event shows a new item)."""
        if hasattr(self, "item_trained"):
            self.item_trained.copy_(trained.to(self.item_trained.device))
            if young_until is not None:
                self.item_young_until.copy_(young_until.to(self.item_young_until.device))

    def set_first_seen(self, first_seen: torch.Tensor, ref: int) -> None:
        """first_seen: long [num_items + 1], each item's first training event (-1: none); ref:
        the newest training event (Unix seconds)."""
        if self.cfg.item_age:
            self.item_first_seen.copy_(first_seen.to(self.item_first_seen.device))
            self.age_ref.fill_(int(ref))
            seen = first_seen[first_seen >= 0]
            self._days = (int(seen.min()) // 86400 if len(seen) else int(ref) // 86400, int(ref) // 86400)

    def set_recent(self, days: torch.Tensor, first_day: int, ref: int) -> None:
        """days: uint8 [num_items + 1, D], each item's bucket on each calendar day from first_day
        (dataset.item_time_stats); ref: the newest training event (Unix seconds), on the last day."""
        if self.cfg.item_recent:
            dev = self.recent_bucket.device
            self.recent_days = torch.cat([torch.zeros_like(days[:, :1]), days], 1).to(dev)    # [n + 1, D + 1]
            self.recent_first_day = int(first_day)
            self.recent_ref.fill_(int(ref))
            self.recent_bucket.copy_(days[:, -1].to(dev))

    def has_pair_bias(self) -> bool:
        """Whether scores carry a bias coordinate (item_age, item_recent)."""
        return self.cfg.item_age or self.cfg.item_recent

    def recent_pair(self, ids: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """Recent-activity bias of item ids at request times ts [N], from each item's bucket on
        the calendar day before the request's: ids [M] -> [N, M], ids [N, K] -> [N, K]. Items
        beyond the table and days outside the training data take bucket 0 (no event)."""
        n, width = self.recent_days.shape
        if ids.dim() != 1:
            col = (torch.div(ts, 86400, rounding_mode="floor") - self.recent_first_day).clamp(0, width - 1)   # [N]
            b = self.recent_days[ids.clamp(0, n - 1), col.unsqueeze(1)] * ((ids > 0) & (ids < n))          # [N, K]
            return self.recent_bias[b.long()]
        days, inv = torch.unique(torch.div(ts, 86400, rounding_mode="floor"), return_inverse=True)        # [D], [N]
        return self._recent_rows(ids, days).index_select(0, inv)                                         # [N, M]

    def _recent_rows(self, ids: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
        """[D, M]: the recent-activity bias of item ids [M] for requests on calendar days [D]."""
        n, width = self.recent_days.shape
        col = (days - self.recent_first_day).clamp(0, width - 1)                                       # [D]
        b = self.recent_days[ids.clamp(0, n - 1)][:, col] * ((ids > 0) & (ids < n)).unsqueeze(1)        # [M, D]
        return self.recent_bias[b.t().long()]                                                         # [D, M]

    def recent_of(self, ids: torch.Tensor, buckets: torch.Tensor = None) -> torch.Tensor:
        """Inference's recent-activity bias of item ids: their buckets (default: the training's
        last day; an id beyond the table has bucket 0) -> bias, the shape of ids."""
        if buckets is None:
            n = len(self.recent_bucket)
            buckets = self.recent_bucket[ids.clamp(0, n - 1)] * ((ids > 0) & (ids < n))
        return self.recent_bias[buckets.long()]

    def _first(self, ids: torch.Tensor) -> tuple:
        """(first training event of item ids, whether the id has one)."""
        n = len(self.item_first_seen)
        first = self.item_first_seen[ids.clamp(0, n - 1)]
        return first, (ids > 0) & (ids < n) & (first >= 0)

    @staticmethod
    def age_bucket_of(days: torch.Tensor) -> torch.Tensor:
        """Bucket of ages in whole days (calendar days, UTC): 0 the same day (or a negative age),
        then one per doubling of days (1, 2-3, 4-7, ...), at most AGE_BUCKETS - 1."""
        d = days.float().clamp(min=0.5)
        return (torch.log2(d).floor() + 1).clamp(0, AGE_BUCKETS - 1).long()

    def age_bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """Age bucket of item ids (any shape) on the day of the newest training event (age_ref),
        as inference scores them. An id without a training event (a cold candidate, id -1 or
        beyond the table) has age 0: an item the training data never showed arrived after it."""
        first, known = self._first(ids)
        days = torch.div(self.age_ref, 86400, rounding_mode="floor") - torch.div(first, 86400, rounding_mode="floor")
        return self.age_bucket_of(days.masked_fill(~known, 0))

    def age_days(self, ids: torch.Tensor, ts: torch.Tensor) -> tuple:
        """(bias by day difference [2 span + 1], request days [N], first days of ids, span): the
        bias of a (request, item) pair is table[request day - first day + span]; days are clamped
        to the training data's first..last day."""
        first, known = self._first(ids)
        lo, hi = self._days
        day_m = torch.div(first, 86400, rounding_mode="floor").masked_fill(~known, hi).clamp(lo, hi)
        day_n = torch.div(ts, 86400, rounding_mode="floor").clamp(lo, hi)
        span = hi - lo
        table = self.age_bias[self.age_bucket_of(torch.arange(-span, span + 1, device=ts.device))]    # [2 span + 1]
        return table, day_n, day_m, span

    def pair_bias(self, ids: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """Age bias of item ids at request times ts [N], as training scores them: ids [M] -> [N, M]
        (every request against every candidate), ids [N, K] -> [N, K] (each request its own). The
        [N, M] work is one subtraction of day numbers and one lookup in a table of the bias by day
        difference (the buckets' log2 runs on that table only); an id without a training event
        counts as first seen on the last day. Requests share few days: the [N, M] form looks up
        one row per distinct request day and copies rows, not an index per pair. With age_unseen
        "bias", a pair whose item is not yet available at the request (see available) takes
        unseen_bias instead. With item_recent, each pair's recent-activity bias (recent_pair) is
        added; without item_age it is the whole bias."""
        if not self.cfg.item_age:
            return self.recent_pair(ids, ts)
        if ids.dim() != 1:
            table, day_n, day_m, span = self.age_days(ids, ts)
            out = table[day_n.unsqueeze(1) - day_m + span]
            if self.cfg.item_recent:
                out = out + self.recent_pair(ids, ts)
        else:
            days, inv = torch.unique(torch.div(ts, 86400, rounding_mode="floor"), return_inverse=True)    # [D], [N]
            table, day_d, day_m, span = self.age_days(ids, days * 86400)
            rows = table[day_d.unsqueeze(1) - day_m + span]                                          # [D, M]
            if self.cfg.item_recent:
                rows = rows + self._recent_rows(ids, days)
            out = rows.index_select(0, inv)                                                          # [D, M] -> [N, M]
        if self.cfg.age_unseen == "bias":
            out = torch.where(self.available(ids, ts), out, self.unseen_bias)
        return out

    def available(self, ids: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """bool [N, M]: item ids [M] (or [N, K] -> [N, K]) existed at request times ts [N] (first seen
        at or before it). An item that training never shows is unavailable to every training request."""
        first, known = self._first(ids)
        first = first.masked_fill(~known, torch.iinfo(torch.long).max)
        return (first.unsqueeze(0) if ids.dim() == 1 else first) <= ts.unsqueeze(1)

    def score_items(self, v: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors as inference scores them (see normalize), with item_age one more
        coordinate: the item's age bias at age_ref, which the query's constant last coordinate adds
        to every score. So the bias is part of the vectors every retrieval backend ranks by.
        Training adds each pair's bias at its request time instead (pair_bias). With item_recent
        the coordinate adds the item's recent-activity bias on the training's last day (export
        replaces it where served histories hold later events)."""
        v = self.normalize(v)
        if not self.has_pair_bias():
            return v
        bias = self.age_bias[self.age_bucket(ids)] if self.cfg.item_age else torch.zeros(ids.shape, device=v.device)
        if self.cfg.item_recent:
            bias = bias + self.recent_of(ids)
        return torch.cat([v, bias.unsqueeze(-1).to(v.dtype)], -1)                                  # [..., d + 1]

    def score_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Query vectors as inference scores them: normalised, with item_age or item_recent a last
        coordinate of 1."""
        q = self.normalize(q)
        return torch.cat([q, torch.ones_like(q[..., :1])], -1) if self.has_pair_bias() else q

    @property
    def vector_dim(self) -> int:
        """Width of the vectors retrieval ranks (user_vectors, item_vectors)."""
        return self.cfg.hidden_units + self.cfg.content_channel + int(self.has_pair_bias())

    @staticmethod
    def _sub(batch, prefix):
        n = len(prefix)
        return {k[n:]: v for k, v in batch.items() if k.startswith(prefix)}

    def embed_items(self, batch: dict, prefix: str) -> torch.Tensor:
        """The single item-embedding function: history tokens, targets, negatives, candidates."""
        x = {k: v for k, v in self._sub(batch, prefix).items() if k != "inv"}
        ids = x["id"]                    # -1: shown as a new item (young event, cold candidate)
        if not self.cfg.use_item_id:
            x["id"] = torch.zeros_like(ids)
        elif self.cfg.cold_ids == "mask":
            known = ids.clamp(min=0)
            new = (ids < 0) | ((ids > 0) & ~self.item_trained[known])
            x["id"] = known.masked_fill(new, self.item_tower.new_id)
        else:
            x["id"] = ids.clamp(min=0)
        return self.item_tower(x)

    def content_of(self, batch: dict, prefix: str) -> torch.Tensor:
        """The content channel's item side [..., K]: a linear map of the raw multimodal vectors,
        each missing one contributing nothing (an item without any scores 0 there)."""
        x = self._sub(batch, prefix)
        parts = [x[f"mm_{fid}"].float() * x["mm_mask"][..., j].unsqueeze(-1).float()
                 for j, fid in enumerate(self.data.mm_dims)]
        return self.content_item(torch.cat(parts, -1))

    def scored_items(self, batch: dict, prefix: str) -> torch.Tensor:
        """Item vectors as scores use them, before normalize: the tower's output [..., d], and
        with content_channel its K content coordinates after it [..., d + K]."""
        v = self.embed_items(batch, prefix)
        if not self.cfg.content_channel:
            return v
        return torch.cat([v, self.content_of(batch, prefix).to(v.dtype)], -1)

    def token_types(self, batch: dict) -> torch.Tensor:
        """Token types [B, T] as the encoder sees them: without the user token it is padding."""
        tt = batch["token_type"]
        return tt if self.cfg.use_user_token else tt.masked_fill(tt == USER_TOKEN, PAD)

    def encode(self, batch: dict) -> torch.Tensor:
        """Encoder states [B, T, d] for the token sequence in `batch` (left-padded)."""
        cfg = self.cfg
        tt = self.token_types(batch)
        B, T = tt.shape
        x = self.embed_items(batch, "seq_")[batch["seq_inv"]]            # [U, d] -> [B, T, d]
        x = x * (tt == ITEM_TOKEN).unsqueeze(-1)
        uid = batch["user_id"] if cfg.use_user_id else torch.zeros_like(batch["user_id"])
        user = self.user_tower({"id": uid, "sparse": batch["user_sparse"],
                                "array": batch["user_array"]})        # [B, d]
        x = torch.where((tt == USER_TOKEN).unsqueeze(-1), user.unsqueeze(1).to(x.dtype), x)
        if self.type_emb is not None:
            x = x + self.type_emb(tt) + self.action_emb(batch["action"])
        if self.pos_emb is not None:
            x = x + self.pos_emb(batch["pos_idx"])
        if self.data.use_timefeat:
            for k, emb in self.time_emb.items():
                x = x + emb(batch[k])
            x = x + self.gap_proj(batch["gap_log"].unsqueeze(-1).to(x.dtype))
        if self.user_ctr_proj is not None:
            x = x + self.user_ctr_proj(batch["user_ctr"].unsqueeze(-1).to(x.dtype))
        real = tt != PAD
        x = self.emb_drop(x) * real.unsqueeze(-1)

        idx = torch.arange(T, device=tt.device)
        pos_idx = batch["pos_idx"]
        if self.mask_free and not cfg.use_rel_bias and (cfg.encoder_type != "hstu" or cfg.hstu_attn == "softmax"):
            # no mask: each block attends in causal order (real tokens first), where is_causal
            # alone is exact; the rest of the block stays in the batch's order
            to, back, real_c = causal_order(real)
            ctx = {"allowed": None, "order": (to, back), "real": real_c.view(B, 1, T, 1)}
            pos_idx = pos_idx.reshape(-1)[to].view(B, T)
        else:
            causal = idx.view(1, T) <= idx.view(T, 1)                   # [T, T] key <= query
            # a padding query sees itself alone (padding before the events, the readers' layout,
            # sees nothing else anyway): so is it in causal order, and the paths agree everywhere
            allowed = (causal & real.unsqueeze(1) & real.unsqueeze(2)) | torch.eye(T, dtype=torch.bool, device=tt.device)
            ctx = {"allowed": allowed.unsqueeze(1)}                     # [B, 1, T, T]
        ctx["window"] = self.data.maxlen + 1                               # tokens a window holds
        if cfg.use_rel_bias:
            ts = batch["ts"]
            ctx["pos_b"] = rel_pos_bucket(idx.view(T, 1) - idx.view(1, T), cfg.rel_pos_buckets)     # [T, T]
            ctx["time_b"] = rel_time_bucket(ts.unsqueeze(2) - ts.unsqueeze(1), cfg.rel_time_buckets,
                                            cfg.rel_time_base)                  # [B, T, T] query - key
        if cfg.use_rope:
            ang = pos_idx.float().unsqueeze(-1) * self.rope_freq          # [B, T, dh/2], attention's order
            ctx["rope"] = (ang.cos().unsqueeze(1).to(x.dtype), ang.sin().unsqueeze(1).to(x.dtype))
        for blk in self.blocks:
            if cfg.grad_checkpoint and self.training:
                x = checkpoint(blk, x, ctx, use_reentrant=False)
            else:
                x = blk(x, ctx)
        return self.final_norm(x)

    def query(self, h: torch.Tensor, next_action: torch.Tensor = None) -> torch.Tensor:
        """Query vectors from encoder states; next_action (action id + 1) conditions the head."""
        if self.next_action_emb is not None and next_action is not None:
            h = h + self.next_action_emb(next_action)
        q = self.head(h) if self.head is not None else h
        if not self.cfg.content_channel:
            return q
        return torch.cat([q, self.content_query(h)], -1)                                         # [..., d + K]

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        """Vectors as they are scored (float32): unit length for cosine scoring, as-is for dot.
        The content channel's K coordinates (after the first d) are never normalised: their dot
        product is a score term of its own, not part of the cosine."""
        v = v.float()
        if self.cfg.score != "cosine":
            return v
        if not self.cfg.content_channel:
            return F.normalize(v, dim=-1)
        d = self.cfg.hidden_units
        return torch.cat([F.normalize(v[..., :d], dim=-1), v[..., d:]], -1)

    @torch.no_grad()
    def user_vectors(self, batch: dict) -> torch.Tensor:
        """The query of each user's newest position, asking for a click next (as scored: see normalize)."""
        h = self.encode(batch)[:, -1]
        nxt = torch.full(h.shape[:1], CLICK, dtype=torch.long, device=h.device)
        return self.score_queries(self.query(h, nxt))

    @torch.no_grad()
    def item_vectors(self, batch: dict, prefix: str = "cand_") -> torch.Tensor:
        return self.score_items(self.scored_items(batch, prefix), batch[prefix + "id"])
