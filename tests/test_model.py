"""Model tests: references for norms/attention/buckets, causality, padding invariance, training steps."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M

T = 9


DATA_FIELDS = ("maxlen", "num_users", "num_items", "user_sparse", "user_array", "item_sparse", "item_array",
               "mm_dims", "use_timefeat", "use_userctr", "use_itemctr")


def make_cfg(**kw):
    """(ModelConfig, DataConfig) of a tiny model; keyword arguments go to whichever owns them."""
    base = dict(hidden_units=16, num_blocks=2, num_heads=2, dqk=8, dv=8, dropout_rate=0.0, maxlen=T - 1,
                num_users=20, num_items=50, user_sparse={"103": 5}, user_array={"106": 4},
                item_sparse={"100": 6, "101": 7}, item_array={"125": 5}, mm_dims={"81": 4},
                use_timefeat=True, use_userctr=True, use_itemctr=True, item_tower="mlp", feat_dim=0)
    base.update(kw)
    return (M.ModelConfig(**{k: v for k, v in base.items() if k not in DATA_FIELDS}),
            M.DataConfig(**{k: v for k, v in base.items() if k in DATA_FIELDS}))


def make_batch(B=3, n_events=(8, 5, 2), seed=0):
    """Left-padded batch like dataset.SequenceBuilder writes: [pad..., user, items...]."""
    g = torch.Generator().manual_seed(seed)
    b = {"token_type": torch.zeros(B, T, dtype=torch.long), "action": torch.zeros(B, T, dtype=torch.long),
         "pos_idx": torch.zeros(B, T, dtype=torch.long), "ts": torch.zeros(B, T, dtype=torch.long)}
    for k, hi in M.TIME_VOCAB.items():
        b[k] = torch.randint(1, hi, (B, T), generator=g)
    b["gap_log"] = torch.rand(B, T, generator=g)
    b["user_ctr"] = torch.randn(B, T, generator=g)
    b["seq_id"] = torch.randint(1, 51, (B, T), generator=g)
    b["seq_sparse"] = torch.stack([torch.randint(0, 6, (B, T), generator=g), torch.randint(0, 7, (B, T), generator=g)], -1)
    b["seq_array"] = torch.randint(0, 5, (B, T, 1, 3), generator=g)
    b["seq_mm_81"] = torch.randn(B, T, 4, generator=g)
    b["seq_mm_mask"] = torch.rand(B, T, 1, generator=g) > 0.3
    b["seq_ctr"] = torch.randn(B, T, generator=g)
    for i, n in enumerate(n_events):
        s = T - 1 - n
        b["token_type"][i, s] = M.USER_TOKEN
        b["token_type"][i, s + 1:] = M.ITEM_TOKEN
        b["action"][i, s + 1:] = torch.randint(1, 3, (n,), generator=g)
        b["pos_idx"][i, s:] = torch.arange(1, n + 2)
        ts = 1_700_000_000 + torch.cumsum(torch.randint(1, 5000, (n,), generator=g), 0)
        b["ts"][i, s + 1:] = ts
        b["ts"][i, s] = ts[0]
    b["user_id"] = torch.randint(1, 21, (B,), generator=g)
    b["user_sparse"] = torch.randint(0, 5, (B, 1), generator=g)
    b["user_array"] = torch.randint(0, 4, (B, 1, 3), generator=g)
    return b


def pack(b):
    """Per-token item inputs -> one row per token plus seq_inv, the collate's packed form."""
    out = {k: (v.flatten(0, 1) if k.startswith("seq_") else v) for k, v in b.items()}
    B, Tb = b["token_type"].shape
    out["seq_inv"] = torch.arange(B * Tb).view(B, Tb)
    return out


OPTIONS = [dict(), dict(encoder_type="transformer"), dict(hstu_attn="silu"), dict(use_rope=True),
           dict(use_rel_bias=True), dict(use_senet=True), dict(action_cond=True), dict(norm_type="layernorm"),
           dict(norm_first=False), dict(use_rel_bias=True, hstu_attn="silu", use_rope=True),
           dict(use_rel_bias=True, hstu_attn="silu", hstu_silu_norm="length", hstu_qk_scale=False,
                hstu_dropout="gate", hstu_init="published", rel_time_base=1.35, rel_time_buckets=64),
           dict(use_rel_bias=True, rel_bias_terms="time"), dict(use_rel_bias=True, rel_bias_terms="pos",
                                                               encoder_type="transformer")]


def test_rmsnorm_matches_formula():
    x = torch.randn(4, 7)
    n = M.RMSNorm(7)
    n.weight.data = torch.randn(7)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref)


def naive_attention(q, k, v, allowed, bias, kind, silu_div=None):
    B, H, Tq, dh = q.shape
    out = torch.zeros(B, H, Tq, v.shape[-1])
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(Tq) if allowed[b, 0, i, j]]
                s = torch.stack([(q[b, h, i] * k[b, h, j]).sum() / math.sqrt(dh) + (bias[b, h, i, j] if bias is not None else 0)
                                 for j in keys])
                w = torch.softmax(s, 0) if kind == "softmax" else F.silu(s) / (silu_div or len(keys))
                out[b, h, i] = sum(w[n] * v[b, h, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("kind", ["softmax", "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_against_naive_loop(kind, with_bias):
    torch.manual_seed(0)
    B, H, Tq, dh = 2, 2, 5, 3
    q, k, v = torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, 4)
    real = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    idx = torch.arange(Tq)
    allowed = ((idx.view(1, Tq) <= idx.view(Tq, 1)) & real.unsqueeze(1)) | torch.eye(Tq, dtype=torch.bool)
    allowed = allowed.unsqueeze(1)
    bias = torch.randn(B, H, Tq, Tq) if with_bias else None
    torch.testing.assert_close(M.attention(q, k, v, allowed, bias, kind, 0.0),
                               naive_attention(q, k, v, allowed, bias, kind), atol=1e-5, rtol=1e-4)


def test_silu_divided_by_the_window_against_naive_loop():
    """hstu_silu_norm="length": the published normalisation, one constant for every query."""
    torch.manual_seed(0)
    B, H, Tq, dh = 2, 2, 6, 4
    q, k, v = torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, 3)
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    idx = torch.arange(Tq)
    allowed = (((idx.view(1, Tq) <= idx.view(Tq, 1)) & real.unsqueeze(1)) | torch.eye(Tq, dtype=torch.bool)).unsqueeze(1)
    bias = torch.randn(B, H, Tq, Tq)
    torch.testing.assert_close(M.attention(q, k, v, allowed, bias, "silu", 0.0, silu_div=9),
                               naive_attention(q, k, v, allowed, bias, "silu", silu_div=9), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("base,buckets", [(2.0, 32), (1.35, 64), (10.0, 5)])
@pytest.mark.parametrize("terms", ["pos+time", "time", "pos"])
def test_relative_bias_against_naive_loop(base, buckets, terms):
    """The bias each head adds at (query i, key j): the position row of bucket(i - j) plus the
    time row of floor(log_base(1 + ts_i - ts_j)), capped, from one Python loop over every pair,
    on a sequence with same-second events and a gap past the last bucket."""
    torch.manual_seed(0)
    cfg, data = make_cfg(use_rel_bias=True, rel_time_base=base, rel_time_buckets=buckets, rel_bias_terms=terms)
    m = M.GenerativeRecommender(cfg, data).eval()
    rel = m.blocks[0].rel
    for emb in (rel.pos, rel.time):
        if emb is not None:
            emb.weight.data = torch.randn_like(emb.weight)
    ts = torch.tensor([[0, 100, 100, 101, 5000, 90_000, 90_000, 10**9, 10**9 + 7]])
    Tn = ts.shape[1]
    idx = torch.arange(Tn)
    got = rel(M.rel_pos_bucket(idx.view(Tn, 1) - idx.view(1, Tn), cfg.rel_pos_buckets),
              M.rel_time_bucket(ts.unsqueeze(2) - ts.unsqueeze(1), buckets, base))
    want = torch.zeros(1, cfg.num_heads, Tn, Tn)
    for i in range(Tn):
        for j in range(Tn):
            gap = max(0, int(ts[0, i]) - int(ts[0, j]))
            tb = min(buckets - 1, math.floor(math.log(1 + gap) / math.log(base) + 1e-12))
            dist = max(0, i - j)
            pb = dist if dist < cfg.rel_pos_buckets // 2 else None
            for h in range(cfg.num_heads):
                val = 0.0
                if "time" in terms:
                    val += float(rel.time.weight[tb, h].detach())
                if "pos" in terms:
                    if pb is None:
                        pb = int(M.rel_pos_bucket(torch.tensor([dist]), cfg.rel_pos_buckets))
                    val += float(rel.pos.weight[pb, h].detach())
                want[0, h, i, j] = val
    torch.testing.assert_close(got.expand_as(want), want)
    assert ("pos" in terms) == (rel.pos is not None) and ("time" in terms) == (rel.time is not None)


@pytest.mark.parametrize("opts", [dict(use_rel_bias=True), dict(use_rel_bias=True, hstu_attn="silu"),
                                  dict(use_rel_bias=True, encoder_type="transformer"),
                                  dict(use_rel_bias=True, rel_time_base=1.35, rel_time_buckets=128)])
def test_the_target_timestamp_does_not_change_the_prediction(opts):
    """A request's time bias uses the query position's own event time, never the target's:
    two sequences that differ only in the target event's timestamp (and the calendar features
    it sets) give the same queries for that target, at every earlier position too."""
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(**opts)).eval()
    for emb in (m.blocks[0].rel.pos, m.blocks[0].rel.time):
        emb.weight.data = torch.randn_like(emb.weight)          # the bias must matter for the test to bite
    a = make_batch()
    b = {k: v.clone() for k, v in a.items()}
    b["ts"][:, -1] = a["ts"][:, -1] + 86_400 * 30                # the target: a month later
    for key in ("hour", "weekday", "week", "gap_bucket"):
        b[key][:, -1] = a[key][:, -1] % 3 + 1
    b["gap_log"][:, -1] = a["gap_log"][:, -1] + 5.0
    ha, hb = m.encode(pack(a)), m.encode(pack(b))
    torch.testing.assert_close(ha[:, :-1], hb[:, :-1])
    nxt = torch.full((ha.shape[0],), M.CLICK)
    torch.testing.assert_close(m.query(ha[:, -2], nxt), m.query(hb[:, -2], nxt))
    # the check can fail: the same change one position earlier moves the last query
    c = {k: v.clone() for k, v in a.items()}
    c["ts"][:, -2] = a["ts"][:, -2] - 86_400 * 30
    assert not torch.allclose(m.encode(pack(a))[:, -1], m.encode(pack(c))[:, -1])


def test_published_hstu_options_change_the_block():
    """Each published-HSTU option is live: the same weights give other outputs with it, and the
    published init draws U/V/Q/K weights at std 0.02."""
    torch.manual_seed(0)
    base_cfg, data = make_cfg(use_rel_bias=True, hstu_attn="silu", dropout_rate=0.3)
    base = M.GenerativeRecommender(base_cfg, data)
    b = pack(make_batch())
    for opts in (dict(hstu_silu_norm="length"), dict(hstu_qk_scale=False), dict(rel_time_base=1.35)):
        other = M.GenerativeRecommender(*make_cfg(use_rel_bias=True, hstu_attn="silu", dropout_rate=0.3, **opts))
        other.load_state_dict(base.state_dict())
        for mm in (base, other):
            mm.eval()
            for blk in mm.blocks:
                blk.rel.time.weight.data = torch.linspace(-1, 1, blk.rel.time.weight.numel()).view_as(blk.rel.time.weight)
        assert not torch.allclose(base.encode(b), other.encode(b)), opts
    gate = M.GenerativeRecommender(*make_cfg(use_rel_bias=True, hstu_attn="silu", dropout_rate=0.3, hstu_dropout="gate"))
    gate.load_state_dict(base.state_dict())
    gate.eval(), base.eval()
    torch.testing.assert_close(gate.encode(b), base.encode(b))   # dropout placement only matters in training
    gate.train(), base.train()
    torch.manual_seed(1)
    hg = gate.encode(b)
    torch.manual_seed(1)
    assert not torch.allclose(hg, base.encode(b))
    pub = M.GenerativeRecommender(*make_cfg(hidden_units=64, dqk=32, dv=32, hstu_init="published"))
    w = pub.blocks[0].uvqk.weight
    assert abs(w.std().item() - 0.02) < 0.002 and pub.blocks[0].uvqk.bias.abs().max() == 0


def test_bucket_functions_hand_computed():
    assert M.rel_time_bucket(torch.tensor([0, 1, 2, 3, 1022, 1023, -5, 10**9]), 16).tolist() == [0, 1, 1, 2, 9, 10, 0, 15]
    b = M.rel_pos_bucket(torch.tensor([0, 1, 15, 16, 32, 1024, 5000]), 32).tolist()
    assert b[:3] == [0, 1, 15]            # exact below num_buckets / 2
    assert 16 <= b[3] <= b[4] <= b[5] == b[6] == 31


@pytest.mark.parametrize("opts", OPTIONS)
def test_no_future_leakage(opts):
    """Changing events after position t changes no encoder output at or before t."""
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(**opts)).eval()
    a = make_batch()
    b = {k: v.clone() for k, v in a.items()}
    t = 5                                      # positions > t are changed for every user
    for key in ("seq_id", "seq_sparse", "seq_array", "seq_mm_81", "seq_ctr", "action", "gap_log", "user_ctr",
                "hour", "weekday", "week", "gap_bucket"):
        b[key][:, t + 1:] = a[key][:, t + 1:].flip(0)
    b["ts"][:, t + 1:] = b["ts"][:, t + 1:] + 99_999
    ha, hb = m.encode(pack(a)), m.encode(pack(b))
    torch.testing.assert_close(ha[:, :t + 1], hb[:, :t + 1])
    assert not torch.allclose(ha[:, t + 1:], hb[:, t + 1:])


@pytest.mark.parametrize("opts", [o for o in OPTIONS if o.get("hstu_silu_norm") != "length"])
def test_left_padding_does_not_change_outputs(opts):
    """The same events with more left padding (a longer window) give the same outputs (not so
    with the published SiLU normalisation, which divides by the window length)."""
    torch.manual_seed(0)
    m1 = M.GenerativeRecommender(*make_cfg(**opts)).eval()
    cfg2 = make_cfg(maxlen=T - 1 + 4, **opts)
    m2 = M.GenerativeRecommender(*cfg2).eval()
    sd = m1.state_dict()
    sd2 = m2.state_dict()
    for k, v in sd.items():
        if k == "pos_emb.weight":
            sd2[k][:v.shape[0]] = v
        else:
            sd2[k] = v
    m2.load_state_dict(sd2)
    a = make_batch()
    pad = {k: (torch.cat([torch.zeros(v.shape[0], 4, *v.shape[2:], dtype=v.dtype), v], 1) if v.dim() > 1 and v.shape[1] == T else v)
           for k, v in a.items()}
    torch.testing.assert_close(m1.encode(pack(a)), m2.encode(pack(pad))[:, 4:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("opts", OPTIONS)
def test_training_step_reduces_loss(opts):
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(**opts))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    b = make_batch()
    item = {"id": b["seq_id"], "sparse": b["seq_sparse"], "array": b["seq_array"], "mm_81": b["seq_mm_81"],
            "mm_mask": b["seq_mm_mask"], "ctr": b["seq_ctr"]}
    losses = []
    for _ in range(15):
        h = m.encode(pack(b))[:, :-1].reshape(-1, 16)
        q = F.normalize(m.query(h, b["action"][:, 1:].reshape(-1)), dim=-1)
        tgt = F.normalize(m.item_tower({k: v[:, 1:].flatten(0, 1) for k, v in item.items()}), dim=-1)
        loss = F.cross_entropy(q @ tgt.T / 0.1, torch.arange(len(q)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_id_dropout_only_in_training_and_senet_shapes():
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(use_senet=True))
    b = make_batch()
    m.set_id_dropout(1.0)
    m.eval()
    e1 = m.embed_items(pack(b), "seq_")
    m.set_id_dropout(0.0)
    torch.testing.assert_close(e1, m.embed_items(pack(b), "seq_"))   # eval ignores id dropout
    m.train()
    m.set_id_dropout(1.0)
    m.item_tower.id_emb.weight.data.normal_()
    out_drop = m.item_tower({"id": b["seq_id"], "sparse": b["seq_sparse"], "array": b["seq_array"],
                             "mm_81": b["seq_mm_81"], "mm_mask": b["seq_mm_mask"], "ctr": b["seq_ctr"]})
    no_id = m.item_tower({"id": torch.full_like(b["seq_id"], m.item_tower.new_id), "sparse": b["seq_sparse"],
                          "array": b["seq_array"], "mm_81": b["seq_mm_81"], "mm_mask": b["seq_mm_mask"],
                          "ctr": b["seq_ctr"]})
    torch.testing.assert_close(out_drop, no_id)                # p = 1 shows every item as new (its id row only)


def test_small_init_mode_sets_every_table_and_zero_tower_biases():
    torch.manual_seed(0)
    unit, small = M.GenerativeRecommender(*make_cfg()), M.GenerativeRecommender(*make_cfg(emb_init_std=0.02))
    tables = lambda m: {n: p.detach() for n, p in m.named_parameters() if n.endswith("weight") and "emb" in n}
    assert set(tables(small)) == set(tables(unit)) and len(tables(small)) >= 6
    for n, w in tables(small).items():
        rows = w[w.abs().sum(-1) > 0]                      # padding rows are zero
        assert 0.01 < float(rows.std()) < 0.03, n
        assert float(tables(unit)[n][tables(unit)[n].abs().sum(-1) > 0].std()) > 0.5, n
    for tw in (small.item_tower, small.user_tower):
        assert all(float(l.bias.detach().abs().max()) == 0 for l in tw.modules() if isinstance(l, torch.nn.Linear))
    # items that differ only by id start distinct in direction (a shared bias would make them
    # nearly parallel, and position rows of unit scale would drown them in the token)
    n = 8
    x = {"id": torch.arange(1, n + 1), "sparse": torch.zeros(n, 2, dtype=torch.long),
         "array": torch.zeros(n, 1, 3, dtype=torch.long), "mm_81": torch.zeros(n, 4),
         "mm_mask": torch.zeros(n, 1, dtype=torch.bool), "ctr": torch.zeros(n)}
    with torch.no_grad():
        v = F.normalize(small.item_tower(x), dim=-1)
    off = (v @ v.T)[~torch.eye(n, dtype=torch.bool)]
    assert float(off.mean()) < 0.5


def test_user_id_switch():
    """use_user_id=False: the user's id never reaches the output (its features still do), and the
    user tower keeps no per-user rows; with the id on, changing it changes the output."""
    torch.manual_seed(0)
    a = make_batch()
    b = {k: v.clone() for k, v in a.items()}
    b["user_id"] = a["user_id"] % 20 + 1                 # ids 1..20: every one moves
    assert (b["user_id"] != a["user_id"]).all()
    off = M.GenerativeRecommender(*make_cfg(use_user_id=False)).eval()
    assert off.user_tower.id_emb.num_embeddings == 1
    torch.testing.assert_close(off.encode(pack(a)), off.encode(pack(b)))
    c = {k: v.clone() for k, v in a.items()}
    c["user_sparse"] = (a["user_sparse"] + 1) % 5
    assert not torch.allclose(off.encode(pack(a)), off.encode(pack(c)))
    on = M.GenerativeRecommender(*make_cfg()).eval()
    assert not torch.allclose(on.encode(pack(a)), on.encode(pack(b)))


# ---------------------------------------------------------------------------------------------
# The mask-free attention path (causal order + is_causal) against the masked path
# ---------------------------------------------------------------------------------------------

def relayout(b, where):
    """The batch with each row's real tokens moved to positions `where(row, n_real)` (ascending,
    so their order is kept) and padding everywhere else: per-token tensors only."""
    B, Tb = b["token_type"].shape
    out = {k: v.clone() for k, v in b.items()}
    for i in range(B):
        src = torch.nonzero(b["token_type"][i] != M.PAD).flatten()
        dst = torch.as_tensor(where(i, len(src)))
        for k, v in b.items():
            if v.dim() > 1 and v.shape[1] == Tb:
                row = torch.zeros_like(v[i])
                row[dst] = v[i, src]
                out[k][i] = row
    return out


def right_pad(b):
    return relayout(b, lambda i, n: range(n))


def middle_pad(b):
    """Real tokens spread over the row with padding between them (not a layout the readers
    write, but the mask defines outputs for it too)."""
    g = torch.Generator().manual_seed(1)
    return relayout(b, lambda i, n: torch.randperm(T, generator=g)[:n].sort().values)


class SDPACalls:
    """Records how model.attention calls scaled_dot_product_attention."""

    def __init__(self, monkeypatch):
        self.calls, real = [], F.scaled_dot_product_attention
        def spy(*a, **kw):
            self.calls.append((kw.get("attn_mask") is None, kw.get("is_causal", False)))
            return real(*a, **kw)
        monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)


MASK_FREE = [dict(), dict(encoder_type="transformer"), dict(use_rope=True), dict(use_rope=True, rope_dim=4),
             dict(action_cond=True), dict(norm_type="layernorm", norm_first=False), dict(hstu_ffn=True),
             dict(use_user_token=False), dict(encoder_type="transformer", use_rope=True)]


def test_attention_in_causal_order_matches_naive_masked_loop():
    """attention() without a mask, on q/k/v put in causal_order and put back, equals the masked
    naive loop at every position, for left, right and scattered padding."""
    torch.manual_seed(0)
    B, H, Tq, dh = 3, 2, 6, 3
    q, k, v = torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, dh), torch.randn(B, H, Tq, 4)
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    idx = torch.arange(Tq)
    allowed = ((idx.view(1, Tq) <= idx.view(Tq, 1)) & real.unsqueeze(1) & real.unsqueeze(2)) | torch.eye(Tq, dtype=torch.bool)
    allowed = allowed.unsqueeze(1)
    to, back, real_c = M.causal_order(real)
    assert real_c.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    perm = lambda t, ix: t.transpose(1, 2).reshape(B * Tq, -1)[ix].view(B, Tq, H, -1).transpose(1, 2)
    a = M.attention(perm(q, to), perm(k, to), perm(v, to), None, None, "softmax", 0.0, real_c.view(B, 1, Tq, 1))
    torch.testing.assert_close(perm(a, back), naive_attention(q, k, v, allowed, None, "softmax"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", [lambda b: b, right_pad, middle_pad], ids=["left", "right", "middle"])
@pytest.mark.parametrize("opts", MASK_FREE)
def test_mask_free_path_equals_masked_path(opts, layout, monkeypatch):
    """Softmax attention without relative bias runs without a mask (is_causal only) and gives the
    masked path's outputs at every position; real positions equal the left-padded batch's."""
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(**opts)).eval()
    a = make_batch(B=4, n_events=(8, 5, 2, 1))
    b = pack(layout(a))
    spy = SDPACalls(monkeypatch)
    fast = m.encode(b)
    assert spy.calls and all(c == (True, True) for c in spy.calls)          # no mask, is_causal
    spy.calls.clear()
    m.mask_free = False
    masked = m.encode(b)
    assert spy.calls and all(c == (False, False) for c in spy.calls)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-4)
    real, real_left = b["token_type"] != M.PAD, a["token_type"] != M.PAD
    if not m.cfg.use_user_token:
        real, real_left = real & (b["token_type"] != M.USER_TOKEN), real_left & (a["token_type"] != M.USER_TOKEN)
    torch.testing.assert_close(fast[real], m.encode(pack(a))[real_left], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("opts", [dict(use_rel_bias=True), dict(hstu_attn="silu"),
                                  dict(encoder_type="transformer", use_rel_bias=True)])
def test_bias_and_silu_keep_the_mask(opts, monkeypatch):
    m = M.GenerativeRecommender(*make_cfg(**opts)).eval()
    spy = SDPACalls(monkeypatch)
    m.encode(pack(make_batch()))
    assert all(c == (False, False) for c in spy.calls)                        # silu: no SDPA call at all


def training_batch(b, n_items=50, n_neg=7, seed=0):
    """make_batch's tokens plus the trainer's inputs: next-item targets (packed per token) and
    shared negatives, as PackedCollate and sample_negatives give them."""
    g = torch.Generator().manual_seed(seed)
    B, Tb = b["token_type"].shape
    out = pack(b)
    item = lambda k: b[f"seq_{k}"]
    nxt = lambda t: torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], 1)
    is_item = nxt(b["token_type"]) == M.ITEM_TOKEN
    out["pos_row"] = nxt(item("id")) * is_item
    out["pos_action"] = nxt(b["action"]) * is_item
    for k in ("id", "sparse", "array", "mm_81", "mm_mask", "ctr"):
        out[f"pos_{k}"] = nxt(item(k)).flatten(0, 1)
    out["pos_id"] = out["pos_row"].flatten()
    out["pos_inv"] = torch.arange(B * Tb).view(B, Tb)
    rows = torch.randint(1, n_items + 1, (n_neg,), generator=g)
    out.update(neg_row=rows, neg_id=rows, neg_sparse=torch.randint(0, 6, (n_neg, 2), generator=g),
               neg_array=torch.randint(0, 5, (n_neg, 1, 3), generator=g), neg_mm_81=torch.randn(n_neg, 4, generator=g),
               neg_mm_mask=torch.rand(n_neg, 1, generator=g) > 0.3, neg_ctr=torch.randn(n_neg, generator=g))
    return out


@pytest.mark.parametrize("opts", [dict(), dict(encoder_type="transformer", action_cond=True)])
def test_mask_free_path_same_user_vectors_loss_and_gradients(opts):
    """The whole model on both paths: user vectors, training loss (InfoNCE over in-batch and
    sampled negatives) and every gradient agree, on a left- and a right-padded batch."""
    import objectives as O
    torch.manual_seed(0)
    m = M.GenerativeRecommender(*make_cfg(**opts))
    trainer = O.Trainer(m, O.ObjectiveConfig(num_neg=7), torch.log(torch.rand(50) + 0.1), 50, 0.1)
    for b in (make_batch(B=4, n_events=(8, 5, 2, 1)), right_pad(make_batch(B=4, n_events=(8, 5, 2, 1)))):
        out = []
        for mask_free in (True, False):
            m.mask_free = mask_free
            m.zero_grad()
            loss, _, last = trainer(training_batch(b))
            loss.backward()
            out.append((m.user_vectors(pack(b)), loss.detach(), last,
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        (u1, l1, last1, g1), (u2, l2, last2, g2) = out
        torch.testing.assert_close(u1, u2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last1, last2, atol=1e-5, rtol=1e-4)
        assert g1.keys() == g2.keys() and len(g1) > 10
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
