"""A Hugging Face config.json read as transformers reads it where it leaves fields out or spells them otherwise:
each config class's defaults and aliases (``flyer.interop.hf_defaults``), a top-level
``original_max_position_embeddings``, and the zero-width shared MLP transformers saves at ``n_shared_experts`` 0.
The oracle is transformers itself: its config classes, and its models' logits on the same files."""

import dataclasses
import json
import re

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from flyer.errors import ConfigError
from flyer.interop.hf import load_hf
from flyer.interop.hf_config import SUPPORTED_MODEL_TYPES, WRAPPER_MODEL_TYPES, from_hf_config
from flyer.interop.hf_defaults import CLASS_ALIASES, CLASS_DEFAULTS
from tests.hf_models import FAMILIES, build, save_tiny
from tests.test_interop_hf import rel

# the types transformers has a config class for (Kimi K2's is remote code); Kimi K2.5's wrapper without a text
# model defaults to a whole DeepseekV3, which flyer refuses instead, naming text_config (tests/test_hf_kimi_k25.py)
CLASS_TYPES = [mt for mt in SUPPORTED_MODEL_TYPES if mt in CONFIG_MAPPING and mt not in WRAPPER_MODEL_TYPES]
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def _read(d: dict):
    """flyer's fields of the config dict ``d`` (as written to a file), or the field its refusal names."""
    try:
        return from_hf_config(json.loads(json.dumps(d)))
    except ConfigError as e:
        return "refused: " + re.search(r"field '([^']+)'", str(e)).group(1)


def test_every_supported_type_without_a_class_is_known():
    assert set(SUPPORTED_MODEL_TYPES) - set(CLASS_TYPES) == {"kimi_k2", "kimi_k25"}


@pytest.mark.parametrize("given", [{}, SMALL], ids=["model_type only", "small sizes"])
@pytest.mark.parametrize("mt", CLASS_TYPES)
def test_missing_fields_read_as_the_config_class_fills_them(mt, given):
    """A file that gives only its model_type (and a few sizes) reads as transformers' whole config of it does:
    every field flyer reads takes the class's default, or both refuse the same field."""
    full = AutoConfig.for_model(mt, **given).to_dict()
    assert _read({"model_type": mt, **given}) == _read(full)


# Kimi K2's config.json maps AutoConfig to its remote configuration_deepseek.DeepseekV3Config: DeepSeek-V3's class,
# whose defaults transformers' DeepseekV3Config took (it declares no aliases)
REMOTE_AS = {"kimi_k2": "deepseek_v3"}


@pytest.mark.parametrize("mt", sorted(CLASS_DEFAULTS))
def test_class_defaults_and_aliases_are_transformers_own(mt):
    cls = CONFIG_MAPPING[REMOTE_AS.get(mt, mt)]
    declared = {f.name: f.default for f in dataclasses.fields(cls)}
    theta = (cls().rope_parameters or {}).get("rope_theta")
    aliases = {alias: own for alias, own in cls.attribute_map.items()}
    for k, v in CLASS_DEFAULTS[mt].items():
        own = next((a for a, o in aliases.items() if o == k and a in declared), k)  # declared under its alias
        assert (theta if k == "rope_theta" else declared[own]) == v, (mt, k)
    assert CLASS_ALIASES.get(mt, {}) == ({} if mt in REMOTE_AS else aliases)


def test_kimi_k2_reads_alike_wherever_it_is():
    """A trimmed Kimi K2 text config (no routing scale, groups, dense layers or MTP field) reads as the same
    DeepseekV3 at the top level (Kimi K2 / K2-Thinking), inside Kimi K2.5's wrapper and as deepseek_v3: each missing
    field is DeepseekV3Config's default (the top level had taken flyer's own: route scale 1.0, one group, no dense
    layer, no MTP)."""
    text = {**SMALL, "n_routed_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "kv_lora_rank": 16, "q_lora_rank": 32, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
            "num_hidden_layers": 4}
    top = _read({**text, "model_type": "kimi_k2"})
    wrapped = _read({"model_type": "kimi_k25", "text_config": {**text, "model_type": "kimi_k2"}})
    assert top == _read({**text, "model_type": "deepseek_v3"})
    assert wrapped == {**top, "tie_embeddings": True}  # the wrapper's own default, as Kimi_K25Config's
    assert CONFIG_MAPPING["kimi_k25"](text_config=text).tie_word_embeddings is True
    want = AutoConfig.for_model("deepseek_v3", **text)
    assert (top["route_scale"], top["n_expert_groups"], top["n_limited_groups"], top["n_dense_layers"],
            top["mtp_depth"]) == (want.routed_scaling_factor, want.n_group, want.topk_group,
                                  want.first_k_dense_replace, want.num_nextn_predict_layers) == (2.5, 8, 4, 3, 1)


@pytest.mark.parametrize("mt, alias, own, value", [("deepseek_v3", "num_local_experts", "n_routed_experts", 16),
                                                   ("deepseek_v3", "num_mtp_layers", "num_nextn_predict_layers", 0),
                                                   ("mixtral", "num_experts", "num_local_experts", 4),
                                                   ("qwen3_moe", "num_experts", "num_local_experts", 16)])
def test_an_alias_reads_as_the_field_it_names(mt, alias, own, value):
    given = {**SMALL, alias: value}
    assert AutoConfig.for_model(mt, **given).to_dict()[own] == value
    assert _read({"model_type": mt, **given}) == _read(AutoConfig.for_model(mt, **given).to_dict())


def test_dsa_dense_layers_from_mlp_layer_types_alone():
    """DeepseekV32's first_k_dense_replace default (3) is not a field the file gave: mlp_layer_types decides."""
    d = {"model_type": "deepseek_v32", **SMALL, "mlp_layer_types": ["dense", "sparse"]}
    assert _read(d)["n_dense_layers"] == 1


def _stripped(tmp_path, drop: tuple[str, ...] = (), **add):
    """``tmp_path``'s config.json without ``drop`` and with ``add``; transformers and flyer both load it."""
    p = tmp_path / "config.json"
    d = json.loads(p.read_text())
    for k in drop:
        del d[k]
    p.write_text(json.dumps({**d, **add}))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, cfg, _ = load_hf(tmp_path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return rel(model(tokens), ref(tokens).logits)


def test_v3_routing_fields_left_out_route_as_transformers_routes(tmp_path):
    """A V3 file without routed_scaling_factor, num_experts_per_tok, n_group, topk_group: 2.5, 8, 8, 4."""
    cls, cfg_cls, kw = FAMILIES["v3"]
    kw = {**kw, "n_routed_experts": 16, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "n_group": 8,
          "topk_group": 4}
    torch.manual_seed(0)
    save_tiny(cls(cfg_cls(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=256, **kw)).eval(), tmp_path, "v3")
    assert _stripped(tmp_path, ("routed_scaling_factor", "num_experts_per_tok", "n_group", "topk_group")) < 1e-4


def test_glm4_moe_eps_left_out_is_its_class_default(tmp_path):
    build("glm4_moe", tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["rms_norm_eps"] == 1e-5  # Glm4MoeConfig's default, which a file may leave out
    assert _stripped(tmp_path, ("rms_norm_eps",)) < 1e-4


@pytest.mark.parametrize("name", ["v3", "llama3"])
def test_top_level_original_max_position_embeddings_comes_first(tmp_path, name):
    """transformers sets a top-level original_max_position_embeddings over the RoPE dict's (YaRN, llama3)."""
    if name == "llama3":
        cls, cfg_cls, kw = FAMILIES["llama"]
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        torch.manual_seed(0)
        save_tiny(cls(cfg_cls(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256,
                              **{**kw, "rope_parameters": rope})).eval(), tmp_path)
    else:
        build(name, tmp_path)
    assert _stripped(tmp_path, original_max_position_embeddings=16) < 1e-4


def test_zero_shared_experts_saved_by_transformers_load(tmp_path):
    """transformers saves DeepseekV3's shared MLP at n_shared_experts 0 as zero-width tensors: nothing to read."""
    cls, cfg_cls, kw = FAMILIES["v3"]
    torch.manual_seed(0)
    save_tiny(cls(cfg_cls(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=256,
                          **{**kw, "n_shared_experts": 0})).eval(), tmp_path, "v3")
    assert _stripped(tmp_path) < 1e-4
