"""Expert-parallel layout checks, wire formats and node-limited routing, in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flyer.config import ConfigError, preset
from flyer.model.dispatch import DISPATCHER_KINDS, LocalDispatcher, dispatcher_kind, weighted_sum
from flyer.model.moe import Gate
from flyer.model.transformer import Transformer
from flyer.model.wire import fp8_decode_rows, fp8_encode_rows, fp8_row_bytes
from flyer.parallel.dispatch import dispatcher_factory
from flyer.parallel.memory import saved_bytes
from flyer.parallel.launch import job_store
from flyer.parallel.mesh import LocalMesh, init_distributed, validate_layout
from flyer.train.build import build_model
from tests.child_env import child_env


@pytest.mark.parametrize("world,ep,rpn,msg", [
    (4, 3, 2, r"ep: must divide the world size 4 \(got 3\)"),
    (4, 2, 3, r"ranks_per_node: must divide the world size 4 \(got 3\)"),
    (6, 6, 6, r"ep: must divide n_routed_experts=16 \(got 6\)"),
    (8, 4, 8, None),  # EP group inside one node
    (8, 8, 2, None),  # 4 expert groups over 4 nodes
    (12, 4, 3, "ep: must be a multiple or a divisor of the 3 ranks per node"),
    (16, 16, 2, "n_expert_groups=4 to be a multiple of the 8 nodes"),  # a group would span 2 nodes
    (16, 16, 4, None),
])
def test_validate_layout(world, ep, rpn, msg):
    cfg = preset("tiny")  # 16 experts in 4 groups, 2 groups per token
    if msg is None:
        validate_layout(cfg, world, ep, rpn)
        return
    with pytest.raises(ConfigError, match=msg) as e:
        validate_layout(cfg, world, ep, rpn)
    assert "\n" not in str(e.value)


def test_layout_without_node_limit_or_experts():
    validate_layout(preset("tiny", n_limited_groups=4), 16, 16, 2)  # no node limit: any group count
    with pytest.raises(ConfigError, match="needs routed experts"):
        validate_layout(preset("qwen2.5-72b"), 2, 2, 2)


def test_init_distributed_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(preset("tiny"), ep=1) is None
    with pytest.raises(ConfigError, match="torchrun"):
        init_distributed(preset("tiny"), ep=2)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_init_distributed_device_choice_fails_before_rendezvous(monkeypatch):
    """--device cuda with fewer GPUs than local ranks, or a device index, is a one-line error
    raised before any process group is formed."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="cuda needs a GPU per local rank: 2 ranks"):
        init_distributed(preset("tiny"), ep=2, device="cuda")
    with pytest.raises(ConfigError, match="give auto, cpu or cuda"):
        init_distributed(preset("tiny"), ep=2, device="cuda:1")


_DESTROY = """
import os, torch, torch.distributed as dist
from flyer.config import preset
from flyer.parallel.mesh import destroy, init_distributed
from flyer.parallel.zero import zero_redundancy_optimizer

def gloo_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read())
        except OSError:  # the thread ended meanwhile
            pass
    return sum("gloo" in n for n in names)

mesh = init_distributed(preset("tiny"), device="cpu")
zero_redundancy_optimizer()  # imported once the group exists, as a sharded optimizer does
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # a class's default holds it too
dist.broadcast(torch.ones(4), 0, group=mesh.dp_group)
before = gloo_threads()
destroy(mesh)
print(before, gloo_threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_destroy_joins_the_groups_worker_threads():
    """``destroy`` left gloo's worker threads running for the life of the process: the mesh kept a handle on the
    default group, and so did torch.distributed.nn.functional's defaults when it was first imported after the group
    existed. A thread ending a collective's cleanup once the interpreter had begun to exit aborted the rank
    ("terminate called without an active exception"); torchrun then killed the others, at times before rank 0 had
    printed the run's error. The threads are joined by ``destroy`` now."""
    store = job_store()
    env = child_env(OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    done = subprocess.run([sys.executable, "-W", "error", "-c", _DESTROY], capture_output=True, text=True, env=env,
                          timeout=120)  # and no warning: torch's deprecated aliases warn when looked at
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split())
    assert before > 0 and after == 0, done.stdout

def test_dispatcher_factory_choices():
    cfg = preset("tiny")
    assert dispatcher_factory(cfg, None) is None  # the model's default local dispatcher
    assert isinstance(dispatcher_factory(cfg, None, fp8=True)(1), LocalDispatcher)
    with pytest.raises(ConfigError, match="dispatcher 'ring' is unknown"):
        dispatcher_factory(cfg, None, "ring")
    assert [dispatcher_kind(k) for k in ("a2a", "hier", *DISPATCHER_KINDS)] == ["flat", "hierarchical",
                                                                                *DISPATCHER_KINDS]


def test_fp8_rows_round_trip():
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 300)  # channel blocks of very different ranges
    b = fp8_encode_rows(x)
    assert b.dtype == torch.uint8 and b.shape == (7, fp8_row_bytes(300)) == (7, 300 + 3 * 4)
    y = fp8_decode_rows(b, 300)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for values near their block's amax
    blocks = torch.nn.functional.pad(x, (0, 84)).view(7, 3, 128).abs().amax(-1)
    bound = blocks.repeat_interleave(128, 1)[:, :300] * 2 ** -4 + 1e-30
    assert ((y - x).abs() <= bound).all()
    assert fp8_decode_rows(fp8_encode_rows(torch.zeros(2, 128)), 128).eq(0).all()


def test_fp8_dispatch_model_is_within_fp8_error():
    """The single-process model with FP8 dispatch / BF16 combine stays close to the FP32 one."""
    cfg = preset("tiny", vocab_size=256, n_layers=3)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    fp8 = Transformer(cfg, dispatcher_factory(cfg, None, "local", fp8=True))
    fp8.load_state_dict(ref.state_dict())
    x = torch.randint(0, 256, (2, 16))
    l_ref, l_fp8 = ref.compute_loss(x, x).loss, fp8.compute_loss(x, x).loss
    # the loss of a random model hardly moves (halving every dispatched row kept it within 1e-3): the gradients tell,
    # and the loss differing says the wire rounded
    assert float(l_ref.detach()) != float(l_fp8.detach())
    l_ref.backward()
    l_fp8.backward()
    for (n, a), b in zip(ref.named_parameters(), fp8.parameters()):
        err = float((a.grad - b.grad).norm() / a.grad.norm().clamp(min=1e-12))
        assert err < 0.05, (n, err)


def test_fp8_dispatch_rounds_only_an_expert_parallel_wire():
    """``fp8_dispatch`` on 2 data-parallel ranks (ep 1): no row crosses ranks, so the model computes as one process
    does, its experts reading their rows unrounded (it rounded them as an FP8 wire would)."""
    cfg = preset("tiny", vocab_size=256, n_layers=3)
    x = torch.randint(0, 256, (2, 16))
    one = build_model(cfg, LocalMesh(torch.device("cpu")), seed=1).compute_loss(x, x).loss
    dp2 = build_model(cfg, LocalMesh(torch.device("cpu"), world=2, dp=2), seed=1, fp8_dispatch=True)
    assert torch.equal(dp2.compute_loss(x, x).loss, one)


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
def test_node_limited_routing_reaches_at_most_m_nodes(limit):
    """Expert groups aligned to nodes (4 groups on 2 nodes, 4 on 4): a token's experts lie in at
    most n_limited_groups groups, hence on at most that many nodes."""
    cfg = preset("tiny", n_routed_experts=32, n_activated_experts=8, n_expert_groups=4, n_limited_groups=limit)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    gate.bias.normal_()
    _, ids, _ = gate(torch.randn(256, cfg.dim))
    for nodes in (2, 4):
        per_node = cfg.n_routed_experts // nodes
        nodes_hit = torch.zeros(256, nodes, dtype=torch.bool).scatter_(1, ids // per_node, True).sum(1)
        assert nodes_hit.max() <= min(limit, nodes)
    assert (torch.zeros(256, 4, dtype=torch.bool).scatter_(1, ids // 8, True).sum(1) == min(limit, 4)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_keeps_expert_outputs_in_their_own_dtype(dtype):
    """The dispatcher seam's combine (``weighted_sum``, every dispatcher's) gives what autograd gives for
    ``zeros.index_add(0, src, y.float() * w)``, bit for bit, keeping for backward the BF16 outputs, the weights and
    the index: not the FP32 copies autograd would keep (the weighted rows, and y's for w's gradient)."""
    torch.manual_seed(0)
    T, K, D = 40, 4, 96
    y = torch.randn(T * K, D).to(dtype)
    w = torch.rand(T * K, 1)
    src = torch.randperm(T * K) % T
    g = torch.randn(T, D)
    grads = []
    for fn in (lambda a, b: weighted_sum(a, b, src, T),
               lambda a, b: torch.zeros(T, D).index_add(0, src, a.float() * b)):
        a, b = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(a, b)
        out.backward(g)
        grads.append((out, a.grad, b.grad))
    for ours, autograd in zip(*grads):
        assert torch.equal(ours, autograd)
    a, b = y.clone().requires_grad_(), w.clone().requires_grad_()
    assert saved_bytes(lambda: weighted_sum(a, b, src, T)) == y.nbytes + w.nbytes + src.nbytes
    disp = LocalDispatcher(4)
    ctx = disp.dispatch(torch.randn(T, D), torch.randint(0, 4, (T, K)))[2]
    weights = torch.rand(T, K, requires_grad=True)
    # y, the picks' weights in dispatch order (FP32), the token and order indices (int64)
    assert saved_bytes(lambda: disp.combine(y.clone().requires_grad_(), weights, ctx)) == y.nbytes + T * K * (4 + 8 + 8)
