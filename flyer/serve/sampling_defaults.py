"""The sampling defaults ``flyer serve`` takes from a checkpoint's ``generation_config.json`` (``--generation-config
auto``, as vLLM's): a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset (or null)
samples with the value the model's authors recommend there (DeepSeek-V3's temperature 0.6, say) instead of
OpenAI's default; a request that sets one keeps its own. ``do_sample`` is not read, as vLLM does not: a config's
temperature is its recommendation whether or not transformers' ``generate`` would sample by default."""

from __future__ import annotations

import math
from pathlib import Path

from flyer.errors import CheckpointError
from flyer.interop.hf_tokenizer import read_json
from flyer.interop.load import settings_dir

# the fields read, and OpenAI's (vLLM's) value for each where neither the request nor the file sets it
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
# each field's range, as a request's is checked (``flyer.serve.schema.Body``, ``flyer.infer.sampling``)
_VALID = {"temperature": lambda v: 0 <= v <= 2, "top_p": lambda v: 0 < v <= 1, "top_k": lambda v: v >= -1,
          "min_p": lambda v: 0 <= v <= 1, "repetition_penalty": lambda v: 0 < v < math.inf}


def generation_defaults(ckpt: str | Path | None) -> dict[str, float]:
    """The sampling fields ``ckpt``'s generation_config.json sets (the directory ``settings_dir`` finds: a Hugging
    Face directory's, or a run fine-tuned from one); {} without one. A value a request could not send (out of its
    range, of the wrong type): a one-line ``CheckpointError`` naming the file and the field."""
    root = settings_dir(ckpt) if ckpt else None
    path = None if root is None else root / "generation_config.json"
    if path is None or not path.is_file():
        return {}
    found = read_json(path)
    out = {}
    for name, valid in _VALID.items():
        value = found.get(name)
        if value is None:
            continue
        integer = name == "top_k"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not valid(value):
            raise CheckpointError(f"{path}: {name} {value!r} is no {'top_k' if integer else name} a request could "
                                  f"send: fix it, or serve with --generation-config none")
        out[name] = value
    return out
