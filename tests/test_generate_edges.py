"""``flyer generate`` and ``flyer serve`` edges a mutation sweep of ``flyer.infer.generate``, ``flyer.infer.cli`` and
``flyer.serve.cli`` found unpinned: the bounds of token ids at the vocabulary's size, bool ids, the decode rate's
tokens, the first logits before any bias, the prefix cache's bound and eviction order, the CLI's one-line refusals,
and the serve flags reaching the engine (loopback by default, the API key handed on)."""

import json

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.errors import CheckpointError, FieldError
from flyer.infer import cli as infer_cli
from flyer.infer import decoder
from flyer.infer.cli import check_checkpoint_eos, parse_logit_bias
from flyer.infer.generate import GenerationConfig, GenerationResult, generate, open_prefix_cache
from flyer.model.transformer import Transformer
from flyer.serve import cli as serve_cli
from flyer.serve.cli import DEFAULT_BLOCK_SIZE, default_block_size
from tests.served import handed_to_serve_http

CFG = preset("tiny")


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ---- flyer/infer/generate.py ---------------------------------------------------------------------
def test_zero_new_tokens_names_max_new_tokens():
    """max_new_tokens=0 is refused naming max_new_tokens itself, not draft_tokens (whose check would catch it
    next, with a message about a bound that is itself the bad value)."""
    with pytest.raises(FieldError) as e:
        GenerationConfig(max_new_tokens=0).validate()
    assert e.value.field == "max_new_tokens"


def test_decode_rate_counts_only_the_decode_loops_tokens():
    """the first token of each row comes from the prefill, so the decode rate leaves it out."""
    res = GenerationResult([[1, 2, 3], [4, 5]], prompt_tokens=4, prefill_s=1.0, decode_s=1.5, cache_bytes_per_token=8)
    assert res.decode_tokens_per_s == pytest.approx(3 / 1.5)
    assert res.tokens_per_s == pytest.approx(5 / 2.5)


def test_bool_token_ids_are_refused():
    """True is an int to isinstance and has __index__, but is no token id."""
    with pytest.raises(TypeError, match=r"prompts\[0\]: token ids are ints \(got True\)"):
        generate(Transformer(CFG), [[True, 2]], GenerationConfig(max_new_tokens=1))


def test_a_bool_eos_id_is_refused():
    """eos_id=True would stop at token 1."""
    with pytest.raises(FieldError, match="eos_id: must be one token id"):
        GenerationConfig(eos_id=True).validate()


def test_first_logits_are_the_models_before_the_adjustments():
    """first_logits is the model's prefill output, unbiased; the bias moves the first token."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    prompts = [[1, 2, 3, 4]]
    plain = generate(model, prompts, GenerationConfig(max_new_tokens=1))
    target = (plain.tokens[0][0] + 1) % CFG.vocab_size
    biased = generate(model, prompts, GenerationConfig(max_new_tokens=1, logit_bias=((target, 100.0),)))
    assert biased.tokens == [[target]]  # the bias applies to the first (prefill) token
    assert torch.equal(biased.first_logits, plain.first_logits)


def test_prefix_hit_rate_keeps_four_decimals(tmp_path):
    """2 hits over 3 lookups reads 0.6667, as PrefixCacheStats rounds it."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    pc = open_prefix_cache(model, tmp_path, block_size=16)
    a = list(range(10, 43))  # two whole blocks and one token
    b = list(range(100, 133))
    generate(model, [a], GenerationConfig(max_new_tokens=1, prefix_cache=pc))
    res = generate(model, [a, b], GenerationConfig(max_new_tokens=1, prefix_cache=pc))
    assert res.prefix["hits"] == 2 and res.prefix["lookups"] == 3, res.prefix
    assert res.prefix["hit_rate"] == 0.6667


def _blocks_model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_prefill_keeps_the_prefix_cache_inside_its_bound(tmp_path):
    """generate evicts after storing, so the directory never stays above max_bytes."""
    model = _blocks_model()
    big = open_prefix_cache(model, tmp_path / "big", block_size=16)
    generate(model, [list(range(10, 43))], GenerationConfig(max_new_tokens=1, prefix_cache=big))
    block = big.disk_bytes() // 2
    pc = open_prefix_cache(model, tmp_path / "small", block_size=16, max_bytes=block + block // 2)
    generate(model, [list(range(10, 43))], GenerationConfig(max_new_tokens=1, prefix_cache=pc))
    assert 0 < pc.disk_bytes() <= block + block // 2


def test_eviction_takes_a_chains_tail_before_its_head(tmp_path):
    """a prompt's blocks are touched head last (``PrefixCache.touch``), so a cache one block over its bound loses
    the tail of the oldest prompt and still serves its head; evicting the head first would orphan the tail."""
    model = _blocks_model()
    A, B = list(range(10, 43)), list(range(100, 133))  # two whole blocks each
    probe = open_prefix_cache(model, tmp_path / "probe", block_size=16)
    generate(model, [A], GenerationConfig(max_new_tokens=1, prefix_cache=probe))
    block = probe.disk_bytes() // 2
    pc = open_prefix_cache(model, tmp_path / "pc", block_size=16, max_bytes=3 * block + block // 2)
    def run(p):
        return generate(model, [p], GenerationConfig(max_new_tokens=1, prefix_cache=pc)).prefix

    run(A), run(B)  # four blocks over a bound of three: one goes, A's tail
    assert run(A)["hits"] == 1


def test_a_prompt_id_equal_to_the_vocab_size_is_refused():
    """id V is outside [0, V): refused by name before the embedding would index past its table."""
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, "):
        generate(Transformer(CFG), [[1, CFG.vocab_size]], GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize("field,over", [("eos_id", {"eos_id": CFG.vocab_size}), ("eos_id", {"eos_id": -1}),
                                        ("stop_ids", {"stop_ids": (2, CFG.vocab_size)})])
def test_a_stop_id_outside_the_vocabulary_is_refused(field, over):
    """A stop id the model cannot sample would never end a row: every row would run to max_new_tokens."""
    with pytest.raises(FieldError, match=rf"\[0, {CFG.vocab_size}\)") as e:
        generate(Transformer(CFG), [[1, 2]], GenerationConfig(max_new_tokens=1, **over))
    assert e.value.field == field


def test_rows_done_at_their_first_token_run_no_decode_step(monkeypatch):
    """a row the prefill's token finishes (max_new_tokens=1, or a stop id) leaves before the decode loop: the
    output is the same either way, but a step for it is wasted work (a whole forward for a batch of such rows)."""
    calls = []
    real = decoder.Decoder.forward
    monkeypatch.setattr(decoder.Decoder, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    res = generate(_blocks_model(), [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=1))
    assert [len(t) for t in res.tokens] == [1, 1] and len(calls) == 1  # the prefill's only


# ---- flyer/infer/cli.py (flyer generate) ---------------------------------------------------------
GEN = ["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "2"]


def _error(capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error:") and says in err and "\n" not in err, err


def test_a_token_biased_twice_keeps_its_last_value():
    """as OpenAI's JSON object would, the last --logit-bias for a token wins."""
    assert parse_logit_bias(["5=1", "7=-3", "5=2.5"]) == ((5, 2.5), (7, -3.0))
    for item in (" 7=1", "+7=1", "7_0=1", "\u0667=1", "-1=1", "=1", "7"):  # a plain decimal id, as the API's keys
        with pytest.raises(FieldError, match="expected ID=VALUE"):
            parse_logit_bias([item])


def test_a_checkpoint_eos_id_equal_to_the_vocab_size_is_refused():
    """an end-of-text id equal to vocab_size is outside [0, vocab_size): it could never be sampled."""
    class Tok:
        def __init__(self, ids):
            self.ids = ids

        def eos_ids(self):
            return self.ids

    check_checkpoint_eos(Tok((0, 2047)), "run", 2048, "fix it")
    with pytest.raises(CheckpointError, match=r"run: its end-of-text id 2048 .* outside this model's vocabulary"):
        check_checkpoint_eos(Tok((1, 2048)), "run", 2048, "fix it")


def test_an_empty_system_message_still_needs_chat(capsys):
    """--system "" is a system message given (an empty one), still without --chat."""
    _error(capsys, GEN + ["--system", ""], "--system is a chat's system message")


@pytest.mark.parametrize("eos", ["-2", "2048"])
def test_an_eos_id_outside_the_vocabulary_is_refused(capsys, eos):
    """C8 (-2 is no token and not -1's "none"), C9 (2048 is the tiny vocabulary's size: outside it)."""
    _error(capsys, GEN + ["--eos-id", eos], f"--eos-id: must be a token id in [0, 2048) of this model (got {eos})")


def test_the_stop_token_is_left_out_of_the_text(capsys):
    """the stop id ends the token ids, and is not decoded into the text."""
    out = _json(capsys, GEN + ["--logit-bias", "65=100", "--eos-id", "65", "--json"])
    assert out["token_ids"] == [[65]] and out["text"] == ""
    assert _json(capsys, GEN + ["--logit-bias", "65=100", "--eos-id", "-1", "--json"])["text"] == "AA"


def test_an_empty_suffix_is_a_plain_prompt(capsys):
    """--suffix "" is no fill-in-the-middle (the API's "" as none), so byte tokens without FIM markers run."""
    plain = _json(capsys, GEN + ["--json"])
    assert _json(capsys, GEN + ["--suffix", "", "--json"])["token_ids"] == plain["token_ids"]


def test_a_prompt_token_equal_to_the_vocab_size_is_one_line(capsys, monkeypatch):
    """a tokenizer id equal to vocab_size does not fit the model either (the existing test's 5000 is far out)."""
    monkeypatch.setattr(infer_cli.ByteTokenizer, "encode_ids", lambda self, text, add_special_tokens=None: [2048])
    _error(capsys, GEN, "--prompt: prompt 1 encodes to token id 2048, outside this model's vocabulary [0, 2048)")


def test_an_empty_prompt_is_one_line(capsys):
    """a prompt that encodes to no token is refused naming --prompt, not by generate's ValueError."""
    _error(capsys, ["generate", "--preset", "tiny", "--prompt", "", "--max-new-tokens", "2"],
           "--prompt: every prompt must encode to at least one token")


def test_json_names_a_non_mla_models_attention(capsys):
    """--attention is MLA's choice; a DeepSeek-V4 model reports its own attention."""
    out = _json(capsys, ["generate", "--preset", "tiny-v4", "--prompt", "hi", "--max-new-tokens", "1", "--json"])
    assert out["attention"] == "hybrid"


# ---- flyer/serve/cli.py (flyer serve) ------------------------------------------------------------
class _Stop(Exception):
    pass


def _engine_config(monkeypatch, *flags):
    """The EngineConfig ``flyer serve --preset tiny FLAGS`` builds its engine with (the engine is not built)."""
    seen = []

    def stand_in(model, cfg, tokenizer=None):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(serve_cli, "Engine", stand_in)
    with pytest.raises(_Stop):
        main(["serve", "--preset", "tiny", "--device", "cpu", "--port", "0", "--kv-cache-memory", "8M",
              "--threads", "1", "--expert-threads", "1", *flags])
    return seen.pop()


def test_serve_flags_reach_the_engine(monkeypatch):
    """each flag is the engine's setting, not its default."""
    base = _engine_config(monkeypatch)
    assert base.prefix_sharing is True and base.cache_dtype == torch.bfloat16 and base.max_queue == 256
    cfg = _engine_config(monkeypatch, "--no-prefix-sharing", "--cache-dtype", "fp32", "--max-queue", "7",
                         "--speculative", "mtp", "--speculative-max-batch", "3")
    assert cfg.prefix_sharing is False and cfg.cache_dtype == torch.float32 and cfg.max_queue == 7
    assert cfg.speculative_max_batch == 3


def test_serve_port_65536_is_refused(capsys):
    """ports end at 65535."""
    assert main(["serve", "--preset", "tiny", "--port", "65536"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --port: must be in [0, 65535] (got 65536)") and "\n" not in err, err


def test_serve_listens_on_loopback_by_default_and_hands_on_the_api_key(monkeypatch):
    """without --host only this machine reaches the server; --api-key reaches the HTTP process."""
    args = handed_to_serve_http(monkeypatch, "--api-key", "sesame")
    limits, tok, name, api_key, template, url = args[:6]
    assert api_key == "sesame" and url.startswith("http://127.0.0.1:") and name == "tiny"
    assert handed_to_serve_http(monkeypatch)[3] is None


def test_v4_default_block_size_is_a_multiple_of_every_ratio():
    """DeepSeek-V4's default block holds whole compressed entries of every ratio (128 for V4-Flash's)."""
    assert default_block_size(preset("dsv4-flash")) == 128
    assert default_block_size(preset("tiny")) == DEFAULT_BLOCK_SIZE == 16
