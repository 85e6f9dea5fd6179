"""FP8 GEMM with fine-grained scales and FP32 promotion every N_C = 128 along K.

The one operation (NT layout, both operands K-major, as DeepGEMM's ``fp8_gemm_nt``)::

    out[m, n] = sum_kb  sa[m, kb] * sb[n | n // 128, kb] * sum_{k in block kb} a[m, k] * b[n, k]

``a`` (M, Kp) float8 with 1x128 tile scales ``sa`` (M, Kp/128); ``b`` (N, Kp) float8 with either
128x128 block scales (ceil(N/128), Kp/128) (weights) or 1x128 tile scales (N, Kp/128) (the
re-tiled operands of the weight-gradient GEMM). The inner sum over one 128-wide block is the
tensor-core MMA; its result is promoted to an FP32 accumulator, where the two scales are applied.

Backends:

* ``emulate`` (CPU, and the oracle): the operands are the FP8 values, the arithmetic FP32.
  Products of two FP8 numbers are exact in FP32, the 128-wide partial sums are FP32 sums, the
  block results are scaled and summed in FP32. Vectorised as one batched matmul over K-blocks.
* ``cuda``: ``torch._scaled_mm`` family. Block-wise 1x128 / 128x128 scales where the installed
  torch and device support them (checked once per device against the emulation), else row-wise
  scaled ``_scaled_mm`` per 128-wide K-block with the per-block promotion done here in FP32,
  which is the same arithmetic contract at a coarser kernel granularity.
* ``auto``: ``cuda`` for CUDA tensors on devices with FP8 support (SM 8.9+), else ``emulate``.

``limited_accumulator_gemm`` emulates the Hopper tensor core's limited-precision accumulator for
the paper's accumulation experiment (slow; not used in training).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from flyer.fp8.quant import TILE, block_rows, dequantize, expand_scale, fp8_to_float, quantize_blocks, quantize_tiles

BACKENDS = ("auto", "emulate", "cuda")


def _check_pair(name: str, data: torch.Tensor, scale: torch.Tensor) -> None:
    if data.dim() != 2 or data.shape[1] % TILE:
        raise ValueError(f"{name}: expected (rows, K) with K a multiple of {TILE} (quantize pads), "
                         f"got {tuple(data.shape)}")
    rows_b = -(-data.shape[0] // TILE)
    if scale.shape[1] != data.shape[1] // TILE or scale.shape[0] not in (data.shape[0], rows_b):
        raise ValueError(f"{name}: scale shape {tuple(scale.shape)} fits neither 1x128 tiles "
                         f"({data.shape[0]}, {data.shape[1] // TILE}) "
                         f"nor 128x128 blocks ({rows_b}, {data.shape[1] // TILE})")


def fp8_gemm_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                emulation: str = "blocks") -> torch.Tensor:
    """``out (M, N) = (a * a_scale) @ (b * b_scale)^T`` with promotion to FP32 every 128 along K.

    a: (M, Kp) float8, a_scale: (M, Kp/128) float32 (1x128 tiles).
    b: (N, Kp) float8, b_scale: (ceil(N/128), Kp/128) (128x128 blocks) or (N, Kp/128) (1x128 tiles).
    out_dtype: float32 or bfloat16. backend: one of ``BACKENDS``. emulation: see ``emulated_gemm_nt``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' not supported (choose from: {', '.join(BACKENDS)})")
    _check_pair("a", a, a_scale)
    _check_pair("b", b, b_scale)
    if block_rows(a, a_scale) != 1:
        raise ValueError("a must carry 1x128 tile scales (one row of scales per row)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: a has {a.shape[1]}, b has {b.shape[1]}")
    if backend == "auto":
        backend = "cuda" if a.is_cuda and cuda_fp8_supported(a.device) else "emulate"
    if backend == "cuda":
        return _cuda_gemm(a, a_scale, b, b_scale, out_dtype)
    return emulated_gemm_nt(a, a_scale, b, b_scale, out_dtype, emulation)


EMULATIONS = ("blocks", "dequant")


def emulated_gemm_nt(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32, emulation: str = "blocks",
                     kb_chunk: int = 16) -> torch.Tensor:
    """CPU emulation of ``fp8_gemm_nt`` (same arguments): FP8 operands, FP32 arithmetic.

    emulation='blocks' (the oracle): one batched matmul over the K-blocks gives the (Kb, M, N)
    unscaled block sums of exact FP8 x FP8 products; each is scaled by ``sa (M) x sb (N)`` and
    summed in FP32, exactly the promote-every-128 data flow. ``kb_chunk`` bounds its memory to
    kb_chunk * M * N floats.
    emulation='dequant' (training on CPU): both operands dequantised tile-wise to FP32 and one
    FP32 GEMM over the whole K. Same values; differs from 'blocks' only by FP32 rounding (the
    scale is applied before rather than after the 128-wide sums), and is a single BLAS call.
    """
    if emulation not in EMULATIONS:
        raise ValueError(f"emulation '{emulation}' not supported (choose from: {', '.join(EMULATIONS)})")
    M, Kp = a.shape
    N = b.shape[0]
    Kb = Kp // TILE
    with torch.autocast(a.device.type, enabled=False):
        if Kb == 1:  # one block: the promotion is just the final scaling, products stay exact
            sb = expand_scale(b, b_scale).float()
            return ((fp8_to_float(a) @ fp8_to_float(b).t()) * (a_scale.float() * sb.t())).to(out_dtype)
        if emulation == "dequant":
            return (dequantize(a, a_scale) @ dequantize(b, b_scale).t()).to(out_dtype)
        sa = a_scale.float()  # (M, Kb)
        sb = expand_scale(b, b_scale).float()  # (N, Kb)
        a_kMc = fp8_to_float(a).view(M, Kb, TILE).transpose(0, 1)  # (Kb, M, 128)
        b_kcN = fp8_to_float(b).view(N, Kb, TILE).permute(1, 2, 0)  # (Kb, 128, N)
        out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
        for k0 in range(0, Kb, kb_chunk):
            k1 = min(Kb, k0 + kb_chunk)
            partial = torch.bmm(a_kMc[k0:k1], b_kcN[k0:k1])  # (kc, M, N): per-block MMA results
            scale = sa[:, k0:k1].t().unsqueeze(2) * sb[:, k0:k1].t().unsqueeze(1)  # (kc, M, N)
            out += (partial * scale).sum(0)
    return out.to(out_dtype)


# ---- CUDA: torch._scaled_mm ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cuda_fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper, Blackwell)."""
    if not torch.cuda.is_available() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype):
    """One ``scaled_mm`` call with 1x128 x {128x128 | 1x128} block scales (torch >= 2.9, SM90).

    Scale layouts follow torch's checks: a's (M, Kb) scales column-major; 128x128 scales of b
    as (round_up(Kb, 4), N/128) column-major; 1x128 scales of b as (N, Kb) column-major.
    """
    from torch.nn.functional import ScalingType

    Kb = a.shape[1] // TILE
    sa = _col_major(a_scale.float())
    if block_rows(b, b_scale) == 1:
        sb, recipe_b = _col_major(b_scale.float()), ScalingType.BlockWise1x128
    else:
        L4 = -(-Kb // 4) * 4
        sb = F.pad(b_scale.float().t(), (0, 0, 0, L4 - Kb))  # (L4, N/128)
        sb, recipe_b = _col_major(sb), ScalingType.BlockWise128x128
    return F.scaled_mm(a, b.t(), sa, ScalingType.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)


def _scaled_mm_rowwise_promoted(a, a_scale, b, b_scale, out_dtype):
    """Row-wise scaled ``_scaled_mm`` per 128-wide K-block, promoted and summed here in FP32.
    (Where the installed torch only returns BF16 for row-wise scales, each block result is
    rounded to BF16 before the FP32 sum.)"""
    Kb = a.shape[1] // TILE
    sb = expand_scale(b, b_scale).float()
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    part_dtype = torch.float32
    for k in range(Kb):
        cols = slice(k * TILE, (k + 1) * TILE)
        args = (a[:, cols].contiguous(), b[:, cols].contiguous().t())
        kw = dict(scale_a=a_scale[:, k:k + 1].float().contiguous(), scale_b=sb[:, k].reshape(1, -1).contiguous())
        try:
            part = torch._scaled_mm(*args, **kw, out_dtype=part_dtype)
        except RuntimeError:
            if part_dtype == torch.bfloat16:
                raise
            part_dtype = torch.bfloat16  # some torch builds only emit BF16 with row-wise scales
            part = torch._scaled_mm(*args, **kw, out_dtype=part_dtype)
        out += part.float()
    return out.to(out_dtype)


def _pad_rows16(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_scaled_mm`` wants M and N multiples of 16; zero rows (scale 1) are harmless."""
    pad = -t.shape[0] % 16
    if not pad:
        return t, s
    t = torch.cat([t, torch.zeros(pad, t.shape[1], dtype=t.dtype, device=t.device)])
    if s.shape[0] == t.shape[0] - pad:  # tile scales: one per row
        s = torch.cat([s, torch.ones(pad, s.shape[1], dtype=s.dtype, device=s.device)])
    elif s.shape[0] != -(-t.shape[0] // TILE):  # block scales: the padded rows may need a new block
        s = torch.cat([s, torch.ones(1, s.shape[1], dtype=s.dtype, device=s.device)])
    return t, s


@functools.lru_cache(maxsize=None)
def _cuda_path(device: torch.device, b_tiles: bool) -> str:
    """'blockwise' if one block-scaled ``scaled_mm`` call runs here and matches the emulation on a
    probe (K = 384, non-uniform scales), else 'rowwise' (per-block promotion in this module)."""

    if not hasattr(F, "scaled_mm"):
        return "rowwise"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(64, 384, generator=g) * torch.logspace(-2, 2, 3).repeat_interleave(128)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-1, 1, 256).unsqueeze(1)
    qa = quantize_tiles(x.to(device))
    qb = quantize_tiles(w.to(device)) if b_tiles else quantize_blocks(w.to(device))
    try:
        got = _scaled_mm_blockwise(qa.data, qa.scale, qb.data, qb.scale, torch.float32)
    except (RuntimeError, ValueError, NotImplementedError, TypeError):
        return "rowwise"
    want = emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32)
    ok = torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    return "blockwise" if ok else "rowwise"


def cuda_gemm_path(device: torch.device, b_tiles: bool = False) -> str:
    """Which ``_scaled_mm`` path ``fp8_gemm_nt`` uses on ``device``: 'blockwise' or 'rowwise'."""
    return _cuda_path(torch.device(device), b_tiles)


_BLOCKWISE_REFUSED: set[tuple] = set()  # (M, N, K, b_tiles, out_dtype) cuBLAS had no blockwise kernel for


def _cuda_gemm(a, a_scale, b, b_scale, out_dtype):
    if not cuda_fp8_supported(a.device):
        raise RuntimeError(f"backend 'cuda' needs a CUDA device with FP8 support (SM 8.9+), got {a.device}")
    M, N = a.shape[0], b.shape[0]
    b_tiles = block_rows(b, b_scale) == 1
    a, a_scale = _pad_rows16(a, a_scale)
    b, b_scale = _pad_rows16(b, b_scale)
    key = (a.shape[0], b.shape[0], a.shape[1], b_tiles, out_dtype)
    if _cuda_path(a.device, b_tiles) == "blockwise" and key not in _BLOCKWISE_REFUSED:
        try:
            return _scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype)[:M, :N]
        except RuntimeError as e:  # e.g. CUBLAS_STATUS_NOT_SUPPORTED for this shape/scale layout
            _BLOCKWISE_REFUSED.add(key)
            warnings.warn(f"FP8 blockwise scaled_mm refused (M, N, K) = {key[:3]} "
                          f"({'1x128' if b_tiles else '128x128'} scales of b): {str(e).splitlines()[0][:160]}; "
                          f"using row-wise calls promoted per 128-block for this shape", stacklevel=3)
    return _scaled_mm_rowwise_promoted(a, a_scale, b, b_scale, out_dtype)[:M, :N]


# ---- limited-precision accumulation (the ISCA paper's experiment) --------------------------------

def round_mantissa(x: torch.Tensor, mantissa_bits: int, rounding: str = "truncate") -> torch.Tensor:
    """FP32 values rounded to ``mantissa_bits`` explicit mantissa bits (exponent range kept).

    rounding: 'truncate' (toward zero, what a narrow accumulator that drops low bits does) or
    'nearest' (ties away from zero).
    """
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits must be in [0, 23], got {mantissa_bits}")
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding '{rounding}' not supported (choose from: truncate, nearest)")
    drop = 23 - mantissa_bits
    if drop == 0:
        return x
    bits = x.float().view(torch.int32)
    if rounding == "nearest":
        bits = bits + (1 << (drop - 1))  # carries into the exponent correctly for sign-magnitude
    return (bits & ~((1 << drop) - 1)).view(torch.float32)


def limited_accumulator_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                             mantissa_bits: int = 13, promote_every: int | None = TILE,
                             rounding: str = "truncate") -> torch.Tensor:
    """``fp8_gemm_nt`` (FP32 output) with a limited-precision tensor-core accumulator.

    Model: each FP8 x FP8 product is exact; the MMA accumulator adds products one at a time
    along K and keeps only ``mantissa_bits`` mantissa bits after every add (13: the FP22
    register the ISCA paper describes; ``rounding`` as in ``round_mantissa``). With
    ``promote_every = 128`` the accumulator is copied to an FP32 register every 128 products
    (scales applied there) and restarted, as DeepSeek-V3 does on CUDA cores; with None it runs
    over the whole K and the scales are applied at the end (needs one scale per row, i.e. the
    same scale for every K-block, which is what the experiment feeds it). O(K) vector steps.
    """
    M, Kp = a.shape
    N = b.shape[0]
    sa = a_scale.float()
    sb = expand_scale(b, b_scale).float()
    af, bf = fp8_to_float(a), fp8_to_float(b)
    if promote_every is None:
        if not (torch.all(sa == sa[:, :1]) and torch.all(sb == sb[:, :1])):
            raise ValueError("promote_every=None needs the same scale for every K-block (per-row scales)")
        acc = torch.zeros(M, N)
        for k in range(Kp):
            acc = round_mantissa(acc + af[:, k:k + 1] * bf[:, k].unsqueeze(0), mantissa_bits, rounding)
        return acc * sa[:, :1] * sb[:, :1].t()
    if promote_every < 1 or TILE % promote_every:  # the scales are applied at each promotion, so no interval may
        raise ValueError(f"promote_every must divide {TILE}, got {promote_every}")  # span two scale blocks
    out = torch.zeros(M, N)
    acc = torch.zeros(M, N)
    for k in range(Kp):
        acc = round_mantissa(acc + af[:, k:k + 1] * bf[:, k].unsqueeze(0), mantissa_bits, rounding)
        if (k + 1) % promote_every == 0 or k == Kp - 1:
            kb = k // TILE  # scales of the block this interval ends in (intervals never straddle blocks)
            out += acc * sa[:, kb:kb + 1] * sb[:, kb].unsqueeze(0)
            acc = torch.zeros(M, N)
    return out


def accumulation_experiment(K: int = 4096, M: int = 32, N: int = 32, mantissa_bits: int = 13,
                            rounding: str = "truncate", seed: int = 0) -> dict[str, float]:
    """The ISCA paper's experiment: max relative error of a K-long FP8 GEMM versus FP64 when the
    tensor-core accumulator is never promoted and when it is promoted to FP32 every 128.

    Inputs: uniform [0, 1) activations and weights (every product positive, so the running sum
    grows to ~K/4 and the narrow accumulator's absolute rounding step grows with it, the case
    where its error shows), quantised to E4M3 with one scale per row (the same scale for every
    K-block, so the unpromoted GEMM is well defined). The reference is the FP64 product of the
    same FP8 operands, so the errors are accumulation errors only.
    """

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(M, K, generator=g)
    w = torch.rand(N, K, generator=g)
    x[:, ::TILE] = 1.0  # pin every tile's amax to 1 so all 1x128 tiles of a row share one scale
    w[:, ::TILE] = 1.0
    qa, qb = quantize_tiles(x), quantize_tiles(w)
    assert torch.all(qa.scale == qa.scale[:, :1]) and torch.all(qb.scale == qb.scale[:, :1])
    ref = (qa.dequantize().double() @ qb.dequantize().double().t())
    rel = lambda out: float(((out.double() - ref).abs() / ref.abs()).max())  # noqa: E731
    no_promo = limited_accumulator_gemm(qa.data, qa.scale, qb.data, qb.scale, mantissa_bits, None, rounding)
    promo = limited_accumulator_gemm(qa.data, qa.scale, qb.data, qb.scale, mantissa_bits, TILE, rounding)
    exact = emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32)
    return {"K": K, "mantissa_bits": mantissa_bits, "rounding": rounding,
            "accum_err_no_promotion": rel(no_promo), "accum_err_promotion": rel(promo),
            "accum_err_fp32": rel(exact)}


__all__ = ["BACKENDS", "EMULATIONS", "fp8_gemm_nt", "emulated_gemm_nt", "cuda_fp8_supported", "cuda_gemm_path",
           "round_mantissa", "limited_accumulator_gemm", "accumulation_experiment"]
