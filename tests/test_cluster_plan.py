"""flyer plan: FLOPs, GPU-hours, cost, MFU and memory against DeepSeek-V3's published figures."""

import pytest

from flyer.cluster.costs import (Layout, Throughput, activation_bytes_per_token_layer, auto_layout, memory_per_gpu,
                                 plan, validate_layout)
from flyer.cluster.hardware import GPUS, gpu_spec
from flyer.cluster.pipeline import bubble_fraction, schedule_cost, simulate_1f1b
from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.model.counts import mtp_training_flops_per_token


@pytest.fixture(scope="module")
def v3_plan():
    # the V3 report's inputs: 14.8T tokens, 2,048 H800, 272.8B tokens/day measured, sequence 4096
    return plan(preset("dsv3"), gpu_spec("h800"), Layout(2048, 16, 64, schedule="dualpipe"), 14.8e12, 4096,
                Throughput(tokens_per_day=272.8e9))


def test_flops_per_token(v3_plan):
    assert v3_plan["flops_per_token_causal"] == pytest.approx(250e9, rel=0.005)  # paper: 250 GFLOPs
    assert v3_plan["flops_per_token_noncausal"] == pytest.approx(281e9, rel=0.005)  # derived: ~281
    # beside them, not in them (the paper's count): the MTP module's, which the trainer's MFU adds
    assert v3_plan["flops_per_token_mtp"] == mtp_training_flops_per_token(preset("dsv3"), 4096) > 0.04 * 250e9


def test_gpu_hours_and_cost(v3_plan):
    assert v3_plan["gpu_hours"] == pytest.approx(2.664e6, rel=0.005)  # paper: 2,664K pre-training
    assert v3_plan["gpu_hours_per_trillion_tokens"] == pytest.approx(180e3, rel=0.005)  # paper: 180K
    assert v3_plan["days"] == pytest.approx(14.8e12 / 272.8e9)
    assert v3_plan["cost_usd"] == pytest.approx(2 * v3_plan["gpu_hours"])
    # the V3 report's 2,788K total adds context extension (119K) and post-training (5K): $5.576M
    total = plan(preset("dsv3"), gpu_spec("h800"), Layout(2048), 14.8e12, 4096, Throughput(tokens_per_day=272.8e9),
                 extra_gpu_hours=124e3)
    assert total["cost_usd"] == pytest.approx(5.576e6, rel=0.005)


def test_mfu_and_tflops(v3_plan):
    assert v3_plan["tflops_per_gpu_causal"] == pytest.approx(385, rel=0.005)
    assert v3_plan["tflops_per_gpu_noncausal"] == pytest.approx(432, rel=0.005)
    assert v3_plan["mfu_causal"] == pytest.approx(0.3894, rel=0.005)
    assert v3_plan["mfu_noncausal"] == pytest.approx(0.4373, rel=0.005)


def test_mfu_input_roundtrips():
    out = plan(preset("dsv3"), gpu_spec("h800"), Layout(2048), 1e12, 4096, Throughput(mfu=0.3894))
    assert out["mfu_causal"] == pytest.approx(0.3894)
    assert out["gpu_hours"] == pytest.approx(1e12 * out["flops_per_token_causal"] / (0.3894 * 989.4e12) / 3600)


def test_measured_step_gives_the_published_tokens_per_day(capsys):
    """The V3 report's 19.926 s a step of 15,360 sequences of 4,096 tokens: 272.80B tokens/day, computed."""
    out = plan(preset("dsv3"), gpu_spec("h800"), Layout(2048, 16, 64, schedule="dualpipe"), 14.8e12, 4096,
               Throughput(step_seconds=19.926, batch_tokens=15360 * 4096))
    assert out["tokens_per_day"] / 1e9 == pytest.approx(272.80, abs=0.005)
    assert out["throughput_source"] == "step_seconds"
    with pytest.raises(FieldError, match="step_seconds"):  # past the peak: named as the flag that set it
        plan(preset("dsv3"), gpu_spec("h800"), Layout(2048), 1e12, 4096, Throughput(step_seconds=0.1,
                                                                                     batch_tokens=15360 * 4096))
    assert main(["plan", "--batch-size", "15360"]) == 2
    assert "--step-seconds: goes with --step-seconds and --batch-size both" in capsys.readouterr().err


def test_params_and_kv(v3_plan):
    assert v3_plan["total_params"] == pytest.approx(671e9, rel=0.002)
    assert v3_plan["activated_params"] == pytest.approx(37e9, rel=0.02)
    assert round(v3_plan["activated_params_without_embedding"] / 1e9) == 37  # DeepSeek's count: no lookup table
    assert v3_plan["kv_cache_bytes_per_token"] == 70272


def test_memory_layout(v3_plan):
    m = v3_plan["memory"]
    assert (m["pp"], m["ep"], m["dp"], m["expert_dp"], m["layers_per_stage"]) == (16, 64, 128, 2, 4)
    cfg = preset("dsv3")
    # DualPipe doubles parameters against 1F1B; ZeRO-1 divides optimizer states by the DP degree
    one = memory_per_gpu(cfg, Layout(2048, 16, 64, schedule="1f1b"), 4096, 80)
    assert m["params_per_gpu"] == 2 * one["params_per_gpu"]
    assert m["weights_gib"] * 2 == pytest.approx(m["gradients_gib"])  # BF16 weights, FP32 grads
    assert one["optimizer_gib"] < one["weights_gib"]  # sharded 8 bytes < replicated 2 bytes
    assert m["activations_gib"] == pytest.approx(one["activations_gib"] * 17 / 16)  # PP+1 vs PP
    full = activation_bytes_per_token_layer(cfg, moe=True, recompute=False)
    assert activation_bytes_per_token_layer(cfg, moe=True, recompute=True) < full / 2
    assert auto_layout(cfg, 2048) == (16, 64, "dualpipe")
    assert auto_layout(preset("tiny"), 8) == (1, 1, "1f1b")


@pytest.mark.parametrize("kw, field", [(dict(pp=3), "pp"), (dict(pp=16, ep=3), "ep"), (dict(pp=128), "pp")])
def test_bad_layout(kw, field):
    with pytest.raises(FieldError, match=f"^{field}: must") as e:
        memory_per_gpu(preset("dsv3"), Layout(2048, **kw), 4096, 80)
    assert e.value.field == field and "--" not in str(e.value)


def test_hardware_table():
    assert set(GPUS) == {"h800", "h100", "h200", "b200", "gb200"}
    assert gpu_spec("h800").nic_gb_s == 50.0
    assert gpu_spec("h800", {"bf16_tflops": "900"}).bf16_tflops == 900
    assert gpu_spec("gb200", {"gpus_per_node": "36"}).gpus_per_node == 36
    with pytest.raises(FieldError, match="^hw: unknown hardware field 'bogus'"):
        gpu_spec("h800", {"bogus": "1"})
    with pytest.raises(FieldError, match="^gpu: unknown GPU 'a100'"):
        gpu_spec("a100")


def test_pipeline_bubbles():
    F, B, W, PP = 1.0, 2.0, 1.0, 16
    assert schedule_cost("1f1b", PP, F, B, W).bubble == (PP - 1) * (F + B)
    assert schedule_cost("zb1p", PP, F, B, W).bubble == (PP - 1) * (F + B - 2 * W)
    dp = schedule_cost("dualpipe", PP, F, B, W, fb=2.5)
    assert dp.bubble == (PP / 2 - 1) * (2.5 + B - 3 * W)
    assert (dp.param_copies, dp.activation_microbatches) == (2, PP + 1)
    with pytest.raises(FieldError, match="^pp: must be even"):
        schedule_cost("dualpipe", 15)


@pytest.mark.parametrize("pp, m, f, b", [(4, 8, 1.0, 2.0), (8, 8, 1.5, 2.5), (3, 7, 1.0, 1.0)])
def test_1f1b_replay_matches_formula(pp, m, f, b):
    makespan, idle = simulate_1f1b(pp, m, f, b)
    assert makespan == pytest.approx(m * (f + b) + schedule_cost("1f1b", pp, f, b, 0).bubble)
    assert idle[0] == pytest.approx(schedule_cost("1f1b", pp, f, b, 0).bubble)


def test_v3_training_layout_fits_an_h800(v3_plan):
    """V3 trained with exactly this layout on 80 GB H800s; with its FP8 caching of expert and
    SwiGLU inputs (report 3.3.3) the estimate must fit (it claimed 83.5 GiB before)."""
    m = v3_plan["memory"]
    assert m["fits"] and m["total_gib"] < m["hbm_gib"] == 80
    cfg = preset("dsv3")
    f, k = cfg.moe_inter_dim, cfg.n_activated_experts + cfg.n_shared_experts
    fp8_cached = activation_bytes_per_token_layer(cfg, moe=True, recompute=True)
    bf16_swiglu_inputs = fp8_cached + k * 0.5 * 2 * f * 2  # the same with SwiGLU inputs in BF16
    # activations scale with the bytes a token saves: BF16 SwiGLU inputs would not fit (the 83.5 GiB it claimed)
    bf16_total = m["total_gib"] + m["activations_gib"] * (bf16_swiglu_inputs / fp8_cached - 1)
    assert bf16_total > m["hbm_gib"] and bf16_total == pytest.approx(83.5, abs=0.05)


def test_dualpipev_is_dualpipe_over_twice_the_stages_in_half_chunks():
    """DualPipeV on PP devices = DualPipe's row on 2 PP stages with chunk times half a stage's."""
    F, B, W, FB, PP = 1.0, 2.0, 0.8, 2.5, 4
    v = schedule_cost("dualpipev", PP, F, B, W, fb=FB)
    assert v.bubble == pytest.approx(schedule_cost("dualpipe", 2 * PP, F / 2, B / 2, W / 2, fb=FB / 2).bubble)
    assert (v.param_copies, v.activation_microbatches) == (1, PP + 0.5)
    assert bubble_fraction("1f1b", PP, 8, F, B, W) == pytest.approx((PP - 1) / (PP - 1 + 8))


def test_ep_must_divide_the_routed_experts():
    """EP 12 divides the 48 GPUs of a stage but not DeepSeek-V3's 256 experts."""
    with pytest.raises(FieldError, match="^ep: must divide the model's 256 routed experts"):
        validate_layout(preset("dsv3"), Layout(48, 1, 12))


def test_pp_may_equal_but_not_exceed_the_layers():
    """The boundary of 'pp <= layers' (61 for DeepSeek-V3)."""
    cfg = preset("dsv3")
    validate_layout(cfg, Layout(61, 61, 1))
    with pytest.raises(FieldError, match="^pp: must be <= the model's 61 layers"):
        validate_layout(cfg, Layout(62, 62, 1))


def test_one_stage_holds_embedding_and_head_both():
    """With pp == 1 the one stage holds the embedding and the output head (untied): params grow by
    2 x dim per added vocabulary entry; with pp > 1 the heaviest stage holds the larger one only (dim)."""
    cfg = preset("dsv3")
    wider = cfg.replace(vocab_size=cfg.vocab_size + 1000)
    for pp, per_entry in ((1, 2), (16, 1)):
        lay = Layout(2048, pp, 64)
        a = memory_per_gpu(cfg, lay, 4096, 80)["params_per_gpu"]
        b = memory_per_gpu(wider, lay, 4096, 80)["params_per_gpu"]
        assert b - a == per_entry * 1000 * cfg.dim, pp


def test_zero1_optimizer_state_per_gpu_does_not_depend_on_ep():
    """An expert's optimizer states are sharded over its expert_dp = dp / ep replicas, so each GPU holds
    (routed experts x layers) / dp of them whatever EP is: the ZeRO-1 optimizer bytes per GPU equal at EP 1 and 64."""
    cfg = preset("dsv3")
    one = memory_per_gpu(cfg, Layout(2048, 16, 1), 4096, 80)
    ep = memory_per_gpu(cfg, Layout(2048, 16, 64), 4096, 80)
    assert ep["optimizer_gib"] == pytest.approx(one["optimizer_gib"], rel=1e-12)
    assert ep["weights_gib"] < one["weights_gib"]  # while the weights themselves are split over EP


def test_mfu_range_is_half_open_and_measured_throughput_past_the_peak_is_refused():
    """``--mfu`` 1.0 is accepted (its range is (0, 1]); a measured throughput implying an MFU just over 100% is
    refused, not only one thousands of percent over."""
    cfg, h800 = preset("dsv3"), gpu_spec("h800")
    out = plan(cfg, h800, Layout(2048), 1e12, 4096, Throughput(mfu=1.0))
    assert out["mfu_causal"] == pytest.approx(1.0)
    over = out["tokens_per_day"] * 1.1  # MFU 110%
    with pytest.raises(FieldError, match="^tokens_per_day: .*implies MFU 110"):
        plan(cfg, h800, Layout(2048), 1e12, 4096, Throughput(tokens_per_day=over))
