"""BF16 emulation edges a mutation sweep of ``flyer.model.lowp`` found unpinned, and DeepSeek-V4's grouped ``wo_a``,
which ran ATen's BF16 bmm under emulation: the dtype ATen computes a GEMM in (ATen's own result the oracle), the bias
rounded as autocast rounds it, a widened operand carrying the emulation choice on any machine, FP16's choice, the
grouped GEMMs' row layout."""

import pytest
import torch
import torch.nn.functional as F

from flyer import runtime
from flyer.model import lowp
from test_lowp import _GemmDtypes

bf16 = torch.bfloat16


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_linear_is_emulated_like_every_other_gemm(autocast):
    """DeepSeek-V4's grouped ``wo_a`` ran a plain einsum whatever ``emulated`` said: ATen's BF16 bmm, the slow
    kernel emulation avoids. Now the FP32 product of the BF16-rounded operands, rounded to BF16."""
    torch.manual_seed(0)
    G, L, K = 2, 4, 8
    x, w = torch.randn(3, G, K), torch.randn(G * L, K)
    if not autocast:
        x, w = x.to(bf16), w.to(bf16)
    mode = _GemmDtypes()
    with mode, lowp.emulation(True), torch.autocast("cpu", dtype=bf16, enabled=autocast):
        y = lowp.grouped_linear(x, w)
    want = torch.einsum("...gk,glk->...gl", x.to(bf16).float(), w.to(bf16).float().view(G, L, K)).to(bf16)
    assert y.dtype == bf16 and torch.equal(y, want)
    assert mode.seen and {d for _, d in mode.seen} <= {torch.float32}, sorted(mode.seen, key=str)


def test_grouped_linear_under_autocast_computes_in_the_autocast_dtype():
    """A weight held in BF16 takes the held FP32 path only outside autocast; under autocast the grouped product is
    autocast's, as torch.einsum's own (not: the held path under autocast too, an FP32 result)."""
    torch.manual_seed(0)
    G, L, K = 2, 4, 8
    x, w = torch.randn(3, G, K), torch.randn(G * L, K).to(bf16)
    with lowp.emulation(False), torch.autocast("cpu", dtype=bf16):
        y = lowp.grouped_linear(x, w)
        ref = torch.einsum("...gk,glk->...gl", x, w.view(G, L, K))
    assert y.dtype == ref.dtype == bf16 and torch.equal(y, ref)
    assert lowp.grouped_linear(x, w).dtype == torch.float32  # outside autocast: the held path, in FP32


def test_a_widened_operand_decides_whatever_the_machine():
    """``operand`` widens under emulation (not: never widens), and a widened operand makes ``mm`` go through
    FP32 even with emulation off (not: ``widened`` ignored, a mixed BF16 x FP32 torch.mm, a RuntimeError).
    tests/test_lowp.py's check of the latter builds its operand under the machine's own choice, so on a CPU with BF16
    hardware its operand is plain BF16 and the check is empty: here it is built under emulation(True)."""
    t = torch.randn(8, 3)
    with lowp.emulation(True):
        w = lowp.operand(t, bf16)
    assert w.dtype == torch.float32 and torch.equal(w, t.to(bf16).float())
    with lowp.emulation(False):
        assert lowp.operand(t, bf16).dtype == bf16
        a = torch.randn(4, 8).to(bf16)
        y = lowp.mm(a, w)
    assert y.dtype == bf16 and torch.equal(y, torch.mm(a.float(), w).to(bf16))


def test_emulated_linear_rounds_its_bias_as_autocast_does():
    """Autocast rounds the bias to BF16 before the sum is rounded: 1 + round(2^-8 + 2^-16) = 1 + 2^-8, a tie,
    rounds to 1.0, where an unrounded bias gives 1 + 2^-7. ATen's autocast linear is the oracle."""
    x, w, b = torch.ones(1, 1), torch.ones(1, 1), torch.tensor([2.0 ** -8 + 2.0 ** -16])
    out = {}
    for emulate in (True, False):
        with lowp.emulation(emulate), torch.autocast("cpu", dtype=bf16):
            out[emulate] = lowp.linear(x, w, b)
    assert out[False].dtype == out[True].dtype == bf16 and out[False].item() == 1.0
    assert torch.equal(out[True], out[False])


def test_gemm_dtype_is_the_dtype_aten_computes_in():
    """FP64 is left alone by autocast and mixed operands promote: as ATen's own result."""
    a64, w64 = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=bf16):
        assert lowp.gemm_dtype(a64, w64) == F_linear_dtype(a64, w64) == torch.float64
        a32 = a64.float()
        assert lowp.gemm_dtype(a32) == F_linear_dtype(a32, w64.float()) == bf16
    a16 = a64.to(bf16)
    assert lowp.gemm_dtype(a16, a64.float()) == torch.result_type(a16, a64.float()) == torch.float32


def F_linear_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.nn.functional.linear(x, w).dtype


def test_fp16_emulation_follows_the_onednn_kernels(monkeypatch):
    """Undecided (no emulation block, no environment), FP16 runs through FP32 where oneDNN has no FP16 GEMM
    (not: the opposite)."""
    monkeypatch.delenv("FLYER_LOWP_EMULATION", raising=False)
    assert lowp.emulated("cpu", torch.float16) is (not runtime.native_gemm("cpu", torch.float16))


def test_group_rows_is_group_major_and_ungroup_rows_inverts_it():
    """Mutant L17 (rows left token-major): group g's M rows consecutive, ``ungroup_rows`` its inverse."""
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    G, M = 4, 6
    rows = lowp.group_rows(x)
    for g in range(G):
        assert torch.equal(rows[g * M:(g + 1) * M], x[..., g, :].reshape(-1, 5))
    assert torch.equal(lowp.ungroup_rows(rows, x), x)


def test_emulated_attention_rounds_fp32_inputs_as_autocast():
    """Under BF16 autocast, ATen's attention on FP32 inputs runs on their BF16 roundings; so must the emulation.
    Inputs built so that every step is exact: both keys of a head equal (whatever their rounding, the two scores
    are equal, the weights exactly 1/2), the values a and b such that (a + b) / 2 lands on a different BF16 number
    from the mean of their roundings. With ulp u = 2^-7 at 1: a = 1 + 0.45 u, b = 1 + 0.65 u round to 1 and 1 + u,
    whose mean 1 + u / 2 (exact in FP32) rounds to even, 1; the unrounded mean 1 + 0.55 u rounds to 1 + u. Scaled
    by powers of two per channel (exact). So the outputs are equal bit for bit, and differ from attention on the
    unrounded inputs."""
    u, H, Sq, K, V = 2.0**-7, 3, 5, 16, 6
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, Sq, K, generator=g)
    k = torch.randn(1, H, 1, K, generator=g).expand(1, H, 2, K).contiguous()
    scale = 2.0 ** torch.arange(-3, V - 3, dtype=torch.float32)
    v = torch.stack([(1 + 0.45 * u) * scale, (1 + 0.65 * u) * scale]).expand(1, H, 2, V).contiguous()
    assert q.dtype == k.dtype == v.dtype == torch.float32 and not torch.equal(v, v.to(bf16).float())
    for causal in (False, True):
        with torch.autocast("cpu", dtype=bf16):
            with lowp.emulation(True):
                e = lowp.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with lowp.emulation(False):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert e.dtype == a.dtype == bf16 and torch.equal(e, a)
        if not causal:  # causal: the first query sees the first key alone (1 + 0.45 u rounds to 1 either way)
            assert torch.equal(e, torch.ones_like(e) * scale.to(bf16))
        unrounded = F.scaled_dot_product_attention(q, k, v, is_causal=causal).to(bf16)
        assert not torch.equal(e, unrounded)
