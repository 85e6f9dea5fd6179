"""BF16-held weights (``flyer.infer.weights``): which weights are held, the bytes saved, outputs
equal to the FP32 model on the rounded weights within FP32 rounding, and the CLI's checks (greedy
serving on held weights: tests/test_serve_engine.py)."""

import contextlib
import copy

import pytest
import torch
from bounds import rel_error

from flyer import kernels
from flyer.cli import main
from flyer.config import preset
from flyer.infer.weights import hold_weights
from flyer.model.experts import Experts, packed_w13
from flyer.model.lowp import Linear
from flyer.model.transformer import Transformer


def _rounded(cfg_name: str = "tiny", **over) -> Transformer:
    """A random FP32 model whose weights are BF16 values (a BF16 checkpoint loaded in FP32)."""
    torch.manual_seed(0)
    model = Transformer(preset(cfg_name, **over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def test_hold_weights_keeps_gemm_weights_in_bf16_and_the_rest_as_it_was():
    model = _rounded()
    before = {n: p.clone() for n, p in model.named_parameters()}
    gemm = sum(p.numel() for n, p in model.named_parameters()
               if (".experts." in n or n.endswith(".weight") and isinstance(model.get_submodule(n[:-7]), Linear))
               and "wkv_b" not in n)
    assert hold_weights(model, torch.float32) == 0
    assert hold_weights(model, torch.bfloat16) == 2 * gemm  # 4 bytes each, now 2
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        held = isinstance(owner, Experts) or (isinstance(owner, Linear) and "wkv_b" not in name)
        assert p.dtype == (torch.bfloat16 if held else torch.float32), name
        assert not held or not p.requires_grad
        assert torch.equal(p.float(), before[name])  # BF16 values: held exactly
    for m in model.modules():
        if isinstance(m, Experts):
            assert packed_w13(m.w1, m.w3) is not None  # w1|w3 one tensor: one kernel call
    with pytest.raises(RuntimeError, match="for inference"):
        model(torch.zeros(1, 3, dtype=torch.long))  # grad enabled: the embedding's output requires grad
    with pytest.raises(ValueError, match="FP32 model on the CPU"):
        hold_weights(Transformer(preset("tiny")).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("over", [{}, dict(attn="gqa", n_kv_heads=2, head_dim=32, attn_bias=True)])
def test_held_model_is_the_fp32_model_on_the_same_weights(kernels_on, over):
    """The held model computes in FP32 on the BF16 values: as close to the FP64 model as the FP32
    model is (both are FP32 sums of the same products, in different orders), for a prefill chunk
    (kernel up to HELD_FEW_ROWS rows, torch.mm on widened weights past it) and decode rows; MLA,
    and GQA with biases (held weights, FP32 biases)."""
    ref = _rounded(**over)
    exact = copy.deepcopy(ref).double()
    held = copy.deepcopy(ref)
    hold_weights(held, torch.bfloat16)
    tokens = torch.randint(0, ref.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), (contextlib.nullcontext() if kernels_on else kernels.disabled()):
        for t in (tokens, tokens[:, :9], tokens[:1, :5]):  # 63 rows, 27, 5
            want = exact(t)
            e32, eheld = rel_error(ref(t), want), rel_error(held(t), want)
            assert eheld <= 2 * e32 + 1e-7, (t.shape, eheld, e32)


def test_cli_weight_dtype(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "3", "--weight-dtype", "bf16",
                 "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    for extra, problem in ((["--precision", "fp8"], "choose one"), (["--device", "cuda"], "CPU kernels")):
        code = main(["generate", "--preset", "tiny", "--prompt", "hi", "--weight-dtype", "bf16", *extra])
        err = capsys.readouterr().err.strip()
        if extra[-1] == "cuda" and "cuda" in err and "weight-dtype" not in err:
            continue  # no CUDA here: the device check speaks first
        assert code == 2 and err.startswith("flyer: error: --weight-dtype: ") and problem in err and "\n" not in err
