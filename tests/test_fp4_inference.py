"""A run trained with FP4 QAT (``flyer train --fp4-experts``) decodes, serves, evaluates and exports the model it
trained: its routed experts as their FP4 values (``flyer.fp8.fp4.fp4_round_trip`` of the checkpoint's FP32 masters),
not the masters (``flyer.interop.load``, ``flyer.interop.export``).

Oracles: the checkpoint's masters with the round trip applied by hand (exact in FP32: every FP4 value is a code
times a power of two, so weights and logits compare bit for bit); the trainer's own model, which multiplies by the
FP4 values at every forward, in eval on the same batch, and the validation loss it logged; transformers'
DeepseekV4 of the export within ``v4_tolerance`` (FP32 rounding's bound on the logits). Mutants: the masters
themselves land 10x beyond that tolerance; FP8 blocks with amax / 448 scales lose FP4 values the held ones keep.
"""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flyer import kernels
from flyer.cli import main
from flyer.fp8 import convert_to_fp8
from flyer.fp8.fp4 import fp4_experts, fp4_round_trip
from flyer.fp8.linear import FP8Experts
from flyer.infer.cli import load_model
from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.weights import FP8, HeldFP8Experts, hold_weights
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import hf_names
from flyer.interop.hf_config import HALF_ROPE_MODEL_TYPES
from flyer.interop.load import fp4_trained, load_pretrained
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import read_tensors, resolve_checkpoint_path, trained_fp4_experts
from flyer.train.metrics import read_metrics
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_interop_export import tensors
from tests.test_qwen3 import TEXT, rel

T = 32
TRAIN = dict(preset="tiny-v4", steps=3, batch_size=2, seq_len=T, eval_every=3, eval_batches=2, warmup=1, lr=3e-3,
             seed=1, device="cpu", precision="fp32", vocab_size=320)


def _flags(d) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in d.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ``flyer train --preset tiny-v4`` runs of 3 steps from the same seed: with ``--fp4-experts`` ("qat") and
    without ("plain")."""
    d = tmp_path_factory.mktemp("fp4inf")
    (d / "text.txt").write_text(TEXT)
    common = [*_flags(TRAIN), "--data", str(d / "text.txt"), "--data-cache", str(d / "cache"), "--no-progress",
              "--no-plots"]
    assert main(["train", *common, "--out", str(d / "qat"), "--fp4-experts"]) == 0
    assert main(["train", *common, "--out", str(d / "plain")]) == 0
    return d


def _masters(run) -> dict[str, torch.Tensor]:
    return read_tensors(resolve_checkpoint_path(run) / "model.safetensors")


def _by_hand(cfg, masters, round_trip: bool) -> Transformer:
    """``cfg``'s model holding ``masters``, its routed expert stacks through the FP4 round trip when ``round_trip``."""
    model = Transformer(cfg)
    model.load_state_dict(masters)
    if round_trip:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Experts):
                    for w in (m.w1, m.w2, m.w3):
                        w.copy_(fp4_round_trip(w))
    return model.eval()


def _expert_keys(model) -> list[str]:
    return [f"{n}.{w}" for n, m in model.named_modules() if isinstance(m, Experts) for w in ("w1", "w2", "w3")]


def _tokens(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def test_checkpoint_records_qat_and_an_old_one_is_not(runs, tmp_path):
    assert trained_fp4_experts(resolve_checkpoint_path(runs / "qat")) and fp4_trained(runs / "qat")
    assert not fp4_trained(runs / "plain")
    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "train_config": {"seed": 0}}))  # before the field
    assert not trained_fp4_experts(tmp_path)


def test_generate_runs_the_fp4_model_bit_for_bit(runs, capsys):
    """``load_pretrained`` (what generate and serve load) holds the masters' FP4 values, every other weight as
    saved; its logits are the hand-built FP4 model's bit for bit and the masters' 10x beyond tolerance; ``flyer
    generate --ckpt`` decodes the FP4 model's greedy tokens and says so."""
    loaded, cfg, tok = load_pretrained(runs / "qat")
    masters = _masters(runs / "qat")
    hand = _by_hand(cfg, masters, round_trip=True)
    keys = _expert_keys(hand)
    state = loaded.state_dict()
    assert keys and state.keys() == masters.keys()
    for k, v in hand.state_dict().items():
        assert torch.equal(state[k], v), k
        assert torch.equal(state[k], masters[k]) == (k not in keys), k  # only the routed experts move
    x = _tokens(cfg.vocab_size)
    with torch.no_grad():
        want = hand(x)
        assert torch.equal(loaded(x), want)
        err, tol = rel(_by_hand(cfg, masters, round_trip=False)(x), want), v4_tolerance(cfg, T)
    with capsys.disabled():
        print(f"masters vs FP4 model: relative logit error {err:.3g} (tolerance {tol:.3g})")
    assert err > 10 * tol, f"{err:.3g} vs {tol:.3g}"

    prompt = "To be, or not"
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(runs / "qat"), "--prompt", prompt, "--max-new-tokens", "8", "--eos-id",
                 "-1", "--cache-dtype", "fp32", "--weight-dtype", "fp32", "--device", "cpu", "--json"]) == 0
    out, err_text = capsys.readouterr()
    gen = GenerationConfig(max_new_tokens=8, cache_dtype=torch.float32)
    assert json.loads(out)["token_ids"] == generate(hand, [tok.encode_ids(prompt)], gen).tokens
    assert "trained with FP4 QAT (--fp4-experts): its routed experts run as their FP4 values" in err_text


def test_loaded_model_is_the_model_training_evaluated(runs):
    """The trainer's model (QAT on: FP4 values at every forward), resumed from the run's checkpoint, in eval: the
    logits of the loaded model bit for bit; its validation loss is the loaded model's over the same batches, and
    the one the run logged at its last step (so training validated the FP4 model); the masters' loss is not."""
    loaded, cfg, _ = load_pretrained(runs / "qat")
    tc = TrainConfig(**TRAIN, out=str(runs / "qat"), resume=True, fp4_experts=True, data=str(runs / "text.txt"),
                     data_cache=str(runs / "cache"), progress=False, plots=False)
    trainer = Trainer(tc, log=lambda _m: None)
    try:
        assert trainer.step == 3 and all(m.weight_quant is not None for m in trainer.model.modules()
                                         if isinstance(m, Experts))
        trainer.model.eval()
        x = _tokens(cfg.vocab_size, seed=4)
        with torch.no_grad():
            assert torch.equal(trainer.model(x), loaded(x))
            masters = _by_hand(cfg, _masters(runs / "qat"), round_trip=False)

            def val_loss(model) -> float:
                return sum(model.compute_loss(x, y).main_loss.item() for x, y in trainer.eval_data) / len(
                    trainer.eval_data)
            val = trainer.evaluate()
            assert val == val_loss(loaded)
            assert val != val_loss(masters)
    finally:
        trainer.close()
    logged = [r["val_loss"] for r in read_metrics(runs / "qat" / "metrics.jsonl") if "val_loss" in r]
    assert logged[-1] == val


def test_a_run_without_qat_loads_as_saved(runs):
    loaded = load_pretrained(runs / "plain")[0]
    masters = _masters(runs / "plain")
    state = loaded.state_dict()
    assert state.keys() == masters.keys()
    for k, v in masters.items():
        assert torch.equal(state[k], v), k


def _expert_names(cfg) -> dict[str, tuple[str, int]]:
    """The export's name -> (flyer key, expert) of every routed expert weight."""
    with torch.device("meta"):
        keys = set(_expert_keys(Transformer(cfg)))
    half = hf_model_type(cfg) in HALF_ROPE_MODEL_TYPES
    return {n: (s.key, s.expert) for n, s in hf_names(cfg, half).items() if s.key in keys}


def test_export_writes_the_fp4_model_and_masters_on_request(runs, capsys):
    """``flyer export`` of the QAT run: FP32 and BF16 hold the FP4 values exactly (the other weights as a plain
    export writes them); transformers' DeepseekV4 of the FP32 export computes the FP4 model within ``v4_tolerance``.
    ``--masters`` writes the checkpoint's masters bit for bit, whose logits land 10x beyond it; ``--masters`` with
    ``--dtype fp8``, ``int4`` or ``nvfp4`` is refused in one line."""
    run = runs / "qat"
    loaded, cfg, _ = load_pretrained(run)
    masters = _masters(run)
    out = {}
    for name, extra in (("fp32", []), ("bf16", []), ("masters", ["--masters"])):
        dtype = "bf16" if name == "bf16" else "fp32"
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(runs / f"export-{name}"), "--dtype", dtype, *extra]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert ("masters" in summary["routed_experts"]) == (name == "masters"), summary
        out[name] = tensors(runs / f"export-{name}")
    names = _expert_names(cfg)
    assert len(names) == len(_expert_keys(loaded)) * cfg.n_routed_experts
    for n, (key, e) in names.items():
        fp4 = fp4_round_trip(masters[key][e])
        assert torch.equal(out["fp32"][n], fp4) and torch.equal(out["bf16"][n].float(), fp4), n
        assert torch.equal(out["masters"][n], masters[key][e]), n
    assert out["fp32"].keys() == out["bf16"].keys() == out["masters"].keys()
    for n, w in out["fp32"].items():  # every other weight as the masters' export; BF16: the FP32 export rounded
        assert n in names or torch.equal(w, out["masters"][n]), n
        assert torch.equal(out["bf16"][n], w.to(out["bf16"][n].dtype)), n

    x = _tokens(cfg.vocab_size, seed=5)
    tol = v4_tolerance(cfg, T)
    with torch.no_grad():
        want = loaded(x)
        back = AutoModelForCausalLM.from_pretrained(runs / "export-fp32").eval()
        err = rel(back(x).logits, want)
        wrong = AutoModelForCausalLM.from_pretrained(runs / "export-masters").eval()
        err_masters = rel(wrong(x).logits, want)
    with capsys.disabled():
        print(f"transformers of the FP32 export: {err:.3g}; of --masters: {err_masters:.3g} (tolerance {tol:.3g})")
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    assert err_masters > 10 * tol, f"{err_masters:.3g} vs {tol:.3g}"

    capsys.readouterr()
    for dtype in ("fp8", "int4", "nvfp4"):
        assert main(["export", str(run), "--out", str(runs / "export-bad"), "--dtype", dtype, "--masters"]) == 2
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert len(err_lines) == 1 and err_lines[0].startswith("flyer: error: --masters:"), err_lines
        assert not (runs / "export-bad").exists()
    assert main(["export", str(runs / "plain"), "--out", str(runs / "export-bad"), "--masters"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "--masters: applies to a run trained with FP4 QAT" in err_lines[0], err_lines
    assert not (runs / "export-bad").exists()


def _held_values(model) -> dict[str, torch.Tensor]:
    """Every routed expert stack of ``model`` as the values its kernels multiply by (FP8: code times block scale)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, Experts):
            continue
        for w in ("w1", "w2", "w3"):
            codes = getattr(m, w)
            if isinstance(m, HeldFP8Experts):
                scale = getattr(m, f"{w}_scale")
                out[f"{name}.{w}"] = torch.stack([kernels.dequantize_held(c, s) for c, s in zip(codes, scale)])
            else:
                out[f"{name}.{w}"] = codes.float()
    return out


@pytest.mark.parametrize("held", [torch.bfloat16, FP8])
def test_held_weights_keep_the_fp4_values(runs, held):
    """``--weight-dtype bf16 | fp8`` of the QAT run hold its routed experts' FP4 values exactly (FP8: E4M3 codes
    under power-of-two block scales); the FP8 mutant, the same values quantized with amax / 448 block scales (the
    recipe for other weights), loses many."""
    want = _held_values(load_pretrained(runs / "qat")[0])
    model = load_pretrained(runs / "qat", held=held)[0]
    assert all(isinstance(m, HeldFP8Experts) == (held == FP8) for m in model.modules() if isinstance(m, Experts))
    got = _held_values(model)
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if held == FP8:
        amax = load_pretrained(runs / "qat")[0]
        hold_weights(amax, FP8)
        lost = sum(int((v != want[k]).sum()) for k, v in _held_values(amax).items())
        total = sum(v.numel() for v in want.values())
        print(f"amax / 448 blocks: {lost} of {total} FP4 values not held")
        assert lost > total // 10


def test_fp8_export_of_an_mla_qat_run_holds_the_fp4_values(runs, tmp_path):
    """DeepSeek-V3's FP8 format (``weight_scale_inv`` blocks, FP32) of a QAT run of the MLA preset: its routed
    experts as E4M3 codes under power-of-two block scales, read back (flyer's dequantization, as transformers'
    test_export_fp8_transformers checks it reads) as the FP4 values bit for bit; amax / 448 blocks would not."""
    flags = [*_flags({**TRAIN, "preset": "tiny", "steps": 1, "eval_every": 1}), "--data", str(runs / "text.txt"),
             "--data-cache", str(runs / "cache"), "--no-progress", "--no-plots", "--fp4-experts"]
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    want = _held_values(load_pretrained(tmp_path / "run")[0])
    got = _held_values(load_hf(tmp_path / "fp8", dtype=torch.float32)[0])
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.equal(got[k], want[k]), k
    files = tensors(tmp_path / "fp8")
    names = _expert_names(load_pretrained(tmp_path / "run")[1])
    scales = torch.cat([files[n + "_scale_inv"].flatten() for n in names])
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two


def test_precision_fp8_computes_as_qat_trained_its_fp8_experts(runs, capsys):
    """``--precision fp8`` of the QAT run: FP8 experts with QAT's power-of-two block scales (which hold the FP4
    values exactly), the model ``build_model(precision="fp8", fp4=True)`` trains, bit for bit; the default amax / 448
    scales (FP4 QAT off) compute another model."""
    model, _ = load_model(argparse.Namespace(ckpt=str(runs / "qat"), preset=None, weight_dtype="fp32", device="cpu",
                                             precision="fp8", speculative=None, prefix_cache=None))
    assert "trained with FP4 QAT" in capsys.readouterr().err
    fp8 = [m for m in model.modules() if isinstance(m, FP8Experts)]
    assert fp8 and all(m.recipe.pow2_scales and m.weight_quant is not None for m in fp8)
    cfg = model.cfg
    masters = _masters(runs / "qat")
    trained = convert_to_fp8(_by_hand(cfg, masters, round_trip=False))
    fp4_experts(trained)
    amax = convert_to_fp8(_by_hand(cfg, masters, round_trip=True))
    x = _tokens(cfg.vocab_size, seed=6)
    with torch.no_grad():
        want = trained(x)
        assert torch.equal(model(x), want)
        assert not torch.equal(amax(x), want)
