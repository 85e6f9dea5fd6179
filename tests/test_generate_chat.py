"""``flyer generate --chat``: each prompt a user message (after ``--system``'s) rendered by the checkpoint's chat
template as transformers' ``apply_chat_template`` renders and tokenizes it (the template's own BOS, no second one);
greedy tokens equal transformers' ``generate`` on those ids. Tiny random DeepseekV3, FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flyer.cli import main
from tests.hf_models import build

N = 8
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3-chat")
    build("v3", path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return path


def _flyer(capsys, path, *args) -> list[int]:
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path), "--max-new-tokens", str(N), "--eos-id", "-1", "--json",
                 *args]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"][0]


@pytest.mark.parametrize("system", [None, "be brief"])
def test_chat_prompts_are_transformers_chat_template_ids(ckpt, capsys, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi there"}]
    hf = AutoTokenizer.from_pretrained(ckpt)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids).count(hf.bos_token_id) == 1
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    expect = ref.generate(torch.tensor([list(ids)]), do_sample=False, max_new_tokens=N, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    got = _flyer(capsys, ckpt, "--chat", "--prompt", "hi there", *(("--system", system) if system else ()))
    assert got == expect
    # the rendered text as a plain prompt gets the tokenizer's BOS before the template's: another prompt
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf(text)["input_ids"][:2] == [hf.bos_token_id] * 2


@pytest.mark.parametrize("argv, says", [
    (["--system", "s", "--prompt", "p"], "--system is a chat's system message: give --chat with it"),
    (["--chat", "--suffix", "s", "--prompt", "p"], "--suffix fills in the middle of a plain prompt: not with --chat"),
])
def test_chat_flags_that_do_not_go_together_are_one_line(ckpt, capsys, argv, says):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"flyer: error: {says}"
