"""Config edges a mutation sweep of ``flyer.config`` / ``flyer.presets`` / ``flyer.train.config`` found unpinned:
the model fields' bounds at their limits and the combinations refused, DeepSeek-V3's published training values, the
trainer's refusals, the cosine's floor, what a resume compares; and numbers written as strings, which were accepted.
Oracles: the fields' documented ranges, ``reference-numbers.md``, the closed-form cosine."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flyer.config import ConfigError, ModelConfig, preset, resolve_config
from flyer.errors import FieldError
from flyer.train.config import TrainConfig, check_resume_settings, check_resumed_run, lr_at


def _longcat():
    return preset("tiny", shortcut_moe=True, n_dense_layers=0, n_zero_experts=2, n_expert_groups=1,
                  n_limited_groups=1)


def test_an_mtp_block_never_holds_a_shortcut_moe():  # kills C3
    # LongCat-Flash's released MTP layer is MLA + the dense FFN alone (has_shortcut_moe's docstring)
    cfg = _longcat()
    assert cfg.n_layers % 2 == 0 and cfg.mtp_depth == 1
    assert [cfg.has_shortcut_moe(i) for i in range(cfg.n_layers + cfg.mtp_depth)] == [True, False, True, False, False]


def test_hybrid_softmax_scale_has_no_yarn_factor_even_with_mscale():  # kills C8
    # DeepSeek-V4's attention: YaRN stretches the frequencies only, the softmax scale stays head_dim^-0.5
    cfg = preset("tiny-v4", rope_factor=4.0, mscale=1.0)
    assert cfg.softmax_scale == cfg.head_dim ** -0.5


def test_an_all_dense_model_needs_an_ffn_width():  # kills C14
    # n_routed_experts 0: every layer is dense (n_dense_layers 0 included), so inter_dim 0 is no model
    with pytest.raises(ConfigError, match="inter_dim"):
        preset("tiny", n_routed_experts=0, n_dense_layers=0, inter_dim=0, mtp_depth=0)


def test_rotary_dim_may_name_the_whole_head():  # kills C19
    # "an even number in [0, head_dim]": head_dim itself is the whole head, as 0 is
    cfg = preset("qwen2.5-72b", rotary_dim=128)
    assert cfg.rope_dim == cfg.head_dim == 128


def test_the_indexer_may_be_as_wide_as_its_rope_channels():  # kills C21
    # "an even number >= qk_rope_head_dim": equal is allowed (every channel rotates)
    assert preset("dsv32", index_head_dim=64).index_head_dim == 64


def test_indexer_types_start_with_a_full_layer():  # kills C22
    kw = dict(index_topk=8, index_n_heads=2, index_head_dim=16)
    assert preset("tiny", indexer_types=("full", "shared", "full", "shared"), **kw).has_indexer(1) is False
    with pytest.raises(ConfigError, match="indexer_types"):
        preset("tiny", indexer_types=("shared", "full", "full", "full"), **kw)


def test_biased_group_routing_needs_two_experts_a_group():  # kills C25, and C26 in its second half
    # V3's group score is the sum of each group's top-2 biased scores (HF DeepseekV3's topk(2) per group)
    with pytest.raises(ConfigError, match="n_expert_groups"):
        preset("tiny", n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2)
    # without the bias (V2's softmax group-limited routing: a group's max) one expert a group is a model
    cfg = preset("tiny", n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2,
                 router_bias=False, score_func="softmax")
    assert cfg.n_expert_groups == 4


def test_hash_layers_are_moe_layers():  # kills C28
    # "the first n MoE layers route by a token-id table": at most n_layers - n_dense_layers of them
    base = dict(n_expert_groups=1, n_limited_groups=1)
    assert preset("tiny", n_hash_layers=3, **base).n_hash_layers == 3  # tiny: 4 layers, 1 dense
    with pytest.raises(ConfigError, match="n_hash_layers"):
        preset("tiny", n_hash_layers=4, **base)


def test_compress_ratios_one_per_layer_exactly():  # kills C31
    with pytest.raises(ConfigError, match="compress_ratios"):
        preset("tiny-v4", compress_ratios=(0, 4, 16, 4, 4))


def test_csa_layers_need_the_indexer():  # kills C32
    with pytest.raises(ConfigError, match="index_topk"):
        preset("tiny-v4", index_topk=0)  # tiny-v4's layers 1 and 3 have ratio 4 = csa_ratio
    assert preset("tiny-v4", index_topk=0, compress_ratios=(0, 16, 16, 0)).index_topk == 0  # HCA only: no indexer


@pytest.mark.parametrize("kind", ["llama3", "linear"])
def test_llama3_and_linear_rope_have_no_cos_sin_factor(kind):  # kills C35 (linear)
    # transformers' linear and llama3 RoPE return attention_factor 1.0
    with pytest.raises(ConfigError, match="rope_attn_factor"):
        preset("tiny", rope_type=kind, rope_factor=2.0, rope_attn_factor=1.5)


def test_llama4_attention_temperature_is_not_taken_with_the_indexer():  # kills C37
    assert preset("tiny", llama4_attn_beta=0.1).llama4_attn_beta == 0.1
    with pytest.raises(ConfigError, match="llama4_attn_beta"):
        preset("tiny", llama4_attn_beta=0.1, index_topk=8, index_n_heads=2, index_head_dim=16)


def test_a_fractional_integer_field_is_refused_not_truncated():  # kills C40
    assert ModelConfig.from_dict({"n_layers": 4.0, "n_dense_layers": 1}).n_layers == 4
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 4.5, "n_dense_layers": 1})


def test_keyword_overrides_win_over_the_config_file(tmp_path):  # kills C43

    p = tmp_path / "m.toml"
    p.write_text("dim = 96\nn_heads = 3\n")
    cfg = resolve_config("tiny", p, {"dim": 64, "n_heads": 2})
    assert (cfg.dim, cfg.n_heads, cfg.n_layers) == (64, 2, 4)  # flag > file > preset


def test_a_field_both_at_the_top_level_and_in_the_model_table_is_refused(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text("dim = 96\n\n[model]\ndim = 64\nn_heads = 2\n")
    with pytest.raises(FieldError, match=r"dim is set both at the top level and in \[model\]") as e:
        resolve_config("tiny", p)
    assert e.value.field == "config"
    p.write_text("n_heads = 3\n\n[model]\ndim = 96\n")  # each field in one place: both read
    assert (resolve_config("tiny", p).dim, resolve_config("tiny", p).n_heads) == (96, 3)


# ---- flyer/train/config.py ----------------------------------------------------------------------------------------


def _refused(field, **kw):
    with pytest.raises(FieldError) as e:
        TrainConfig(**kw).validate()
    assert e.value.field == field, e.value


def test_lr_may_be_its_maximum():  # kills T2
    TrainConfig(lr=1.0).validate()  # "must be in (0, 1]"
    _refused("lr", lr=1.0000001)


def test_micro_batches_need_pipelining():  # kills T11
    TrainConfig(pp=2, micro_batches=4).validate()
    _refused("micro_batches", micro_batches=4)  # pp 1: a step's micro-batches are grad_accum's


@pytest.mark.parametrize("name, value", [("pp", 2), ("ep", 2), ("indexer_train", "warmup")])
def test_dpo_refuses_what_it_does_not_support(name, value):  # kills T12 (ep)
    kw = dict(dpo=True, init="some/model", data="prefs.jsonl")
    TrainConfig(**kw).validate()
    _refused(name, **kw, **{name: value})


@pytest.mark.parametrize("schedule", ["zb", "dualpipev"])
def test_mla_recompute_is_refused_with_split_weight_backward_from_two_stages(schedule):  # kills T15
    TrainConfig(recompute="mla", pp=2, pp_schedule="1f1b").validate()
    TrainConfig(recompute="mla", pp=1, pp_schedule=schedule).validate()  # no pipeline: the schedule is not run
    _refused("recompute", recompute="mla", pp=2, pp_schedule=schedule)


def test_cosine_reaches_its_floor_on_the_last_step_and_its_midpoint_halfway():  # kills T21

    tc = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(tc, 5) == pytest.approx(5e-4)  # warmup: linear
    assert lr_at(tc, 10) == pytest.approx(1e-3)
    assert lr_at(tc, 60) == pytest.approx((1e-3 + 1e-4) / 2)  # half the decay's steps: cos(pi/2)
    assert lr_at(tc, 110) == pytest.approx(1e-4)


def test_a_fine_tunes_preset_is_not_compared_on_resume(tmp_path):  # kills T26
    # with init, init's config is the model's: the preset named nothing, on either side of the resume


    saved = TrainConfig(preset="tiny", init=str(tmp_path / "model"))
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 2, "train_config": dataclasses.asdict(saved)}))
    check_resume_settings(TrainConfig(preset="small"), tmp_path)  # resumed without init: the run's own config
    check_resume_settings(TrainConfig(preset="small", init=saved.init), tmp_path)
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 2, "train_config": dataclasses.asdict(
        TrainConfig(preset="tiny"))}))
    with pytest.raises(FieldError) as e:
        check_resume_settings(TrainConfig(preset="small"), tmp_path)
    assert e.value.field == "preset"


def test_a_checkpoint_that_recorded_auto_precision_resumes_at_any_resolution(tmp_path):  # kills T29


    fp = {"tokenizer": "t", "data": "d"}
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 1, "train_config": {"precision": "auto"}}))
    check_resumed_run(tmp_path, TrainConfig(), "fp32", fp)  # saved before the resolved precision was recorded
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 1, "precision": "bf16"}))
    check_resumed_run(tmp_path, TrainConfig(precision="bf16"), "bf16", fp)
    with pytest.raises(FieldError) as e:
        check_resumed_run(tmp_path, TrainConfig(precision="fp32"), "fp32", fp)
    assert e.value.field == "precision"


def test_a_boolean_is_not_a_number_for_a_float_field():  # kills T30
    # a config file's `lr = true` would otherwise train at lr 1.0
    assert TrainConfig.type_problem("lr", 1) is None and TrainConfig.type_problem("lr", 0.5) is None
    assert "a number" in TrainConfig.type_problem("lr", True)
    _refused("lr", lr=True)


def test_max_seq_len_must_be_positive():  # kills C46
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_seq_len"):
            preset("tiny", max_seq_len=bad)


def test_dsv3_training_and_context_defaults_are_the_published_ones():  # kills P3, P6, P7
    cfg = preset("dsv3")
    assert cfg.max_seq_len == 163840  # HF config.json's max_position_embeddings (40 x 4096, YaRN)
    assert cfg.bias_update_speed == 0.001  # the report's gamma (section 4.2)
    assert cfg.mtp_loss_weight == 0.3  # the report's lambda for the first 10T tokens


def test_zero_and_device_values_outside_their_sets_are_refused():  # kills T16, T17
    _refused("zero", zero=2)
    TrainConfig(device="cuda:1").validate()
    _refused("device", device="cuda:")


@pytest.mark.parametrize("field, value", [("n_layers", "12"), ("norm_eps", "1e-5"), ("dim", " 7168 ")])
def test_a_number_written_as_a_string_is_refused(field, value):
    """A number field given a string in a config file is refused, as a bool field given "true" is (it was read
    through int() / float(): "12" became 12)."""
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        ModelConfig.from_dict({**dataclasses.asdict(preset("tiny")), field: value})
