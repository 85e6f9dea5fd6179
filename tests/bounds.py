"""Oracle bounds shared by the tests."""

from __future__ import annotations

import math

import torch

FP32_U = 2.0**-24  # unit roundoff of FP32


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||got - ref|| / ||ref|| in FP64 (an all-zero reference: the plain norm)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def assert_fp32_sums(actual: torch.Tensor, exact: torch.Tensor, abs_sum: torch.Tensor, n: int) -> None:
    """``actual`` is, element by element, a sum of ``n`` terms whose exact value is ``exact`` and
    whose absolute values sum to ``abs_sum``, computed in FP32 in any order (the order is the
    BLAS's or the vector width's: AVX2 and AVX-512 builds differ). Checked against the worst-case
    bound n u abs_sum, u = 2^-24, which holds for every order; a fixed tolerance does not (an AVX2
    machine missed 1e-5 by 27% on a 200-term sum)."""
    err = (actual.double() - exact.double()).abs()
    bound = n * FP32_U * abs_sum.double()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g} over {n} terms"


def assert_fp32_gemm(actual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, extra_roundings: int = 0) -> None:
    """``actual`` = ``a @ b`` (operands exact in FP32) summed in FP32 in any order, each term
    rounded up to ``extra_roundings`` more times (scales, promotion)."""
    a, b = a.double(), b.double()
    assert_fp32_sums(actual, a @ b, a.abs() @ b.abs(), a.shape[-1] + extra_roundings)


def logit_scale(model) -> float:
    """|logit| <= ||RMSNorm(h)||_2 max_v ||W_v||_2 <= sqrt(D) max|g| max_v ||W_v||_2 (RMSNorm's output has unit RMS
    before its gain g), from the weights alone."""
    return math.sqrt(model.cfg.dim) * float(model.norm.weight.detach().abs().max()) * \
        float(model.head.weight.detach().norm(dim=1).max())


def decode_logit_bound(model, n_ctx: int) -> float:
    """How far an FP32 logit of ``model`` moves between two evaluations over ``n_ctx`` positions that sum in other
    orders (a prompt prefilled whole or in chunks, alone or in a batch, read from a cache or computed): each block
    (the MTP module's too) sums its projections (the model dim, the query and key-value latents, the rope key, the
    widest FFN) and attention over the context, n u each of ``logit_scale``, and a few roundings in its norms."""
    cfg = model.cfg
    terms = (cfg.dim + max(cfg.inter_dim, cfg.moe_inter_dim) + cfg.q_lora_rank + cfg.kv_lora_rank
             + cfg.qk_rope_head_dim + n_ctx + 18)
    return (cfg.n_layers + cfg.mtp_depth) * terms * FP32_U * logit_scale(model)


def bf16_experts_bound(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                       w3_EFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact SwiGLU experts' output (N, D) in FP64 on BF16-rounded rows and weights, bound on the error of a BF16
    evaluation whose GEMMs accumulate in FP32 in any order and round their outputs to BF16, as SiLU and the product
    round theirs): a GEMM's K terms are off by K u A (A: their absolute sum) before its rounding (u_b = 2^-8 of
    the value, and of that error); SiLU's slope lies in [-0.1, 1.1] and its FP32 evaluation is off by a few u; the
    product carries both factors' errors; the second GEMM carries the product's through |w2|."""
    ub, u = 2.0**-8, FP32_U
    rb = lambda t: t.detach().bfloat16().double()  # noqa: E731
    exact, bound = [], []
    for xs, w1, w2, w3 in zip(rb(x_ND).split(counts_E.tolist()), rb(w1_EFD), rb(w2_EDF), rb(w3_EFD)):
        K, F_ = w1.shape[1], w1.shape[0]
        h1, h3 = xs @ w1.T, xs @ w3.T
        d1, d3 = (K * u * (xs.abs() @ w.abs().T) for w in (w1, w3))
        d1, d3 = d1 + ub * (h1.abs() + d1), d3 + ub * (h3.abs() + d3)
        s = torch.nn.functional.silu(h1)
        ds = 1.1 * d1 + 4 * u * s.abs()
        ds = ds + ub * (s.abs() + ds)
        a = s * h3
        da = ds * (h3.abs() + d3) + s.abs() * d3
        da = da + ub * (a.abs() + da)
        y = a @ w2.T
        dy = da @ w2.abs().T + F_ * u * ((a.abs() + da) @ w2.abs().T)
        exact.append(y)
        bound.append(dy + ub * (y.abs() + dy))
    return torch.cat(exact), torch.cat(bound)


def route_weight_bound(x_a: torch.Tensor, x_b: torch.Tensor, w_ED: torch.Tensor,
                       weights_TK: torch.Tensor) -> torch.Tensor:
    """Bound on |a - b| for top-K routing weights ``weights_TK`` (b's) that two FP32 implementations compute from
    their gate inputs x_a, x_b (T, D) with the gate weight w (E, D). A logit is a D-term sum, off by at most
    D u A_e in either (A_e: its terms' absolute sum), and the inputs' difference moves it by at most
    sum_d |w_ed| |x_a - x_b|_d: L, the largest over the experts, bounds every logit's change. A softmax (over all
    experts or the top K) or a sigmoid (or sqrt-softplus), renormalised over the top K or not, moves each weight by
    at most 2 L of itself (a log-weight moves by its logit and at most one log-sum of logits); each side rounds
    its E-term normalisation, K-term renormalisation and a few elementwise steps (exp, the scale)."""
    xa, xb, w = x_a.double(), x_b.double(), w_ED.double()
    E, D, K = *w.shape, weights_TK.shape[-1]
    L = (2 * D * FP32_U * (xa.abs() @ w.abs().T) + (xa - xb).abs() @ w.abs().T).amax(-1, keepdim=True)
    return (2 * L + 2 * (E + K + 8) * FP32_U) * weights_TK.double().abs()


def mla_attention_bound(attn, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact per-head attention output (B, T, H, v) in FP64, bound on the error of any FP32
    evaluation of it) for MLA with queries q_nope/q_rope, cached [c | k_rope] ``kv`` (B, S, C + R)
    and visibility ``mask`` (B, 1, T, S). A score is a sum of nope*C + R products, so its error is
    at most (nope + C + R) u A with A the sum of their absolute values; a score error d moves each
    probability by at most 2 max|d| of itself; the output sums S probabilities times values that
    are C-term sums (v + C + S roundings, and a few for exp and the normalisation)."""
    H, nope, v = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim
    C, R = attn.kv_lora_rank, attn.qk_rope_head_dim
    w = attn.wkv_b.weight.detach().double().view(H, nope + v, C)
    qn, qr, c, kr = q_nope.double(), q_rope.double(), kv.double()[..., :C], kv.double()[..., C:]
    scores = (torch.einsum("bthd,hdc,bsc->bhts", qn, w[:, :nope], c)
              + torch.einsum("bthr,bsr->bhts", qr, kr)) * attn.softmax_scale
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    exact = torch.einsum("bhts,hjc,bsc->bthj", p, w[:, nope:], c)
    A = attn.softmax_scale * (torch.einsum("bthd,hdc,bsc->bhts", qn.abs(), w[:, :nope].abs(), c.abs())
                              + torch.einsum("bthr,bsr->bhts", qr.abs(), kr.abs()))
    d_max = ((nope + C + R) * FP32_U * A).masked_fill(~mask, 0).amax(-1, keepdim=True)  # (B, H, T, 1)
    val_abs = torch.einsum("bhts,hjc,bsc->bthj", p, w[:, nope:].abs(), c.abs())  # sum_s p_s |V_s|
    bound = (2 * d_max.permute(0, 2, 1, 3) + (v + C + mask.shape[-1] + 8) * FP32_U) * val_abs
    return exact, bound


def adamw_bound(grad_max: list[float], w_max: float, lr: float, eps: float, grad_tol: float) -> float:
    """Largest difference of a parameter (largest magnitude ``w_max``) after AdamW steps (rate
    ``lr``, epsilon ``eps``) whose gradients, of largest magnitude G per step (``grad_max``), differ
    by at most d = grad_tol * G: each step moves it by lr * m / (sqrt(v) + eps), which changes by at
    most lr * (|dm| / eps + |m| |d sqrt(v)| / eps^2) <= lr * d * (1/eps + G/eps^2), plus the few FP32
    roundings of each step's arithmetic."""
    steps = grad_tol * lr * sum(G / eps + G * G / eps**2 for G in grad_max)
    return steps + 8 * len(grad_max) * FP32_U * w_max


def latent_attention_bound(q_BMK: torch.Tensor, kv_BSK: torch.Tensor, pos_BT: torch.Tensor, C: int,
                           scale: float, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact softmax(scale q . kv) kv[:, :C] (B, M, C) in FP64, bound on the error of any FP32
    evaluation) for queries q (B, M, K), row m seeing slots first .. pos[b, m % T] of kv (B, S, K). A
    score is K products and a scaling, so it is off by at most (K + 1) u A (A: its absolute terms);
    that moves each probability by at most 2 max|d| of itself; the output sums S of them times
    values (S roundings, and a few for exp and the normalisation). Weights below FP32's smallest
    normal may be dropped: at most S 2^-126 max|c| more."""
    B, M, K = q_BMK.shape
    S, T = kv_BSK.shape[1], pos_BT.shape[1]
    q, kv = q_BMK.double(), kv_BSK.double()
    slots = torch.arange(S).view(1, 1, S)
    visible = (slots <= pos_BT.repeat(1, M // T).unsqueeze(-1)) & (slots >= first)  # (B, M, S)
    scores = (q @ kv.transpose(1, 2)) * scale
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    exact = p @ kv[..., :C]
    A = scale * (q.abs() @ kv.abs().transpose(1, 2))
    d_max = ((K + 1) * FP32_U * A).masked_fill(~visible, 0).amax(-1, keepdim=True)
    flushed = S * torch.finfo(torch.float32).tiny * kv[..., :C].abs().amax((1, 2)).view(B, 1, 1)
    return exact, (2 * d_max + (S + 8) * FP32_U) * (p @ kv[..., :C].abs()) + flushed


def binomial_halfwidth(n: int, p: float, delta: float = 1e-9) -> float:
    """t with P(|k - n p| >= t) <= ``delta`` for k ~ Binomial(n, p): Bernstein's inequality,
    P(|k - np| >= t) <= 2 exp(-t^2 / (2 (n p (1 - p) + t / 3))), solved for t (terms bounded by 1).
    Holds for every n and p, no normal approximation; a seeded test inside it fails a correct
    sampler for at most ``delta`` of the seeds."""
    log_term = math.log(2 / delta)
    return log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * log_term * n * p * (1 - p))
