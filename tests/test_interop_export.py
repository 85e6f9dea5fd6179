"""flyer export: transformers loads what flyer writes (same logits and greedy tokens), export then
import is the identity, DeepSeek's FP8 block format round-trips bit for bit, and train --init."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer

from flyer.cli import main
from flyer.config import preset
from flyer.errors import CheckpointError, ConfigError
from flyer.fp8.linear import convert_to_fp8
from flyer.fp8.quant import quantize_blocks
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import _items, export_model, parse_size
from flyer.interop.hf import TextTokenizer, load_hf
from flyer.interop.load import load_init_weights, load_pretrained
from flyer.interop.tensorfile import TensorFile
from flyer.model.counts import mtp_params_stored, param_counts
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests.hf_models import build

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny flyer run (2 steps) on a small text file."""
    root = tmp_path_factory.mktemp("run")
    (root / "text.txt").write_text(TEXT)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--vocab-size", "300", "--data", str(root / "text.txt"), "--data-cache", str(root / "cache"),
                 "--out", str(root / "run"), "--no-progress", "--no-plots", "--eval-every", "2",
                 "--eval-batches", "1", "--ckpt-every", "2", "--device", "cpu"]) == 0
    return root / "run"


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def rel(a, b) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


def test_train_export_then_transformers_matches_flyer_generate(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "300KB"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == "deepseek_v3" and len(summary["files"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(summary["files"])
    assert all((out / f).stat().st_size <= 300_000 for f in summary["files"] if len(index["weight_map"]) > 1)
    ref, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model, cfg, tok = load_pretrained(run)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["mismatched_keys"]
    # transformers' DeepseekV3ForCausalLM runs no MTP module and ignores only layer 61 (V3's own): the
    # MTP layer of a 4-layer model is the one unexpected group, as DeepSeek stores it
    unexpected = set(info["unexpected_keys"])
    assert all(k.startswith(f"model.layers.{cfg.n_layers}.") for k in unexpected)
    assert "model.layers.4.eh_proj.weight" in unexpected and "model.layers.4.eh_proj.weight" in index["weight_map"]
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok("To be, or not")["input_ids"]
    assert ids == tok.encode_ids("To be, or not")
    x = torch.tensor([ids * 3])
    with torch.no_grad():
        assert rel(model(x), ref.eval()(x).logits) < 1e-4
    want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(ids):]
    assert main(["generate", "--ckpt", str(run), "--prompt", "To be, or not", "--max-new-tokens", "12",
                 "--temperature", "0", "--json", "--cache-dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [want.tolist()]


def test_export_then_import_is_the_identity(run, tmp_path):
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "fp32", "fp32")
    back = load_hf(tmp_path / "fp32")[0].state_dict()
    for k, v in model.state_dict().items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    export_model(model, tok, tmp_path / "bf16", "bf16")
    bf16 = load_hf(tmp_path / "bf16")[0]
    assert bf16.embed.weight.dtype == torch.bfloat16
    export_model(bf16, tok, tmp_path / "bf16b", "bf16")
    a, b = tensors(tmp_path / "bf16"), tensors(tmp_path / "bf16b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["llama", "qwen2", "v3", "v2-grouped"])
def test_hf_import_export_round_trip(tmp_path, name):
    build(name, tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "out", "fp32")
    a, b = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # rope rows permuted back
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello")["input_ids"] == tok.encode_ids("hello")


def test_rotate_half_deepseek_exports_interleaved_and_tied(tmp_path):
    src = build("v3-tied-half", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "out", "fp32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_interleave"] is True and config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensors(tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        assert rel(ref(x).logits, src(x).logits) < 1e-4


def test_fp8_block_format_round_trips_and_matches_transformers(run, tmp_path):
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = tensors(tmp_path / "fp8")
    w = files["model.layers.1.self_attn.kv_b_proj.weight"]
    s = files["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    assert files["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    deq = load_hf(tmp_path / "fp8", dtype=torch.float32)[0]
    export_model(deq, tok, tmp_path / "fp8b", "fp8")  # flyer's quantizer on the dequantized weights
    again = tensors(tmp_path / "fp8b")
    assert files.keys() == again.keys()
    for k in files:
        assert torch.equal(files[k].view(torch.uint8) if files[k].dtype.itemsize == 1 else files[k],
                           again[k].view(torch.uint8) if again[k].dtype.itemsize == 1 else again[k]), k
    export_model(deq, tok, tmp_path / "deq", "fp32")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "deq").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert rel(deq(x), ref(x).logits) < 1e-4


def test_generate_fp8_uses_the_checkpoint_blocks(run, tmp_path, capsys):
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = tensors(tmp_path / "fp8")
    deq = convert_to_fp8(load_hf(tmp_path / "fp8", dtype=torch.float32)[0])
    w = deq.layers[1].attn.wkv_b.weight
    q = quantize_blocks(w)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(q.data[:, :w.shape[1]].view(torch.uint8), files[name].view(torch.uint8))
    assert torch.equal(q.scale, files[name + "_scale_inv"])
    # against the CLI's own settings: its cache is FP32 (auto, for an FP32-held Hugging Face import;
    # a BF16 cache's greedy tokens on this 2-step model matched it on one CPU kind only by chance)
    want = generate(deq, [tok.encode_ids("To be")],
                    GenerationConfig(max_new_tokens=6, eos_id=None, cache_dtype=torch.float32)).tokens[0]
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "fp8"), "--prompt", "To be", "--max-new-tokens", "6",
                 "--precision", "fp8", "--json", "--eos-id", "-1", "--threads", str(torch.get_num_threads())]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache_dtype"] == "fp32" and out["token_ids"] == [want]


def test_train_init_from_hf_directory(tmp_path):
    build("v3", tmp_path / "src")
    (tmp_path / "text.txt").write_text(TEXT)
    tc = TrainConfig(init=str(tmp_path / "src"), steps=1, batch_size=2, seq_len=16, out=str(tmp_path / "run"),
                     data=str(tmp_path / "text.txt"), data_cache=str(tmp_path / "cache"), progress=False,
                     plots=False, eval_every=1, eval_batches=1, device="cpu", precision="fp32")
    t = Trainer(tc, log=lambda m: None)
    src = load_hf(tmp_path / "src")[0].state_dict()
    got = t.model.state_dict()
    assert t.cfg.vocab_size == 320 and all(torch.equal(got[k], v) for k, v in src.items())
    t.run()


def test_train_init_cli_then_export(tmp_path, capsys):
    build("llama", tmp_path / "src")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["train", "--init", str(tmp_path / "src"), "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "run"), "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1",
                 "--ckpt-every", "1", "--device", "cpu"]) == 0
    assert f"flyer train: init {tmp_path / 'src'}, " in capsys.readouterr().err  # not the unused preset's name
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2


def test_fp8_scale_of_the_wrong_shape_is_one_line(run, tmp_path):
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = tensors(tmp_path / "fp8")
    name = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    files[name] = torch.ones(3, 3)
    (tmp_path / "fp8" / "model.safetensors").unlink()
    save_file(files, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {name} has shape \\(3, 3\\)"):
        load_hf(tmp_path / "fp8")


def test_export_errors(run, tmp_path, capsys):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("300KB") == 300_000
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert capsys.readouterr().err.strip() == "flyer: error: --max-shard-size: expected a size like 5GB or 500MB " \
                                               "(got 'lots')"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("bias", [False, True])  # Llama, Qwen2
def test_gqa_model_exports_without_its_mtp_module_and_refuses_experts(tmp_path, bias):
    """Llama and Qwen2 have no MTP module and no routed experts: a dense GQA model's MTP module is
    left out (the summary says so), and transformers and flyer load what is written with the same
    logits; a GQA model with softmax-routed experts but without Qwen3-MoE's head norms is refused
    before anything is written (it used to be written as a Llama directory holding expert tensors that
    nothing could load; with DeepSeek's sigmoid router it exports as GLM-4.5: tests/test_glm4_moe.py)."""
    torch.manual_seed(0)
    gqa = dict(attn="gqa", n_kv_heads=2, head_dim=32, attn_bias=bias)
    model = Transformer(preset("tiny", **gqa, n_dense_layers=4, n_layers=4, mtp_depth=1)).eval()
    tok = TextTokenizer(Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")))
    summary = export_model(model, tok, tmp_path / "out", "fp32")
    assert summary["model_type"] == ("qwen2" if bias else "llama") and "MTP" in summary["left_out"]
    back = load_hf(tmp_path / "out")[0]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        assert back.cfg.mtp_depth == 0 and torch.equal(back(x), want)
        assert rel(ref(x).logits, want) < 1e-4
    moe = Transformer(preset("tiny", **gqa, score_func="softmax", router_bias=False)).eval()
    with pytest.raises(ConfigError, match="'qk_norm': a GQA model with routed experts exports as Qwen3-MoE"):
        export_model(moe, tok, tmp_path / "moe", "bf16")
    assert not (tmp_path / "moe").exists()


class _RankPart(torch.nn.Module):
    """What one rank holds of ``model`` (as ``PipelineModel`` registers it: one-process names): the
    layers ``keep``, the norm and head, and the second half of each expert stack (rank 1 of EP 2)."""

    def __init__(self, model: Transformer, keep: list[int]):
        super().__init__()
        self.cfg = model.cfg
        self.layers = torch.nn.ModuleDict({str(i): model.layers[i] for i in keep})
        self.norm, self.head = model.norm, model.head
        for m in self.modules():
            if isinstance(m, Experts):
                half = m.n_local // 2
                for w in ("w1", "w2", "w3"):
                    setattr(m, w, torch.nn.Parameter(getattr(m, w).data[half:].clone()))
                m.first, m.n_local = half, m.n_local - half


@pytest.mark.parametrize("source", ["hf", "run"])
def test_train_init_reads_only_what_a_rank_holds(run, tmp_path, monkeypatch, source):
    """``--init`` fills what one rank holds (its pipeline stages, its experts of each stack) tensor
    by tensor: the values are the checkpoint's, and the bytes read are those of the part held, not
    of the whole model (each rank used to load all of it in FP32 first)."""
    if source == "hf":
        build("v3", tmp_path / "src")
        path, whole = tmp_path / "src", load_hf(tmp_path / "src", dtype=torch.float32)[0]
    else:
        path, whole = run, load_pretrained(run)[0]
    torch.manual_seed(1)
    part = _RankPart(Transformer(whole.cfg), keep=[whole.cfg.n_layers - 1])
    read = []
    real = TensorFile.read_into
    monkeypatch.setattr(TensorFile, "read_into", lambda self, name, out, rows=None: read.append(
        out.numel() * out.element_size()) or real(self, name, out, rows))
    load_init_weights(part, path)
    want = whole.state_dict()
    for name, t in part.state_dict().items():
        w = want[name]
        if ".experts." in name:
            w = w[w.shape[0] // 2:]
        assert torch.equal(t, w.to(t.dtype)), name
    assert sum(read) == sum(t.numel() * t.element_size() for t in part.state_dict().values())  # both FP32


def test_fp8_export_keeps_the_mtp_eh_proj_in_bf16(run, tmp_path):
    """DeepSeek-V3's release stores the MTP layer's eh_proj in BF16, with no scale: vLLM's and SGLang's MTP loaders
    build it as a plain linear."""
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = tensors(tmp_path / "fp8")
    name = f"model.layers.{cfg.n_layers}.eh_proj.weight"
    assert files[name].dtype == torch.bfloat16 and name + "_scale_inv" not in files
    assert torch.equal(files[name], model.mtp[0].eh_proj.weight.to(torch.bfloat16))


def test_fp8_export_of_a_ue8m0_checkpoint_keeps_its_scale_fmt(run, tmp_path):
    """DeepSeek-V3.1 / V3.2's scale_fmt "ue8m0" (power-of-two block scales, activations quantized so) survives a
    re-export with the codes; blocks quantized anew take power-of-two scales too."""
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "src", "fp8")
    src = tensors(tmp_path / "src")
    for k in [k for k in src if k.endswith("_scale_inv")]:  # each block's codes under 2^ceil(log2(scale))
        w, s = k.removesuffix("_scale_inv"), src[k]
        up = torch.exp2(torch.ceil(torch.log2(s)))
        R, C = src[w].shape
        ratio = (s / up).repeat_interleave(128, 0).repeat_interleave(128, 1)[:R, :C]
        src[w], src[k] = (src[w].float() * ratio).to(torch.float8_e4m3fn), up
    (tmp_path / "src" / "model.safetensors").unlink()
    save_file(src, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--dtype", "fp8"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    out = tensors(tmp_path / "out")
    for k in src:
        assert torch.equal(out[k].view(torch.uint8) if out[k].dtype.itemsize == 1 else out[k],
                           src[k].view(torch.uint8) if src[k].dtype.itemsize == 1 else src[k]), k
    state = model.state_dict()
    scales = [make() for name, _, _, make in _items(cfg, state, lambda s: state[s.key] if s.expert is None
                                                    else state[s.key][s.expert], "fp8", None, pow2=True)
              if name.endswith("_scale_inv")]
    assert scales and all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)


def test_mtp_params_stored_counts_the_exported_mtp_layer(run, tmp_path):
    """``mtp_params_stored``: what DeepSeek's layout writes for the MTP layer, embedding and head copies included."""
    model, cfg, tok = load_pretrained(run)
    export_model(model, tok, tmp_path / "hf", "fp32")
    stored = sum(t.numel() for k, t in tensors(tmp_path / "hf").items()
                 if k.startswith(f"model.layers.{cfg.n_layers}."))
    assert stored == mtp_params_stored(cfg) > param_counts(cfg).mtp


def test_a_run_and_its_fp32_export_generate_alike(tmp_path, capsys):
    """``--cache-dtype auto`` takes FP32 for a run's checkpoint computed in FP32, as for its FP32 export (it took BF16
    for the run): the two decode the same greedy tokens with the same cache."""
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--vocab-size",
                 "300", "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "run"), "--no-progress", "--no-plots", "--eval-every", "2", "--eval-batches", "1",
                 "--ckpt-every", "2", "--device", "cpu", "--precision", "fp32"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    runs = []
    for ckpt in ("run", "hf"):
        assert main(["generate", "--ckpt", str(tmp_path / ckpt), "--prompt", "To be", "--max-new-tokens", "12",
                     "--eos-id", "-1", "--device", "cpu", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert [r["cache_dtype"] for r in runs] == ["fp32", "fp32"] and runs[0]["token_ids"] == runs[1]["token_ids"]
