"""DeepSeek-V3's recomputation of the MLA up-projections (``flyer.model.recompute``, ``flyer train --recompute
mla``): the same loss and gradients bit for bit, in every precision, with and without a query LoRA, on packed rows;
what one forward keeps alive (``flyer.parallel.memory.held_bytes``: the storages its ops made that are still alive,
which sees what the checkpoint keeps outside autograd's hooks, ``saved_bytes``) loses at least the per-head q, k and
v the estimate leaves out; a run resumed with it on trains the same steps as one without."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from test_run_safety import steps_logged, train_argv

from flyer import kernels
from flyer.cluster.costs import mla_attention_saved_bytes
from flyer.cli import main
from flyer.config import preset
from flyer.fp8 import convert_to_fp8
from flyer.model import lowp
from flyer.model.indexer_loss import set_indexer_training
from flyer.model.recompute import recompute_line, recomputed, set_recompute
from flyer.model.transformer import Transformer
from flyer.parallel.memory import activation_bytes, held_bytes, saved_bytes
from flyer.runtime import CPU_KINDS, assume_cpu, cpu_kind
from flyer.train.metrics import read_metrics

B, T = 2, 64


def _step(model, precision, tokens, docs):
    """(loss, every gradient, bytes autograd keeps beside the parameters) of one training step."""
    ctx = torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32")
    model.zero_grad(set_to_none=True)
    with ctx:
        kept = held_bytes(lambda: model.compute_loss(tokens, tokens, documents_BT=docs), model)
    with ctx:
        loss = model.compute_loss(tokens, tokens, documents_BT=docs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kept


DSA = dict(index_topk=8, index_n_heads=4, index_head_dim=32)  # T = 64: masked under autograd (dsa_gathers)
GLM5 = dict(DSA, indexer_types=("full", "shared", "full", "shared"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("over", [{}, {"q_lora_rank": 0}, "packed", DSA, GLM5, "packed DSA"],
                         ids=["mla", "no-q-lora", "packed", "dsa", "glm5", "packed-dsa"])
def test_recompute_keeps_every_gradient_and_drops_the_per_head_qkv(precision, over):
    """Dense MLA layers, and DSA layers (V3.2's and GLM-5's shared ones) in their masked form, whose selection's mask
    the region keeps: the same loss and gradients, and at least the per-head q, k and v fewer bytes kept. A DSA
    layer on packed rows recomputes nothing (its documents run a group at a time): the same bytes."""
    packed = isinstance(over, str) and over.startswith("packed")
    cfg = preset("tiny").replace(**(DSA if over == "packed DSA" else {} if packed else over))
    torch.manual_seed(0)
    model = Transformer(cfg)
    if precision == "fp8":
        convert_to_fp8(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    docs = torch.arange(T).div(24, rounding_mode="floor").expand(B, T).contiguous() if packed else None
    assert set_recompute(model, "none") == cfg.n_layers + cfg.mtp_depth
    if precision == "fp8":  # the tables FP8 makes once a process, before either measurement
        _step(model, precision, tokens, docs)
    loss, grads, kept = _step(model, precision, tokens, docs)
    set_recompute(model, "mla")
    loss2, grads2, kept2 = _step(model, precision, tokens, docs)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
        hooked = saved_bytes(lambda: model.compute_loss(tokens, tokens, documents_BT=docs), model)
    # the checkpoint keeps its inputs and the attention's outputs out of the hooks' sight
    assert hooked < kept2 or over == "packed DSA"
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), [n for n in grads if not torch.equal(grads[n],
                                                                                                       grads2[n])]
    # SDPA keeps q, k and v (v padded to q's width, 48 > 32) in the compute dtype: none of them is kept now
    element = 4 if precision == "fp32" else 2
    qkv = B * T * cfg.n_heads * 3 * cfg.qk_head_dim * element * (cfg.n_layers + cfg.mtp_depth)
    assert kept - kept2 >= qkv if over != "packed DSA" else kept == kept2, (kept, kept2, qkv)


def test_the_log_line_says_which_layers_recompute():
    """DSA layers recompute as dense MLA's do, but not while their indexers train; a model without MLA has none."""
    cfg = preset("tiny").replace(**DSA)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert set_recompute(model, "mla") == cfg.n_layers + cfg.mtp_depth == 5
    assert recompute_line(model) == "recompute: 5 MLA layers' latent norms and up-projections in backward"
    set_indexer_training(model, "sparse")
    assert recompute_line(model) == ("recompute: none: 5 DSA layers training their indexers keep theirs (L_I reads "
                                     "the queries and keys)")
    with torch.device("meta"):
        v4 = Transformer(preset("tiny-v4"))
    assert set_recompute(v4, "mla") == 0 and recompute_line(v4) == "recompute: this model has no MLA layer: nothing is"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("over", [{}, DSA, GLM5], ids=["mla", "dsa", "glm5"])
def test_recompute_keeps_the_loss_on_cuda(precision, over):
    """On a GPU (its fused attention kernels; its FP32 norms without autograd take torch's fused kernel, which the
    indexer's query latent must not), dense MLA and DSA layers give the same loss with recomputation, so the same
    selections, bit for bit. Dense FFNs and no MTP: the routed experts' atomic adds would vary any two runs, as the
    fused attention's backward does their gradients."""
    cfg = preset("tiny").replace(n_dense_layers=preset("tiny").n_layers, mtp_depth=0, **over)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).cuda()
    losses = []
    for mode in ("none", "mla"):
        set_recompute(model, mode)
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            loss = model.compute_loss(tokens, tokens).loss
        loss.backward()  # the recomputation runs
        losses.append(loss.detach())
    assert torch.equal(*losses)


def _switches() -> tuple:
    return lowp._forced.get(), kernels.cpu_ops() is None, cpu_kind()


def test_the_recomputation_runs_under_the_forwards_switches():
    """flyer's switches (``assume_cpu``, ``lowp.emulation``, ``kernels.disabled``) set around a forward hold when
    autograd recomputes it, after their blocks closed (the recomputation saw the defaults), and in a region of the
    indexer losses' plain checkpoint too."""
    for selective in (True, False):
        seen = []

        def region(x):
            seen.append(_switches())
            return x.sin()

        x = torch.randn(4, requires_grad=True)
        assumed = next(k for k in CPU_KINDS if k != cpu_kind())
        with assume_cpu(assumed), lowp.emulation(True), kernels.disabled():
            y = recomputed(region, x, selective=selective)
        y.sum().backward()
        assert seen == [(True, True, assumed)] * 2, seen
        assert torch.equal(x.grad, x.detach().cos())


def test_a_region_that_backpropagates_inside_itself_recomputes():
    """A region whose forward takes a gradient inside it (torch's non-reentrant checkpoint recomputes it then, while
    the forward runs) works as under plain ``checkpoint``: each run of the region gets a context of its own (one
    shared context cannot be entered twice)."""
    def region(x):
        return torch.autograd.grad(x.sin().exp().sum(), x, create_graph=True)[0]

    grads = []
    for how in (lambda x: checkpoint(region, x, use_reentrant=False), lambda x: recomputed(region, x, selective=False)):
        x = torch.arange(4.0, requires_grad=True)
        how(x).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("emulate", [True, False])
def test_a_recomputed_model_backward_outside_its_switches_equals_one_inside(emulate):
    """BF16 autocast, the emulation forced one way around the forward: the MLA regions recomputed in a backward run
    after the block (under the other way) give the gradients of a backward run inside it, bit for bit."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    set_recompute(model, "mla")
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    grads = []
    for inside in (True, False):
        model.zero_grad(set_to_none=True)
        with lowp.emulation(emulate):
            with torch.autocast("cpu", torch.bfloat16):
                loss = model.compute_loss(tokens, tokens).loss
            if inside:
                loss.backward()
        if not inside:
            with lowp.emulation(not emulate):  # what the backward's own GEMMs run under: not the recomputation
                loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]), [n for n in grads[0]
                                                                         if not torch.equal(grads[0][n], grads[1][n])]


def test_the_estimate_saves_no_more_than_recompute_does():
    """The estimate with ``recompute="mla"`` stays under what one FP32 forward keeps, and what it takes off per
    token (the MLA layers' q, k, v, their normed latents and the norms' inverse RMS) is what the measurement loses
    per token (batch 2 less batch 1), to the byte."""
    cfg = preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    measured, estimated = {}, {}
    for mode in ("none", "mla"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        set_recompute(model, mode)
        measured[mode] = [held_bytes(lambda: model.compute_loss(tokens[:b], tokens[:b]), model) for b in (1, 2)]
        estimated[mode] = [activation_bytes(cfg, 1, 0, "1f1b", T, b, "fp32", recompute=mode) for b in (1, 2)]
        assert all(e <= m for e, m in zip(estimated[mode], measured[mode]))
    slope = {k: {m: v[m][1] - v[m][0] for m in v} for k, v in (("measured", measured), ("estimated", estimated))}
    dropped = slope["estimated"]["none"] - slope["estimated"]["mla"]
    per_layer = cfg.n_heads * 3 * cfg.qk_head_dim * 4 + (cfg.q_lora_rank + cfg.kv_lora_rank) * 4 + 2 * 4  # v padded
    assert per_layer == mla_attention_saved_bytes(cfg, 4) - mla_attention_saved_bytes(cfg, 4, recompute_up=True)
    assert dropped == per_layer * (T * cfg.n_layers + sum(T - k for k in range(1, cfg.mtp_depth + 1)))  # MTP: T - k
    assert slope["measured"]["none"] - slope["measured"]["mla"] == dropped


def test_a_run_resumed_with_recompute_trains_the_same_steps(tmp_path, data_cache, capsys):
    """Two steps without, two resumed with ``--recompute mla`` (a memory choice: free on a resume): the losses of
    all four are those of a run without it, bit for bit."""
    assert main(train_argv(tmp_path / "plain", data_cache)) == 0
    argv = train_argv(tmp_path / "mixed", data_cache)
    at = argv.index("--steps") + 1
    assert main([*argv[:at], "2", *argv[at + 1:]]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--recompute", "mla"]) == 0
    assert "recompute: 5 MLA layers' latent norms and up-projections in backward" in capsys.readouterr().err
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
              for run in ("plain", "mixed")]
    assert losses[0] == losses[1] and steps_logged(tmp_path / "mixed") == [1, 2, 3, 4]


def test_a_runs_log_line_says_its_dsa_layers_training_indexers_keep_theirs(tmp_path, data_cache, capsys):
    """``--indexer-train sparse --recompute mla`` on DSA layers: the run's line says none recompute (it was logged
    before the indexers' training was set, and said all five did)."""
    config = tmp_path / "dsa.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in DSA.items()))
    argv = train_argv(tmp_path / "run", data_cache, "--config", str(config), "--indexer-train", "sparse",
                      "--recompute", "mla")
    at = argv.index("--steps") + 1
    assert main([*argv[:at], "1", *argv[at + 1:]]) == 0
    assert ("recompute: none: 5 DSA layers training their indexers keep theirs (L_I reads the queries and keys)"
            in capsys.readouterr().err)


def test_an_unknown_recompute_is_one_line(tmp_path, data_cache, capsys):
    assert main(train_argv(tmp_path, data_cache, "--recompute", "full")) == 2
    assert capsys.readouterr().err.strip() == "flyer: error: --recompute: must be one of none, mla (got 'full')"


def test_a_split_backward_is_refused(tmp_path, data_cache, capsys):
    """Zero-bubble and DualPipeV split backward into the input gradients, then the weights' (``torch.distributed.
    pipelining``'s ``stage_backward_input`` / ``_weight``, the latter once per parameter group): the selective
    checkpoint refuses a second backward (here the embedding output's gradient first, then the parameters'), and a
    whole-region checkpoint recomputed each layer 5 times. ``flyer train`` refuses the pair in one line."""
    cfg = preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    model = Transformer(cfg)
    set_recompute(model, "mla")
    seen = []
    model.embed.register_forward_hook(lambda _m, _i, out: seen.append(out))
    loss = model.compute_loss(tokens, tokens).loss
    torch.autograd.grad(loss, seen[0], retain_graph=True)
    with pytest.raises(RuntimeError, match="backward an extra time"):
        loss.backward()
    for schedule in ("zb", "dualpipev"):
        assert main(train_argv(tmp_path / schedule, data_cache, "--recompute", "mla", "--pp", "2", "--pp-schedule",
                               schedule)) == 2
        assert capsys.readouterr().err.strip() == (
            "flyer: error: --recompute: is not taken with --pp-schedule zb or dualpipev: their split weight backward "
            "would recompute each MLA layer once per parameter group (5 times); use 1f1b or interleaved (got 'mla')")


def test_held_bytes_counts_what_the_function_made_alive():
    """A view or an in-place result of a tensor made before is not the function's memory (a slice of a 4 MiB
    tensor counted 4 MiB); a new tensor, or a view of one the function made, is."""
    big = torch.zeros(1 << 20)
    assert held_bytes(lambda: big[:1]) == 0 and held_bytes(lambda: big.add_(1)) == 0
    assert held_bytes(lambda: (big + 1)[:1]) == big.nbytes
    assert held_bytes(lambda: [big * 2 for _ in range(3)][0]) == big.nbytes  # the two others are freed


def test_flyer_plan_estimates_a_recompute_run(capsys):
    """``flyer plan``'s per-rank activation estimate of a ``--recompute mla`` run is the one ``flyer train`` checks
    memory against (it had no such flag: the plan said 136 MB where the run's check used 115 MB)."""
    import json

    cfg = preset("tiny")
    got = {}
    for mode in ("none", "mla"):
        assert main(["plan", "--preset", "tiny", "--gpus", "1", "--precision", "bf16", "--recompute", mode,
                     "--json"]) == 0
        got[mode] = json.loads(capsys.readouterr().out)["activation_bytes_per_rank_estimate"]
        assert got[mode] == [activation_bytes(cfg, 1, 0, "1f1b", 4096, 1, "bf16", recompute=mode)]
    assert got["mla"][0] < got["none"][0]
    assert main(["plan", "--preset", "tiny", "--gpus", "1", "--recompute", "full"]) == 2
    assert capsys.readouterr().err.strip() == "flyer: error: --recompute: must be one of none, mla (got 'full')"
    for schedule in ("zb", "dualpipev"):  # as flyer train refuses it: no plan for a run that cannot start
        assert main(["plan", "--preset", "tiny", "--gpus", "2", "--pp", "2", "--pp-schedule", schedule,
                     "--recompute", "mla"]) == 2
        assert capsys.readouterr().err.strip().startswith(
            "flyer: error: --recompute: is not taken with --pp-schedule zb or dualpipev")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--ep", "2"), ("--pp", "2", "--pp-schedule", "1f1b")], ids=["ep2", "pp2_1f1b"])
def test_parallel_runs_with_recompute_train_the_same_steps(tmp_path, data_cache, layout):
    """Two gloo ranks, expert-parallel (its dispatch collectives inside the recomputed layers' blocks) or a 1F1B
    pipeline (torch.distributed.pipelining's backward): the losses with ``--recompute mla`` are those without, bit for
    bit."""
    from test_run_safety import _torchrun

    losses = []
    for mode in ("none", "mla"):
        out = tmp_path / mode
        done = _torchrun(train_argv(out, data_cache, "--steps", "3", "--batch-size", "4", *layout, "--recompute", mode))
        assert done.returncode == 0, done.stderr[-3000:]
        losses.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    assert losses[0] == losses[1] and len(losses[0]) == 3
