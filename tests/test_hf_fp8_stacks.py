"""transformers' own fine-grained FP8 save of a model with fused expert stacks (Mistral 4): ``mlp.experts.gate_up_proj``
and ``down_proj`` as (E, R, C) E4M3 codes beside (E, R/128, C/128) ``*_scale_inv`` block scales, as
``FineGrainedFP8Config`` writes them. flyer refused it ("FP8 tensor ... is a stack of experts"). Now it loads: FP32
values each code times its block's scale, logits within ``logit_tolerance`` of transformers' model on those values,
and, held as FP8, the file's own codes and scales, bit for bit. Tiny random models, FP32, CPU."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config, Mistral4Config, Mistral4ForCausalLM
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from flyer.infer.weights import FP8, held_scale
from flyer.interop.hf import load_hf
from flyer.interop.load import load_init_weights, stored_weight_dtype
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from tests.hf_models import make_tokenizer
from tests.test_hf_mistral4 import _MISTRAL4, logit_tolerance
from tests.test_qwen3_moe import check_logits_and_routes

STACKS = ("gate_up_proj", "down_proj")


def _values(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The format's values: each code times its 128x128 block's scale (the last two dimensions)."""
    full = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :codes.shape[-2], :codes.shape[-1]]
    return codes.float() * full


def build(out, moe_inter: int, monkeypatch) -> dict[str, torch.Tensor]:
    """A random tiny Mistral 4 (hidden 256) quantized and saved by transformers' fine-grained FP8 (128x128 blocks)
    under ``out``, each E4M3 code then shrunk by 3/4 so that no tile's largest is 448: requantizing moves most
    values. Returns the file's tensors."""
    torch.manual_seed(0)
    cfg = Mistral4Config(**{**_MISTRAL4, "hidden_size": 256, "intermediate_size": 256,
                            "moe_intermediate_size": moe_inter})
    Mistral4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out / "bf16")
    # its quantizer runs on the CPU; only its environment check asks for a GPU (one to compute in FP8)
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    fp8 = FineGrainedFP8Config(weight_block_size=(128, 128))
    quantized = Mistral4ForCausalLM.from_pretrained(out / "bf16", quantization_config=fp8)
    quantized.save_pretrained(out / "fp8")
    make_tokenizer(out / "fp8")
    files = load_file(str(out / "fp8" / "model.safetensors"))
    files = {k: (v.float() * 0.75).to(v.dtype) if v.dtype == FP8 else v for k, v in files.items()}
    save_file(files, str(out / "fp8" / "model.safetensors"))
    assert {f"model.layers.1.mlp.experts.{s}{x}" for s in STACKS for x in ("", "_scale_inv")} <= set(files)
    assert files["model.layers.1.mlp.experts.gate_up_proj"].dtype == FP8
    return files


def _reference(out, files) -> Mistral4ForCausalLM:
    """transformers' FP32 model with each quantized weight replaced by its values (codes x scales)."""
    ref = Mistral4ForCausalLM.from_pretrained(out / "bf16", dtype=torch.float32).eval()
    state = ref.state_dict()
    for name, codes in files.items():
        if codes.dtype == FP8:
            state[name].copy_(_values(codes, files[name + "_scale_inv"]))
    return ref


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Experts of 128 channels: the gate and up halves of ``gate_up_proj`` each whole 128-row tiles."""
    out = tmp_path_factory.mktemp("fp8-stacks")
    with pytest.MonkeyPatch.context() as mp:
        return out, build(out, 128, mp)


def test_values_and_logits_equal_transformers(aligned):
    """FP32 load: every expert's w1 / w3 / w2 the codes x scales of its rows of the stacks, bit for bit; logits and
    routes within ``logit_tolerance`` of transformers on the same values. ``--weight-dtype auto`` holds it as FP8."""
    out, files = aligned
    model, cfg, _ = load_hf(out / "fp8", dtype=torch.float32)
    state, inter = model.state_dict(), cfg.moe_inter_dim
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        stem = f"model.layers.{i}.mlp.experts."
        gate_up = _values(files[stem + "gate_up_proj"], files[stem + "gate_up_proj_scale_inv"])
        down = _values(files[stem + "down_proj"], files[stem + "down_proj_scale_inv"])
        assert torch.equal(state[f"layers.{i}.ffn.experts.w1"], gate_up[:, :inter])
        assert torch.equal(state[f"layers.{i}.ffn.experts.w3"], gate_up[:, inter:])
        assert torch.equal(state[f"layers.{i}.ffn.experts.w2"], down)
    check_logits_and_routes(model, cfg, _reference(out, files), logit_tolerance)
    assert stored_weight_dtype(out / "fp8") == "fp8"


def test_held_fp8_keeps_the_files_codes(aligned):
    """Held as FP8: each expert's codes and block scales are the file's rows, split between w1 and w3 at a tile
    boundary, not the values quantized anew (which, the codes shrunk, would move most of them)."""
    out, files = aligned
    model, cfg, _ = load_hf(out / "fp8", dtype=torch.float32, held=FP8)
    state, inter = model.state_dict(), cfg.moe_inter_dim
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        stem = f"model.layers.{i}.mlp.experts."
        codes, scale = files[stem + "gate_up_proj"], files[stem + "gate_up_proj_scale_inv"]
        for key, rows, tiles in (("w1", slice(0, inter), slice(0, 1)), ("w3", slice(inter, None), slice(1, None))):
            key = f"layers.{i}.ffn.experts.{key}"
            assert torch.equal(state[key].view(torch.uint8), codes[:, rows].view(torch.uint8))
            assert torch.equal(held_scale(model, key), scale[:, tiles])
        key = f"layers.{i}.ffn.experts.w2"
        assert torch.equal(state[key].view(torch.uint8), files[stem + "down_proj"].view(torch.uint8))
        assert torch.equal(held_scale(model, key), files[stem + "down_proj_scale_inv"])


def test_a_stack_left_in_bf16_beside_an_fp8_one(tmp_path, monkeypatch):
    """Experts of 192 channels: transformers quantizes ``gate_up_proj`` (384 x 256, whole tiles) and leaves
    ``down_proj`` (256 x 192) in BF16. Each value is the file's (codes x scales, or the BF16 value), the gate and up
    halves split mid-tile; held as FP8 the experts are held as stored, FP32 (the wider of the stack's dtypes)."""
    files = build(tmp_path, 192, monkeypatch)
    stem = "model.layers.1.mlp.experts."
    assert files[stem + "gate_up_proj"].dtype == FP8 and files[stem + "down_proj"].dtype == torch.bfloat16
    gate_up = _values(files[stem + "gate_up_proj"], files[stem + "gate_up_proj_scale_inv"])
    for held in (None, FP8):
        model = load_hf(tmp_path / "fp8", dtype=torch.float32, held=held)[0]
        state = model.state_dict()
        assert torch.equal(state["layers.1.ffn.experts.w1"], gate_up[:, :192])
        assert torch.equal(state["layers.1.ffn.experts.w3"], gate_up[:, 192:])
        assert torch.equal(state["layers.1.ffn.experts.w2"], files[stem + "down_proj"].float())


def test_a_rank_reads_its_experts_rows(aligned):
    """A rank holding experts 4..7 (expert parallelism's ``Experts.first``, as ``flyer train --init`` builds it) gets
    the whole model's values of its experts from the FP8 stacks."""
    out, _ = aligned
    whole, cfg, _ = load_hf(out / "fp8", dtype=torch.float32)
    rank = Transformer(cfg)
    for layer in rank.layers[cfg.n_dense_layers:]:
        layer.ffn.experts = Experts(4, cfg.dim, cfg.moe_inter_dim, first=4)
    load_init_weights(rank, out / "fp8")
    for mine, full in zip(rank.layers[cfg.n_dense_layers:], whole.layers[cfg.n_dense_layers:]):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(mine.ffn.experts, w), getattr(full.ffn.experts, w)[4:])
