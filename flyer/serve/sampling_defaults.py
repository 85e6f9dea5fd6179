"""The sampling defaults ``flyer serve`` takes from a checkpoint's ``generation_config.json`` (``--generation-config
auto``, as vLLM's): a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset (or null)
samples with the value the model's authors recommend there (DeepSeek-V3's temperature 0.6, say) instead of
OpenAI's default; a request that sets one keeps its own. ``do_sample`` is not read, as vLLM does not: a config's
temperature is its recommendation whether or not transformers' ``generate`` would sample by default."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from flyer.errors import CheckpointError, FieldError
from flyer.interop.hf_tokenizer import read_json
from flyer.interop.load import settings_dir
from flyer.serve.request import SamplingOptions
from flyer.serve.schema import CompletionBody

# the fields read, and OpenAI's (vLLM's) value for each where neither the request nor the file sets it
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def generation_defaults(ckpt: str | Path | None) -> dict[str, float]:
    """The sampling fields ``ckpt``'s generation_config.json sets (the directory ``settings_dir`` finds: a Hugging
    Face directory's, or a run fine-tuned from one); {} without one. A value a request could not send (out of its
    range, of the wrong type): a one-line ``CheckpointError`` naming the file and the field."""
    root = settings_dir(ckpt) if ckpt else None
    path = None if root is None else root / "generation_config.json"
    if path is None or not path.is_file():
        return {}
    found = read_json(path)
    out = {name: found[name] for name in OPENAI_DEFAULTS if found.get(name) is not None}
    for name, value in out.items():  # each checked as a request's would be: its type and range, then the engine's
        try:
            CompletionBody.model_validate({"model": "", "prompt": [0], name: value})
            opts = SamplingOptions(**{name: max(value, 0) if name == "top_k" else value})
            _ = opts.params
            opts.check_adjustments()
        except (ValidationError, FieldError) as e:
            problem = e.errors()[0]["msg"] if isinstance(e, ValidationError) else e.problem
            raise CheckpointError(f"{path}: {name} {value!r} is no value a request could send ({problem}): fix it, "
                                  f"or serve with --generation-config none") from None
    return out
