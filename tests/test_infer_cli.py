"""``flyer generate``: JSON interface, speculative and prefix-cache reporting, user errors."""

import json

import pytest
import torch

from flyer import kernels
from flyer.cli import main
from flyer.config import preset
from flyer.model.counts import kv_cache_bytes_per_token


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_reports_cache_bytes_of_info(capsys):
    out = _json(capsys, ["generate", "--preset", "tiny", "--prompt", "hello", "--prompt", "a longer prompt",
                         "--max-new-tokens", "4", "--json"])
    assert {"text", "texts", "tokens_per_s", "cache_bytes_per_token"} <= set(out)
    assert out["new_tokens"] == 8 and out["tokens_per_s"] > 0
    assert main(["info", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert out["cache_bytes_per_token"] == info["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(preset("tiny"))


def test_a_presets_weights_do_not_depend_on_the_sampling_seed(capsys):
    """``--seed`` seeds the sampling only: a preset's random weights are the same under any seed, so its greedy
    tokens are too (it also seeded the weights), and a seeded sample repeats."""
    base = ["generate", "--preset", "tiny", "--prompt", "hello", "--max-new-tokens", "6", "--json"]
    greedy = {_json(capsys, base + seed)["text"] for seed in ([], ["--seed", "1"], ["--seed", "2"])}
    assert len(greedy) == 1
    sampled = [_json(capsys, base + ["--temperature", "1", "--seed", s])["text"] for s in ("1", "1", "2")]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_speculative_and_prefix_cache(capsys, tmp_path):
    base = ["generate", "--preset", "tiny", "--prompt", "x" * 40, "--max-new-tokens", "6", "--json",
            "--prefix-cache", str(tmp_path), "--prefix-block", "16"]
    plain = _json(capsys, base)
    spec = _json(capsys, base + ["--speculative", "mtp", "--draft-tokens", "2"])
    assert spec["text"] == plain["text"]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and "acceptance_rate" not in plain
    # the MTP module's cache beside the main model's: one more (uncompressed MLA) layer's worth, in the same dtype
    cfg = preset("tiny")
    per_layer = plain["cache_bytes_per_token"] // cfg.n_layers
    assert spec["mtp_cache_bytes_per_token"] == cfg.mtp_depth * per_layer > 0
    assert _json(capsys, base[:-4])["cache_bytes_per_token"] == plain["cache_bytes_per_token"]
    assert "mtp_cache_bytes_per_token" not in _json(capsys, base[:-4])
    assert plain["prefix_cache"]["hits"] == 0 and plain["prefix_cache"]["stored"] == 2
    assert spec["prefix_cache"]["hits"] == 2 and spec["prefix_cache"]["hit_rate"] == 1.0
    assert spec["prefix_cache_total"]["lookups"] == 3
    # human-readable mode prints the statistics
    assert main(base[:-5] + ["--prefix-cache", str(tmp_path), "--prefix-block", "16"]) == 0
    assert "2/2 blocks hit" in capsys.readouterr().err


def test_generate_expert_threads_split_the_stream_and_change_no_token(capsys):
    """``--expert-threads`` (as ``flyer serve``'s): the small preset's experts (12 MB a layer held in
    BF16) streamed on two threads where torch runs one; the kernel's split is bitwise, so the
    tokens are those of one thread."""
    base = ["generate", "--preset", "small", "--prompt", "hello there", "--max-new-tokens", "5", "--json",
            "--weight-dtype", "bf16", "--threads", "1", "--device", "cpu"]
    try:
        one = _json(capsys, base + ["--expert-threads", "1"])
        assert not kernels.splits()
        two = _json(capsys, base + ["--expert-threads", "2"])
        assert kernels.splits()
    finally:
        kernels.set_expert_threads(1)
    assert two["text"] == one["text"] and two["new_tokens"] == one["new_tokens"] == 5


@pytest.mark.parametrize("argv,msg", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "5000"], "--max-new-tokens: 5000 new tokens after a 2-token prompt exceed"),
    (["--draft-tokens", "0"], "--draft-tokens: must be >= 1 (got 0)"),
    (["--prefill-chunk", "0"], "--prefill-chunk: must be >= 1 (got 0)"),
    (["--draft-tokens", "2"], "--draft-tokens: 2 drafts need speculative decoding"),
    (["--prefix-cache", "/tmp/x", "--prefix-cache-size", "lots"], "--prefix-cache-size"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--device", "mps"], "--device: unsupported device 'mps'"),
    (["--device", "cuda:99"], "--device: cuda:99 asked for"),
    (["--logit-bias", "65"], "--logit-bias: expected ID=VALUE"),
    (["--logit-bias", "A=1"], "--logit-bias: expected ID=VALUE"),
    (["--logit-bias", "65=101"], "--logit-bias: values must be in [-100, 100] (got 101.0 for token 65)"),
    (["--logit-bias", "9999=1"], "--logit-bias: token ids must be in [0, 2048) (got 9999)"),
    (["--frequency-penalty", "2.5"], "--frequency-penalty: must be in [-2, 2]"),
    (["--presence-penalty", "nan"], "--presence-penalty: must be a finite number"),
    (["--presence-penalty", "-3"], "--presence-penalty: must be in [-2, 2] (got -3.0)"),
])
def test_user_errors_are_one_line(capsys, argv, msg):
    assert main(["generate", "--preset", "tiny", "--prompt", "hi"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error:") and msg in err and "\n" not in err


def test_generate_logit_bias_and_penalties(capsys):
    """``--logit-bias``, ``--frequency-penalty``, ``--presence-penalty`` as flyer serve's fields: a
    bias of 100 makes its token every token; a penalty breaks the run it makes (the engine's own
    tokens under them: tests/test_serve_engine.py)."""
    base = ["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "6", "--json", "--eos-id", "-1"]
    assert _json(capsys, base + ["--logit-bias", "65=100"])["text"] == "A" * 6
    assert _json(capsys, base + ["--logit-bias", "65=5", "--logit-bias", "65=100"])["text"] == "A" * 6  # the last
    bias = ["--logit-bias", "66=5"]  # random weights: logits far closer together than 5
    assert _json(capsys, base + bias)["text"] == "B" * 6
    assert _json(capsys, base + bias + ["--presence-penalty", "2"])["text"] == "B" * 6  # 5 - 2 still leads
    assert _json(capsys, base + bias + ["--frequency-penalty", "2"])["text"].count("B") == 3  # 5 - 3 x 2 does not


def test_needs_exactly_one_model_source(capsys, tmp_path):
    assert main(["generate", "--prompt", "hi"]) == 2
    assert main(["generate", "--ckpt", str(tmp_path), "--preset", "tiny", "--prompt", "hi"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_generate_from_checkpoint(capsys, tmp_path):
    ckpt = pytest.importorskip("flyer.train.checkpoint")
    from flyer.data.tokenizer import train_bpe
    from flyer.model.transformer import Transformer

    cfg = preset("tiny", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    ckpt.save_checkpoint(tmp_path / "checkpoints", 5, {
        "model.safetensors": model.state_dict(), "config.json": cfg.to_dict(),
        "tokenizer.json": json.loads(tok.to_str())})
    out = _json(capsys, ["generate", "--ckpt", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "5",
                         "--temperature", "0", "--speculative", "mtp", "--json"])
    assert out["cache_bytes_per_token"] == kv_cache_bytes_per_token(cfg, 4)  # auto: FP32 for a checkpoint in FP32
    assert isinstance(out["text"], str) and "acceptance_rate" in out
    assert main(["generate", "--ckpt", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "checkpoint" in capsys.readouterr().err
