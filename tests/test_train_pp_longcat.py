"""`flyer train --pp 2` on a tiny LongCat-Flash (``shortcut_moe``, zero-computation experts) under torchrun (gloo,
CPU) against one process with ``--grad-accum`` = the micro-batches (the same batches), over two steps: the loss terms,
the gradient norm, the expert loads the trainer gathers from both stages (the pairs' shortcut MoEs, their identity
columns too) and the router statistics over both; and the same with LongCat's MTP module (mtp_depth 1) on the last
stage, its loss among the terms.

Tolerance as ``tests/test_train_pp.py`` derives it: the learning rate is tiny, so at step 1 (the same weights) the
loss terms differ by the FP32 summation order alone (FP32_TOL relative) and at step 2 by that plus the weights' drift
(as its ``_loss_bound``); the gradient norm by FP32_TOL relative (the drift moves the gradient by ~1e-7 of it). The
expert loads are token counts: equal unless a routing decision ties within 1e-7 (not modelled, as there).
"""

from __future__ import annotations

import math
from pathlib import Path

from test_train_pp import FP32_TOL, LR, WD, _records, _run, _torchrun

from flyer.cli import main

STEPS, M = 2, 2
# tests/test_pp_longcat.py's shapes, 4 blocks (2 pairs: one a stage)
MODEL = dict(dim=64, n_layers=4, n_heads=4, inter_dim=96, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=8, n_zero_experts=4,
             n_activated_experts=3, n_dense_layers=0, shortcut_moe=True, score_func="softmax", router_bias=True,
             norm_topk_prob=False, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0, route_scale=1.5,
             mtp_depth=0)
BATCH, SEQ_LEN = 2, 32  # rows a micro-batch, tokens a row
N_PARAMS = 0.3e6 * 1.2  # "0.3M params" in the log, rounded up (the MTP module's 0.04M too)


def _toml(path: Path, model: dict = MODEL) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)

    path.write_text("[model]\n" + "".join(f"{k} = {value(v)}\n".replace("'", '"') for k, v in model.items()))
    return str(path)


def _args(out: Path, cache: str, config: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--config", config, "--vocab-size", "512", "--batch-size", str(BATCH),
            "--seq-len", str(SEQ_LEN), "--steps", str(STEPS), "--lr", str(LR), "--warmup", "0", "--schedule",
            "constant", "--precision", "fp32", "--eval-every", "100", "--ckpt-every", "100", "--threads", "1",
            "--no-progress", "--no-plots", "--data-cache", cache, "--out", str(out), "--device", "cpu",
            "--collective-timeout", "120", *extra]


def check_steps(got: dict[int, dict], one: dict[int, dict], model: dict = MODEL, n_params: float = N_PARAMS) -> None:
    """A distributed run's metrics records ``got`` against the one-process run's ``one`` of ``model`` (``n_params``
    parameters at most), step by step: the loss terms within FP32_TOL plus the weights' drift (the module docstring),
    the gradient norm within FP32_TOL, the expert loads (a list per shortcut MoE, a count per routing column, identity
    picks among them) and the router statistics equal, the balance loss on, and with an MTP module its loss too."""
    assert sorted(got) == sorted(one) == list(range(1, STEPS + 1))
    grad = 2 * max(r["grad_norm"] for x in (got, one) for r in x.values())
    for step in one:
        drift = math.sqrt(n_params) * grad * 2 * (step - 1) * LR * (1 + WD)
        for key in ("loss", "main_loss", "aux_loss") + (("mtp_loss",) if model["mtp_depth"] else ()):
            bound = FP32_TOL * abs(one[step][key]) + drift
            assert abs(got[step][key] - one[step][key]) <= bound, (step, key, got[step][key], one[step][key], bound)
        # every gradient counted once (a stage's, a mirror's): the norm as one process's, the weights' drift moving
        # it by far less than the FP32 summation order does (tests/test_train_pp.py)
        norm = (got[step]["grad_norm"], one[step]["grad_norm"])
        assert abs(norm[0] - norm[1]) <= FP32_TOL * norm[1], (step, "grad_norm", *norm)
        loads = one[step]["expert_load"]
        assert len(loads) == model["n_layers"] // 2 and all(sum(x[8:]) > 0 for x in loads)  # identity picks
        assert got[step]["expert_load"] == loads, step
        for key in ("load_imbalance", "bias_min", "bias_max"):
            assert got[step][key] == one[step][key], (step, key)
        assert got[step]["aux_loss"] > 0 and (got[step]["mtp_loss"] > 0) == (model["mtp_depth"] > 0)


def test_pp2_equals_one_process_with_grad_accum(tmp_path, data_cache):
    config = _toml(tmp_path / "longcat.toml")
    err = _run(_torchrun(2, "--standalone") + _args(tmp_path / "pp", data_cache, config, "--pp", "2",
                                                    "--micro-batches", str(M))).stderr
    assert "PP 2 x DP 1, EP 1, 1f1b over 2 micro-batches" in err, err[-3000:]
    assert main(["train", *_args(tmp_path / "one", data_cache, config, "--grad-accum", str(M))]) == 0
    pp, one = _records(tmp_path / "pp"), _records(tmp_path / "one")
    check_steps(pp, one)  # the router statistics over both stages' MoE layers, not rank 0's alone
    first = [one[step]["expert_load"][0] for step in one]  # stage 0's layer: its imbalance alone would show
    assert any(max(x) * len(x) / sum(x) != one[step]["load_imbalance"] for step, x in zip(one, first))


def test_pp2_with_the_mtp_module_equals_one_process(tmp_path, data_cache):
    """LongCat-Flash's MTP module (mtp_depth 1: an MLA block with a dense FFN, no shortcut MoE) on the last stage,
    reading a mirror of the embedding there (1F1B's loop placement): its loss and the total within the bound too."""
    model = {**MODEL, "mtp_depth": 1}
    config = _toml(tmp_path / "longcat.toml", model)
    err = _run(_torchrun(2, "--standalone") + _args(tmp_path / "pp", data_cache, config, "--pp", "2",
                                                    "--micro-batches", str(M))).stderr
    assert "PP 2 x DP 1, EP 1, 1f1b over 2 micro-batches" in err, err[-3000:]
    assert main(["train", *_args(tmp_path / "one", data_cache, config, "--grad-accum", str(M))]) == 0
    check_steps(_records(tmp_path / "pp"), _records(tmp_path / "one"), model)
