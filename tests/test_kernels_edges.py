"""The fused CPU kernels at their edges: malformed and degenerate inputs (an error, or the eager answer,
never a crash or garbage), scales and logits past what the vector routes take, inputs the facade hands
the eager code instead of refusing them, and results that must not depend on the thread count.
"""

import pytest
import torch
import torch.nn.functional as F

from bounds import FP32_U, assert_fp32_sums

from flyer import kernels


@pytest.fixture
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("flyer's fused CPU kernels are not built here (no C++ compiler?)")
    return kernels.cpu_ops()


def _isas(ops):
    """The builds to run: this CPU's, and the AVX2 one where an x86 CPU runs AVX2 code too (its FP8 route differs)."""
    builds = [ops]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        builds.append(kernels.build("AVX2"))
    return builds


# ---- malformed and degenerate shapes -----------------------------------------------------------------

def test_mla_decode_refuses_positions_without_columns(ops):
    """pos (B, 0): a RuntimeError naming pos, where the shape check divided by T = 0 (SIGFPE, the
    process gone) and the row's max position was taken over an empty range."""
    q, pool, tables = torch.randn(1, 2, 24), torch.randn(4, 4, 24), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"pos \(B, T\) with T >= 1"):
        ops.mla_decode(q, pool, tables, torch.zeros(1, 0, dtype=torch.long), 16, 1.0, 0, 16)
    with pytest.raises(RuntimeError, match=r"pos \(B, T\) with T >= 1"):
        kernels.mla_decode(q, pool, tables, torch.zeros(1, 0, dtype=torch.long), 16, 1.0)


@pytest.mark.parametrize("offsets", [[0, 5, 2], [0, 1 << 40, 2], [0, -(1 << 40), 2], [0, 2, 1, 2]])
def test_combine_and_segment_sum_refuse_decreasing_offsets(ops, offsets):
    """A CSR whose inner offsets decrease (one past the rows, or negative) is refused before any row
    is read: the loops ran k from offsets[t] to offsets[t + 1] and read rows, then y, out of bounds."""
    y, w, rows = torch.randn(2, 8), torch.ones(2), torch.tensor([0, 1])
    off = torch.tensor(offsets)
    with pytest.raises(RuntimeError, match="row offsets decrease"):
        ops.combine(y, w, off, rows)
    with pytest.raises(RuntimeError, match="row offsets decrease"):
        ops.segment_sum(y, off, rows)


def test_grouped_mm_and_linear_of_no_columns_are_zeros(ops):
    """K = 0: every output is an empty sum, 0, as the eager torch.mm gives, on the kernel's rows and on
    the GEMM blocks (the BLAS refused their leading dimension of 0 and left the output unwritten), and
    ``linear_held`` of (..., 0) rows (whose reshape could not infer its -1)."""
    x, w = torch.randn(30, 0), torch.randn(1, 5, 0)
    for _ in range(3):  # a freed block of the output's size full of NaN: what an unwritten output would show
        torch.full((30, 5), float("nan"))
        assert torch.equal(kernels.grouped_mm(x, [30], w), torch.zeros(30, 5))  # 30 rows: GEMM blocks
    assert torch.equal(kernels.grouped_mm(x[:3], [3], w), torch.zeros(3, 5))  # the kernel's rows
    with torch.no_grad():
        for weight in (w[0], w[0].bfloat16()):
            assert torch.equal(kernels.linear_held(torch.randn(2, 15, 0), weight, torch.ones(5)), torch.ones(2, 15, 5))


# ---- FP8 scales past 256 scale's range ----------------------------------------------------------------

def _e4m3_values() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


@pytest.mark.parametrize("scale", [2.0**100, 2.0**120, 1e37, 3.4e38, -2.0**127])
def test_fp8_dequantize_is_code_times_scale_for_scales_past_2p100(ops, scale):
    """``fp8_dequantize`` of every E4M3 code is the table's value times its scale bit for bit (NaN where
    it is NaN, the sign of zero included) also where 256 scale overflows (from 2^120): the vector route took
    (code / 256) (256 scale), which gave every code inf and code 0 NaN; such tiles go through the table."""
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    scales = torch.tensor([[scale], [1.0]])  # a large tile beside an ordinary one
    for build in _isas(ops):
        got = build.fp8_dequantize(codes, scales, 1, False)
        want = _e4m3_values().view(2, 128) * scales
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan], want[~nan]) and torch.equal(got[~nan].signbit(), want[~nan].signbit())


def _small_fp8_weights(G, N, K, seed):
    """E4M3 codes of magnitude below 2 (no NaN), so that times 2^120 they stay finite."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (G, N, K), dtype=torch.uint8, generator=g)
    codes[~(_e4m3_values()[codes.long()].abs() < 2)] = 0  # NaN codes too
    return codes.view(torch.float8_e4m3fn)


def test_fp8_gemm_is_the_fp32_kernel_on_weights_dequantized_for_scales_past_2p100(ops):
    """``grouped_mm`` / ``linear_held`` on FP8 weights with block scales of 2^100 and more (checkpoint
    scales; 256 scale overflows from 2^120) beside tiny ones (2^-140: their products subnormal): the FP32
    kernel's sums on the table-dequantized weights, bit for bit, on the kernel's rows and the GEMM blocks,
    in this CPU's build and the AVX2 one. It was NaN (0 times the overflowed factor)."""
    G, N, K = 2, 200, 256
    w8 = _small_fp8_weights(G, N, K, seed=3)
    scale = torch.tensor([[[2.0**120, 2.0**-140], [1e37 / 4, 1.0]], [[2.0**101, 0.75], [3.0, 2.0**-140]]])
    deq = _e4m3_values()[w8.view(torch.uint8).long()] * scale.repeat_interleave(128, 1)[:, :N].repeat_interleave(
        128, 2)
    assert deq.isfinite().all() and deq.abs().amax() > 2.0**100
    rows = torch.tensor([3, 40])  # a group on the kernel, one on GEMM blocks (max_rows 16)
    x = torch.randn(43, K) * 2.0**-20  # sums of terms up to 2^101: far from FP32's overflow
    for build in _isas(ops):
        got = build.grouped_mm(x, rows, w8, 16, scale)
        assert got.isfinite().all()
        assert torch.equal(got, build.grouped_mm(x, rows, deq, 16, None))
    one = torch.zeros(1, K)
    one[0, 0] = 1.0
    w = w8[1, :1].clone()
    w.view(torch.uint8)[0, 0] = 0x38  # 1.0
    with torch.no_grad():
        assert kernels.linear_held(one, w, scale=torch.tensor([[1e37, 1.0]])).item() == torch.tensor(1e37).item()


# ---- cross-entropy of an infinite logit ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("column", [5, 34])  # in the kernel's vectors; in its scalar tail (37 columns)
def test_xent_chunk_of_an_infinite_logit_is_the_eager_nan(ops, dtype, column):
    """A row with a +inf logit (FP16 logits reach it by overflow), and one of all -inf: log p and every
    dlogit NaN, as the eager log_softmax gives, wherever the inf sits. The vector exp clamped away the
    NaN of inf - inf, so the row's other probabilities came out 0 and log p -inf. A finite row beside
    them is untouched."""
    logits = torch.randn(3, 37)
    logits[0, column] = float("inf")
    logits[1] = float("-inf")
    logits = logits.to(dtype)
    tgt = torch.tensor([1, 0, 2])
    lp, eager_lp = torch.empty(3, 1), torch.empty(3, 1)
    d = kernels.xent_chunk(logits, tgt, True, lp)
    with kernels.disabled():
        eager_d = kernels.xent_chunk(logits, tgt, True, eager_lp)
    assert eager_lp[:2].isnan().all() and eager_d[:2].isnan().all()
    assert lp[:2].isnan().all() and d[:2].isnan().all()
    assert lp[2].isfinite().all() and d[2].isfinite().all()
    alone = torch.empty(1, 1)
    kernels.xent_chunk(logits[2:], tgt[2:], False, alone)
    assert torch.equal(lp[2:], alone)


# ---- the facade falls back where the kernel cannot take its tensors -----------------------------------

def test_facade_takes_views_and_other_dtypes_the_eager_code_takes(ops):
    """Inputs the kernels refuse (strided views, da in another dtype than h13, an FP16 or FP64 weight):
    the facade gives what it gives for contiguous copies (made contiguous where that is the kernel's
    input) or runs the eager code (under ``kernels.disabled()``: the same bits), never an error."""
    h13 = torch.randn(6, 4).t()  # (4, 6), transposed
    assert torch.equal(kernels.swiglu(h13), kernels.swiglu(h13.contiguous()))
    da = torch.randn(3, 4).t()
    assert torch.equal(kernels.swiglu_backward(da, h13), kernels.swiglu_backward(da.contiguous(), h13.contiguous()))
    da32, h16 = torch.randn(4, 3), h13.contiguous().bfloat16()
    with kernels.disabled():
        eager = kernels.swiglu_backward(da32, h16)
    assert torch.equal(kernels.swiglu_backward(da32, h16), eager)

    logits, tgt = torch.randn(10, 7).t(), torch.zeros(14, dtype=torch.long)[::2]
    lp, lp_c = torch.empty(7, 1), torch.empty(7, 1)
    d = kernels.xent_chunk(logits, tgt, True, lp)
    assert torch.equal(d, kernels.xent_chunk(logits.contiguous(), tgt.contiguous(), True, lp_c))
    assert torch.equal(lp, lp_c)

    src, w = torch.tensor([0, 1, 1, 2]), torch.rand(8)[::2]
    y = torch.randn(4, 6)[:, ::2]
    index = kernels.token_index(src, 2, y, w)
    assert index.csr is not None
    assert torch.equal(kernels.combine(y, w, index), kernels.combine(y.contiguous(), w.contiguous(), index))
    assert torch.equal(kernels.segment_sum(y, index), kernels.segment_sum(y.contiguous(), index))
    g = torch.randn(2, 3)
    got, want = (kernels.combine_backward(g, a, b, index, True) for a, b in ((y, w), (y.contiguous(), w.contiguous())))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    from flyer.model import lowp

    x = torch.randn(3, 8)
    with torch.no_grad():
        for weight in (torch.randn(5, 8).half(), torch.randn(5, 8).double()):
            with kernels.disabled():
                eager = kernels.linear_held(x, weight)
            assert torch.equal(kernels.linear_held(x, weight), eager)
            assert torch.equal(lowp.linear(x, weight), eager)


# ---- results independent of the thread count ----------------------------------------------------------

def test_rms_norm_weight_gradient_is_the_same_on_any_number_of_threads(ops):
    """dw = sum over rows of g xhat: the same bits on 1, 2 and 3 torch threads (its rows split into
    blocks fixed by the row count, their parts added in block order; they were one block per thread),
    within the FP32 bound of its M products and their roundings, (M + 3) u sum |g xhat|."""
    g = torch.Generator().manual_seed(0)
    M, D = 200, 1000
    x, w, gy = torch.randn(M, D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(M, D, generator=g)
    threads = torch.get_num_threads()
    dws = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _, r = kernels.rms_norm(x, w, 1e-6, torch.float32)
            dws.append(kernels.rms_norm_backward(gy, x, w, r, False, True)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dws[0], dws[1]) and torch.equal(dws[0], dws[2])
    terms = gy.double() * (x.double() * r.double())  # r (M, 1)
    assert_fp32_sums(dws[0], terms.sum(0), terms.abs().sum(0), M + 3)


# ---- what the split paths promise -------------------------------------------------------------------

@pytest.mark.parametrize("R,K,N,bias", [(64, 2048, 512, False), (64, 512, 129, False), (17, 512, 300, True)])
def test_fp32_prefill_linears_are_f_linear_without_expert_threads(ops, monkeypatch, R, K, N, bias):
    """``lowp.linear`` of an FP32 prefill chunk under no_grad: without expert threads ``F.linear``'s
    bits (the autograd forward's; the kernel's 128-row GEMM blocks sum otherwise at these shapes: the
    BLAS blocks K by the call's shape, and a bias is added apart); where the expert threads split it,
    the kernel's blocks, within the FP32 bound (K + 1) u (sum |x||w| + |b|) of the exact product."""
    from flyer.model import lowp

    g = torch.Generator().manual_seed(R + K + N)
    x, w = torch.randn(R, K, generator=g), torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g) if bias else None
    with torch.no_grad():
        assert torch.equal(lowp.linear(x, w, b), F.linear(x, w, b))
        monkeypatch.setattr(kernels, "splits", lambda: True)
        split = lowp.linear(x, w, b)
    assert torch.equal(split, kernels.linear_held(x, w, b))
    bd = None if b is None else b.double()
    mags = F.linear(x.double().abs(), w.double().abs(), None if b is None else bd.abs())
    assert_fp32_sums(split, F.linear(x.double(), w.double(), bd), mags, K + 1)


def _attention_bound(q, k, v, mask, scale):
    """(exact sdpa in FP64, bound on any FP32 evaluation's error): a score is d products and a scaling,
    off by at most (d + 1) u A (A: its absolute terms); that moves each probability by at most 2 max|e|
    of itself; the output sums S of them times values (S roundings, and a few for exp and the
    normalisation: 8)."""
    q, k, v = q.double(), k.double(), v.double()
    d, S = q.shape[-1], k.shape[-2]
    p = (scale * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1)
    A = (scale * q.abs() @ k.abs().transpose(-1, -2)).masked_fill(~mask, 0)
    e = ((d + 1) * FP32_U * A).amax(-1, keepdim=True)
    return p @ v, (2 * e + (S + 8) * FP32_U) * (p @ v.abs())


@pytest.mark.parametrize("shape,masked", [((2, 4, 3, 3, 64, 33), True), ((2, 4, 26, 26, 64, 1), False),
                                          ((2, 4, 2, 22, 65, 16), True)])
def test_attention_split_on_the_math_path_is_within_fp32_rounding(ops, monkeypatch, shape, masked):
    """Shapes where ATen's sdpa takes its math path (``torch._fused_sdp_choice``) and the split differs
    from the single call (the audit's: a value width apart from the key's, one value column): the heads split
    over the expert threads are the single call's result within FP32 rounding of the exact attention
    (not its bits: batched GEMMs over (B, H) sum in another order than one head's), and the same bits
    on 2 and 3 threads."""
    B, H, T, S, d, dv = shape
    g = torch.Generator().manual_seed(T * S + d)
    q, k, v = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, dv,
                                                                                                      generator=g)
    mask = torch.rand(B, 1, T, S, generator=g) < 0.7 if masked else torch.ones(T, S, dtype=torch.bool).tril()
    mask[..., 0] = True  # every query sees a slot
    monkeypatch.setattr(kernels, "SPLIT_SECONDS", 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outs = []
    try:
        with torch.inference_mode():
            for n in (2, 3):
                kernels.set_expert_threads(n)
                assert kernels.attention_splits(q, k, v)
                outs.append(kernels.attention(q, k, v, 0.125, mask if masked else None))
    finally:
        kernels.set_expert_threads(1)
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    exact, bound = _attention_bound(q, k, v, mask, 0.125)
    err = (outs[0].double() - exact).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"


# ---- from a mutation sweep: the eager paths (FP64), the bias, causal SDPA, a graph refused ----------------


def test_rms_norm_of_fp64_runs_in_fp64_with_eps_inside_the_mean():
    # FP64 takes the eager code (the kernels take no FP64): r in FP64, and y the plain formula's within FP64
    # rounding: D + 8 roundings of 2^-53 each (the sum of squares, the divide, the add, rsqrt, two products)
    D, eps = 16, 0.5  # eps large enough that eps / D and eps differ far beyond the bound
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.rand(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    y, r = kernels.rms_norm(x, w, eps, torch.float64)
    assert r.dtype == torch.float64 and y.dtype == torch.float64
    r_ref = 1 / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    tol = (D + 8) * 2.0**-53
    assert ((r - r_ref).abs() / r_ref).max() <= tol
    y_ref = x * r_ref * w
    assert ((y - y_ref).abs() <= tol * y_ref.abs() + tol * (x.abs() * r_ref * w)).all()


def test_linear_held_eager_adds_the_bias():
    # FP64 x takes grouped_mm's torch.mm (the kernel takes FP32 x only): F.linear's within K roundings of 2^-53
    # on the sum of |x||w| (and one for the bias)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((3, 8), (5, 8), (5,)))
    with torch.no_grad():
        got = kernels.linear_held(x, w, b)
    want = torch.nn.functional.linear(x, w, b)
    bound = (8 + 2) * 2.0**-53 * (x.abs() @ w.abs().T + b.abs())
    assert ((got - want).abs() <= 2 * bound).all()


def test_attention_without_a_mask_is_causal_sdpa():
    # torch on its threads (no expert threads): the facade is the one SDPA call, bit for bit
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=True)
    assert torch.equal(kernels.attention(q, k, v, 0.3), want)


def test_linear_held_refuses_a_graph():
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        kernels.linear_held(x, torch.randn(4, 8))
