"""The no-grad fast paths of the model (decoding: RMSNorm without its autograd Function, the routed
experts without padding or saved tensors, the router and RoPE with fewer ops) against the autograd
paths they shortcut: bitwise equal outputs, with the fused CPU kernels and without."""

import pytest
import torch

from flyer.config import preset
from flyer.infer import Decoder
from flyer.model import lowp
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset(name)).eval()
    for moe_layer in model.layers[model.cfg.n_dense_layers:]:  # some experts get no token
        moe_layer.ffn.gate.bias[:3] = -10.0
    return model


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("B,T", [(1, 1), (16, 1), (3, 7)])
def test_forward_without_grad_equals_autograd_path(name, B, T, cpu_kernels):
    """Logits and the routed-expert counts under inference_mode and no_grad equal the autograd
    path's (parameters requiring grad, grad enabled), for decode-sized and prefill-sized inputs."""
    model = _model(name)
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T))
    ref = model(tokens)
    assert ref.requires_grad  # the autograd Functions ran
    ref_counts = [m.ffn.last_counts.clone() for m in model.layers[model.cfg.n_dense_layers:]]
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            got = model(tokens)
        assert torch.equal(got, ref.detach()), mode
        for m, counts in zip(model.layers[model.cfg.n_dense_layers:], ref_counts):
            assert torch.equal(m.ffn.last_counts, counts)


@pytest.mark.parametrize("emulate", [True, False])
def test_bf16_autocast_forward_without_grad_equals_autograd_path(emulate):
    """Under bf16 autocast: emulated GEMMs (no padding: the no-grad routed path) and oneDNN's
    (64-row padding: the autograd Function either way)."""
    model = _model("tiny")
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 1))
    with lowp.emulation(emulate), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(tokens)
        with torch.inference_mode():
            got = model(tokens)
    assert torch.equal(got, ref.detach())


@pytest.mark.parametrize("T", [0, 1, 5])
@pytest.mark.parametrize("dtype,emulate", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, True)])
def test_routed_experts_without_grad_equal_autograd_function(T, dtype, emulate, cpu_kernels):
    """``Experts.routed_local`` without grad (no pad rows, nothing saved) against its autograd
    Function: FP32, FP64 (summed in FP64) and emulated BF16 GEMMs; no tokens at all, and experts
    with none (8 experts, 2 per token)."""
    torch.manual_seed(0)
    ex = Experts(8, 32, 24).to(dtype)
    x, w = torch.randn(T, 32, dtype=dtype), torch.rand(T, 2, dtype=dtype)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(T)]) if T else torch.zeros(0, 2, dtype=torch.long)
    counts = torch.bincount(ids.flatten(), minlength=8)
    with lowp.emulation(emulate):
        ref = ex.routed_local(x, w, ids, counts)
        with torch.no_grad():
            got = ex.routed_local(x, w, ids, counts)
    assert ref.requires_grad and got.dtype == ref.dtype and torch.equal(got, ref.detach())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_decode_steps_without_grad_equal_autograd_path(name, cpu_kernels):
    """``Decoder.forward`` (inference mode: the fast paths) step by step against the same decoder
    code run with grad enabled (its undecorated function: the autograd paths), bitwise."""
    model = _model(name)
    B, T, n_prefill = 4, 12, 5
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T))
    fast, slow = (Decoder(model, B, T, cache_dtype=torch.float32) for _ in range(2))

    def slow_forward(toks, start):
        with torch.enable_grad():
            return Decoder.forward.__wrapped__(slow, toks, start).detach()

    start = torch.zeros(B, dtype=torch.long)
    assert torch.equal(fast.forward(tokens[:, :n_prefill], start), slow_forward(tokens[:, :n_prefill], start))
    for t in range(n_prefill, T):
        start = torch.full((B,), t)
        h = fast.forward(tokens[:, t:t + 1], start)
        assert torch.equal(h, slow_forward(tokens[:, t:t + 1], start)), t
        assert torch.equal(fast.logits(h), slow.logits(h))
