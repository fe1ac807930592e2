"""InfoNCE, its weighting schemes and the logQ correction against naive per-example references."""
import math

import pytest
import torch
import torch.nn.functional as F

import training
import objectives


def naive_info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop, num_items, in_batch, sub=None):
    """One example at a time: explicit candidate list, explicit skip of accidental hits."""
    N = len(q)
    batch_cols = list(range(N)) if sub is None else sub
    out = []
    for i in range(N):
        cands = []
        if in_batch:
            cands += [(pos[j], int(pos_ids[j]), "batch") for j in batch_cols]
        if negs is not None:
            cands += [(negs[j], int(neg_ids[j]), "neg") for j in range(len(negs))]

        def corr(item):
            if log_pop is None:
                return 0.0
            e = 0.0
            if in_batch:
                e += len(batch_cols) * math.exp(float(log_pop[item]))
            if negs is not None:
                e += len(negs) / num_items
            return math.log(e)

        pos_logit = float(q[i] @ pos[i]) / float(tau[i]) - corr(int(pos_ids[i]))
        logits = [pos_logit]
        for vec, item, _ in cands:
            if item == int(pos_ids[i]):
                continue                      # accidental hit (or the target itself)
            logits.append(float(q[i] @ vec) / float(tau[i]) - corr(item))
        t = torch.tensor(logits, dtype=torch.float64)
        out.append(float(torch.logsumexp(t, 0) - t[0]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("in_batch,with_negs,logq,sub", [(True, True, True, None), (True, False, False, None),
                                                         (False, True, True, None), (True, True, False, None),
                                                         (True, True, True, [4, 0, 2])])
def test_info_nce_matches_naive_loop(in_batch, with_negs, logq, sub, fused):
    torch.manual_seed(0)
    N, S, d, items = 6, 5, 4, 9
    q = F.normalize(torch.randn(N, d), dim=-1)
    pos = F.normalize(torch.randn(N, d), dim=-1)
    pos_ids = torch.tensor([1, 2, 2, 3, 4, 5])               # a duplicate target: accidental hit
    negs = F.normalize(torch.randn(S, d), dim=-1) if with_negs else None
    neg_ids = torch.tensor([3, 6, 7, 1, 8]) if with_negs else None
    tau = torch.tensor([0.05, 0.1, 0.05, 0.2, 0.05, 0.1])
    log_pop = torch.log(torch.softmax(torch.randn(items + 1), 0)) if logq else None
    got, _ = objectives.info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop, items, in_batch,
                           None if sub is None else torch.tensor(sub), fused=fused)
    want = naive_info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop, items, in_batch, sub)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def nce_inputs(N, S, d, logq, sub, two_tau, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    pos = F.normalize(torch.randn(N, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    negs = F.normalize(torch.randn(S, d, generator=g, dtype=dtype), dim=-1).requires_grad_() if S else None
    pos_ids = torch.randint(1, N // 3 + 2, (N,), generator=g)            # many accidental hits
    neg_ids = torch.randint(1, N // 3 + 2, (S,), generator=g) if S else None
    tau = torch.where(torch.rand(N, generator=g) > 0.5, 0.03, 0.05) if two_tau else torch.full((N,), 0.05)
    log_pop = torch.log_softmax(torch.randn(N // 3 + 2, generator=g, dtype=dtype), 0) if logq else None
    sub = torch.randperm(N, generator=g)[:sub] if sub else None
    return q, pos, negs, (pos_ids, neg_ids, tau.to(dtype), log_pop, N // 3 + 1, True, sub)


@pytest.mark.parametrize("N,S,d,logq,sub,two_tau", [(60, 7, 8, True, None, False), (300, 1, 16, True, 128, False),
                                                    (80, 16, 4, False, None, True), (50, 0, 8, True, 20, True)])
def test_fused_info_nce_is_bit_identical_to_plain_autograd(N, S, d, logq, sub, two_tau):
    """The fused loss (one buffer, in-place backward) gives the plain autograd form's loss,
    positive logits and gradients bit for bit, so a seeded run trains the same weights."""
    out = []
    for fused in (True, False):
        q, pos, negs, rest = nce_inputs(N, S, d, logq, sub, two_tau)
        pos_ids, neg_ids, tau, log_pop, items, in_batch, idx = rest
        loss, s_pos = objectives.info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop, items, in_batch, idx,
                                          fused=fused)
        w = torch.rand(N, generator=torch.Generator().manual_seed(1))
        ((loss * w).sum() / w.sum()).backward()
        out.append([loss.detach(), s_pos.detach(), q.grad, pos.grad] + ([negs.grad] if S else []))
    for a, b in zip(*out):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_fused_info_nce_gradients_match_finite_differences():
    q, pos, negs, rest = nce_inputs(12, 3, 4, True, 8, True, dtype=torch.float64)
    pos_ids, neg_ids, tau, log_pop, items, in_batch, idx = rest
    assert (pos_ids.unsqueeze(0) == pos_ids.unsqueeze(1)).sum() > len(pos_ids)    # hits are masked too
    fn = lambda q, pos, negs: objectives.info_nce(q, pos, pos_ids, negs, neg_ids, tau, log_pop, items, in_batch,
                                                  idx)[0]
    assert torch.autograd.gradcheck(fn, (q, pos, negs))


def test_logq_hand_computed():
    """Two targets, in-batch only: each row's softmax over {own, other} with log(2 p) subtracted."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    ids = torch.tensor([1, 2])
    log_pop = torch.log(torch.tensor([0.0, 0.25, 0.75]).clamp(min=1e-12))
    got, _ = objectives.info_nce(q, pos, ids, None, None, torch.tensor([1.0, 1.0]), log_pop, 2, True)
    # row 0: own logit 1 - log(2*.25), other 0.6 - log(2*.75)
    a, b = 1 - math.log(0.5), 0.6 - math.log(1.5)
    row0 = math.log(math.exp(a) + math.exp(b)) - a
    # row 1: own logit 0.8 - log(1.5), other 0 - log(0.5)
    a, b = 0.8 - math.log(1.5), 0.0 - math.log(0.5)
    row1 = math.log(math.exp(a) + math.exp(b)) - a
    torch.testing.assert_close(got, torch.tensor([row0, row1]), atol=1e-6, rtol=1e-6)


def test_full_softmax_equals_cross_entropy_over_catalogue():
    torch.manual_seed(1)
    items, d = 7, 3
    cat = F.normalize(torch.randn(items, d), dim=-1)              # rows for items 1..7
    q = F.normalize(torch.randn(4, d), dim=-1)
    ids = torch.tensor([3, 1, 7, 3])
    got, _ = objectives.info_nce(q, cat[ids - 1], ids, cat, torch.arange(1, items + 1), torch.full((4,), 0.1), None,
                           items, False)
    want = F.cross_entropy(q @ cat.T / 0.1, ids - 1, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weight_schemes_against_hand_values():
    act = torch.tensor([1, 2, 1, 3])                 # exposure, click, exposure, conversion
    loss = torch.tensor([0.5, 1.0, 2.0, 0.1])
    assert objectives.nce_weights("none", act, loss).tolist() == [1, 1, 1, 1]
    assert objectives.nce_weights("fixed", act, loss, click_weight=3.0).tolist() == [1, 3, 1, 3]
    cb = objectives.nce_weights("cb", act, loss, click_rate=0.2)
    torch.testing.assert_close(cb, torch.tensor([0.5 / 0.8, 0.5 / 0.2, 0.5 / 0.8, 0.5 / 0.2]))
    focal = objectives.nce_weights("focal", act, loss, gamma=2.0)
    torch.testing.assert_close(focal, (1 - torch.exp(-loss)) ** 2)


def test_schedules():
    f = training.lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert training.id_dropout_at(0.6, 0, 0.0) == pytest.approx(0.6)
    assert training.id_dropout_at(0.6, 0, 0.5) == pytest.approx(0.3)
    assert training.id_dropout_at(0.6, 1, 0.0) == 0.0 and training.id_dropout_at(0.0, 0, 0.0) == 0.0


def naive_rank_loss(s_pos, s_pkg, grade, mode):
    per = []
    for i in range(len(s_pos)):
        items = [(float(s_pos[i]), 4)] + [(float(s_pkg[i, j]), int(grade[i, j])) for j in range(s_pkg.shape[1])
                                          if grade[i, j] > 0]
        if len(items) == 1:
            continue
        if mode == "pairwise":
            terms = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, ga in items for b, gb in items if ga > gb]
            per.append(sum(terms) / len(terms))
        else:
            z = sum(math.exp(a) for a, _ in items)
            tot = sum(2 ** g - 1 for _, g in items)
            per.append(-sum((2 ** g - 1) / tot * (a - math.log(z)) for a, g in items))
    return sum(per) / len(per)


@pytest.mark.parametrize("mode", ["pairwise", "listwise"])
def test_rank_loss_matches_naive_loop(mode):
    torch.manual_seed(0)
    s_pos, s_pkg = torch.randn(4), torch.randn(4, 5)
    grade = torch.tensor([[3, 3, 2, 2, 1], [0, 3, 0, 2, 1], [0, 0, 0, 0, 0], [3, 0, 2, 0, 0]])
    got = objectives.rank_loss(s_pos, s_pkg, grade, mode)
    assert got.item() == pytest.approx(naive_rank_loss(s_pos, s_pkg, grade, mode), rel=1e-5)


def test_package_hard_negatives_extend_the_softmax():
    torch.manual_seed(2)
    q, pos = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    ids = torch.tensor([1, 2, 3])
    hard = F.normalize(torch.randn(3, 2, 4), dim=-1)
    hard_ids = torch.tensor([[5, 0], [2, 6], [7, 8]])      # empty slot, accidental hit
    tau = torch.full((3,), 0.5)
    got, _ = objectives.info_nce(q, pos, ids, None, None, tau, None, 10, True, None, hard, hard_ids)
    want = []
    for i in range(3):
        logits = [float(q[i] @ pos[i])] + [float(q[i] @ pos[j]) for j in range(3) if j != i]
        logits += [float(q[i] @ hard[i, k]) for k in range(2) if hard_ids[i, k] not in (0, ids[i])]
        t = torch.tensor(logits, dtype=torch.float64) / 0.5
        want.append(float(torch.logsumexp(t, 0) - t[0]))
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_info_nce_under_cpu_autocast_is_the_plain_form():
    """Under bf16 autocast (gpu_check's dry run) the loss is the plain autograd form's: the fused
    buffer is float32 CPU only."""
    q, pos, negs, rest = nce_inputs(40, 5, 8, True, None, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = objectives.info_nce(q, pos, rest[0], negs, *rest[1:])[0]
        b = objectives.info_nce(q, pos, rest[0], negs, *rest[1:], fused=False)[0]
    assert torch.equal(a, b)
