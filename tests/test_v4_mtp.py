"""DeepSeek-V4's multi-token prediction module (``flyer.model.mtp.HyperMTPModule``): it trains with the main
model (its loss in the total as V3's, gradients reaching its weights); its forward is the published combination
(DeepSeek's V4 ``inference/model.py`` ``MTPBlock`` and vLLM's ``deepseek_v4_mtp.py``: the main model's streams
before ``hc_head``, ``h_proj(hnorm(h))`` per stream plus ``e_proj(enorm(emb))`` on every stream, a window-only
block, the module's own ``hc_head``, ``norm``, the shared head), written out below and held to a derived
bound, with wrong combinations far outside it; a checkpoint in DeepSeek's published names and formats (FP8
``e_proj``/``h_proj``/attention, FP4 experts; ``tests.test_v4_counts.checkpoint_tensors`` lists them) loads
into the right parameters, a renamed or swapped tensor is caught; load -> export -> load is bit-exact, mtp.*
included, and the config says ``num_nextn_predict_layers`` with the MTP layer's window-only compress ratio.
Tiny random models, FP32, CPU."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import CheckpointError
from flyer.interop.export import export_model
from flyer.interop.hf import load_hf
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, quantize_fp4_e2m1,
                                    quantize_ue8m0_blocks)
from flyer.model.counts import param_counts
from flyer.model.info import meta_counts
from flyer.model.transformer import Transformer, layer_rope_tables
from tests.hf_models import make_tokenizer
from tests.test_deepseek_v4 import FLASH, v4_tolerance
from tests.test_interop_export import tensors
from tests.test_qwen3 import rel
from tests.test_v4_counts import checkpoint_tensors

# DeepSeek's hub config.json spelling at a tiny size: one MTP layer, its compress_ratios entry 0
HUB = {**FLASH, "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
       "head_dim": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "sliding_window": 8,
       "compress_ratios": [0, 4, 128, 4, 0], "o_groups": 2, "o_lora_rank": 16, "index_topk": 2, "index_n_heads": 2,
       "index_head_dim": 16, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
       "num_hash_layers": 1, "num_nextn_predict_layers": 1}


def _tokens(cfg: ModelConfig, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


# ---- training -------------------------------------------------------------------------------------------------
def test_tiny_v4_with_mtp_trains_and_its_loss_reaches_the_mtp_weights():
    """``tiny-v4`` with mtp_depth 1 (``flyer info``'s MTP count is its parameters): the total is main +
    mtp_loss_weight * mtp + balance (V3's), every MTP weight gets a gradient, and a few AdamW steps lower the
    MTP loss. With
    mtp_loss_weight 0 (the mutation; and no balance loss, which the MTP block's MoE adds too) no gradient reaches
    them: the loss term is what trains them."""
    torch.manual_seed(0)
    cfg = preset("tiny-v4", mtp_depth=1, vocab_size=256)
    model = Transformer(cfg).train()
    counts = param_counts(cfg)  # what ``flyer info`` reports: the closed form equals the module tree
    assert meta_counts(cfg) == counts and counts.mtp == sum(p.numel() for p in model.mtp.parameters()) > 0
    x = _tokens(cfg, 33)
    tokens, targets = x[:, :-1], x[:, 1:]
    out = model.compute_loss(tokens, targets)
    assert len(out.mtp_losses) == 1
    assert torch.allclose(out.loss, out.main_loss + cfg.mtp_loss_weight * out.mtp_losses[0] + out.aux_loss)
    out.loss.backward()
    mtp = model.mtp[0]
    for name, p in mtp.named_parameters():
        if p.requires_grad:  # the CSA indexer is frozen; the MTP block has none
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert mtp.block.attn.compressor is None and mtp.block.attn.indexer is None  # window-only
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.mtp_losses[0].item()
    for _ in range(8):
        opt.zero_grad()
        out = model.compute_loss(tokens, targets)
        out.loss.backward()
        opt.step()
    assert out.mtp_losses[0].item() < first - 0.2, (first, out.mtp_losses[0].item())

    model.zero_grad()
    unweighted = Transformer(cfg.replace(mtp_loss_weight=0.0, seq_aux_alpha=0.0)).train()  # no MTP balance loss
    unweighted.load_state_dict(model.state_dict())
    unweighted.compute_loss(tokens, targets).loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in unweighted.mtp[0].parameters())


# ---- the forward, against the published semantics ---------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def reference_mtp_logits(model: Transformer, tokens: torch.Tensor, variant: str = "published") -> torch.Tensor:
    """DeepSeek's ``MTPBlock.forward`` for module 0 written out, positions 0..T-2 predicting t_{i+2}:
    x = main model's streams (before hc_head); e = enorm(embed(t_{i+1})); x = e_proj(e)[:, :, None] +
    h_proj(hnorm(x)); x = block(x) (the decoder layer, flyer's, held to transformers' by test_deepseek_v4);
    y = sum_j (sigmoid(F.linear(x_flat, hc_head_fn) * rsqrt(mean x_flat^2 + eps) * scale + base) + hc_eps)_j x_j;
    logits = head(norm(y)). ``variant`` names a wrong combination (the mutations)."""
    cfg, mod = model.cfg, model.mtp[0]
    eps = cfg.norm_eps
    T = tokens.shape[1] - 1
    h = model.last_residual(tokens)[:, :T]  # (B, T, N, D)
    if variant == "collapsed":  # the main model's hc_head collapse fed to every stream
        h = model.hc_head(h).unsqueeze(2).expand_as(h)
    e = _rms(model.embed(tokens[:, 1:]), mod.enorm.weight, eps)
    hn = h if variant == "no-hnorm" else _rms(h, mod.hnorm.weight, eps)
    e_w, h_w = (mod.h_proj.weight, mod.e_proj.weight) if variant == "swapped" else (mod.e_proj.weight,
                                                                                    mod.h_proj.weight)
    e_out = F.linear(e, e_w).unsqueeze(2)
    if variant == "first-stream":  # the embedding added to stream 0 only
        e_out = F.pad(e_out, (0, 0, 0, cfg.hc_mult - 1))
    x = e_out + F.linear(hn, h_w)
    (cos, sin), = layer_rope_tables(cfg, [cfg.n_layers], T, tokens.device)  # the window-only layers' table
    x = mod.block(x, cos, sin)
    head = model.hc_head if variant == "main-hc-head" else mod.hc_head
    flat = x.flatten(2).float()
    mixes = F.linear(flat, head.fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mixes * head.scale + head.base) + cfg.hc_eps
    y = (pre.unsqueeze(-1) * x.float()).sum(2).to(x.dtype)
    norm_w = model.norm.weight if variant == "main-norm" else mod.norm.weight
    return F.linear(_rms(y, norm_w, eps), model.head.weight).float()


@pytest.fixture(scope="module")
def trained():
    """tiny-v4 with an MTP module, its weights moved off their init (hc maps, norms) by a few steps."""
    torch.manual_seed(1)
    cfg = preset("tiny-v4", mtp_depth=1, vocab_size=256)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        x = _tokens(cfg, 33, step)
        opt.zero_grad()
        model.compute_loss(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
    with torch.no_grad():  # norms and hc biases away from 1 and 0, so that a wrong one shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".base")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_mtp_forward_equals_the_published_semantics(trained):
    """flyer's MTP logits (``mtp_hidden`` then ``head_input`` and the head) equal the written-out reference
    within ``v4_tolerance`` of one layer (both read the same main-model streams: only the MTP block and its
    combination compute apart, in different orders); each wrong
    combination (e_proj / h_proj swapped, no hnorm, the collapsed hidden in place of the streams, the embedding
    on one stream only, the main model's hc_head or final norm) lands over 100x outside it."""
    model, cfg = trained, trained.cfg
    tokens = _tokens(cfg, 48, 7)
    with torch.no_grad():
        h1 = model.mtp_hidden(model.last_residual(tokens), tokens)[0]
        mine = model.head(model.mtp[0].head_input(h1)).float()
        want = reference_mtp_logits(model, tokens)
        tol = v4_tolerance(SimpleNamespace(**{**cfg.to_dict(), "n_layers": 1}), 48)  # the one MTP block's
        assert mine.shape == (2, 47, cfg.vocab_size)
        err = rel(mine, want)
        assert err <= tol, f"{err:.3g} > {tol:.3g}"
        for variant in ("swapped", "no-hnorm", "collapsed", "first-stream", "main-hc-head", "main-norm"):
            err = rel(reference_mtp_logits(model, tokens, variant), want)
            assert err > 100 * tol, f"{variant}: {err:.3g} within 100x {tol:.3g}"


# ---- DeepSeek's published checkpoint format ----------------------------------------------------------------------
def _flyer_slot(name: str) -> tuple[str, int | None]:
    """The test's own map from a published ``mtp.0.*`` name to flyer's state-dict key (and expert row)."""
    m = re.fullmatch(r"mtp\.0\.ffn\.experts\.(\d+)\.(w[123])\.weight", name)
    if m:
        return f"mtp.0.block.ffn.experts.{m.group(2)}", int(m.group(1))
    sub = name.removeprefix("mtp.0.")
    own = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"}
    if sub in own:
        return name, None
    m = re.fullmatch(r"hc_(head|attn|ffn)_(fn|base|scale)", sub)
    if m:
        where = "mtp.0." if m.group(1) == "head" else "mtp.0.block."
        return f"{where}hc_{m.group(1)}.{m.group(2)}", None
    return "mtp.0.block." + sub.replace("shared_experts", "shared"), None


def _write_hub(cfg: ModelConfig, out, mutate: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint of ``cfg`` in DeepSeek's published names and formats (random values), with the hub config
    and a tokenizer; returns each weight's decoded value by published name. ``mutate``: "swap" e_proj and
    h_proj's tensors, "rename" e_proj to V3's eh_proj, "drop" every mtp.* (transformers' save_pretrained)."""
    out.mkdir()
    g = torch.Generator().manual_seed(3)
    stored, values = {}, {}
    for name, dtype, shape, role in checkpoint_tensors(cfg, mtp=True):
        if role == "scale":
            continue  # written with its weight
        if dtype in ("F8_E4M3", "I8"):
            rows, cols = shape[0], shape[1] * (2 if dtype == "I8" else 1)
            w = 0.05 * torch.randn(rows, cols, generator=g)
            encode, decode = ((quantize_fp4_e2m1, dequantize_fp4_e2m1) if dtype == "I8"
                              else (quantize_ue8m0_blocks, dequantize_ue8m0_blocks))
            codes, scale = encode(w, name=name)
            stored[name], stored[name.removesuffix(".weight") + ".scale"] = codes, scale
            values[name] = decode(codes, scale)
        elif dtype == "I64":
            stored[name] = values[name] = torch.randint(0, cfg.n_routed_experts, shape, generator=g)
        else:
            t = (1 + 0.1 * torch.randn(shape, generator=g)) if name.endswith("norm.weight") else \
                0.05 * torch.randn(shape, generator=g)
            stored[name] = t.to(torch.bfloat16 if dtype == "BF16" else torch.float32)
            values[name] = stored[name].float()
    if mutate == "swap":
        for suffix in (".weight", ".scale"):
            stored["mtp.0.e_proj" + suffix], stored["mtp.0.h_proj" + suffix] = (stored["mtp.0.h_proj" + suffix],
                                                                               stored["mtp.0.e_proj" + suffix])
    if mutate == "rename":
        for suffix in (".weight", ".scale"):
            stored["mtp.0.eh_proj" + suffix] = stored.pop("mtp.0.e_proj" + suffix)
    if mutate == "drop":
        stored = {k: v for k, v in stored.items() if not k.startswith("mtp.")}
    save_file(stored, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(HUB))
    make_tokenizer(out)
    return values


def _mismatches(model: Transformer, values: dict[str, torch.Tensor]) -> list[str]:
    state = model.state_dict()
    bad = []
    for name, v in values.items():
        if name.startswith("mtp."):
            key, row = _flyer_slot(name)
            got = state[key] if row is None else state[key][row]
            if not torch.equal(got.float(), v):
                bad.append(name)
    return bad


def test_published_mtp_names_load_into_the_right_parameters(tmp_path):
    """Every ``mtp.0.*`` tensor of the published list lands in the parameter the published semantics give it
    (checked by the test's own name map), decoded exactly; the config reads mtp_depth 1 from
    ``num_nextn_predict_layers``, and the files hold it (a directory without ``mtp.*``, as transformers saves one,
    reads 0 and builds none). Mutations:
    e_proj and h_proj swapped in the file load (same shapes) but land wrong; V3's ``eh_proj`` name is refused."""
    cfg = ModelConfig.from_dict(HUB)
    assert cfg.mtp_depth == 1 and cfg.compress_ratios == (0, 4, 128, 4)
    values = _write_hub(cfg, tmp_path / "hub")
    model, got_cfg, _ = load_hf(tmp_path / "hub")
    assert got_cfg == cfg
    assert sum(n.startswith("mtp.") for n in values) > 30 and _mismatches(model, values) == []
    assert sum(k.startswith("mtp.") for k in model.state_dict()) == len(
        {_flyer_slot(n)[0] for n in values if n.startswith("mtp.")})  # every MTP tensor is the file's

    _write_hub(cfg, tmp_path / "swapped", "swap")
    swapped = load_hf(tmp_path / "swapped")[0]
    assert _mismatches(swapped, values) == ["mtp.0.e_proj.weight", "mtp.0.h_proj.weight"]
    _write_hub(cfg, tmp_path / "renamed", "rename")
    with pytest.raises(CheckpointError, match="mtp.0.eh_proj.weight"):
        load_hf(tmp_path / "renamed")
    _write_hub(cfg, tmp_path / "dropped", "drop")
    dropped, dropped_cfg, _ = load_hf(tmp_path / "dropped")
    assert dropped_cfg == cfg.replace(mtp_depth=0) and not any(k.startswith("mtp.") for k in dropped.state_dict())


def test_load_export_load_is_bit_exact_with_the_mtp_module(tmp_path, capsys):
    """The published-format checkpoint exported as FP8 (``flyer export``: its own codes and scales kept) and as
    FP32 (``export_model``) reads back to the same parameters, MTP included, bit for bit; the FP8 export holds
    the published tensor list byte for byte, and both configs say ``num_nextn_predict_layers`` 1 with the MTP
    layer's compress ratio 0. The summary notes that transformers' DeepseekV4 skips mtp.*."""
    cfg = ModelConfig.from_dict(HUB).replace(mtp_depth=1)
    _write_hub(cfg, tmp_path / "hub")
    model, _, tok = load_hf(tmp_path / "hub")
    want = model.state_dict()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "hub"), "--out", str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    assert "mtp" in json.loads(capsys.readouterr().out)["note"]
    src, fp8 = tensors(tmp_path / "hub"), tensors(tmp_path / "fp8")
    assert src.keys() == fp8.keys()
    assert all(torch.equal(src[k].view(torch.uint8), fp8[k].view(torch.uint8)) for k in src)
    export_model(model, tok, tmp_path / "fp32", "fp32")
    for out in ("fp8", "fp32"):
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["num_nextn_predict_layers"] == 1 and config["compress_ratios"] == [0, 4, 128, 4, 0]
        back, back_cfg, _ = load_hf(tmp_path / out)
        assert back_cfg == cfg
        state = back.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k].float(), want[k].float()) for k in want), out
    assert tensors(tmp_path / "fp32")["mtp.0.e_proj.weight"].dtype == torch.float32
    # ratios other than the release's 4 and 128 (tiny-v4's HCA 16) are written as they are, not as 4 or 128: DeepSeek's
    # inference code reads compress_ratios, transformers layer_types and compress_rates
    tiny = preset("tiny-v4")
    export_model(Transformer(tiny), tok, tmp_path / "tiny", "fp32")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["compress_ratios"] == [*tiny.compress_ratios, 0] == [0, 4, 16, 4, 0]
    assert load_hf(tmp_path / "tiny")[1].compress_ratios == tiny.compress_ratios
