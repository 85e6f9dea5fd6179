"""Fused CPU kernels against the eager PyTorch code they replace, both through the facade
(``flyer.kernels``: the kernel where usable, the eager code under ``kernels.disabled()``).

Each kernel rounds once where the eager code rounds per op, so against eager it agrees to the
output dtype's rounding (the combine kernels: bitwise), and against FP64 it is at least as close.
"""

import os
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bounds import assert_fp32_sums, latent_attention_bound
from bounds import rel_error as _nerr
from child_env import child_env

from flyer import kernels
from flyer.kernels import extension

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("flyer's fused CPU kernels are not built here (no C++ compiler?)")
    return kernels.cpu_ops()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 37, 4096])  # one class; a vector tail; many full vectors
def test_xent_chunk_matches_log_softmax(ops, dtype, V):
    logits = (3 * torch.randn(70, V)).to(dtype)
    tgt = torch.randint(0, V, (70,))
    tgt[:2] = torch.tensor([0, V - 1])
    out, eager_out = torch.empty(70, 1), torch.empty(70, 1)
    dlogits = kernels.xent_chunk(logits, tgt, True, out)
    logp_t = out[:, 0]
    ref = torch.log_softmax(logits.double(), -1)
    ref_d = ref.exp().scatter_(1, tgt[:, None], torch.expm1(ref.gather(1, tgt[:, None])))
    assert logp_t.dtype == torch.float32 and dlogits.dtype == dtype
    torch.testing.assert_close(logp_t.double(), ref.gather(1, tgt[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    with kernels.disabled():
        eager_d = kernels.xent_chunk(logits, tgt, True, eager_out)
    torch.testing.assert_close(logp_t, eager_out[:, 0], rtol=2e-6, atol=1e-6)
    assert _nerr(dlogits, ref_d) <= 1.05 * _nerr(eager_d, ref_d) + 1e-6
    ulp = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(dlogits.float(), eager_d.float(), rtol=ulp, atol=1e-6)
    lp2 = torch.empty(70, 1)
    assert kernels.xent_chunk(logits, tgt, False, lp2) is None  # no gradient wanted: nothing written
    assert torch.equal(lp2[:, 0], logp_t)


def test_xent_chunk_rejects_bad_targets(ops):
    with pytest.raises(RuntimeError, match="target 5 out of range for 5 classes"):
        ops.xent_chunk(torch.randn(3, 5), torch.tensor([0, 5, 1]), True)
    with pytest.raises(RuntimeError, match="expected a contiguous tensor"):
        ops.xent_chunk(torch.randn(5, 3).t(), torch.tensor([0, 1, 2]), True)


def _swiglu_ref(h13: torch.Tensor) -> torch.Tensor:
    F_ = h13.shape[1] // 2
    return F.silu(h13[:, :F_]) * h13[:, F_:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F_", [5, 64])
def test_swiglu_forward_and_backward(ops, dtype, F_):
    h13 = (2 * torch.randn(300, 2 * F_)).to(dtype)
    if F_ >= 8:  # h1 where exp(-h1) under- and overflows
        h13[0, :8] = torch.tensor([-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, -1e-3]).to(dtype)
    da = torch.randn(300, F_).to(dtype)
    h64 = h13.double().requires_grad_()
    ref = _swiglu_ref(h64)
    (ref_g,) = torch.autograd.grad(ref, h64, da.double())
    a, dh13 = kernels.swiglu(h13), kernels.swiglu_backward(da, h13)
    assert a.dtype == dh13.dtype == dtype and torch.isfinite(a).all() and torch.isfinite(dh13).all()
    with kernels.disabled():
        eager, eager_g = kernels.swiglu(h13), kernels.swiglu_backward(da, h13)
    hh = h13.clone().requires_grad_()
    (autograd_g,) = torch.autograd.grad(_swiglu_ref(hh), hh, da)
    assert torch.equal(eager, _swiglu_ref(h13)) and torch.equal(eager_g, autograd_g)  # the eager twin is autograd's
    if dtype == torch.float32:
        torch.testing.assert_close(a.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dh13.double(), ref_g, rtol=1e-5, atol=1e-6)
    else:  # one rounding instead of one per op: at least as close to FP64 as eager
        assert _nerr(a, ref.detach()) <= 1.05 * _nerr(eager, ref.detach())
        assert _nerr(dh13, ref_g) <= 1.05 * _nerr(eager_g, ref_g)



# whole 64-byte lines of weights; lines, then vectors, then a scalar tail (58); a scalar tail alone after lines
@pytest.mark.parametrize("K", [384, 58, 37])
def test_grouped_mm_is_a_gemm_per_group(ops, K):
    rows = [0, 3, 1, 5, 2, 0, 8, 4, 12]  # empty groups, 1..12 rows (past the 4 rows sharing a weight load)
    x, w = torch.randn(sum(rows), K), torch.randn(len(rows), 70, K)  # 70 weight rows: a partial block
    out = kernels.grouped_mm(x, rows, w)
    with kernels.disabled():
        eager = kernels.grouped_mm(x, rows, w)
    starts = [0, *torch.tensor(rows).cumsum(0).tolist()]
    for g, n in enumerate(rows):
        if n:
            xs = x[starts[g]:starts[g + 1]]
            assert torch.equal(eager[starts[g]:starts[g + 1]], xs @ w[g].t())  # the eager twin is torch.mm
            assert_fp32_sums(out[starts[g]:starts[g + 1]], xs.double() @ w[g].double().t(),
                             xs.double().abs() @ w[g].double().abs().t(), K)
    big = kernels.FEW_ROWS + 1  # past the kernel's rows: GEMMs on blocks of weight rows; the small group: the kernel
    many = [big, 2]
    x2, w2 = torch.randn(sum(many), K), torch.randn(2, 300, K)
    mixed = kernels.grouped_mm(x2, many, w2)
    assert torch.equal(mixed[:big], _gemm_blocks(x2[:big], w2[0]))
    xd, wd = x2[:big].double(), w2[0].double()
    assert_fp32_sums(mixed[:big], xd @ wd.t(), xd.abs() @ wd.abs().t(), K)
    assert torch.equal(mixed[big:], kernels.grouped_mm(x2[big:], [2], w2[1:]))
    sparse = [0, big, 0, 0, 2, 0]  # most groups empty: torch.mm on views of the few others
    w3 = torch.randn(len(sparse), 16, K)
    with kernels.disabled():
        assert torch.equal(kernels.grouped_mm(x2, sparse, w3), torch.cat([x2[:big] @ w3[1].t(), x2[big:] @ w3[4].t()]))
    assert torch.equal(kernels.grouped_mm(x2, sparse, w3)[:big], x2[:big] @ w3[1].t())
    with pytest.raises(RuntimeError, match="counts sum"):
        ops.grouped_mm(x, torch.tensor([1, 2]), w[:2], kernels.FEW_ROWS)


def _gemm_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T as the kernel computes a group of more rows than its own: one GEMM per 128 rows of w."""
    return torch.cat([x @ w[n:n + 128].t() for n in range(0, w.shape[0], 128)], 1)


@pytest.mark.parametrize("K", [384, 58, 37])
def test_grouped_mm_on_bf16_held_weights_is_the_fp32_kernel_on_them_widened(ops, K):
    """BF16 weights widen exactly in registers: the kernel's sums are, bit for bit, the FP32
    kernel's on ``w.float()``; ``grouped_mm`` keeps groups up to HELD_FEW_ROWS in the kernel and
    runs GEMMs on the widened weight past it (and torch.mm for every group with the kernels off)."""
    few = kernels.HELD_FEW_ROWS
    rows = [0, 1, 3, 4, 9, kernels.FEW_ROWS + 1, few, few + 1]  # past FP32's FEW_ROWS, past the held limit
    x, w = torch.randn(sum(rows), K), torch.randn(len(rows), 70, K).bfloat16()
    counts = torch.tensor(rows)
    assert torch.equal(ops.grouped_mm(x, counts, w, few), ops.grouped_mm(x, counts, w.float(), few))
    ops.set_blas(False)  # a torch without a BLAS: larger groups on the kernel's loop over the widened rows
    try:
        assert torch.equal(ops.grouped_mm(x, counts, w, few), ops.grouped_mm(x, counts, w, sum(rows)))
    finally:
        ops.set_blas(True)
    out = kernels.grouped_mm(x, rows, w)
    with kernels.disabled():
        eager = kernels.grouped_mm(x, rows, w)
    starts = [0, *torch.tensor(rows).cumsum(0).tolist()]
    for g, n in enumerate(rows):
        r = slice(starts[g], starts[g + 1])
        if not n:
            continue
        wide = w[g].float()
        assert torch.equal(eager[r], x[r] @ wide.t())
        if n > few:
            assert torch.equal(out[r], _gemm_blocks(x[r], wide))
        assert_fp32_sums(out[r], x[r].double() @ wide.double().t(), x[r].double().abs() @ wide.double().abs().t(), K)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float8_e4m3fn"):
        ops.grouped_mm(x, counts, w.half(), few)


def _fp8_weights(G, N, K, seed=0):
    """FP8 E4M3 codes (G, N, K) holding every code value (NaN's two in group 0's first 256), and random FP32
    block scales (G, ceil(N / 128), ceil(K / 128)) over several binades (V3.1's are powers of 2)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (G, N, K), dtype=torch.uint8, generator=g)
    codes[codes & 0x7F == 0x7F] = 0  # NaN only below
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scale = torch.exp2(torch.randn(G, -(-N // 128), -(-K // 128), generator=g) * 4)
    return codes.view(torch.float8_e4m3fn), scale


def test_held_weights_widen_exactly_in_the_avx2_build(ops):
    """The AVX2 build's own widening of BF16 and FP8 weights and its FP8 dequantisation (their
    intrinsics differ from AVX-512's), run here whatever this CPU dispatches to: an AVX-512 CPU runs
    AVX2 code too."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("AVX2 code needs an x86 CPU with AVX2")
    avx2 = kernels.build("AVX2")
    w, scale = _fp8_weights(3, 200, 100, seed=2)
    w.view(-1).view(torch.uint8)[:256] = 0
    rows = torch.tensor([1, 4, 7])
    x = torch.randn(12, 100)
    deq = torch.stack([kernels.dequantize_held(w[g], scale[g]) for g in range(3)])
    assert torch.equal(avx2.grouped_mm(x, rows, w, 48, scale), avx2.grouped_mm(x, rows, deq, 48))
    wb = torch.randn(3, 70, 100).bfloat16()
    assert torch.equal(avx2.grouped_mm(x, rows, wb, 48), avx2.grouped_mm(x, rows, wb.float(), 48))
    _widens_every_fp8_code(avx2)


def _widens_every_fp8_code(ops) -> None:
    """Every E4M3 code widened exactly, also with subnormals flushed: by the held-weight GEMM every
    code but NaN's two (held weights have none: it does not look for them), by fp8_dequantize all.
    The GEMM's AVX2 route gives a subnormal code an FP32 subnormal, which it must not take where
    denormals read as zero, nor with a scale of 256 or more (2^120 scale overflows)."""
    every = torch.zeros(1, 256, 128, dtype=torch.uint8)  # weight row n: code n, then zeros
    every[0, :, 0] = torch.arange(256, dtype=torch.uint8)
    every[0, [0x7F, 0xFF], 0] = 0
    every = every.view(torch.float8_e4m3fn)
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    try:
        for flush, scale in ((False, 1.0), (True, 1.0), (False, 1024.0), (False, 2.0 ** -100)):
            torch.set_flush_denormal(flush)
            out = ops.grouped_mm(torch.ones(1, 128), torch.tensor([1]), every, 4, torch.full((1, 2, 1), scale))
            assert torch.equal(out[0], every[0, :, 0].float() * scale), (flush, scale)
            torch.testing.assert_close(ops.fp8_dequantize(codes, torch.tensor([[0.75]]), 128, False),
                                       kernels.fp8_to_float(codes.view(torch.float8_e4m3fn)) * 0.75, rtol=0, atol=0,
                                       equal_nan=True)
    finally:
        torch.set_flush_denormal(False)  # torch's default, which nothing in flyer changes


@pytest.mark.parametrize("K", [384, 100])
def test_grouped_mm_on_fp8_weights_is_the_fp32_kernel_on_them_dequantized(ops, K):
    """FP8 codes with 128x128 block scales widen exactly in registers and multiply by their
    block's scale there, as dequantisation rounds it: the kernel's sums are, bit for bit, the FP32
    kernel's on ``dequantize_held(w, scale)``; groups past HELD_FEW_ROWS run GEMMs on the weight so
    dequantized (and all groups torch.mm, with the kernels off). 200 weight rows: a partial block of rows; K 100: of
    columns, and a vector tail."""
    few = kernels.HELD_FEW_ROWS
    rows = [0, 1, 3, 4, 9, few, few + 1]
    w, scale = _fp8_weights(len(rows), 200, K)
    x = torch.randn(sum(rows), K)
    deq = torch.stack([kernels.dequantize_held(w[g], scale[g]) for g in range(len(rows))])
    assert deq[0].view(-1)[:256].isnan().sum() == 2  # the NaN codes stay NaN
    per_weight = scale.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[..., :K]
    torch.testing.assert_close(deq, w.float() * per_weight, rtol=0, atol=0, equal_nan=True)
    _widens_every_fp8_code(ops)
    w, deq = w[1:], deq[1:]  # group 0 holds the NaN codes: its outputs would all be NaN
    rows, scale = rows[1:], scale[1:]
    x = x[:sum(rows)]
    counts = torch.tensor(rows)
    assert torch.equal(ops.grouped_mm(x, counts, w, few, scale), ops.grouped_mm(x, counts, deq, few))
    out = kernels.grouped_mm(x, rows, w, scale=scale)
    with kernels.disabled():
        eager = kernels.grouped_mm(x, rows, w, scale=scale)
    starts = [0, *torch.tensor(rows).cumsum(0).tolist()]
    for g, n in enumerate(rows):
        r = slice(starts[g], starts[g + 1])
        assert torch.equal(eager[r], x[r] @ deq[g].t())
        if n > few:
            assert torch.equal(out[r], _gemm_blocks(x[r], deq[g]))
        assert_fp32_sums(out[r], x[r].double() @ deq[g].double().t(), x[r].double().abs() @ deq[g].double().abs().t(),
                         K)
    with pytest.raises(ValueError, match="FP8 weights take their block scales"):
        kernels.grouped_mm(x, rows, w)
    with pytest.raises(RuntimeError, match="takes its block scales"):
        ops.grouped_mm(x, counts, deq, few, scale)
    with pytest.raises(RuntimeError, match="scale: contiguous"):
        ops.grouped_mm(x, counts, w, few, scale[:, :1].contiguous())


def _same_on_expert_threads(monkeypatch, call, one: torch.Tensor) -> None:
    """``call()`` split over 2 and 3 expert threads (torch on one thread, every call split) gives
    ``one``, bit for bit, and the workers took part (calls repeated until they do: a worker asleep,
    or kept off its core by other processes, misses a short call's items)."""
    monkeypatch.setattr(kernels, "SPLIT_SECONDS", 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = kernels.cpu_ops()
    try:
        for n in (2, 3):
            kernels.set_expert_threads(n)
            assert ops.threads() == n
            before, until = ops.worker_items(), time.monotonic() + 60
            while ops.worker_items() == before and time.monotonic() < until:
                assert torch.equal(call(), one)
            assert ops.worker_items() > before
    finally:
        kernels.set_expert_threads(1)
        torch.set_num_threads(threads)


def test_linear_held_splits_one_weight_by_columns_over_expert_threads(ops, monkeypatch):
    """``kernels.linear_held``: F.linear of FP32 rows on a BF16 weight, any leading shape, with bias; its
    output columns split over the expert threads give the same bits as one thread, for decode rows
    (the kernel) and a prefill chunk's (GEMMs on blocks of the widened weight: 300 rows, 3 blocks)."""
    x, w, b = torch.randn(2, 5, 96), torch.randn(300, 96).bfloat16(), torch.randn(300)
    one = kernels.linear_held(x, w, b)
    assert one.shape == (2, 5, 300) and one.dtype == torch.float32
    ref = F.linear(x.double(), w.double(), b.double())
    assert_fp32_sums(one, ref, F.linear(x.double().abs(), w.double().abs(), b.double().abs()), 97)
    _same_on_expert_threads(monkeypatch, lambda: kernels.linear_held(x, w, b), one)
    many = torch.randn(kernels.HELD_FEW_ROWS + 3, 96)
    chunk = kernels.linear_held(many, w)
    assert torch.equal(chunk, _gemm_blocks(many, w.float()))
    _same_on_expert_threads(monkeypatch, lambda: kernels.linear_held(many, w), chunk)


def test_linear_held_on_fp8_weights_split_over_expert_threads(ops, monkeypatch):
    """An FP8 weight with its block scales: the FP32 linear on it dequantized, bit for bit
    the kernel's; split over the expert threads by its output columns, the same bits."""
    w, scale = _fp8_weights(1, 300, 96, seed=1)
    w, scale = w[0], scale[0]
    w.view(-1).view(torch.uint8)[:256] = 0  # no NaN codes
    x, b = torch.randn(2, 5, 96), torch.randn(300)
    deq = kernels.dequantize_held(w, scale)
    one = kernels.linear_held(x, w, b, scale)
    assert one.shape == (2, 5, 300)
    assert torch.equal(one.view(10, 300), ops.grouped_mm(x.view(10, 96), torch.tensor([10]), deq.unsqueeze(0), 48) + b)
    _same_on_expert_threads(monkeypatch, lambda: kernels.linear_held(x, w, b, scale), one)
    many = torch.randn(kernels.HELD_FEW_ROWS + 3, 96)
    chunk = kernels.linear_held(many, w, scale=scale)
    assert torch.equal(chunk, _gemm_blocks(many, deq))
    _same_on_expert_threads(monkeypatch, lambda: kernels.linear_held(many, w, scale=scale), chunk)


def test_held_weights_run_the_kernel_at_any_rows_where_the_blas_is_narrower(ops, monkeypatch):
    """Where torch's BLAS runs narrower vectors than the kernel (``blas_narrower``: MKL on an AMD CPU
    with AVX-512), held weights' groups of any size run the kernel, for BF16 and FP8 weights, in
    ``grouped_mm`` and ``linear_held``, and ``mla_decode`` any number of query rows on its register
    blocks; FP32 weights keep the BLAS past FEW_ROWS (F.linear's bits)."""
    rows = [1, kernels.HELD_FEW_ROWS + 5, 200]
    x, w = torch.randn(sum(rows), 96), torch.randn(3, 300, 96).bfloat16()
    w8, scale = _fp8_weights(3, 300, 96, seed=2)
    w8.view(torch.uint8)[w8.view(torch.uint8) & 0x7F == 0x7F] = 0  # no NaN codes
    many = torch.randn(300, 96)
    counts = torch.tensor(rows)
    q, pool, tables, pos = _paged_latents(2, 4, 6, 45, 8, 5, 20, torch.float32, 0.3)  # 24 query rows
    calls = {
        "bf16 grouped": (lambda: kernels.grouped_mm(x, rows, w), ops.grouped_mm(x, counts, w, 200, None)),
        "fp8 grouped": (lambda: kernels.grouped_mm(x, rows, w8, scale=scale),
                        ops.grouped_mm(x, counts, w8, 200, scale)),
        "bf16 linear": (lambda: kernels.linear_held(many, w[0]), ops.linear(many, w[0], None, None, 300)),
        "fp8 linear": (lambda: kernels.linear_held(many, w8[0], scale=scale[0]),
                       ops.linear(many, w8[0], None, scale[0], 300)),
        "mla_decode": (lambda: kernels.mla_decode(q, pool, tables, pos, 45, 0.9),
                       ops.mla_decode(q, pool, tables, pos, 45, 0.9, 0, 24)),
    }
    monkeypatch.setattr(kernels, "blas_narrower", lambda: True)
    assert kernels.held_few_rows() == kernels.ANY_ROWS
    for name, (call, on_the_kernel) in calls.items():
        assert torch.equal(call(), on_the_kernel), name
    wide = w.float()
    assert torch.equal(kernels.grouped_mm(x, rows, wide)[1:], ops.grouped_mm(x, counts, wide, kernels.FEW_ROWS)[1:])
    monkeypatch.setattr(kernels, "blas_narrower", lambda: False)  # past 48 rows: GEMMs on widened blocks
    for name, (call, on_the_kernel) in calls.items():
        assert not torch.equal(call(), on_the_kernel) or not ops.has_blas(), name


def test_blas_narrower_is_mkl_on_a_non_intel_cpu_with_avx512(monkeypatch):
    """MKL runs its AVX-512 code on Intel CPUs only: the kernel's AVX-512 build outruns its SGEMM
    on AMD ones; elsewhere the BLAS is as wide; ``FLYER_BLAS_NARROWER`` overrides the detection."""
    monkeypatch.delenv("FLYER_BLAS_NARROWER")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    cases = [("AVX512", "AuthenticAMD", True), ("AVX512", "HygonGenuine", True), ("AVX512", "GenuineIntel", False),
             ("AVX2", "AuthenticAMD", False), ("AVX512", None, False)]
    try:
        for capability, vendor, narrower in cases:
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            monkeypatch.setattr(kernels, "_cpu_vendor", lambda v=vendor: v)
            kernels.blas_narrower.cache_clear()
            assert kernels.blas_narrower() is narrower, (capability, vendor)
        for value, narrower in (("1", True), ("0", False)):
            monkeypatch.setenv("FLYER_BLAS_NARROWER", value)
            kernels.blas_narrower.cache_clear()
            assert kernels.blas_narrower() is narrower
    finally:
        kernels.blas_narrower.cache_clear()


def test_fp32_linears_of_prefill_chunks_run_on_the_kernel_in_inference(ops, monkeypatch):
    """``lowp.linear`` on an FP32 weight: in inference, where the expert threads run, a prefill chunk's
    rows (more than FEW_ROWS) run the extension's GEMM blocks (so they split over them), within FP32
    rounding of F.linear (here, at K = 96, also its bits; not at every shape: test_kernels_edges); decode
    rows and anything with gradients stay ``F.linear``."""
    from flyer.model import lowp

    monkeypatch.setattr(kernels, "splits", lambda: True)
    w, b = torch.randn(300, 96), torch.randn(300)
    chunk, rows = torch.randn(2, kernels.FEW_ROWS, 96), torch.randn(3, 96)
    with torch.no_grad():
        got = lowp.linear(chunk, w, b)
        assert torch.equal(got.view(-1, 300), _gemm_blocks(chunk.view(-1, 96), w) + b)
        assert torch.equal(got, F.linear(chunk, w, b))  # at this shape; not at every one
        assert torch.equal(lowp.linear(rows, w, b), F.linear(rows, w, b))
    assert_fp32_sums(got, F.linear(chunk.double(), w.double(), b.double()),
                     F.linear(chunk.double().abs(), w.double().abs(), b.double().abs()), 97)
    assert torch.equal(lowp.linear(chunk, w, b), F.linear(chunk, w, b))  # gradients on: torch's own


def test_linear_held_builds_no_tensor_per_call(ops, monkeypatch):
    """The kernel's counts tensor of a row count is built once: a decode step runs ~40 held
    linears, and a host tensor built for each costs more than a small GEMM's kernel call."""
    x, w = torch.randn(3, 96), torch.randn(64, 96).bfloat16()
    kernels.linear_held(x, w)  # the row count's tensor, cached
    built = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real(*a, **k))
    for rows in (x, torch.randn(kernels.HELD_FEW_ROWS + 3, 96)):  # decode rows; a prefill chunk's
        for _ in range(3):
            kernels.linear_held(rows, w)
    assert built == []


def test_grouped_mm_split_over_expert_threads_is_the_same_sums(ops, monkeypatch):
    """``set_expert_threads``: the kernel's groups and the larger groups' GEMM blocks, claimed by
    whichever thread is free, give the same output bit for bit (each output is one item's)."""
    rows = [3, 0, 5, kernels.FEW_ROWS + 2, 1, 4, 0, 2, 6]
    x, w = torch.randn(sum(rows), 64), torch.randn(len(rows), 200, 64)
    one = kernels.grouped_mm(x, rows, w)
    _same_on_expert_threads(monkeypatch, lambda: kernels.grouped_mm(x, rows, w), one)
    with pytest.raises(ValueError, match="expert threads"):
        kernels.set_expert_threads(0)


def test_expert_threads_survive_a_fork(ops, monkeypatch):
    """A process forked while the workers run (a DataLoader worker, a multiprocessing pool) has
    none of them: its calls run on its own thread, and it can start its own."""
    import multiprocessing

    monkeypatch.setattr(kernels, "SPLIT_SECONDS", 0.0)
    rows = [3, 40, 1]
    x, w = torch.randn(sum(rows), 64), torch.randn(len(rows), 200, 64).bfloat16()
    one = kernels.grouped_mm(x, rows, w)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kernels.set_expert_threads(2)
    try:
        kernels.grouped_mm(x, rows, w)  # the workers awake
        with multiprocessing.get_context("fork").Pool(1) as pool:
            outs = pool.apply_async(_split_in_child, (x, rows, w)).get(timeout=120)
    finally:
        kernels.set_expert_threads(1)
        torch.set_num_threads(threads)
    assert all(torch.equal(o, one) for o in outs)


def _split_in_child(x, rows, w):
    torch.set_num_threads(1)
    inherited = kernels.grouped_mm(x, rows, w)
    kernels.set_expert_threads(2)  # forgets the parent's threads instead of joining them
    return inherited, kernels.grouped_mm(x, rows, w)


def _csr_case(T=60, D=40, n=300, dtype=torch.bfloat16):
    src = torch.randint(0, T + 1, (n,))  # T: pad rows; some tokens get no row
    src[:5] = T
    y = torch.randn(n, D).to(dtype)
    y[src == T] = 0
    return src, y, torch.rand(n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_is_index_add_bitwise(ops, dtype):
    T = 60
    src, y, w = _csr_case(T=T, dtype=dtype)
    index = kernels.token_index(src, T, y, w)
    with kernels.disabled():
        eager_index = kernels.token_index(src, T, y, w)
    assert index.csr is not None and eager_index.csr is None
    eager = y.new_zeros(T + 1, y.shape[1], dtype=torch.float32).index_add_(0, src, y.float() * w[:, None])[:T]
    assert torch.equal(kernels.combine(y, w, eager_index), eager)
    assert torch.equal(kernels.combine(y, w, index), eager)
    x = torch.randn(y.shape).to(dtype)
    assert torch.equal(kernels.segment_sum(x, index), kernels.segment_sum(x, eager_index))


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_backward(ops, dtype):
    T = 60
    src, y, w = _csr_case(T=T, dtype=dtype)
    g = torch.randn(T, y.shape[1])
    index = kernels.token_index(src, T, y, w)
    dy, dw = kernels.combine_backward(g, y, w, index, True)
    with kernels.disabled():
        eager_dy, eager_dw = kernels.combine_backward(g, y, w, kernels.token_index(src, T, y, w), True)
    gg = torch.cat([g, torch.zeros(1, g.shape[1])]).index_select(0, src)
    assert torch.equal(dy, (gg * w[:, None]).to(dtype)) and torch.equal(dy, eager_dy)  # pad rows: zeros
    terms = gg.double() * y.double()  # FP32 dot products in the kernel's vector order
    assert_fp32_sums(dw, terms.sum(1), terms.abs().sum(1), y.shape[1])
    assert_fp32_sums(eager_dw, terms.sum(1), terms.abs().sum(1), y.shape[1])
    dy2, none = kernels.combine_backward(g, y, w, index, False)
    assert none is None and torch.equal(dy2, dy)


def test_combine_rejects_bad_rows(ops):
    with pytest.raises(RuntimeError, match="row 9 out of range for 4 rows"):
        ops.combine(torch.randn(4, 3), torch.rand(4), torch.tensor([0, 1]), torch.tensor([9]))
    with pytest.raises(RuntimeError, match="token 7 out of range for 2 tokens"):
        ops.combine_backward(torch.randn(2, 3), torch.randn(1, 3), torch.rand(1), torch.tensor([7]), True)


def test_disabled_and_unsupported_inputs_take_the_eager_path():
    x = torch.zeros(2, 2)
    with kernels.disabled():
        assert not kernels.usable(x)
    assert not kernels.usable(x.double())  # FP64 (gradcheck, oracles) always runs eagerly
    assert not kernels.usable(torch.zeros(2, device="meta"))


def test_env_switch_turns_the_kernels_off():
    code = "import torch; from flyer import kernels; print(kernels.cpu_ops() is None, kernels.usable(torch.zeros(1)))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLYER_CPU_KERNELS": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_a_build_killed_midway_does_not_hang_later_loads(ops):
    """A build killed midway (Ctrl-C on the first run) leaves torch's ``lock`` file in the build
    directory, and torch's ``load`` waits for it to go, forever: every later flyer command hung
    without a word. The build is cached, so only the lock stands in the way here."""
    lock = Path(extension.build_directory(ops.__name__)) / "lock"
    lock.touch()
    code = "from flyer import kernels; print(kernels.cpu_ops() is not None)"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the load waited on the lock file of a build that was killed")
    finally:
        lock.unlink(missing_ok=True)
    assert out.returncode == 0 and out.stdout.split() == ["True"], out.stderr[-2000:]



@pytest.mark.parametrize("output,said", [
    # torch's message for a failed build: ninja's log, whose last line says only that it stopped
    ("Error building extension 'flyer_cpu_ops': [1/2] c++ -MMD -MF cpu_ops.o.d -O3 -c /src/cpu_ops.cpp -o cpu_ops.o\n"
     "FAILED: cpu_ops.o\nc++ -MMD -MF cpu_ops.o.d -O3 -c /src/cpu_ops.cpp -o cpu_ops.o\n"
     "cc1plus: fatal error: error writing to /tmp/ccq1.s: File too large\ncompilation terminated.\n"
     "ninja: build stopped: subcommand failed.\n",
     "cc1plus: fatal error: error writing to /tmp/ccq1.s: File too large"),
    ("Error building extension 'x': FAILED: a.o\n/src/a.cpp:3:10: Error: 'omp.h' file not found\n"
     "/src/a.cpp:9:1: error: second\nninja: build stopped: subcommand failed.",
     "/src/a.cpp:3:10: Error: 'omp.h' file not found"),
    ("Command '['which', 'c++']' returned non-zero exit status 1.", "Command '['which', 'c++']' returned non-zero "
                                                                   "exit status 1."),
    ("Error building extension 'x' (-Werror=format in the flags)\nninja: build stopped.", "ninja: build stopped.")])
def test_a_failed_build_is_said_by_its_first_error(monkeypatch, output, said):
    """The warning quoted ninja's last line ("ninja: build stopped: subcommand failed.") and never the compiler's
    reason (a full disk, a missing header); it quotes the first error line now, else the last line."""
    monkeypatch.setattr(extension, "_state", {"module": None, "tried": False, "env_off": False})
    monkeypatch.setattr(extension, "build", lambda: (_ for _ in ()).throw(RuntimeError(output)))
    with pytest.warns(UserWarning) as got:
        assert extension.cpu_ops() is None
    assert [str(w.message) for w in got] == [f"fused CPU kernels unavailable, using eager PyTorch (RuntimeError: "
                                             f"{said})"]

def test_each_environment_and_checkout_builds_in_a_directory_of_its_own(ops, tmp_path):
    """Two environments (torch installs) sharing a checkout built in one directory, and each load rebuilt what the
    other had built (about 100 s on 2 cores): torch's include paths are in the compile command ninja compares. The
    build of this process is in the directory its own name gives."""
    assert ops.__name__ == extension.extension_name(torch.backends.cpu.get_cpu_capability())
    here = extension.extension_name("AVX2")
    assert extension.extension_name("AVX2") == here != extension.extension_name("AVX512")
    assert extension.extension_name("AVX2", torch_dir="/other/env/site-packages/torch") != here
    copy = tmp_path / "cpu_ops.cpp"  # another checkout of the same source
    copy.write_bytes(extension._SOURCE.read_bytes())
    assert extension.extension_name("AVX2", copy) != here


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [7, 384])
def test_rms_norm_forward_and_backward(ops, x_dtype, out_dtype, D):
    """Against FP64: the kernels' normwise errors are within the output dtype's rounding, and no
    worse than eager ``F.rms_norm``'s."""
    x = (3 * torch.randn(50, D)).to(x_dtype)
    w = torch.rand(D) + 0.5
    g = torch.randn(50, D).to(out_dtype)
    y, r = kernels.rms_norm(x, w, 1e-6, out_dtype)
    assert y.dtype == out_dtype and r.shape == (50, 1) and r.dtype == torch.float32
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.rms_norm(x64, (D,), w64, 1e-6)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64), g.double())
    torch.testing.assert_close(r.double(), x64.detach().pow(2).mean(1, keepdim=True).add(1e-6).rsqrt(), rtol=1e-6,
                               atol=0)
    for need_dx, need_dw in [(True, True), (True, False), (False, True)]:
        dx, dw = kernels.rms_norm_backward(g, x, w, r, need_dx, need_dw)
        assert (dx is None) != need_dx and (dw is None) != need_dw
        if need_dx:
            assert dx.dtype == x_dtype
    dx, dw = kernels.rms_norm_backward(g, x, w, r, True, True)
    with kernels.disabled():  # the facade's eager twin: no further from FP64 than the kernels allow
        ey, er = kernels.rms_norm(x, w, 1e-6, out_dtype)
        edx, edw = kernels.rms_norm_backward(g, x, w, er, True, True)
    xe = x.clone().requires_grad_()
    we = w.to(x_dtype).requires_grad_()
    eager = F.rms_norm(xe, (D,), we, 1e-6)
    e_dx, e_dw = torch.autograd.grad(eager, (xe, we), g.to(x_dtype))
    eps = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
    for got, eag, want in [(y, eager.to(out_dtype), ref.detach()), (dx, e_dx, ref_dx), (dw, e_dw, ref_dw),
                           (ey, eager.to(out_dtype), ref.detach()), (edx, e_dx, ref_dx), (edw, e_dw, ref_dw)]:
        assert _nerr(got, want) <= max(1.05 * _nerr(eag, want), eps[got.dtype]), (_nerr(got, want), _nerr(eag, want))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tile", "block"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 130), (257, 300)])  # partial tiles and row blocks
def test_fp8_dequantize_equals_eager_bitwise(ops, fmt, granularity, shape):
    """The fused FP8 dequantisation (code -> float times its tile's scale) gives the eager table
    lookup's values bit for bit, NaN codes and saturated values included."""
    from flyer.fp8.quant import dequantize, quantize_blocks, quantize_tiles

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * torch.logspace(-30, 30, shape[1])  # every scale range
    x.view(-1)[0] = float("nan")
    q = (quantize_tiles if granularity == "tile" else quantize_blocks)(x, fmt)
    got = dequantize(q.data, q.scale)
    with kernels.disabled():
        want = dequantize(q.data, q.scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_fp8_dequantize_batched_and_bad_input(ops):
    from flyer.fp8.quant import dequantize_blocks_batched, quantize_blocks_batched

    data, scale = quantize_blocks_batched(torch.randn(3, 256, 200))
    got = dequantize_blocks_batched(data, scale)
    with kernels.disabled():
        assert torch.equal(got, dequantize_blocks_batched(data, scale))
    bits = data[0].view(torch.uint8)
    with pytest.raises(RuntimeError, match="scale has the wrong shape"):
        ops.fp8_dequantize(bits, scale[0][:1], 128, False)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        ops.fp8_dequantize(bits[:, :100].contiguous(), scale[0], 128, False)
    with pytest.raises(RuntimeError, match="block_rows must be 1 or 128"):
        ops.fp8_dequantize(bits, scale[0], 64, False)


def test_fp8_training_step_unchanged_by_the_kernel(ops, monkeypatch):
    """Dequantisation is exact either way, so an FP8 step's loss and gradients are bitwise the same
    with the fused dequantisation and with the eager one (the other kernels on in both)."""
    from flyer.config import preset
    from flyer.fp8 import convert_to_fp8
    from flyer.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = convert_to_fp8(Transformer(cfg))
    x = torch.randint(0, cfg.vocab_size, (2, 33))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l1, g1 = run()
    fused = kernels.fp8_dequantize

    def eager(*args):
        with kernels.disabled():
            return fused(*args)

    monkeypatch.setattr(kernels, "fp8_dequantize", eager)
    l0, g0 = run()
    assert torch.equal(l1, l0) and all(torch.equal(a, b) for a, b in zip(g1, g0))


@pytest.mark.parametrize("capability,flags", [("AVX512", {"-mavx512f", "-mavx512bw", "-mfma"}),
                                              ("AVX2", {"-mavx2", "-mfma", "-mf16c"}), ("DEFAULT", set())])
def test_kernels_build_for_the_isa_aten_dispatches_to(capability, flags, monkeypatch):
    """The C++ kernels are compiled for the vector ISA ATen itself uses on this CPU (forced here for
    each one): AVX-512 code on an AVX2-only CPU would die on an illegal instruction."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    got = set(extension.capability_flags())
    assert flags <= got and (capability == "AVX512" or not any("avx512" in f for f in got))


# ---- argmax of each row ------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_argmax_is_torchs_on_ties_nans_and_infinities(ops, isa):
    """``kernels.argmax``: torch.argmax(x, -1) index for index, the first on ties and the first NaN
    where a row has one; rows whose length is no multiple of the vector width, rows of -inf, +inf
    and NaN anywhere (the vector pass and the tail, one or several)."""
    if isa == "AVX2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("AVX2 code needs an x86 CPU with AVX2")
        ops = kernels.build("AVX2")
    g = torch.Generator().manual_seed(0)
    for V in (1, 5, 8, 37, 8191):
        x = torch.randn(12, V, generator=g).round()  # rounded: many ties among the largest values
        x[1] = -torch.inf
        x[2, V // 2] = torch.inf
        x[3, -1] = torch.nan  # in the tail
        x[4, 0] = torch.nan
        x[5, V // 3] = x[5, -1] = torch.nan
        x[6] = torch.nan
        x[7] = 0.0
        x[8, -1] = torch.inf
        x[8, 0] = torch.inf
        want = x.argmax(-1)
        assert torch.equal(ops.argmax_rows(x), want), V
        assert torch.equal(kernels.argmax(x), want)
    x = torch.randn(2, 3, 40, generator=g)[..., ::2]  # any shape, strided
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert kernels.argmax(torch.zeros(0, 9)).shape == (0,)
    with kernels.disabled():
        assert torch.equal(kernels.argmax(x), x.argmax(-1))


# ---- a prefill chunk's fused attention split by head ----------------------------------------------

@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_attention_split_over_expert_threads_is_sdpa_bit_for_bit(ops, monkeypatch, mode):
    """``kernels.attention``: ATen's fused attention per (row, head) on the expert threads gives the
    single call's bits: a chunk after cached slots (a mask per row, and one for all rows), causal
    without a mask, strided (B, H, T, d) views as MLA's dense prefill passes them, value width
    apart from the key's. Where it does not split (gradients wanted, one expert thread) it is that
    call."""
    B, T, S, H = 2, 37, 100, 3
    q, k = (torch.randn(B, n, H, 24).transpose(1, 2) for n in (T, S))
    v = torch.randn(B, S, H, 16).transpose(1, 2)
    pos = torch.tensor([[S - T], [S - T - 5]]) + torch.arange(T)  # row 1 sees fewer slots
    per_row = (torch.arange(S) <= pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S)
    cases = [(q, k, v, per_row), (q, k, v, per_row[:1]), (k, k, v, None)]  # None: causal, T == S
    context = torch.inference_mode if mode == "inference" else torch.no_grad
    with context():
        for qi, ki, vi, mask in cases:
            how = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
            one = F.scaled_dot_product_attention(qi, ki, vi, scale=0.3, **how)
            _same_on_expert_threads(monkeypatch, lambda: kernels.attention(qi, ki, vi, 0.3, mask), one)
    assert not kernels.attention_splits(q, k, v)  # one expert thread: torch's own call
    wanted = q.detach().requires_grad_()
    monkeypatch.setattr(kernels, "splits", lambda: True)
    assert kernels.attention_splits(q, k, v) and not kernels.attention_splits(wanted, k, v)
    kernels.attention(wanted, k, v, 0.3, per_row).sum().backward()  # F.scaled_dot_product_attention's autograd
    assert wanted.grad is not None
    with pytest.raises(RuntimeError, match="mask"):
        ops.attention_heads(q, k, v, per_row.float(), 0.3)
    with pytest.raises(RuntimeError, match="causal"):
        ops.attention_heads(q, k, v, None, 0.3)


# ---- absorbed MLA decode attention over a paged latent cache ---------------------------------------

def _paged_latents(B, T, H, C, R, bs, nb, pool_dtype, spread, seed=0):
    """Queries (B, H*T, C + R), a pool of shuffled blocks (nb per row, some left unused), the
    tables, and T consecutive positions per row, each row at its own."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(B * nb + 3, bs, C + R, generator=g).to(pool_dtype)
    tables = torch.randperm(B * nb + 3, generator=g)[:B * nb].view(B, nb)
    last = torch.randint(T - 1, nb * bs, (B, 1), generator=g)
    pos = last - T + 1 + torch.arange(T)
    return torch.randn(B, H * T, C + R, generator=g) * spread, pool, tables, pos


@pytest.fixture(params=["blas", "loop"])
def blas(ops, request):
    """mla_decode's tile products on torch's BLAS (where found) and on the plain loop that runs where
    torch has none, whatever this machine's torch links."""
    if request.param == "blas" and not ops.has_blas():
        pytest.skip("this torch exports no sgemm_")
    ops.set_blas(request.param == "blas")
    yield request.param
    ops.set_blas(True)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,C,R,bs,nb,spread,first", [
    (3, 1, 4, 37, 8, 5, 20, 0.3, 0),  # vector tails, blocks of 5, contexts up to 100 slots (two tiles)
    (2, 2, 6, 96, 16, 16, 10, 0.3, 0),  # two new tokens per row (MTP verification): per-token masks
    (2, 1, 2, 64, 16, 16, 40, 3.0, 0),  # peaked over up to 640 slots: the max moves across tiles, weights flushed
    (2, 2, 3, 37, 8, 4, 20, 3.0, 1),  # slot 0 not attended (the server's MTP cache), its score the largest
    (2, 1, 3, 45, 8, 5, 20, 0.3, 0),  # outputs in blocks of two vectors, then one, then a scalar tail
    (2, 2, 10, 37, 8, 5, 20, 0.3, 0),  # 20 query rows: past MLA_FEW_QUERY_ROWS, the tile products on the BLAS
])
@pytest.mark.parametrize("narrower", [False, True])  # True: any number of query rows on the register blocks
def test_mla_decode_within_fp32_bound_of_exact(ops, blas, monkeypatch, narrower, pool_dtype, B, T, H, C, R, bs, nb,
                                               spread, first):
    monkeypatch.setattr(kernels, "blas_narrower", lambda: narrower)
    q, pool, tables, pos = _paged_latents(B, T, H, C, R, bs, nb, pool_dtype, spread)
    pos = pos.clamp(min=first)
    scale = 0.9
    if first:  # slot 0 of each row: the query itself, scaled up, so attending it would dominate the sums
        pool[tables[:, 0], 0] = (4 * q[:, 0]).to(pool_dtype)
    got = kernels.mla_decode(q, pool, tables, pos, C, scale, first=first)
    S = int(pos.max()) + 1
    kv = pool[tables].flatten(1, 2)[:, :S].float()  # the slots each row sees, gathered (exact)
    exact, bound = latent_attention_bound(q, kv, pos, C, scale, first)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"
    if spread > 1:  # the case exercises the flush: exact weights below FP32's smallest normal
        p = ((q.double() @ kv.double().transpose(1, 2)) * scale).softmax(-1)
        assert ((p > 0) & (p < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_mla_decode_of_a_cache_shifted_by_first_slots_is_bitwise_the_unshifted(ops, blas, isa):
    """The server's MTP cache keeps position p in slot p + 1 (``first`` 1): its sums must be an
    unshifted cache's bit for bit, so that the server drafts what ``flyer generate`` drafts. With
    tiles from slot 0, every tile boundary and vector of exponentials sat one slot off."""
    if isa == "AVX2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("AVX2 code needs an x86 CPU with AVX2")
        ops = kernels.build("AVX2")
        ops.set_blas(blas == "blas")
    B, T, H, C, R, bs, nb = 2, 2, 3, 37, 8, 4, 40  # up to 160 slots: three tiles of 64, vector tails
    q, pool, tables, pos = _paged_latents(B, T, H, C, R, bs, nb, torch.float32, 1.0)
    kv = pool[tables].flatten(1, 2)  # (B, nb bs, K): each row's slots in order
    junk = 4 * q[:, :1]  # slot 0 of the shifted cache: the query scaled up, the largest score if attended
    shifted = torch.cat([junk, kv, kv[:, :bs - 1]], dim=1)  # (B, (nb + 1) bs, K)
    tables1 = torch.arange(B * (nb + 1)).view(B, nb + 1)
    try:
        few = kernels.MLA_FEW_QUERY_ROWS
        want = ops.mla_decode(q, pool, tables, pos, C, 0.9, 0, few)
        got = ops.mla_decode(q, shifted.reshape(B * (nb + 1), bs, -1), tables1, pos + 1, C, 0.9, 1, few)
    finally:
        ops.set_blas(True)
    assert torch.equal(got, want), (got - want).abs().max()


def test_mla_decode_split_over_expert_threads_is_bitwise(ops, monkeypatch):
    q, pool, tables, pos = _paged_latents(5, 1, 3, 40, 8, 16, 6, torch.float32, 0.5)
    alone = kernels.mla_decode(q, pool, tables, pos, 40, 0.5)
    _same_on_expert_threads(monkeypatch, lambda: kernels.mla_decode(q, pool, tables, pos, 40, 0.5), alone)


def test_mla_decode_bad_tables_are_refused(ops):
    q, pool, tables, pos = _paged_latents(2, 1, 2, 16, 8, 4, 3, torch.float32, 0.5)
    with pytest.raises(RuntimeError, match=r"outside slots 0 \.\. 11"):
        kernels.mla_decode(q, pool, tables, pos + 12, 16, 1.0)
    with pytest.raises(RuntimeError, match=r"position 0 outside slots 1 \.\. 11"):
        kernels.mla_decode(q, pool, tables, pos * 0, 16, 1.0, first=1)
    with pytest.raises(RuntimeError, match="block id 99 outside"):
        kernels.mla_decode(q, pool, tables.fill_(99), pos, 16, 1.0)
