"""retrieval_torch: .fbin/.u64bin round trips and refusals, exact streaming top-k against the full
score matrix, pessimistic target ranks against a naive count, backends and the CLI."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval_torch as R  # noqa: E402
from layout import DataError  # noqa: E402

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                HealthCheck.function_scoped_fixture])


def dyadic(rng, n, d, levels=16):
    """Vectors of multiples of 1/4: every dot product is exact in fp32 whatever the summation
    order, so chunked and full-matrix scores agree bit for bit (and ties are real ties)."""
    return torch.from_numpy(rng.integers(-levels, levels, size=(n, d)).astype(np.float32) / 4)


def reference_topk(q, b, k, exclude=None):
    S = (q.double() @ b.double().T).float()
    if exclude is not None:
        for r, e in enumerate(exclude):
            S[r, torch.as_tensor(np.asarray(e, dtype=np.int64))] = float("-inf")
    return S, torch.topk(S, min(k, b.shape[0]), dim=1)


def assert_topk_matches(q, b, k, vals, idx, exclude=None):
    """Scores equal the reference exactly; indices are valid (their score, no repeats, not
    excluded); where the reference has no tie at the cut-off, the index lists are equal."""
    S, (rv, ri) = reference_topk(q, b, k, exclude)
    assert vals.shape == rv.shape and idx.shape == ri.shape
    assert torch.equal(vals, rv)
    for r in range(q.shape[0]):
        real = idx[r][idx[r] >= 0]
        assert len(set(real.tolist())) == len(real)
        assert torch.equal(S[r, real], vals[r, :len(real)])
        if exclude is not None:
            assert not set(real.tolist()) & set(np.asarray(exclude[r]).tolist())
        row = S[r][torch.isfinite(S[r])]
        kk = min(k, len(row))
        top = torch.sort(row, descending=True).values[:kk + 1]
        if len(torch.unique(top)) == len(top):
            assert real.tolist() == ri[r, :kk].tolist()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@FAST
@given(st.integers(0, 6), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_fbin_round_trip_random_shapes(tmp_path, n, d, seed):
    a = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    p = tmp_path / "x.fbin"
    R.write_fbin(p, a)
    assert os.path.getsize(p) == 8 + n * d * 4
    for back in (R.read_fbin(p), R.read_fbin(p, mmap=True)):
        assert back.dtype == np.float32 and back.shape == (n, d)
        np.testing.assert_array_equal(back, a)


@FAST
@given(st.integers(0, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_u64bin_round_trip_random_shapes(tmp_path, n, cols, seed):
    a = np.random.default_rng(seed).integers(0, 2**63, size=(n, cols), dtype=np.uint64)
    a[:, 0] = np.iinfo(np.uint64).max if n else a[:, 0]  # the full unsigned range survives
    p = tmp_path / "x.u64bin"
    R.write_u64bin(p, a if cols > 1 else a.ravel())
    back = R.read_u64bin(p)
    assert back.dtype == np.uint64 and back.shape == (n, cols)
    np.testing.assert_array_equal(back, a)


def test_u64bin_1d_header_is_n_by_1(tmp_path):
    R.write_u64bin(tmp_path / "id.u64bin", np.array([7, 8, 9]))
    raw = open(tmp_path / "id.u64bin", "rb").read()
    assert np.frombuffer(raw[:8], "<u4").tolist() == [3, 1]
    assert np.frombuffer(raw[8:], "<u8").tolist() == [7, 8, 9]


def test_fbin_layout_is_little_endian_row_major(tmp_path):
    R.write_fbin(tmp_path / "x.fbin", np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    raw = open(tmp_path / "x.fbin", "rb").read()
    assert np.frombuffer(raw[:8], "<u4").tolist() == [2, 3]
    assert np.frombuffer(raw[8:], "<f4").tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("cut", [-1, -4, +1, +12])
def test_wrong_size_refused_with_header_and_size(tmp_path, cut):
    p = tmp_path / "x.fbin"
    R.write_fbin(p, np.ones((3, 4), np.float32))
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:cut] if cut < 0 else raw + b"\0" * cut)
    with pytest.raises(DataError) as e:
        R.read_fbin(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "N=3, D=4" in msg and str(len(raw) + cut) in msg
    assert "\n" not in msg


def test_short_header_missing_file_zero_dim_refused(tmp_path):
    (tmp_path / "short.fbin").write_bytes(b"\x01\x00\x00")
    with pytest.raises(DataError, match="too short"):
        R.read_fbin(tmp_path / "short.fbin")
    with pytest.raises(DataError, match="not found"):
        R.read_u64bin(tmp_path / "nope.u64bin")
    (tmp_path / "zero.fbin").write_bytes(np.array([5, 0], "<u4").tobytes())
    with pytest.raises(DataError, match="D=0"):
        R.read_fbin(tmp_path / "zero.fbin")


def test_u64bin_refuses_negative_and_float(tmp_path):
    with pytest.raises(DataError, match="negative"):
        R.write_u64bin(tmp_path / "x.u64bin", np.array([1, -1]))
    with pytest.raises(DataError, match="integers"):
        R.write_u64bin(tmp_path / "x.u64bin", np.array([1.5]))
    assert not (tmp_path / "x.u64bin").exists()


# ---------------------------------------------------------------------------------------------
# Exact top-k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_q,chunk_n", [(5, 64), (7, 100), (64, 4096), (1, 1)])
def test_topk_equals_full_matrix_topk(chunk_q, chunk_n):
    rng = np.random.default_rng(chunk_q * 100 + chunk_n)
    q, b = dyadic(rng, 23, 12), dyadic(rng, 900, 12)
    for k in (1, 10, 37):
        vals, idx = R.topk_inner_product(q, b, k, chunk_q=chunk_q, chunk_n=chunk_n)
        assert vals.dtype == torch.float32 and idx.dtype == torch.int64
        assert_topk_matches(q, b, k, vals, idx)


def test_topk_sparse_merge_path_is_exercised(monkeypatch):
    """Long scans with small chunks go through the pooled candidate merge, not only the dense
    warm-up; the result still equals the full-matrix top-k."""
    calls = []
    real = R._merge_sparse
    monkeypatch.setattr(R, "_merge_sparse", lambda *a: (calls.append(1), real(*a))[1])
    rng = np.random.default_rng(1)
    q, b = torch.from_numpy(rng.standard_normal((40, 8), dtype=np.float32)), \
        torch.from_numpy(rng.standard_normal((6000, 8), dtype=np.float32))
    vals, idx = R.topk_inner_product(q, b, 5, chunk_q=40, chunk_n=128)
    assert calls
    S = q @ b.T
    rv, ri = torch.topk(S, 5, dim=1)
    assert torch.equal(idx, ri)  # continuous scores: no ties
    torch.testing.assert_close(vals, rv, rtol=1e-5, atol=1e-5)


def test_topk_with_exclude_and_k_beyond_what_is_left():
    rng = np.random.default_rng(2)
    q, b = dyadic(rng, 17, 6), dyadic(rng, 300, 6)
    exclude = [rng.choice(300, size=int(rng.integers(0, 40)), replace=False) for _ in range(17)]
    exclude[3] = None
    vals, idx = R.topk_inner_product(q, b, 10, exclude=exclude, chunk_q=4, chunk_n=64)
    assert_topk_matches(q, b, 10, vals, idx, [() if e is None else e for e in exclude])
    # k above N returns N columns; slots no unmasked row can fill are -inf / -1
    small = b[:6]
    ex = [[0, 1, 2]] * 17
    vals, idx = R.topk_inner_product(q, small, 50, exclude=ex, chunk_n=4)
    assert vals.shape == (17, 6)
    assert (idx[:, 3:] == -1).all() and torch.isneginf(vals[:, 3:]).all()
    assert set(idx[:, :3].flatten().tolist()) <= {3, 4, 5}


def test_topk_numpy_memmap_and_threads(tmp_path):
    rng = np.random.default_rng(3)
    q, b = dyadic(rng, 30, 8), dyadic(rng, 500, 8)
    R.write_fbin(tmp_path / "b.fbin", b.numpy())
    mm = R.read_fbin(tmp_path / "b.fbin", mmap=True)
    assert isinstance(mm, np.memmap)
    ref = R.topk_inner_product(q, b, 7, chunk_q=30)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = R.topk_inner_product(q.numpy(), mm, 7, chunk_q=30, chunk_n=64)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(old)
    # float64 and non-contiguous inputs are converted chunk by chunk
    got = R.topk_inner_product(q.double().numpy(), np.asfortranarray(b.double().numpy()), 7)
    assert torch.equal(got[0], ref[0])


def test_topk_refuses_bad_input():
    q, b = torch.ones(2, 3), torch.ones(5, 3)
    with pytest.raises(DataError, match="dim"):
        R.topk_inner_product(q, torch.ones(5, 4), 2)
    with pytest.raises(DataError, match="one list per query"):
        R.topk_inner_product(q, b, 2, exclude=[[1]])
    with pytest.raises(DataError, match="range|lie in"):
        R.topk_inner_product(q, b, 2, exclude=[[1], [9]])
    b[2, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        R.topk_inner_product(q, b, 2)


# ---------------------------------------------------------------------------------------------
# Pessimistic ranks
# ---------------------------------------------------------------------------------------------


def naive_ranks(q, b, t, exclude=None):
    S = (q.double() @ b.double().T).float()
    out = []
    for r in range(q.shape[0]):
        row = S[r].clone()
        if exclude is not None and exclude[r] is not None:
            m = [j for j in np.asarray(exclude[r]).tolist() if j != t[r]]
            row[m] = float("-inf")
        st_ = row[t[r]]
        others = torch.cat([row[:t[r]], row[t[r] + 1:]])
        out.append(1 + int((others > st_).sum()) + int((others == st_).sum()))
    return torch.tensor(out)


@pytest.mark.parametrize("chunk_q,chunk_n", [(4, 64), (50, 7), (1000, 4096)])
def test_target_ranks_match_naive_with_ties(chunk_q, chunk_n):
    rng = np.random.default_rng(chunk_n)
    q, b = dyadic(rng, 41, 3, levels=2), dyadic(rng, 260, 3, levels=2)  # many exact ties
    t = rng.integers(0, 260, size=41)
    exclude = [rng.choice(260, size=20, replace=False) for _ in range(41)]
    exclude[0] = np.array([t[0], (t[0] + 1) % 260])  # the target itself is never masked
    got = R.target_ranks(q, b, t, chunk_q=chunk_q, chunk_n=chunk_n)
    assert torch.equal(got, naive_ranks(q, b, t))
    got = R.target_ranks(q, b, t, exclude=exclude, chunk_q=chunk_q, chunk_n=chunk_n)
    assert torch.equal(got, naive_ranks(q, b, t, exclude))


def test_target_ranks_constant_model_ranks_last():
    q, b = torch.full((6, 4), 0.3), torch.full((50, 4), 0.7)
    t = np.arange(6) * 7
    assert R.target_ranks(q, b, t, chunk_n=16).tolist() == [50] * 6
    ex = [np.arange(10)] * 6
    assert R.target_ranks(q, b, t, exclude=ex, chunk_n=16).tolist() == [50 - 10 + (j < 10)
                                                                         for j in t]


def test_target_ranks_float_data_agree_with_topk():
    """On continuous scores, rank <= k exactly when the target is in the exact top-k."""
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((64, 16), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((3000, 16), dtype=np.float32))
    _, idx = R.topk_inner_product(q, b, 10)
    t = np.where(np.arange(64) % 2 == 0, idx[:, 3].numpy(), rng.integers(0, 3000, size=64))
    ranks = R.target_ranks(q, b, t, chunk_n=256)
    assert (ranks[::2] == 4).all()
    inside = (idx.numpy() == t[:, None]).any(1)
    assert ((ranks <= 10).numpy() == inside).all()


# ---------------------------------------------------------------------------------------------
# Backends and CLI
# ---------------------------------------------------------------------------------------------


def test_faiss_backends_equal_torch():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    q = rng.standard_normal((20, 16), dtype=np.float32)
    b = rng.standard_normal((400, 16), dtype=np.float32)
    exclude = [rng.choice(400, size=5, replace=False) for _ in range(20)]
    ref_v, ref_i = R.search(q, b, 10, exclude=exclude)
    v, i = R.search(q, b, 10, backend="faiss", exclude=exclude)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    for backend in ("faiss_ivf", "faiss_hnsw"):  # approximate; on 400 rows near-exact
        v, i = R.search(q, b, 10, backend=backend, exclude=exclude)
        assert (i.numpy()[:, :, None] == ref_i.numpy()[:, None, :]).any(2).mean() > 0.9
        assert not any(set(i[r].tolist()) & set(exclude[r].tolist()) for r in range(20))


def test_half_shortlist_rerank_is_exact_scores():
    rng = np.random.default_rng(7)
    q = torch.from_numpy(rng.standard_normal((12, 8), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((700, 8), dtype=np.float32) * 100)
    ex = [rng.choice(700, size=3, replace=False) for _ in range(12)]
    ref = R.topk_inner_product(q, b, 5, exclude=ex)
    for dtype in (torch.float16, torch.bfloat16):
        v, i = R.topk_half_rerank(q, b, 5, exclude=ex, shortlist=64, dtype=dtype, chunk_n=128)
        assert torch.equal(i, ref[1])
        torch.testing.assert_close(v, ref[0], rtol=1e-5, atol=1e-4)


def test_fallbacks_print_one_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(R, "_told", set())
    q, b = torch.randn(3, 4), torch.randn(30, 4)
    ref = R.search(q, b, 4)
    for _ in range(2):
        got = R.search(q, b, 4, backend="faiss_ivf")
        assert torch.equal(got[1], ref[1])
    err = capsys.readouterr().err
    assert err.count("faiss is not installed") == 1 and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert torch.equal(R.search(q, b, 4, device="cuda")[1], ref[1])
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown backend"):
        R.search(q, b, 4, backend="annoy")


def test_cli_round_trip_and_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(8)
    q, b = dyadic(rng, 9, 5), dyadic(rng, 120, 5)
    ids = rng.choice(10**12, size=120, replace=False).astype(np.uint64)
    R.write_fbin(tmp_path / "q.fbin", q.numpy())
    R.write_fbin(tmp_path / "b.fbin", b.numpy())
    R.write_u64bin(tmp_path / "id.u64bin", ids)
    args = ["--query", str(tmp_path / "q.fbin"), "--base", str(tmp_path / "b.fbin"),
            "--ids", str(tmp_path / "id.u64bin"), "--k", "7", "--out", str(tmp_path / "r.u64bin")]
    assert R.main(args) == 0
    out = R.read_u64bin(tmp_path / "r.u64bin")
    vals, idx = R.topk_inner_product(q, b, 7)
    assert out.shape == (9, 7)
    np.testing.assert_array_equal(out, ids[idx.numpy()])
    assert_topk_matches(q, b, 7, vals, idx)
    capsys.readouterr()
    raw = open(tmp_path / "b.fbin", "rb").read()
    (tmp_path / "cut.fbin").write_bytes(raw[:-2])
    bad = {"--base": str(tmp_path / "cut.fbin"), "--ids": str(tmp_path / "q.fbin"),
           "--out": str(tmp_path / "q.fbin")}
    for flag, value in bad.items():
        a = list(args)
        a[a.index(flag) + 1] = value
        assert R.main(a) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert open(tmp_path / "q.fbin", "rb").read()[:8] == np.array([9, 5], "<u4").tobytes()
