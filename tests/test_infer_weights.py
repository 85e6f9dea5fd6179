"""BF16- and FP8-held weights (``flyer.infer.weights``): which weights are held, the bytes saved,
outputs equal to the FP32 model on the rounded (dequantized) weights within FP32 rounding, an FP8
checkpoint's own codes and scales held as they are, and the CLI's checks (greedy serving on held
weights: tests/test_serve_engine.py)."""

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from bounds import rel_error

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from flyer import kernels
from flyer.cli import main
from flyer.config import preset
from flyer.fp8.quant import quantize_blocks
from flyer.infer import GenerationConfig, generate
from flyer.errors import CheckpointError
from flyer.infer.cli import STORED, load_model, resolve_weight_dtype
from flyer.infer.weights import FP8, HeldFP8Experts, HeldFP8Linear, hold_weights
from flyer.interop.export import export_model
from flyer.interop.hf import (TextTokenizer, load_hf, read_hf_config, rope_half_layout, unquantized_weights,
                              weight_files)
from flyer.interop.load import load_pretrained, loaded_bytes
from flyer.model.experts import Experts, packed_w13
from flyer.model.lowp import Linear
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import save_checkpoint
from tests.hf_models import build
from tests.test_deepseek_v4 import v4_tolerance


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


@pytest.mark.parametrize("held", ["bf16", "fp8"])
def test_cli_weight_dtype(capsys, held):
    assert main(["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "3", "--weight-dtype", held,
                 "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    for extra, problem in ((["--precision", "fp8"], "choose one"), (["--device", "cuda"], "CPU kernels")):
        code = main(["generate", "--preset", "tiny", "--prompt", "hi", "--weight-dtype", held, *extra])
        err = capsys.readouterr().err.strip()
        if extra[-1] == "cuda" and "cuda" in err and "weight-dtype" not in err:
            continue  # no CUDA here: the device check speaks first
        assert code == 2 and err.startswith("flyer: error: --weight-dtype: ") and problem in err and "\n" not in err


def _dequantized(held: Transformer, like: Transformer) -> Transformer:
    """``like`` with every FP8-held weight of ``held`` dequantized (and its BF16-held head widened)."""
    ref = copy.deepcopy(like)
    with torch.no_grad():
        for name, m in held.named_modules():
            r = ref.get_submodule(name) if name else ref
            if isinstance(m, HeldFP8Linear):
                r.weight.copy_(kernels.dequantize_held(m.weight, m.weight_scale))
            elif isinstance(m, HeldFP8Experts):
                for w in ("w1", "w2", "w3"):
                    codes, scale = getattr(m, w), getattr(m, f"{w}_scale")
                    getattr(r, w).copy_(torch.stack([kernels.dequantize_held(c, s) for c, s in zip(codes, scale)]))
            elif isinstance(m, Linear) and m.weight.dtype == torch.bfloat16:
                r.weight.copy_(m.weight.float())
    return ref


@pytest.mark.parametrize("over", [dict(moe_inter_dim=64), dict(moe_inter_dim=128),  # w1|w3 apart, or packed
                                  dict(attn="gqa", n_kv_heads=2, head_dim=32, attn_bias=True)])
@pytest.mark.parametrize("kernels_on", [True, False])
def test_fp8_held_model_is_the_fp32_model_on_the_dequantized_weights(over, kernels_on):
    """FP8: every linear but wkv_b and the head (BF16) and the routed experts held as E4M3 codes with
    128x128 block scales (a quarter of their FP32 bytes, plus the scales), computed in FP32: as
    close to the FP64 model on the dequantized weights as the FP32 model on them is. MLA with the
    experts' w1|w3 in two tensors or packed as one; GQA with biases (FP32)."""
    inter = over.get("moe_inter_dim", 64)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **over)).eval()
    held = copy.deepcopy(model)
    saved = hold_weights(held, FP8)
    fp8 = {n: p for n, p in held.named_parameters() if p.dtype == FP8}
    expected = [n for n, p in model.named_parameters()
                if (".experts." in n or n.endswith(".weight") and isinstance(model.get_submodule(n[:-7]), Linear))
                and "wkv_b" not in n and n != "head.weight"]
    assert sorted(fp8) == sorted(expected) and held.head.weight.dtype == torch.bfloat16
    n_fp8 = sum(p.numel() for p in fp8.values())
    assert 3 * n_fp8 < saved < 3 * n_fp8 + 2 * held.head.weight.numel()  # 3 bytes a weight, less the scales
    experts = [m for m in held.modules() if isinstance(m, HeldFP8Experts)]
    assert all((m.w13 is not None) == (inter % 128 == 0) for m in experts)
    ref = _dequantized(held, model)
    exact = copy.deepcopy(ref).double()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    dispatched = copy.deepcopy(held)  # the experts behind the dispatcher (their forward), not fused with it
    for m in dispatched.modules():
        if hasattr(m, "fuse_local"):
            m.fuse_local = False
    with torch.no_grad(), (contextlib.nullcontext() if kernels_on else kernels.disabled()):
        for t in (tokens, tokens[:, :9], tokens[:1, :5]):  # 63 rows, 27, 5
            want = exact(t)
            for net in (held, dispatched):
                assert rel_error(net(t), want) <= 2 * rel_error(ref(t), want) + 1e-7, t.shape
    assert all(m.path == "dispatched" for m in dispatched.modules() if hasattr(m, "fuse_local"))


@pytest.mark.parametrize("held", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("o_lora_rank", [64, 128])  # FP8: a 128-row scale block spans two groups' rows, or one's
def test_v4_held_model_is_the_fp32_model_on_its_held_values(held, kernels_on, o_lora_rank):
    """DeepSeek-V4 (``tiny-v4``: hyper-connections, window / CSA / HCA layers, hash routing) held in BF16 or FP8
    computes as the FP32 model on the held values, within two FP32 evaluations' bound (``v4_tolerance``), for
    prefill and decode-sized inputs. Its grouped ``wo_a`` (each head group times its own row block) is held as the
    other linears are; it used to reach the held weight raw, and any held V4 model (``flyer generate``'s default
    on a BF16 checkpoint) stopped with a dtype error."""
    model = _rounded("tiny-v4", o_lora_rank=o_lora_rank)
    h = copy.deepcopy(model)
    hold_weights(h, held)
    assert all(layer.attn.wo_a.weight.dtype == held for layer in h.layers)
    ref = _dequantized(h, model)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), (contextlib.nullcontext() if kernels_on else kernels.disabled()):
        for t in (tokens, tokens[:1, :5]):
            err, tol = rel_error(h(t), ref(t)), v4_tolerance(model.cfg, t.shape[1])
            assert err <= tol, (t.shape, err, tol)


def test_fp8_hold_refuses_nan_codes(tmp_path):
    """The held-weight kernel does not look for NaN codes (they would widen to +-1.875): holding
    refuses them, naming the weight, from NaN weights, and loading refuses them from an FP8
    checkpoint, naming the file's tensor."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    export_model(model, _word_tokenizer(), tmp_path, "fp8")
    files = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    files[name].view(torch.uint8)[3, 5] = 0xFF
    save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name}: .*1 of its FP8 codes are NaN"):
        load_hf(tmp_path, dtype=torch.float32, held=FP8)
    with torch.no_grad():
        model.layers[1].ffn.experts.w2[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.ffn.experts.w2: .* NaN"):
        hold_weights(model, FP8)


@pytest.mark.parametrize("family", ["v3", "v3-tied-half"])  # rope rows interleaved, or permuted on load
def test_fp8_checkpoint_held_with_its_own_codes_and_scales(tmp_path, capsys, family):
    """A DeepSeek-format FP8 checkpoint with power-of-two block scales (V3.1's UE8M0: a block's
    largest code is then not 448, so requantizing its values would change them): every FP8 weight
    is held with the file's codes and scales (rope rows permuted with their codes where the layout
    needs it), so the held model's weights are the checkpoint's exactly; greedy tokens through
    ``flyer generate --weight-dtype fp8`` equal the held model's."""
    build(family, tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src", dtype=torch.float32)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    for k in [k for k in files if files[k].dtype == FP8]:  # the same values in UE8M0 blocks
        q = quantize_blocks(kernels.dequantize_held(files[k], files[k + "_scale_inv"]), pow2_scales=True)
        files[k], files[k + "_scale_inv"] = q.data[:, :files[k].shape[1]].contiguous(), q.scale
    save_file(files, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    deq = load_hf(tmp_path / "fp8", dtype=torch.float32)[0]  # every weight dequantized
    held = load_hf(tmp_path / "fp8", dtype=torch.float32, held=FP8)[0]  # the E4M3 weights' codes as stored
    requantized = copy.deepcopy(deq)
    hold_weights(requantized, FP8)
    changed = 0
    for name, m in held.named_modules():
        if isinstance(m, (HeldFP8Linear, HeldFP8Experts)):
            pairs = [("weight", "weight_scale")] if isinstance(m, HeldFP8Linear) else \
                [(w, f"{w}_scale") for w in ("w1", "w2", "w3")]
            for w, sc in pairs:
                codes, scale = getattr(m, w), getattr(m, sc)
                assert torch.equal(scale, torch.exp2(torch.log2(scale).round())), (name, w)  # the file's
                values = torch.stack([kernels.dequantize_held(c, s) for c, s in
                                      zip(codes.reshape(-1, *codes.shape[-2:]), scale.reshape(-1, *scale.shape[-2:]))])
                assert torch.equal(values.view(codes.shape), deq.get_submodule(name).get_parameter(w)), (name, w)
                other = requantized.get_submodule(name)
                changed += not torch.equal(getattr(other, w).view(torch.uint8), codes.view(torch.uint8))
    assert changed > 0  # requantized, the same values would not have been held as they are
    for name, p in held.named_parameters():  # the rest, wkv_b's values from its codes included
        if p.dtype != FP8:
            assert torch.equal(p, deq.get_parameter(name).to(p.dtype)), name
    prompt = tok.encode_ids("hello there")
    want = generate(held, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32, eos_id=None))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "fp8"), "--prompt", "hello there", "--max-new-tokens", "6",
                 "--weight-dtype", "fp8", "--cache-dtype", "fp32", "--device", "cpu", "--json", "--eos-id",
                 "-1"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.tokens


def _word_tokenizer() -> TextTokenizer:
    return TextTokenizer(Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")))


def _saved(model: Transformer, path, source: str):
    """``model`` saved as a flyer run (``source`` "run") or an HF directory in ``source``'s dtype."""
    if source != "run":
        export_model(model, _word_tokenizer(), path, source)
        return path
    tok = json.loads(_word_tokenizer().tok.to_str())
    save_checkpoint(path / "checkpoints", 1, {"model.safetensors": model.state_dict(),
                                              "config.json": model.cfg.to_dict(), "tokenizer.json": tok})
    return path


def _state(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (the FP8 block scales are buffers), FP8 codes as bytes."""
    return {n: t.view(torch.uint8) if t.dtype == FP8 else t
            for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("held", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("source,over", [
    ("bf16", {}), ("fp8", dict(moe_inter_dim=128)), ("fp32", {}), ("run", dict(moe_inter_dim=128)),
    ("run", dict(attn="gqa", n_kv_heads=2, head_dim=32, attn_bias=True, tie_embeddings=True))])
def test_loading_into_held_weights_is_holding_the_loaded_model(tmp_path, held, source, over):
    """``load_pretrained(held=)`` writes each tensor into the held weights as it reads it, never
    into an FP32 copy: the same parameters, FP8 scales and bits as loading the FP32 model and
    holding it, the experts' w1|w3 one tensor where holding packs them (BF16; FP8 with whole
    blocks), a tied head still the embedding. HF directories in BF16, DeepSeek's FP8 and FP32, and
    flyer runs (MLA; GQA with biases and a tied head)."""
    torch.manual_seed(0)
    path = _saved(Transformer(preset("tiny", **over)).eval(), tmp_path, source)
    want = load_pretrained(path, dtype=torch.float32)[0]
    # what an FP8 checkpoint stores unquantized (the MTP layer's eh_proj, as DeepSeek's) is held as stored
    files = weight_files(path) if source != "run" else None
    as_stored = {} if files is None or held != FP8 else unquantized_weights(
        want.cfg, path, rope_half_layout(read_hf_config(path, files)[1]), files)
    hold_weights(want, held, as_stored)
    got = load_pretrained(path, dtype=torch.float32, held=held)[0]
    a, b = _state(got), _state(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for m in got.modules():
        if type(m) is Experts:
            assert packed_w13(m.w1, m.w3) is not None
        elif isinstance(m, HeldFP8Experts):
            assert (m.w13 is not None) == (m.w1.shape[1] % 128 == 0)
            assert m.w13 is None or m.w1.data_ptr() == m.w13.data_ptr()
    assert (got.head.weight is got.embed.weight) == got.cfg.tie_embeddings
    assert not got.training


# load_model as flyer generate/serve run it, in a fresh process: its peak resident memory past the imports
_PEAK = """
import argparse, sys
from pathlib import Path
from flyer.infer.cli import load_model
from flyer.interop.load import load_pretrained

def status(key):
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":"))
    return int(line.split()[1]) * 1024

base = status("VmRSS")
if sys.argv[2] == "stored":  # as the file stores it, not held: what --weight-dtype auto loads on a GPU
    load_pretrained(sys.argv[1])
else:
    load_model(argparse.Namespace(ckpt=sys.argv[1], weight_dtype=sys.argv[2], device="cpu", precision="auto"))
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_weight_dtype_bf16_loads_a_bf16_checkpoint_in_its_own_memory(tmp_path):
    """``--weight-dtype bf16`` on a BF16 checkpoint takes about the memory of loading it as stored
    (a BF16 model), not the FP32 model's: loading it in FP32 first and
    then holding it in BF16 peaked at twice its GEMM weights' bytes more."""
    over = dict(dim=512, n_layers=4, n_dense_layers=1, inter_dim=2048, moe_inter_dim=512, n_routed_experts=16,
                n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, mtp_depth=0)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **over)).eval()
    gemm = sum(p.numel() for n, p in model.named_parameters()
               if (".experts." in n or n.endswith(".weight") and isinstance(model.get_submodule(n[:-7]), Linear))
               and "wkv_b" not in n)
    _saved(model, tmp_path, "bf16")
    del model
    peak = {}
    for dtype in ("stored", "bf16"):
        # one torch thread, as the tests run: two threads' parallel regions on 2 shared cores wait on each other
        run = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path), dtype], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        peak[dtype] = int(run.stdout)
    # the FP32 copy would add 2 bytes per GEMM weight; the held load adds only the FP32 norms, router
    # and embedding (2 bytes each more than stored) and what one tensor's read needs
    assert peak["bf16"] - peak["stored"] < gemm, (peak, gemm)


@pytest.mark.parametrize("source", ["bf16", "run"])
def test_loaded_bytes_are_what_loading_allocates_and_too_many_are_refused(tmp_path, capsys, monkeypatch, source):
    """``loaded_bytes`` counts, from the config alone, the bytes the loaded model holds (as stored,
    in FP32, or held in BF16 or FP8); ``flyer generate --ckpt`` refuses a checkpoint that does not
    fit the memory available, in one line, before reading it."""
    torch.manual_seed(0)
    path = _saved(Transformer(preset("tiny", moe_inter_dim=128)).eval(), tmp_path, source)
    for dtype, held in ((None, None), (torch.float32, None), (torch.float32, torch.bfloat16), (torch.float32, FP8)):
        model = load_pretrained(path, dtype=dtype, held=held)[0]
        unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
        assert loaded_bytes(path, dtype, held) == sum(t.numel() * t.element_size() for t in unique.values())
    need = loaded_bytes(path, torch.float32, torch.bfloat16)
    monkeypatch.setattr("flyer.runtime.available_memory", lambda device: need - 1)
    assert main(["generate", "--ckpt", str(path), "--prompt", "hi", "--weight-dtype", "bf16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --ckpt: ") and "needs about" in err and "\n" not in err, err


def test_weight_dtype_auto_holds_weights_as_the_checkpoint_stores_them(tmp_path, capsys):
    """``--weight-dtype auto`` (the default) on the CPU holds a BF16 checkpoint's weights in BF16 and
    an FP8 one's as its codes (FP32 compute, lossless: the same tokens as asking for it), and leaves
    an FP32 flyer run, a preset, other devices and ``--precision fp8`` unheld."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    for source, want in (("bf16", "bf16"), ("fp8", "fp8"), ("run", "fp32")):
        path = _saved(model, tmp_path / source, source)
        runs = []
        for flag in ([], ["--weight-dtype", want]):
            assert main(["generate", "--ckpt", str(path), "--prompt", "hello", "--max-new-tokens", "4", "--device",
                         "cpu", "--json", "--eos-id", "-1", *flag]) == 0
            runs.append(json.loads(capsys.readouterr().out))
        assert runs[0]["weight_dtype"] == want and runs[0]["token_ids"] == runs[1]["token_ids"], source
    bf16 = str(tmp_path / "bf16")
    for device, precision, ckpt, want in (("cuda", "auto", bf16, STORED), ("cuda", "auto", None, "fp32"),
                                          ("cpu", "fp8", bf16, "fp32"), ("cpu", "auto", None, "fp32")):
        args = argparse.Namespace(weight_dtype="auto", precision=precision, ckpt=ckpt)
        assert resolve_weight_dtype(args, torch.device(device)) == want, (device, precision, ckpt)


@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_weight_dtype_fp32_computes_in_fp32(tmp_path, capsys, source):
    """``--weight-dtype fp32`` on a BF16 or FP8 checkpoint loads an FP32 model (it loaded the checkpoint's
    BF16 before): every floating parameter FP32, and the tokens of the same checkpoint loaded in FP32."""
    torch.manual_seed(0)
    path = _saved(Transformer(preset("tiny", moe_inter_dim=128)).eval(), tmp_path, source)
    model, _ = load_model(argparse.Namespace(ckpt=str(path), preset=None, weight_dtype="fp32", device="cpu",
                                             precision="auto", speculative=None, prefix_cache=None))
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    want = load_pretrained(path, dtype=torch.float32)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    assert main(["generate", "--ckpt", str(path), "--prompt", "hello", "--max-new-tokens", "3", "--device", "cpu",
                 "--json", "--eos-id", "-1", "--weight-dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_dtype"] == "fp32"


@pytest.mark.parametrize("moe_inter_dim", [64, 128])  # w1|w3 apart, or packed as one
def test_fp8_hold_returns_the_bytes_it_saves(moe_inter_dim):
    """FP8: each held weight saves 3 of its 4 bytes less its FP32 block scales' 4; the head (BF16) 2."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", moe_inter_dim=moe_inter_dim)).eval()
    saved = hold_weights(model, FP8)
    want = 2 * model.head.weight.numel()
    for m in model.modules():
        if isinstance(m, HeldFP8Linear):
            want += 3 * m.weight.numel() - 4 * m.weight_scale.numel()
        elif isinstance(m, HeldFP8Experts):
            want += sum(3 * getattr(m, w).numel() - 4 * getattr(m, f"{w}_scale").numel() for w in ("w1", "w2", "w3"))
    assert saved == want


def test_weights_are_held_only_in_bf16_or_fp8():
    """hold_weights refuses a dtype other than float32, bfloat16 and float8_e4m3fn (float16 here), leaving the model
    as it was, rather than holding its weights in it."""
    model = Transformer(preset("tiny")).eval()
    with pytest.raises(ValueError, match="float32, bfloat16 or float8_e4m3fn"):
        hold_weights(model, torch.float16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
