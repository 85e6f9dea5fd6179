"""LongCat-Flash's MTP module (``model.mtp.*``, which transformers' LongcatFlash skips): read into flyer's MTP module
where Meituan's config declares it (``num_nextn_predict_layers``: 1) and the files hold it, used by ``--speculative
mtp``, written back by ``flyer export``. The layout is the one SGLang's ``longcat_flash_nextn.py`` and vLLM's
``longcat_flash_mtp.py`` load (they agree): ``eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])`` with h the main model's
normed output, one MLA sublayer (its LoRA scaling applied) with a dense SwiGLU of ``ffn_hidden_size``, the module's
final norm, the shared head. A tiny transformers LongcatFlash saved with save_pretrained, random MTP tensors added
under the released names; the reference below computes the module plainly from those tensors (not flyer's code),
on transformers' main hidden states. FP32, CPU."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LongcatFlashForCausalLM

from flyer.cli import main
from flyer.errors import CheckpointError, ConfigError
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.model.counts import param_counts
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from tests.bounds import FP32_U
from tests.hf_models import VOCAB
from tests.test_hf_longcat_flash import _native, build, logit_tolerance
from tests.test_interop_export import tensors
from tests.test_qwen3 import rel

# Meituan's config fields for its one MTP layer (LongCat-Flash-Chat's config.json)
MTP_FIELDS = {"num_nextn_predict_layers": 1, "nextn_use_scmoe": False}


def mtp_tensors(d: dict, embed: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random MTP tensors of the config ``d`` (transformers' LongcatFlash fields) under the released names, the
    shapes SGLang's and vLLM's loaders expect; norms near 1, projections of std 0.1 (the model's initializer_range),
    and the module's copy of the embedding ``embed``."""
    g = torch.Generator().manual_seed(seed)
    D, H, Q, C = d["hidden_size"], d["num_attention_heads"], d["q_lora_rank"], d["kv_lora_rank"]
    R, nope, v, ffn = d["qk_rope_head_dim"], d["qk_nope_head_dim"], d["v_head_dim"], d["ffn_hidden_size"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def norm(n):
        return 1 + torch.randn(n, generator=g) * 0.1
    pre = "model.mtp.layers.0."
    return {"model.mtp.embed_tokens.weight": embed.clone(), pre + "eh_proj.weight": w(D, 2 * D),
            pre + "enorm.m.weight": norm(D), pre + "hnorm.m.weight": norm(D),
            pre + "input_layernorm.weight": norm(D), pre + "post_attention_layernorm.weight": norm(D),
            pre + "self_attn.q_a_proj.weight": w(Q, D), pre + "self_attn.q_a_layernorm.weight": norm(Q),
            pre + "self_attn.q_b_proj.weight": w(H * (nope + R), Q),
            pre + "self_attn.kv_a_proj_with_mqa.weight": w(C + R, D), pre + "self_attn.kv_a_layernorm.weight": norm(C),
            pre + "self_attn.kv_b_proj.weight": w(H * (nope + v), C), pre + "self_attn.o_proj.weight": w(D, H * v),
            pre + "transformer_layer.mlp.gate_proj.weight": w(ffn, D),
            pre + "transformer_layer.mlp.up_proj.weight": w(ffn, D),
            pre + "transformer_layer.mlp.down_proj.weight": w(D, ffn), "model.mtp.norm.weight": norm(D)}


def with_mtp(path) -> None:
    """Add the MTP tensors to a saved LongCat-Flash's safetensors and Meituan's MTP fields to its config."""
    d = json.loads((path / "config.json").read_text())
    t = tensors(path)
    save_file({**t, **mtp_tensors(d, t["model.embed_tokens.weight"])}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**d, **MTP_FIELDS}))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """(directory, transformers' model of its main part): the "pow2" tiny LongCat-Flash (MLA scales 2, exact when
    folded) with its MTP module."""
    path = tmp_path_factory.mktemp("longcat-mtp")
    ref = build(path)
    with_mtp(path)
    return path, ref


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mtp_logits(t: dict[str, torch.Tensor], d: dict, h: torch.Tensor, tokens: torch.Tensor,
                         swap: bool = False, lora_scale: bool = True) -> torch.Tensor:
    """The MTP module's logits (B, T-1, V) at positions 0..T-2 (predicting t_{i+2}), from the file's tensors ``t``,
    its config ``d``, the main model's normed output ``h`` (B, T, D) and the tokens (B, T): plain torch, the
    layout the module doc gives; RoPE on interleaved pairs of the rope head at the positions 0..T-2, default
    frequencies. ``swap``: the concat's halves the other way round; ``lora_scale``: False leaves out MLA's scales
    (the two mutations the test shows are far off)."""
    pre, eps = "model.mtp.layers.0.", d["rms_norm_eps"]
    H, C, R, nope, v = (d["num_attention_heads"], d["kv_lora_rank"], d["qk_rope_head_dim"], d["qk_nope_head_dim"],
                        d["v_head_dim"])
    B, T = tokens.shape[0], tokens.shape[1] - 1
    e = _rms(t["model.embed_tokens.weight"][tokens[:, 1:]], t[pre + "enorm.m.weight"], eps)
    hh = _rms(h[:, :-1], t[pre + "hnorm.m.weight"], eps)
    x = torch.cat([hh, e] if swap else [e, hh], -1) @ t[pre + "eh_proj.weight"].T
    # attention: MLA with a compressed query; q times sqrt(D / q_lora_rank), the normed kv latent sqrt(D / C)
    a = _rms(x, t[pre + "input_layernorm.weight"], eps)
    sa = pre + "self_attn."
    sq, skv = ((d["hidden_size"] / d["q_lora_rank"]) ** 0.5, (d["hidden_size"] / C) ** 0.5) if lora_scale else (1, 1)
    q = _rms(a @ t[sa + "q_a_proj.weight"].T, t[sa + "q_a_layernorm.weight"], eps) @ t[sa + "q_b_proj.weight"].T
    q = (q * sq).view(B, T, H, nope + R)
    kv_a = a @ t[sa + "kv_a_proj_with_mqa.weight"].T
    c = _rms(kv_a[..., :C], t[sa + "kv_a_layernorm.weight"], eps) * skv
    kv = (c @ t[sa + "kv_b_proj.weight"].T).view(B, T, H, nope + v)
    inv = 1.0 / d["rope_parameters"]["rope_theta"] ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, R/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(z):  # (..., T, R): pairs (z_2i, z_2i+1) rotated by angle i, as transformers' interleaved RoPE
        z1, z2 = z[..., 0::2], z[..., 1::2]
        return torch.stack([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1).flatten(-2)
    qn, qr = q[..., :nope], rope(q[..., nope:].transpose(1, 2))  # (B, T, H, nope), (B, H, T, R)
    kr = rope(kv_a[..., C:])  # (B, T, R), shared by the heads
    kn, val = kv[..., :nope], kv[..., nope:]
    s = (torch.einsum("bthd,bshd->bhts", qn, kn) + torch.einsum("bhtr,bsr->bhts", qr, kr)) / math.sqrt(nope + R)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), val).reshape(B, T, H * v)
    x = x + o @ t[sa + "o_proj.weight"].T
    mlp = pre + "transformer_layer.mlp."
    f = _rms(x, t[pre + "post_attention_layernorm.weight"], eps)
    hidden = F.silu(f @ t[mlp + "gate_proj.weight"].T) * (f @ t[mlp + "up_proj.weight"].T)
    x = x + hidden @ t[mlp + "down_proj.weight"].T
    return _rms(x, t["model.mtp.norm.weight"], eps) @ t["lm_head.weight"].T


def mtp_tolerance(cfg, T: int) -> float:
    """``logit_tolerance`` of the main model (the reference's h is transformers') plus, to the same first order,
    the module's own sums: eh_proj's 2D, its block's (the projections from D, the q and kv latents, a head's q.k,
    the T attended values, the output projection over the heads' values, the dense FFN's hidden sum, the two folded
    MLA scales) and the head's D."""
    block = (2 * cfg.dim + cfg.dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_head_dim + T
             + cfg.n_heads * cfg.v_head_dim + cfg.inter_dim + 2 + cfg.dim)
    return logit_tolerance(cfg, T) + block * FP32_U


def _checkpoint(out, src, config: dict, ts: dict[str, torch.Tensor]):
    """A checkpoint directory ``out`` of ``config`` and the tensors ``ts``, with ``src``'s tokenizer."""
    out.mkdir()
    save_file(ts, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return out


def test_module_reads_where_declared_and_held(src, tmp_path, capsys):
    """Declared and held: one module, the file's tensors (MLA's scales folded as in the main layers). A config
    without Meituan's field (transformers') or files without the tensors: none, as before. A tensor missing, two
    layers declared or an MTP layer with the shortcut MoE: one line naming the tensor or the field."""
    path, _ = src
    model, cfg, _ = load_hf(path)
    t = tensors(path)
    assert cfg.mtp_depth == 1 and len(model.mtp) == 1 and model.mtp[0].block.shortcut is None
    mod, pre = model.mtp[0], "model.mtp.layers.0."
    assert torch.equal(mod.eh_proj.weight, t[pre + "eh_proj.weight"])
    assert torch.equal(mod.enorm.weight, t[pre + "enorm.m.weight"]) and torch.equal(mod.norm.weight,
                                                                                     t["model.mtp.norm.weight"])
    assert torch.equal(mod.block.ffn.w2.weight, t[pre + "transformer_layer.mlp.down_proj.weight"])
    assert torch.equal(mod.block.attn.kv_norm.weight, 2 * t[pre + "self_attn.kv_a_layernorm.weight"])  # sqrt(64/16)
    # what flyer info counts of the module: the file's tensors but its copy of the shared embedding
    assert param_counts(cfg).mtp == sum(v.numel() for k, v in t.items()
                                        if k.startswith("model.mtp.") and k != "model.mtp.embed_tokens.weight")
    d = json.loads((path / "config.json").read_text())
    cases = {"transformers": ({k: v for k, v in d.items() if k not in MTP_FIELDS}, t),
             "no-tensors": (d, {k: v for k, v in t.items() if not k.startswith("model.mtp.")})}
    for name, (conf, ts) in cases.items():
        other = load_hf(_checkpoint(tmp_path / name, path, conf, ts))[0]
        assert other.cfg == cfg.replace(mtp_depth=0), name
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())
    out = _checkpoint(tmp_path / "missing", path, d, {k: v for k, v in t.items()
                                                       if k != pre + "self_attn.o_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.mtp\.layers\.0\.self_attn\.o_proj\.weight$"):
        load_hf(out)
    for change, field in (({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
                          ({"nextn_use_scmoe": True}, "nextn_use_scmoe")):
        (out / "config.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(ConfigError, match=f"field '{field}'") as e:
            load_hf(out)
        assert "\n" not in str(e.value)
        capsys.readouterr()
        assert main(["info", "--config", str(out / "config.json")]) == 2
        assert f"'{field}'" in capsys.readouterr().err


def test_mtp_logits_equal_the_plain_reference(src):
    """flyer's MTP logits, from the training path (``mtp_hidden``) and from the decode cache (``Decoder.mtp_forward``
    after a prefill, as speculation drafts), are within ``mtp_tolerance`` of the plain reference on transformers'
    hidden states; the reference with the concat's halves swapped, or without MLA's scales, is far outside it."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    t, d = tensors(path), json.loads((path / "config.json").read_text())
    assert ref.config.rope_parameters["rope_type"] == "default"
    T = 48
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = ref.model(tokens).last_hidden_state  # after the final norm
        d = {**d, "rope_parameters": ref.config.rope_parameters}
        want = reference_mtp_logits(t, d, h, tokens)
        (h1,) = model.mtp_hidden(model.hidden(tokens), tokens)
        got = model.head(model.mtp[0].head_input(h1)).float()
        tol = mtp_tolerance(cfg, T)
        assert rel(got, want) <= tol, f"{rel(got, want):.3g} > {tol:.3g}"
        for kw in (dict(swap=True), dict(lora_scale=False)):
            assert rel(reference_mtp_logits(t, d, h, tokens, **kw), want) > 100 * tol, kw
        dec = Decoder(model, 2, T, cache_dtype=torch.float32, with_mtp=True)
        start = torch.zeros(2, dtype=torch.long)
        hidden = dec.forward(tokens, start)
        drafted = dec.mtp_logits(dec.mtp_forward(hidden[:, :-1], tokens[:, 1:], start))
        assert rel(drafted, want) <= tol


PATTERN = [5, 17, 42, 99, 7, 64, 130, 21, 88, 3, 250]


def test_speculative_greedy_is_plain_greedy(src, capsys):
    """``flyer generate --speculative mtp`` (1 and 3 drafts) gives plain greedy's tokens; so do ``generate`` and the
    serving engine with the model trained a few AdamW steps on a repeating sequence (main and MTP losses), whose
    module then drafts the sequence's tokens and gets some accepted (measured: 20 of 25 with 1 draft, 32 of 39
    with 3)."""
    path, _ = src
    text = "the quick brown fox jumps over the lazy dog"
    args = ["generate", "--ckpt", str(path), "--prompt", text, "--max-new-tokens", "20", "--cache-dtype", "fp32",
            "--eos-id", "-1", "--device", "cpu", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)["token_ids"]
    for k in ("1", "3"):
        assert main(args + ["--speculative", "mtp", "--draft-tokens", k]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["token_ids"] == want and res["speculative"] == "mtp", k
    model = load_hf(path)[0].train()
    seq = torch.tensor(PATTERN).repeat(5)[:49]
    x = torch.stack([seq, torch.roll(seq, -3)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(6):
        opt.zero_grad()
        out = model.compute_loss(x[:, :-1], x[:, 1:])
        assert len(out.mtp_losses) == 1
        out.loss.backward()
        opt.step()
    model.eval()
    prompts = [(PATTERN * 4)[:13], (PATTERN * 4)[3:32]]
    gen = dict(max_new_tokens=24, cache_dtype=torch.float32, eos_id=None)
    plain = generate(model, prompts, GenerationConfig(**gen)).tokens
    for k in (1, 3):
        r = generate(model, prompts, GenerationConfig(**gen, speculative="mtp", draft_tokens=k))
        assert r.tokens == plain and r.accepted > 0, k
    # the serving engine's (``flyer serve --speculative mtp``): paged caches, the module's too, 2 drafts a step
    eng = Engine(model, EngineConfig(kv_cache_bytes=1 << 22, block_size=4, prefill_chunk=8, cache_dtype=torch.float32,
                                     speculative="mtp", draft_tokens=2))
    outs: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=24), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    assert outs == plain and eng.accepted > 0


def test_export_round_trip_is_bit_equal(src, tmp_path, capsys):
    """``export_model`` of the import and ``flyer export`` of the directory (streamed) write every tensor of the
    source, the MTP module's and its copy of the embedding included, bit for bit (the MLA scales 2: exact), with
    Meituan's MTP fields; flyer reads the export as the same model, and transformers loads it (skipping the MTP). An
    FP8 export exported again is bit for bit itself, the module's codes and block scales included."""
    path, ref = src
    model, cfg, tok = load_hf(path)
    export_model(model, tok, tmp_path / "out", "fp32")
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "streamed"), "--dtype", "fp32"]) == 0
    assert "model.mtp.*" in json.loads(capsys.readouterr().out)["note"]
    a = tensors(path)
    assert sum(k.startswith("model.mtp.") for k in a) == 17
    x = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    for out in (tmp_path / "out", tmp_path / "streamed"):
        b = tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        config = json.loads((out / "config.json").read_text())
        assert {k: config[k] for k in MTP_FIELDS} == MTP_FIELDS
        back, cfg_back, _ = load_hf(out)
        assert cfg_back == cfg and all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
        with torch.no_grad():
            assert torch.equal(LongcatFlashForCausalLM.from_pretrained(out).eval()(x).logits, ref(x).logits)
    # DeepSeek's FP8 format (as LongCat-Flash's FP8 release: the loaders map the MTP's weight_scale_inv too), read
    # back and exported again keeping its own codes and scales: bit for bit
    fp8, again = tmp_path / "fp8", tmp_path / "fp8-again"
    assert main(["export", str(path), "--out", str(fp8), "--dtype", "fp8"]) == 0
    assert main(["export", str(fp8), "--out", str(again), "--dtype", "fp8"]) == 0
    a, b = tensors(fp8), tensors(again)
    assert a["model.mtp.layers.0.eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.mtp.layers.0.transformer_layer.mlp.up_proj.weight_scale_inv" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        if a[k].dtype == torch.float8_e4m3fn else torch.equal(a[k], b[k]) for k in a)
    assert load_hf(fp8)[1].mtp_depth == 1


def test_native_model_with_mtp_trains_and_exports(src, tmp_path):
    """A flyer model with the shortcut MoE and one MTP module (its block MLA + the dense FFN) trains a step, exports
    as LongCat-Flash with ``model.mtp.*`` and reads back as itself (the folded sqrt(2) scale: one rounding each way);
    two modules, which LongCat-Flash's names cannot hold, are one line naming ``mtp_depth``."""
    tok = load_hf(src[0])[2]
    cfg = _native().replace(mtp_depth=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    out = model.compute_loss(x, torch.roll(x, -1, 1))
    out.loss.backward()
    assert len(out.mtp_losses) == 1 and model.mtp[0].block.ffn.w1.weight.grad.abs().sum() > 0
    export_model(model.eval(), tok, tmp_path / "out", "fp32")
    back, cfg_back, _ = load_hf(tmp_path / "out")
    assert cfg_back.mtp_depth == 1 and "model.mtp.layers.0.eh_proj.weight" in tensors(tmp_path / "out")
    mine = model.state_dict()
    for k, v in back.state_dict().items():
        assert ((v - mine[k]).abs() <= 2 * FP32_U * mine[k].abs()).all(), k
    with pytest.raises(ConfigError, match="config field 'mtp_depth': .*longcat_flash") as e:
        hf_model_type(cfg.replace(mtp_depth=2))
    assert "\n" not in str(e.value)
