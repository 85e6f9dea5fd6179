"""flyer used as a library, the way a researcher's own loop uses it: a model copied for an EMA or a best-model
snapshot after training steps, sampled from amid training, built on the meta device, cast to BF16; ``generate``
given what users pass it (a token tensor, the HF list form of an EOS id, a dict, a flat list of ids)."""

import copy
import io

import pytest
import torch

from flyer.config import preset
from flyer.errors import CheckpointError, FieldError
from flyer.infer.generate import GenerationConfig, generate
from flyer.model.moe import Gate
from flyer.model.transformer import Transformer

CFG = preset("tiny")
TOKENS = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def test_a_model_trained_a_step_deep_copies_and_saves():
    """Each MoE layer kept its balance loss, a tensor of the step's graph: ``copy.deepcopy`` refused the model
    ("Only Tensors created explicitly by the user ... support the deepcopy protocol") after any training forward,
    the eval model too. Copies and pickles now leave such losses out; the original keeps them."""
    model = Transformer(CFG)
    model.compute_loss(TOKENS, TOKENS).loss.backward()
    model.eval()
    twin = copy.deepcopy(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert [m.aux_loss for m in twin.modules() if hasattr(m, "aux_loss")] == [None] * CFG.n_layers
    assert any(getattr(m, "aux_loss", None) is not None for m in model.modules())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back(TOKENS), model(TOKENS))


@pytest.mark.parametrize("training", [True, False])
def test_generate_hands_the_model_back_in_its_mode(training):
    """Sampling amid training left the model in eval mode: every later step ran without the balance loss and the
    expert-load counts."""
    model = Transformer(CFG).train(training)
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2))
    assert model.training is training and all(m.training is training for m in model.modules())


def test_generate_takes_a_token_tensor_and_refuses_what_is_no_batch_of_ids():
    model = Transformer(CFG)
    gen = GenerationConfig(max_new_tokens=3)
    assert generate(model, TOKENS[:, :5], gen).tokens == generate(model, TOKENS[:, :5].tolist(), gen).tokens
    for prompts, said in (([1, 5, 7], "prompts[0]: a list of token ids (got int; one prompt goes in a list"),
                          ("hello", "prompts: a list of token-id lists (got str; encode text first)"),
                          ([[1.0, 5.5]], "prompts[0]: token ids are ints (got 1.0)"),
                          (torch.tensor([1, 2]), "prompts: a (B, T) integer tensor or a list of token-id lists"),
                          (torch.ones(1, 2, dtype=torch.bool), "prompts: a .B, T. integer tensor")):
        with pytest.raises(TypeError, match=said.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            generate(model, prompts, gen)
    with pytest.raises(TypeError, match="gen: a GenerationConfig"):
        generate(model, [[1, 2]], {"max_new_tokens": 3})


def test_an_eos_id_list_is_refused_not_ignored():
    """``eos_id=[2]``, the list form of Hugging Face configs, never stopped a row (no id equals a list)."""
    model = Transformer(CFG)
    with pytest.raises(FieldError, match=r"eos_id: must be one token id .* go in stop_ids \(got \[2\]\)"):
        generate(model, [[1, 2]], GenerationConfig(eos_id=[2]))
    with pytest.raises(FieldError, match="stop_ids: must be token ids"):
        generate(model, [[1, 2]], GenerationConfig(stop_ids=(2.0,)))


def test_a_model_built_on_meta_and_initialised_is_a_fresh_one():
    """``to_empty`` leaves every buffer uninitialised memory; ``init_weights`` set the weights only, so the router
    biases held whatever was there (-9.4e27 seen) and routing was garbage. It is the fresh model now, buffers too."""
    fresh = Transformer(CFG)
    torch.manual_seed(3)
    fresh.init_weights()  # the constructor's own init, with the RNG where the meta model's starts
    with torch.device("meta"):
        model = Transformer(CFG)
    model.to_empty(device="cpu")
    for b in model.buffers():
        b.fill_(float("nan")) if b.is_floating_point() else b.fill_(7)
    torch.manual_seed(3)
    model.init_weights()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers(), model.buffers()))


def test_a_model_cast_to_bf16_keeps_its_router_bias_and_loads_fp32():
    """``.to(torch.bfloat16)`` cast the balancing bias too: at 0.5, BF16's step is 2**-8, so updates of
    ``bias_update_speed`` (1e-3) up were lost (0.5 + 0.001 rounds back to 0.5); and the expert-load counts, which
    round past 256. Both stay FP32 with their values (not cast to BF16 and back: 0.501 came back 0.5)."""
    model = Transformer(CFG)
    gates = [m for m in model.modules() if isinstance(m, Gate) and m.bias is not None]
    moes = [m for m in model.modules() if hasattr(m, "tokens_per_expert")]
    for g in gates:
        g.bias.fill_(0.501)
    for m in moes:
        m.tokens_per_expert.fill_(16385)
    model.to(torch.bfloat16)
    assert gates and all(g.bias.dtype == torch.float32 and g.weight.dtype == torch.bfloat16 for g in gates)
    assert all("bias" in dict(g.named_buffers()) for g in gates)
    assert all(torch.equal(g.bias, torch.full_like(g.bias, 0.501)) for g in gates)
    assert moes and all(m.tokens_per_expert.dtype == torch.float32 and (m.tokens_per_expert == 16385).all()
                        for m in moes)
    gates[0].bias.fill_(0.5).add_(1e-3)
    assert gates[0].bias[0].item() != 0.5
    with torch.device("meta"):
        meta = Transformer(CFG).to(torch.bfloat16)  # and on the meta device, where there are no values
    assert all(g.bias.dtype == torch.float32 for g in meta.modules() if isinstance(g, Gate) and g.bias is not None)


def test_the_readmes_python_example_runs():
    """The README's "From Python" block, as written (a tiny model: seconds)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"## From Python\n.*?```python\n(.*?)```", readme, re.S)
    exec(compile(block, "README.md", "exec"), {})


def test_misuse_gets_an_error_naming_it(tmp_path):
    """What a library user types wrong is named: a preset's name for a config, one sequence of ids without its
    batch, float ids, a dtype or device by name (taken), a path that is not there."""
    from flyer.interop.load import load_pretrained

    with pytest.raises(TypeError, match=r"cfg: a ModelConfig, e.g. flyer.config.preset\('tiny'\) \(got str\)"):
        Transformer("tiny")
    model = Transformer(CFG)
    for bad in (TOKENS[0], TOKENS.float()):
        with pytest.raises(ValueError, match=r"tokens_BT: \(B, T\) integer token ids"):
            model(bad)
        with pytest.raises(ValueError, match=r"tokens_BT: \(B, T\) integer token ids"):
            model.compute_loss(bad, bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match=r"dtype: a torch.dtype or one of bf16, .* \(got 'b16'\)"):
        load_pretrained(tmp_path, dtype="b16")
    if not torch.cuda.is_available():
        with pytest.raises(FieldError, match="device: cuda asked for, but CUDA is not available"):
            load_pretrained(tmp_path, device="cuda")


def test_load_pretrained_takes_dtype_and_device_by_name(tmp_path):
    from hf_models import build

    from flyer.interop.load import load_pretrained

    build("v3", tmp_path)
    model, _, _ = load_pretrained(str(tmp_path), device="cpu", dtype="bf16")
    want, _, _ = load_pretrained(tmp_path, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    torch_named, _, _ = load_pretrained(tmp_path, dtype="bfloat16")  # torch's name
    assert all(torch.equal(a, b) for a, b in zip(torch_named.state_dict().values(), want.state_dict().values()))
    # a dtype the model cannot compute in: E4M3 would cast the weights without their scales (the forward then fails)
    for field, bad in (("dtype", "float8_e4m3fn"), ("dtype", torch.float8_e4m3fn), ("dtype", "int8"),
                       ("dtype", torch.bool), ("held", torch.float16)):
        with pytest.raises(TypeError, match=f"{field}: .*got {bad!r}"):
            load_pretrained(tmp_path, **{field: bad})


def test_export_takes_the_dtype_load_pretrained_takes(tmp_path):
    from hf_models import build

    from flyer.interop.export import export_model
    from flyer.interop.load import load_pretrained

    build("v3", tmp_path / "hf")
    model, _, tok = load_pretrained(tmp_path / "hf")
    export_model(model, tok, tmp_path / "a", dtype=torch.bfloat16)
    export_model(model, tok, tmp_path / "b", dtype="bf16")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with pytest.raises(TypeError, match="tok: the tokenizer to write beside the weights"):
        export_model(model, None, tmp_path / "c")
