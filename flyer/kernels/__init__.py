"""One facade for flyer's fused CPU kernels: each function below runs the compiled kernel where it
can take its tensors and the eager PyTorch code otherwise, so that callers write the maths
(``kernels.swiglu(h13)``). The eager code sits beside each kernel call: it is the fallback on
every other device and dtype, and the oracle the tests compare the kernels against.

- ``xent_chunk``: a chunk of logits to log p(target) and softmax - onehot (the fused loss);
- ``swiglu`` / ``swiglu_backward``: the routed experts' activation and its gradient (with
  DeepSeek-V4's clamp, ``clamp_gate_up``, where a limit is given);
- ``combine`` / ``combine_backward`` / ``segment_sum``: the MoE's weighted FP32 sum of each
  token's expert outputs, and its gradients (rows indexed by token once, ``token_index``);
- ``rms_norm`` / ``rms_norm_backward``: RMSNorm of each row and its gradients;
- ``grouped_mm`` / ``linear_held``: the routed experts' GEMMs and those of weights held in BF16 or FP8,
  a few rows (decoding) at memory bandwidth, more (prefill) on BLAS GEMMs over blocks of the weight,
  or on the kernel at any count where the BLAS runs narrower vectors (``blas_narrower``);
- ``mla_decode``: absorbed MLA attention of a few new tokens over a (paged) latent cache, read in place
  (FP32, BF16, or DeepSeek's FP8 rows decoded as they are read);
- ``index_scores``: DSA's indexer scores of a few new tokens over a (paged) index-key cache, read in place
  (FP32, BF16, or DeepSeek's FP8 keys decoded as they are read); ``index_scores_fp4`` over DeepSeek-V4's FP4
  index-key rows the same way;
- ``attention``: a prefill chunk's fused attention (ATen's), one call per (row, head) over the
  expert threads;
- ``fp8_dequantize``: FP8 codes (1x128 tiles or 128x128 blocks) times their scales, as FP32 (the
  operands of the CPU FP8 GEMM emulation), bit for bit the eager table lookup and multiply.

Where torch runs one thread, ``set_expert_threads`` splits the larger calls of ``grouped_mm``, ``linear_held``,
``mla_decode``, ``attention``, ``index_scores`` and ``index_scores_fp4`` over threads of the extension's own. The
compiled extension (``cpu_ops.cpp``), how it is built and loaded, and the switches that turn it off:
``flyer.kernels.extension`` (``cpu_ops``, ``usable``, ``disabled``).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from flyer.kernels.extension import KERNEL_DTYPES, build, cpu_ops, disabled, usable

TILE = 128  # FP8 tile width and block size (flyer.fp8.quant.TILE); the kernel takes no other


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums of ``dtype`` values run in: FP32, or FP64 for FP64 (``torch.promote_types`` with FP32 gives it too,
    as an op: a decode step asks ~30 times)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- routed experts: SwiGLU ------------------------------------------------------------------

def swiglu(h13_N2F: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(h1) * h3 of ``h13 = [h1 | h3]`` (N, 2F) -> (N, F), in h13's dtype. ``limit`` > 0 (DeepSeek-V4's
    ``swiglu_limit``): silu(min(h1, limit)) * clamp(h3, -limit, limit) (``clamp_gate_up``)."""
    if limit > 0:
        h13_N2F = clamp_gate_up(h13_N2F, limit)
    if usable(h13_N2F):  # the kernel reads rows in place: a view made contiguous (a no-op where it is)
        return cpu_ops().swiglu(h13_N2F.contiguous())
    F_ = h13_N2F.shape[1] // 2
    return F.silu(h13_N2F[:, :F_]) * h13_N2F[:, F_:]


def swiglu_backward(da_NF: torch.Tensor, h13_N2F: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """Gradient of ``swiglu`` at h13 (the unclamped projections) for the output gradient da (N, F):
    dh13 (N, 2F), h13's dtype. With ``limit`` > 0, zero where a clamp is active (what ``torch.clamp``'s
    autograd gives: the gradient passes where the value is inside the bounds, boundary included)."""
    if limit > 0:
        clamped = clamp_gate_up(h13_N2F, limit)
        return swiglu_backward(da_NF, clamped).masked_fill_(clamped != h13_N2F, 0)
    if usable(da_NF, h13_N2F) and da_NF.dtype == h13_N2F.dtype:  # the kernel takes one dtype
        return cpu_ops().swiglu_backward(da_NF.contiguous(), h13_N2F.contiguous())
    # the element-wise ops autograd would run for silu(h1) * h3, written into one buffer
    F_ = h13_N2F.shape[1] // 2
    h1, h3 = h13_N2F[:, :F_], h13_N2F[:, F_:]
    dh13 = h13_N2F.new_empty(h13_N2F.shape)
    torch.ops.aten.silu_backward.grad_input(da_NF * h3, h1, grad_input=dh13[:, :F_])
    torch.mul(da_NF, F.silu(h1), out=dh13[:, F_:])
    return dh13


def clamp_gate_up(h13_N2F: torch.Tensor, limit: float) -> torch.Tensor:
    """A new contiguous (N, 2F) ``[min(h1, limit) | clamp(h3, -limit, limit)]``: DeepSeek-V4's SwiGLU
    clamp, the gate bounded above only, the up-projection both ways."""
    F_ = h13_N2F.shape[1] // 2
    out = torch.empty(h13_N2F.shape, dtype=h13_N2F.dtype, device=h13_N2F.device)
    torch.clamp(h13_N2F[:, :F_], max=limit, out=out[:, :F_])
    torch.clamp(h13_N2F[:, F_:], min=-limit, max=limit, out=out[:, F_:])
    return out


# ---- routed experts: weighted combine ----------------------------------------------------------

class TokenIndex:
    """Which token each row of an (R, D) buffer of expert outputs belongs to.

    ``src`` (R,) int64: row r's token, ``n_tokens`` for a pad row (no token). ``csr``: the kernels'
    index (offsets (T+1,), rows), token t's rows ``rows[offsets[t]:offsets[t+1]]`` ascending (the
    order ``index_add_`` sums them in); None where the eager code runs. Chosen once per forward
    (``token_index``), so a backward takes the path its forward took.
    """

    def __init__(self, src_R: torch.Tensor, n_tokens: int, csr: tuple[torch.Tensor, torch.Tensor] | None):
        self.src, self.n_tokens, self.csr = src_R, n_tokens, csr

    @functools.cached_property
    def gather(self) -> torch.Tensor:
        """(R,) a token for every row: pad rows read the last one (and are zeroed by the caller)."""
        return self.src.clamp(max=self.n_tokens - 1)

    @functools.cached_property
    def pad_rows(self) -> torch.Tensor:
        """Indices of the pad rows."""
        return (self.src == self.n_tokens).nonzero().squeeze(1)


def token_rows(src_R: torch.Tensor, n_tokens: int, per_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of rows by token: (offsets (T+1,), rows) with token t's rows ``rows[offsets[t]:offsets[t+1]]``
    ascending. ``src_R[r]`` is row r's token; values ``>= n_tokens`` (pad rows) belong to no token.
    ``per_token``: every token has exactly that many rows and there are no pad rows (K routed copies each)."""
    rows = torch.argsort(src_R, stable=True)
    if per_token is not None:  # the offsets without counting (decoding: a few ops fewer per layer)
        return torch.arange(0, (n_tokens + 1) * per_token, per_token, device=src_R.device), rows
    counts = torch.bincount(src_R, minlength=n_tokens + 1)[:n_tokens]
    offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=src_R.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, rows


def token_index(src_R: torch.Tensor, n_tokens: int, *tensors: torch.Tensor, per_token: int | None = None) -> TokenIndex:
    """``src_R`` indexed for ``combine`` and ``segment_sum`` on ``tensors`` (the rows and weights);
    ``per_token`` as in ``token_rows``."""
    return TokenIndex(src_R, n_tokens, token_rows(src_R, n_tokens, per_token) if usable(*tensors) else None)


def combine(y_RD: torch.Tensor, w_R: torch.Tensor, index: TokenIndex) -> torch.Tensor:
    """out (T, D) in w's dtype (FP32, or FP64): each token's rows times their weights, summed in
    ascending row order; pad rows go nowhere."""
    if index.csr is not None:
        return cpu_ops().combine(y_RD.contiguous(), w_R.contiguous(), *index.csr)
    acc_dtype = w_R.dtype
    # cast, then scale in place: a mixed-dtype broadcast multiply is slower on CPU
    yw = torch.mul(y_RD, w_R[:, None]) if y_RD.dtype == acc_dtype else y_RD.to(acc_dtype).mul_(w_R[:, None])
    return y_RD.new_zeros(index.n_tokens + 1, y_RD.shape[1], dtype=acc_dtype).index_add_(0, index.src, yw)[:-1]


def combine_backward(g_TD: torch.Tensor, y_RD: torch.Tensor, w_R: torch.Tensor, index: TokenIndex,
                     need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``combine`` for out's gradient g (T, D): dy (R, D) = g[token] * w in y's dtype
    (pad rows exactly zero), and, if ``need_dw``, dw (R,) = <g[token], y_row> in w's dtype. The
    kernel's FP32 dot products add their terms in another order than the eager code's."""
    if index.csr is not None and g_TD.dtype == w_R.dtype:
        return cpu_ops().combine_backward(g_TD.contiguous(), y_RD.contiguous(), w_R.contiguous(), index.src, need_dw)
    g = g_TD.to(w_R.dtype).index_select(0, index.gather)  # each row's token gradient
    dw = g.mul(y_RD.to(g.dtype)).sum(1) if need_dw else None
    dy = g.mul_(w_R[:, None]).to(y_RD.dtype).index_fill_(0, index.pad_rows, 0)  # zeros, even for inf/nan g
    return dy, dw


def segment_sum(x_RD: torch.Tensor, index: TokenIndex) -> torch.Tensor:
    """(T, D) in x's dtype: each token's rows summed (rounded once, as ``index_add_``); pad rows go nowhere."""
    if index.csr is not None:
        return cpu_ops().segment_sum(x_RD.contiguous(), *index.csr)
    return x_RD.new_zeros(index.n_tokens + 1, x_RD.shape[1]).index_add_(0, index.src, x_RD)[:-1]


# ---- routed experts: few rows per expert -------------------------------------------------------

FEW_ROWS = 16  # rows per group up to which ``grouped_mm`` runs the kernel (bench/cpu_kernels.py: the BLAS wins past it)
# the same for BF16-held weights, where the BLAS GEMM needs the weight widened to FP32 first (a copy
# as slow as the GEMM at 16 rows): the kernel wins up to about 48-64 rows (bench/cpu_kernels.py)
HELD_FEW_ROWS = 48
ANY_ROWS = 1 << 62  # a group of any size runs the kernel


def held_few_rows() -> int:
    """Rows per group up to which held (BF16, FP8) weights run the kernel, past which BLAS GEMMs on
    widened blocks: ``HELD_FEW_ROWS``, or any number where the BLAS runs narrower vectors than the
    kernel (``blas_narrower``). FP32 weights keep ``FEW_ROWS``: past it the BLAS, on 128-row blocks
    of the weight (one GEMM's sums within FP32 rounding, not its bits: the BLAS blocks K by the call's shape)."""
    return ANY_ROWS if blas_narrower() else HELD_FEW_ROWS


@functools.cache
def blas_narrower() -> bool:
    """Whether torch's BLAS runs narrower vectors than the kernel built for this CPU: MKL takes its
    AVX-512 code only on Intel CPUs, so on an AMD CPU with AVX-512 its SGEMM runs AVX2 code, and the
    AVX-512 kernel is faster at every row count (0.5-0.85x the time of widening plus SGEMM on the
    small preset's layers, 16 to 2,048 rows, two threads; docs/performance.md).
    ``FLYER_BLAS_NARROWER=0`` or ``1`` sets the answer instead (the tests pin it: the same sums on
    every CPU)."""
    forced = os.environ.get("FLYER_BLAS_NARROWER")
    if forced is not None:
        return forced != "0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not torch.backends.mkl.is_available():
        return False
    return _cpu_vendor() not in (None, "GenuineIntel")


def _cpu_vendor() -> str | None:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) where Linux tells it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        return None

# One thread's work (seconds: weight bytes at 10 GB/s, FP32 arithmetic at 40 GFLOP/s) from which a
# kernel call splits over the expert threads: a worker that is spinning joins within a microsecond
SPLIT_SECONDS = 20e-6
SPIN_SECONDS = 1e-3  # how long an expert thread waits for the next call (spinning, yielding to others) before it sleeps
_split: dict = {"threads": 1}


def splits() -> bool:
    """Whether the expert threads run anything: only where torch runs one thread (more torch threads
    split the same work themselves, and both at once would oversubscribe the cores)."""
    return _split["threads"] > 1 and torch.get_num_threads() == 1


def set_expert_threads(n: int) -> None:
    """Split the kernels' larger calls (``grouped_mm``, ``linear_held``, ``mla_decode``,
    ``attention``, ``index_scores``, ``index_scores_fp4``) over ``n`` threads of the extension's own (the
    caller's one included) where torch runs one thread: ``flyer serve`` runs torch on one thread on a small CPU (a
    decode step's hundreds of small ops gain nothing from more), and one core cannot pull the experts' weights at
    the memory's bandwidth nor run a prefill chunk's GEMMs at two cores' rate. Each call's work is
    split into items (blocks of weight rows, rows of the batch, heads) claimed by whichever thread
    is free, so the results are the same on any number of threads."""
    if n < 1:
        raise ValueError(f"expert threads must be >= 1 (got {n})")
    _split["threads"] = n
    ops = cpu_ops()
    if ops is not None:
        ops.set_threads(n, SPLIT_SECONDS, SPIN_SECONDS)


HELD_DTYPES = (torch.float32, torch.bfloat16)  # weight dtypes the kernel reads with FP32 rows
# and FP8 E4M3 codes with one FP32 scale per 128x128 block (``scale``: DeepSeek's checkpoint format)
HELD_FP8 = torch.float8_e4m3fn


def _held_usable(x_RK: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel's ``grouped_mm`` takes FP32 rows x against w (FP32, held, or FP8 with its scales)."""
    return (x_RK.dtype == torch.float32 and usable(x_RK) and w.device.type == "cpu"
            and (w.dtype in HELD_DTYPES or w.dtype == HELD_FP8))


def dequantize_held(w_NK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 from FP8 codes and their 128x128 block scales (ceil(N / 128), ceil(K / 128)):
    each code times its block's scale, the values ``grouped_mm``'s kernel computes with."""
    K = w_NK.shape[1]
    if K % TILE == 0:
        return fp8_dequantize(w_NK, scale, TILE)
    # fp8_dequantize takes whole 128-column tiles: padded with zero codes
    padded = F.pad(w_NK.view(torch.uint8), (0, -K % TILE)).view(w_NK.dtype)
    return fp8_dequantize(padded, scale, TILE)[:, :K].contiguous()


def grouped_mm(x_RK: torch.Tensor, rows_G: list[int], w_GNK: torch.Tensor,
               rows_G_tensor: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out (R, N): each group's consecutive rows of x (``rows_G[g]`` of them) times w[g]^T. The
    kernel (FP32 x; w FP32, held in BF16, or FP8 E4M3 codes with their 128x128 block scales
    ``scale`` (G, ceil(N / 128), ceil(K / 128)) and no NaN codes (``flyer.infer.weights`` refuses
    them; the kernel does not look), widened exactly as it is read) runs the groups of at most
    ``FEW_ROWS`` rows (``held_few_rows()`` for held w) reading each weight once for all of its
    group's rows, and larger groups as BLAS GEMMs on blocks of 128 weight rows widened
    (dequantized) to FP32; split over the expert threads (``set_expert_threads``). Elsewhere one
    ``torch.mm`` per group on its weight widened to x's dtype. ``rows_G_tensor``: ``rows_G`` as a
    CPU int64 tensor where the caller has one (not built again)."""
    if (w_GNK.dtype == HELD_FP8) != (scale is not None):
        raise ValueError(f"grouped_mm: FP8 weights take their block scales, other weights none "
                         f"(w is {w_GNK.dtype}, scale {'given' if scale is not None else 'None'})")
    if _held_usable(x_RK, w_GNK):
        few = FEW_ROWS if w_GNK.dtype == torch.float32 else held_few_rows()
        rows = torch.tensor(rows_G, dtype=torch.long) if rows_G_tensor is None else rows_G_tensor
        return cpu_ops().grouped_mm(x_RK.contiguous(), rows, w_GNK.contiguous(), few,
                                    None if scale is None else scale.contiguous())
    out = x_RK.new_empty(x_RK.shape[0], w_GNK.shape[1])
    live = [g for g, n in enumerate(rows_G) if n]
    sizes = [rows_G[g] for g in live]
    # x and out split once, by the groups with rows, and no no-op casts: two ops a group where slicing took six, and
    # a GPU's decode step, host-bound, runs ~280 of them (a few live experts of many make no views)
    w_GKN = w_GNK.transpose(1, 2) if scale is None and w_GNK.dtype == x_RK.dtype else None
    for g, x, o in zip(live, x_RK.split(sizes), out.split(sizes)):
        if w_GKN is not None:
            torch.mm(x, w_GKN[g], out=o)
        else:
            w = w_GNK[g] if scale is None else dequantize_held(w_GNK[g], scale[g])
            torch.mm(x, w.to(x_RK.dtype).t(), out=o)
    return out


def linear_held(x: torch.Tensor, weight_NK: torch.Tensor, bias: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of FP32 x (..., K) on a weight in FP32, held in BF16, or in FP8 with its 128x128
    block scales ``scale`` (inference: ``flyer.infer.weights``), computed in FP32: ``grouped_mm``
    with one group, so up to ``held_few_rows()`` rows (decoding; ``FEW_ROWS`` for FP32) read the
    weight once, and more rows (a prefill chunk) run BLAS GEMMs on blocks of it widened, both split
    by output columns over the expert threads. One call into the extension: a decode step makes
    ~40 of these, and Python-side reshapes and checks cost more than a small GEMM."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("linear_held is for inference: run the model under torch.no_grad()")
    ops = cpu_ops()
    if (ops is not None and x.dtype == torch.float32 and x.device.type == "cpu" and weight_NK.device.type == "cpu"
            and (weight_NK.dtype in HELD_DTYPES or weight_NK.dtype == HELD_FP8)):  # others: grouped_mm's torch.mm
        return ops.linear(x, weight_NK, bias, scale, FEW_ROWS if weight_NK.dtype == torch.float32 else held_few_rows())
    x_RK = x.reshape(-1, x.shape[-1])
    out = grouped_mm(x_RK, [x_RK.shape[0]], weight_NK.unsqueeze(0), scale=None if scale is None else scale.unsqueeze(0))
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight_NK.shape[0])


# ---- absorbed MLA decode attention -------------------------------------------------------------

FP8_ROWS = torch.uint8  # a latent pool of DeepSeek's FP8 rows (``flyer.infer.cache_fp8``), seen as their bytes


def mla_decode_usable(pool: torch.Tensor) -> bool:
    """Whether ``mla_decode`` takes a latent cache pool: FP32, BF16 or FP8 rows (``FP8_ROWS``) on the CPU, the
    kernel built."""
    return ((pool.dtype in HELD_DTYPES or pool.dtype == FP8_ROWS) and pool.device.type == "cpu"
            and cpu_ops() is not None)


# Query rows (heads x new tokens) up to which ``mla_decode`` runs a tile's two products on the kernel's
# own register blocks rather than the BLAS (any number where the BLAS is narrower): a few rows make
# each BLAS call cost more than its arithmetic (6 rows 1.3x, 16 rows of V3's 576-wide slots 1.2x;
# 32 rows 0.85x on an AMX machine, measured ad hoc: docs/performance.md)
MLA_FEW_QUERY_ROWS = 16


def mla_decode(q_BMK: torch.Tensor, pool_NbK: torch.Tensor, tables_Bn: torch.Tensor, pos_BT: torch.Tensor, C: int,
               scale: float, first: int = 0) -> torch.Tensor:
    """(B, M, C) FP32: absorbed MLA attention of FP32 queries q (B, M, K), row m = h T + t (head h,
    new token t), over a latent cache read in place: ``pool`` (N, block_size, K) [latent | rope
    key] of every slot in FP32 or BF16, or (N, block_size, ``cache_fp8.token_bytes(C, K - C)``) uint8 DeepSeek's FP8
    rows, each decoded into the kernel's FP32 tile as it is read (each code times its tile's power-of-two scale,
    exact: the eager ``unpack_rows``'s values); row b's slot s at ``pool[tables[b, s // block_size],
    s % block_size]``;
    query (b, m) attends slots ``first`` .. pos[b, m % T]: softmax(scale q . kv) kv[:, :C]. One pass over
    each row's slots (flash decoding), where the eager path (``flyer.infer.attention.
    mla_absorbed_core``, its oracle) gathers them into a new tensor per layer first. Rows are
    split over the expert threads (``set_expert_threads``) when the cache they read is large enough to pay."""
    return cpu_ops().mla_decode(q_BMK.contiguous(), pool_NbK, tables_Bn.contiguous(), pos_BT.contiguous(), C, scale,
                                first, ANY_ROWS if blas_narrower() else MLA_FEW_QUERY_ROWS)


# ---- DSA indexer scores over a (paged) index-key cache -------------------------------------------

def index_scores_usable(pool: torch.Tensor) -> bool:
    """Whether ``index_scores`` takes an index-key cache pool: FP32, BF16 or FP8 E4M3 codes (``HELD_FP8``) on the
    CPU, the kernel built."""
    return ((pool.dtype in HELD_DTYPES or pool.dtype == HELD_FP8) and pool.device.type == "cpu"
            and cpu_ops() is not None)


def index_scores(q_BTHK: torch.Tensor, w_BTH: torch.Tensor, pool_NbK: torch.Tensor, tables_Bn: torch.Tensor,
                 first: int, n_slots: int, scale: float, key_scale_Nb1: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, n_slots - first) FP32: DSA's index scores sum_h w[b, t, h] relu(scale q[b, t, h] . key_s) of FP32
    queries q (B, T, H, K) with head weights w (B, T, H) over slots ``first`` .. ``n_slots - 1`` of an index-key
    cache read in place: ``pool`` (N, block_size, K), row b's slot s at ``pool[tables[b, s // block_size],
    s % block_size]``. The eager oracle (``Indexer.scores``) scores a new FP32 copy of every key; here the keys
    are read as they lie, BF16 widened exactly as read. FP8 keys (``flyer.infer.indexer_fp8``: E4M3 codes, their
    FP32 scales ``key_scale`` (N, block_size, 1) in the same blocks) are read as code times scale, as the latent
    kernel (``mla_decode``) decodes FP8 rows: key_scale[s] sum_h w relu(scale q . codes_s), DeepSeek's
    ``fp8_index`` (q the query codes' values, ``scale`` 1: ``index_queries``'s weights carry d^-0.5), whose eager
    oracle is ``indexer_fp8.index_scores``. Rows split over the expert threads."""
    B, T, H, K = q_BTHK.shape
    fp8 = pool_NbK.dtype == HELD_FP8
    if fp8 != (key_scale_Nb1 is not None):
        raise ValueError(f"index_scores: FP8 keys take their scales, other keys none (keys {pool_NbK.dtype}, "
                         f"key_scale {'given' if key_scale_Nb1 is not None else 'None'})")
    return cpu_ops().index_scores(q_BTHK.reshape(B, T * H, K).contiguous(), w_BTH.contiguous(),
                                  pool_NbK.view(torch.uint8) if fp8 else pool_NbK, tables_Bn.contiguous(), first,
                                  n_slots, scale, key_scale_Nb1.contiguous() if fp8 else None)


def index_scores_fp4(q_BTHK: torch.Tensor, w_BTH: torch.Tensor, pool_NbW: torch.Tensor, tables_Bn: torch.Tensor,
                     first: int, n_slots: int, scale: float) -> torch.Tensor:
    """(B, T, n_slots - first) FP32: ``index_scores`` of FP32 q (B, T, H, K) and w (B, T, H) over DeepSeek-V4's FP4
    index keys read in place (``flyer.infer.hybrid_index_fp4``): ``pool`` (N, block_size, K / 2 + K / 32) uint8
    through ``tables`` (B, n), as ``index_scores`` reads its pool; each slot's row of E2M1 codes (two a byte, the
    even channel in the low nibble) and UE8M0 scale bytes (one per 32 channels), K a multiple of 32, decoded as it
    is read into the kernel's FP32 tile: the eager ``unpack_rows``'s values bit for bit, so the scores are the eager
    ones (the oracle: ``HybridCache.read_entries`` then ``Indexer.scores``) but for the order of their FP32 sums.
    Where the pool is usable (``index_scores_fp4_usable``)."""
    B, T, H, K = q_BTHK.shape
    return cpu_ops().index_scores_fp4(q_BTHK.reshape(B, T * H, K).contiguous(), w_BTH.contiguous(), pool_NbW,
                                      tables_Bn.contiguous(), first, n_slots, scale)


def index_scores_fp4_usable(pool: torch.Tensor) -> bool:
    """Whether ``index_scores_fp4`` takes a pool of FP4 index-key rows: uint8 on the CPU, the kernel built."""
    return pool.dtype == torch.uint8 and pool.device.type == "cpu" and cpu_ops() is not None


# ---- a prefill chunk's fused attention over the expert threads --------------------------------

def attention_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention`` splits these: FP32 CPU tensors without gradients, where the expert
    threads run (``set_expert_threads``: torch on one thread)."""
    return (splits() and q.dtype == k.dtype == v.dtype == torch.float32 and usable(q, k, v)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q_BHTd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSv: torch.Tensor, scale: float,
              mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)``, causal (T == S)
    without a mask. Where ``attention_splits``, one call per (batch row, head), split over the
    expert threads: a prefill chunk's attention (MLA's compute-bound form) otherwise runs on torch's
    one thread (18% of a 256-token prompt's prefill on 2 cores, 43% of a 1,024-token one's). The bits
    are the single call's where ATen runs its fused (flash) kernel; where it runs its math path (by shape and
    mask: ``torch._fused_sdp_choice``) its batched GEMMs over (B, H) may sum in another order than one head's,
    and the split result is the single call's within FP32 rounding. Either way the same on any number of expert
    threads."""
    if attention_splits(q_BHTd, k_BHSd, v_BHSv):
        return cpu_ops().attention_heads(q_BHTd, k_BHSd, v_BHSv, mask_B1TS, scale)
    how = dict(is_causal=True) if mask_B1TS is None else dict(attn_mask=mask_B1TS)
    return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSv, scale=scale, **how)


# ---- argmax of each row --------------------------------------------------------------------------

def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first index on ties, the first NaN where there is one), in vectors for
    FP32 rows on the CPU: torch's compares one value at a time, which costs a 16-request decode step
    0.3 ms on the logits alone."""
    if x.dtype == torch.float32 and x.dim() >= 1 and x.shape[-1] > 0 and usable(x):
        if x.dim() == 2 and x.is_contiguous():  # the logits of a step: no reshapes (each costs more than a row)
            return cpu_ops().argmax_rows(x)
        return cpu_ops().argmax_rows(x.reshape(-1, x.shape[-1]).contiguous()).view(x.shape[:-1])
    return x.argmax(-1)


# ---- RMSNorm -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., D) over its last dim times weight: (y (..., D) in ``out_dtype``, rounded
    once from the FP32 result; r (..., 1) the reciprocal RMS in FP32 (FP64 for FP64 x))."""
    if usable(x, weight_D) and out_dtype in KERNEL_DTYPES:  # one pass in, one out
        y, r = cpu_ops().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight_D, eps, out_dtype)
        return y.view(x.shape), r.view(*x.shape[:-1], 1)
    # one vectorised upcast (mixed-dtype ops take a slow CPU path); no no-op casts: each is an op of every norm
    acc = acc_dtype(x.dtype)
    xf = x if x.dtype == acc else x.to(acc)
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    r = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))  # (..., 1)
    w = weight_D if weight_D.dtype == acc else weight_D.to(acc)
    y = (xf * r if xf is x else xf.mul_(r)).mul_(w)  # never written: the caller's x
    return (y if y.dtype == out_dtype else y.to(out_dtype)), r


def rms_norm_backward(g: torch.Tensor, x: torch.Tensor, weight_D: torch.Tensor, r: torch.Tensor, need_dx: bool,
                      need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``rms_norm`` for y's gradient g: (dx in x's dtype, dw in weight's dtype), each
    None when not needed. With xhat = x * r and g' = g * w (the closed form):

        dx = r * (g' - xhat * mean(g' * xhat)),    dw = sum over rows of g * xhat.
    """
    D = x.shape[-1]
    if usable(g, x, weight_D) and r.dtype == torch.float32:
        dx, dw = cpu_ops().rms_norm_backward(g.reshape(-1, D).contiguous(), x.reshape(-1, D).contiguous(), weight_D,
                                             r.reshape(-1), need_dx, need_dw)
        return None if dx is None else dx.view(x.shape), None if dw is None else dw.to(weight_D.dtype)
    xhat = x * r if x.dtype == r.dtype else x.to(r.dtype).mul_(r)
    gf = g.to(r.dtype)
    gw = gf * weight_D.to(r.dtype)
    dx = dw = None
    if need_dx:
        c = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(D)
        dx = torch.addcmul(gw, xhat, c, value=-1).mul_(r).to(x.dtype)
    if need_dw:
        dw = xhat.mul_(gf).reshape(-1, D).sum(0).to(weight_D.dtype)
    return dx, dw


# ---- loss ----------------------------------------------------------------------------------------

def xent_chunk(logits_nV: torch.Tensor, targets_n: torch.Tensor, need_grad: bool,
               logp_t_n1: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy pieces of a chunk of logits: log p(target) written into ``logp_t_n1`` (n, 1)
    (FP32, or FP64: the log-sum-exp dtype) and, if ``need_grad``, softmax - onehot (n, V) rounded
    once to the logits' dtype (as the reference's cast of its FP32 dlogits). Targets in [0, V)."""
    if logp_t_n1.dtype == torch.float32 and usable(logits_nV):  # one pass over the logits, not five
        logp_t, dlogits = cpu_ops().xent_chunk(logits_nV.contiguous(), targets_n.contiguous(), need_grad)
        logp_t_n1[:, 0] = logp_t
        return dlogits
    logp = torch.log_softmax(logits_nV, dim=-1, dtype=logp_t_n1.dtype)
    logp_t = torch.gather(logp, 1, targets_n[:, None], out=logp_t_n1)
    if not need_grad:
        return None
    # expm1 gives p_t - 1 without cancellation
    return logp.exp_().scatter_(1, targets_n[:, None], torch.expm1(logp_t)).to(logits_nV.dtype)


# ---- FP8 ---------------------------------------------------------------------------------------

@functools.cache
def _decode_table(fp8_dtype: torch.dtype) -> torch.Tensor:
    """The 256 values of an FP8 format as float32, indexed by bit pattern (NaN codes included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).float()


def fp8_to_float(data: torch.Tensor) -> torch.Tensor:
    """Exact FP8 -> float32. On CPU a 256-entry table lookup (several times faster than the
    element-wise conversion kernel); elsewhere ``.float()``."""
    if data.device.type != "cpu":
        return data.float()
    table = _decode_table(data.dtype)
    return table.index_select(0, data.reshape(-1).view(torch.uint8).int()).view(data.shape)


def fp8_dequantize(data_RC: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(R, C) float32: FP8 codes data (R, C), C a multiple of 128, times their scales: ``scale``
    (R / block_rows rounded up, C / 128) for 1x128 tiles (block_rows 1) or 128x128 blocks (128)."""
    R, C = data_RC.shape
    if data_RC.device.type == "cpu" and (ops := cpu_ops()) is not None:
        return ops.fp8_dequantize(data_RC.contiguous().view(torch.uint8), scale.float().contiguous(), block_rows,
                                  data_RC.dtype == torch.float8_e5m2)
    s = scale if block_rows == 1 else scale.repeat_interleave(block_rows, dim=0)[:R]
    return (fp8_to_float(data_RC).view(R, C // TILE, TILE) * s.unsqueeze(-1)).view(R, C)


__all__ = ["FP8_ROWS", "HELD_DTYPES", "HELD_FP8", "KERNEL_DTYPES", "TokenIndex", "acc_dtype", "argmax", "attention",
           "attention_splits", "blas_narrower", "build", "clamp_gate_up", "combine", "combine_backward", "cpu_ops",
           "dequantize_held", "disabled", "fp8_dequantize", "fp8_to_float", "grouped_mm", "held_few_rows",
           "linear_held", "mla_decode", "mla_decode_usable", "rms_norm", "rms_norm_backward", "segment_sum",
           "set_expert_threads", "swiglu", "swiglu_backward", "token_index", "token_rows", "usable", "xent_chunk"]
