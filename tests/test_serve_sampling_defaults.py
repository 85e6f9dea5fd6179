"""The sampling defaults ``flyer serve`` takes from a checkpoint's generation_config.json (``--generation-config
auto``, vLLM's behaviour): read and checked from the file (``flyer.serve.sampling_defaults``), taken by a request
that leaves the fields unset (or null), never over a request's own; handed to the HTTP process by the command."""

import json

import httpx
import pytest
import torch
from served import EngineServer, handed_to_serve_http

from flyer.config import preset

from flyer.errors import CheckpointError
from flyer.infer.cli import ByteTokenizer
from flyer.serve import cli as serve_cli
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.sampling_defaults import generation_defaults
from flyer.model.transformer import Transformer


def _hf_dir(path, generation: dict | None):
    """A directory ``settings_dir`` takes for a Hugging Face model's (a config and a weights file)."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_the_files_sampling_fields_are_read_and_checked(tmp_path):
    gen = {"do_sample": False, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2], "min_p": 0}
    assert generation_defaults(_hf_dir(tmp_path / "a", gen)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                                  "min_p": 0}  # do_sample is not read (vLLM's)
    assert generation_defaults(_hf_dir(tmp_path / "b", None)) == {} and generation_defaults(None) == {}
    assert generation_defaults(_hf_dir(tmp_path / "c", {"temperature": None, "top_p": 1})) == {"top_p": 1}
    for i, (name, value) in enumerate([("temperature", 3), ("top_p", 0), ("top_k", 1.5), ("top_k", -2),
                                       ("repetition_penalty", 0), ("temperature", True), ("min_p", "0.1")]):
        path = _hf_dir(tmp_path / f"bad{i}", {name: value})
        with pytest.raises(CheckpointError, match=f"generation_config.json: {name} {value!r} is no ") as e:
            generation_defaults(path)
        assert "--generation-config none" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def servers():
    """The same tiny engine's API twice: with the defaults a checkpoint's temperature 0 and top_k 3 give, and without
    any. Random weights: sampling at temperature 1 leaves the greedy tokens."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(vocab_size=64)).eval()
    made = []
    for defaults in ({"temperature": 0.0, "top_k": 3}, None):
        cfg = EngineConfig(kv_cache_bytes=64 * 4 * 384 * 2, block_size=4, cache_dtype=torch.float32, prefill_chunk=8)
        made.append(EngineServer(Engine(model, cfg, tokenizer=ByteTokenizer()), lambda link, d=defaults: Api(
            link, ByteTokenizer(), "tiny-test", sampling_defaults=d)))
    yield made
    for s in made:
        s.close()


def test_a_request_without_sampling_fields_takes_the_servers_defaults(servers):
    """With a checkpoint's temperature 0 a request that sets none (or sends null) is greedy; one that sets its own
    temperature samples with it, as on a server without defaults; OpenAI's default (1) where neither sets one."""
    with_defaults, plain = servers

    def text(server, **over):
        body = {"model": "tiny-test", "prompt": [1, 2, 3], "max_tokens": 12, "seed": 3, **over}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(plain, temperature=0)
    assert text(with_defaults) == text(with_defaults, temperature=None) == greedy
    assert text(with_defaults, temperature=1, top_k=0) == text(plain, temperature=1)
    assert text(with_defaults, temperature=1) == text(plain, temperature=1, top_k=3)  # the checkpoint's top_k
    assert text(plain) == text(plain, temperature=1) != greedy  # sampled at OpenAI's 1


def test_the_command_hands_the_http_process_the_checkpoints_defaults(monkeypatch, capsys):
    """What the checkpoint's file gives (a preset has none: its reading stands in) reaches the HTTP process and is
    said in one line; ``--generation-config none`` reads nothing."""
    assert handed_to_serve_http(monkeypatch)[-2] == {}
    read = []
    monkeypatch.setattr(serve_cli, "generation_defaults", lambda ckpt: read.append(ckpt) or {"temperature": 0.6})
    assert handed_to_serve_http(monkeypatch)[-2] == {"temperature": 0.6} and read == [None]
    assert "sampling defaults from generation_config.json: temperature 0.6" in capsys.readouterr().err
    assert handed_to_serve_http(monkeypatch, "--generation-config", "none")[-2] == {} and read == [None]
