"""Oracle bounds shared by the tests."""

from __future__ import annotations

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
