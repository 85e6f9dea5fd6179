"""Process-mesh, stage-split and memory-estimate edges a mutation sweep of ``flyer.parallel.mesh``, ``stages``,
``memory`` and ``overlap`` found unpinned: every rank's groups as the mesh's docstring defines them (with a
recording ``new_group``, no processes), backward groups, the mean over every rank, group handles dropped on
destroy, layout sizes below one, node-limited routing over two nodes, the device check of one local rank, exact
minimum layouts, heartbeats and ``max_int`` on two gloo ranks, the last stage's FLOPs from a model's parameters,
the split's tie-break, and where the activation estimate puts the experts, the head and the MTP blocks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flyer.config import ConfigError, preset
from flyer.errors import FieldError
from flyer.model.counts import layer_flops_per_token
from flyer.model.transformer import Transformer
from flyer.parallel.memory import activation_bytes, measure_state_bytes
from flyer.parallel.mesh import LocalMesh, build_mesh, destroy, init_distributed, init_mesh, validate_layout
from flyer.parallel.overlap import OverlapFB
from flyer.parallel.stages import end_flops, split_layers, validate_pipeline
from ranks import run_ranks
from test_pp_longcat import _cfg as longcat_cfg


# ---- build_mesh's rank arithmetic and group membership, with a recording new_group (no processes) --------------
def _fake_mesh(monkeypatch, world, pp, ep, rpn):
    """Every rank's Mesh, built with ``dist.new_group`` replaced by a recorder: a group is the tuple of its ranks.
    Returns (meshes by rank, the ordered list of group rank-lists each rank created)."""
    calls: dict[int, list[tuple[int, ...]]] = {}
    meshes = []
    for r in range(world):
        calls[r] = []
        monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None, _r=r: calls[_r].append(tuple(ranks))
                            or tuple(ranks))
        meshes.append(build_mesh(preset("tiny"), r, world, ep, rpn, torch.device("cpu"), "gloo", 60, pp))
    return meshes, calls


LAYOUTS = [(8, 1, 8, 4), (8, 2, 2, 4), (8, 1, 2, 4), (8, 2, 4, 2), (4, 2, 1, 2), (16, 2, 8, 2), (8, 1, 4, 1)]


@pytest.mark.parametrize("world,pp,ep,rpn", LAYOUTS)
def test_build_mesh_groups_follow_the_documented_layout(monkeypatch, world, pp, ep, rpn):
    """Each rank's indices and groups are those the module docstring defines: node-major nodes, stage-major
    PP x DP, EP groups of ``ep`` consecutive ranks, hierarchical inter (same local index, one per node) and intra
    (same node) groups, expert-DP groups (same EP rank in the stage), pipelines (same replica); groups of one
    rank are None, and every rank creates the same groups in the same order."""
    meshes, calls = _fake_mesh(monkeypatch, world, pp, ep, rpn)
    dp = world // pp
    L = min(ep, rpn)
    assert all(c == calls[0] for c in calls.values())  # one creation order on every rank
    assert all(len(g) >= 2 for g in calls[0])  # no group of a single rank

    def group(members):
        members = tuple(sorted(members))
        return members if len(members) >= 2 else None

    for r, m in enumerate(meshes):
        assert (m.rank, m.world, m.pp, m.dp, m.ep) == (r, world, pp, dp, ep)
        assert (m.pp_rank, m.dp_rank) == (r // dp, r % dp)
        assert (m.node, m.local_rank, m.n_nodes, m.ranks_per_node) == (r // rpn, r % rpn, world // rpn, rpn)
        assert all(m.node_of(x) == x // rpn for x in range(world))
        assert m.ep_rank == r % ep and m.ep_ranks == [r - r % ep + i for i in range(ep)]
        assert (m.ep_nodes, m.ep_ranks_per_node, m.ep_node) == (max(1, ep // rpn), L, (r % ep) // L)
        inter = [x for x in m.ep_ranks if x % L == r % L]  # same index on its node, one per node of the group
        intra = [x for x in m.ep_ranks if x // rpn == r // rpn]
        assert m.inter_ranks == inter and m.intra_ranks == intra
        assert r in inter and r in intra and len(inter) == m.ep_nodes and len(intra) == L
        if ep > 1:
            assert m.ep_group == group(m.ep_ranks) and m.inter_group == group(inter) and m.intra_group == group(intra)
        else:
            assert m.ep_group is None and m.inter_group is None and m.intra_group is None
        stage = [x for x in range(world) if x // dp == r // dp]
        assert m.dp_group is dist.group.WORLD if pp == 1 else m.dp_group == group(stage)
        if ep == 1:
            assert m.expert_dp_group is m.dp_group
        else:
            assert m.expert_dp_group == group([x for x in stage if x % ep == r % ep])
        assert m.pp_ranks == [x for x in range(world) if x % dp == r % dp]
        assert m.pp_group == (group(m.pp_ranks) if pp > 1 else None)


def test_backward_groups_are_a_second_copy_of_the_ep_groups(monkeypatch):
    """add_backward_groups creates, once, groups with the same members as ep/inter/intra_group."""
    meshes, calls = _fake_mesh(monkeypatch, 8, 1, 8, 4)
    m = meshes[5]
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None: ("bwd", tuple(ranks)))
    m.add_backward_groups()
    assert m.ep_group_bwd == ("bwd", m.ep_group) and m.inter_group_bwd == ("bwd", m.inter_group)
    assert m.intra_group_bwd == ("bwd", m.intra_group)
    first = m.ep_group_bwd
    m.add_backward_groups()  # a second call creates nothing
    assert m.ep_group_bwd is first


def test_mesh_mean_divides_by_every_rank(monkeypatch):
    """mean averages over all ranks (world), not over one stage's replicas: with pp 2 x dp 2 and every rank holding
    the same values, the mean is those values (the all-reduce sums world copies)."""
    meshes, _ = _fake_mesh(monkeypatch, 4, 2, 1, 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.mul_(4))
    assert meshes[3].mean({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}


def test_destroy_drops_every_group_handle_the_mesh_holds(monkeypatch):
    """destroy sets every *_group and *_group_bwd field to None (handles keep a group's threads alive)."""
    meshes, _ = _fake_mesh(monkeypatch, 8, 2, 4, 2)
    m = meshes[1]
    m.ep_group_bwd = m.inter_group_bwd = m.intra_group_bwd = ("bwd",)
    destroy(m)
    for name in ("ep_group", "expert_dp_group", "inter_group", "intra_group", "dp_group", "pp_group",
                 "ep_group_bwd", "inter_group_bwd", "intra_group_bwd"):
        assert getattr(m, name) is None, name


# ---- validate_layout's bounds -------------------------------------------------------------------------------
@pytest.mark.parametrize("world,ep,rpn,pp,field", [(0, 1, 1, 1, None), (4, 1, 0, 1, "ranks_per_node"),
                                                   (4, 1, -2, 1, "ranks_per_node"), (4, 1, 2, 0, "pp"),
                                                   (4, 1, 2, -1, "pp"), (4, 0, 2, 1, "ep")])
def test_validate_layout_refuses_sizes_below_one(world, ep, rpn, pp, field):
    """A world, ranks per node, pp or ep below 1 is a one-line ConfigError (naming the field), not a
    ZeroDivisionError or a layout accepted."""
    with pytest.raises(ConfigError) as e:
        validate_layout(preset("tiny"), world, ep, rpn, pp)
    assert "\n" not in str(e.value)
    if field is not None:
        assert isinstance(e.value, FieldError) and e.value.field == field


def test_node_limited_routing_with_an_ep_group_of_two_nodes():
    """An EP group of exactly 2 nodes under node-limited routing needs the expert-group count to be a multiple
    of 2: 3 groups over 2 nodes is refused, 4 accepted."""
    cfg = preset("tiny", n_routed_experts=12, n_expert_groups=3, n_limited_groups=1)
    with pytest.raises(FieldError, match="n_expert_groups=3 to be a multiple of the 2 nodes"):
        validate_layout(cfg, 4, 4, 2)
    validate_layout(preset("tiny", n_expert_groups=4, n_limited_groups=2), 4, 4, 2)


# ---- init_distributed / init_mesh at their boundaries -------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_a_machine_without_gpus_is_refused_for_a_single_local_rank(monkeypatch):
    """--device cuda with one local rank and no GPU is the one-line device error, before any rendezvous."""
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FieldError, match="cuda needs a GPU per local rank: 1 ranks"):
        init_distributed(preset("tiny"), device="cuda")


def test_init_mesh_under_a_world_of_one_is_local(monkeypatch):
    """A launch with WORLD_SIZE=1 and neither ep nor pp is the single-process LocalMesh (no process group)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert isinstance(init_mesh(preset("tiny"), device="cpu"), LocalMesh)


# ---- validate_pipeline at its boundaries ---------------------------------------------------------------------
@pytest.mark.parametrize("schedule,pp,mb", [("1f1b", 4, 4), ("dualpipev", 2, 4), ("interleaved", 2, 4),
                                            ("zb", 2, 4)])
def test_the_exact_minimum_layout_is_accepted(schedule, pp, mb):
    """As many stages as layers, and exactly the schedule's minimum micro-batches, are accepted (tiny: 4 layers)."""
    cfg = preset("tiny")
    assert cfg.n_layers == 4
    validate_pipeline(cfg, pp, schedule, mb)
    assert len(split_layers(cfg, 4, 64)) == 4


def test_a_model_of_exactly_as_many_pairs_as_stages_is_accepted():
    """shortcut_moe: 2 x stages blocks (one pair per stage) is enough."""
    validate_pipeline(longcat_cfg(n_layers=4), 2, "1f1b", 2)


# ---- heartbeats and max_int over real gloo ranks --------------------------------------------------------------
BEAT_S = 1.0  # a beat every second: silent_ranks watches 3 s, three beats of a live rank (slack for a loaded host)


def _beat_worker(rank: int) -> dict:
    mesh = init_distributed(preset("tiny"), timeout_s=60, device="cpu")
    out = {"max": mesh.max_int(10 * rank + 3)}
    mesh.start_heartbeat(BEAT_S)
    mesh.barrier()
    out["all_alive"] = mesh.silent_ranks(BEAT_S)
    mesh.barrier()
    if rank == 1:  # rank 1 stops beating, as a rank that hangs
        stop, thread = mesh.heartbeat
        stop.set()
        thread.join()
    mesh.barrier()
    out["one_stopped"] = mesh.silent_ranks(BEAT_S)
    mesh.barrier()
    mesh.destroy()
    return out


def test_max_int_and_silent_ranks_on_two_ranks():
    """max_int is the largest value of any rank; silent_ranks names no rank while all beat and exactly the rank
    whose heartbeat stopped once one does."""
    res = run_ranks(_beat_worker, 2)
    for r in res:
        assert r["max"] == 13
        assert r["all_alive"] == []
        assert r["one_stopped"] == [1]


# ---- the last stage's FLOPs, from the modules it holds --------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_end_flops_are_six_per_weight_of_the_last_stages_modules(name):
    """Without MTP, end_flops is 6 training FLOPs per GEMM weight of the output head (and of hc_head's collapse,
    its fn, with hyper-connections: its base and scale are no GEMM, as ``training_flops_per_token`` counts them),
    2 in the indexers' warm-up (frozen): counted from the parameters of a meta-device model, not from the formula
    (exact)."""
    cfg = preset(name, mtp_depth=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    head = model.head.weight.numel()
    if cfg.hc_mult > 1:
        head += model.hc_head.fn.numel()
    assert (cfg.hc_mult > 1) == (name == "tiny-v4")
    assert end_flops(cfg, 64) == end_flops(cfg, 64, "sparse") == 6 * head
    assert end_flops(cfg, 64, "warmup") == 2 * head


def test_split_ties_go_to_the_later_cut():
    """Among splits with the same largest-stage FLOPs the later cut wins (later stages lighter): 4 equal MoE
    blocks, a head lighter than one block, 3 stages: [0, 1], [2], [3] and [0], [1, 2], [3] both peak at two blocks;
    the split is the first (exact: integer FLOP counts)."""
    cfg = preset("tiny", vocab_size=256, n_layers=4, n_dense_layers=0, mtp_depth=0)
    cost = [layer_flops_per_token(cfg, 64, i) for i in range(4)]
    assert len(set(cost)) == 1 and end_flops(cfg, 64) < cost[0]
    assert split_layers(cfg, 3, 64) == [range(0, 2), range(2, 3), range(3, 4)]


def test_as_many_full_indexer_layers_as_stages_is_accepted():
    """indexer_types (GLM-5's shared indexers): a stage starts at a 'full' layer, so exactly as many full layers
    as stages is enough, one fewer is refused naming pp."""
    cfg = preset("tiny", index_topk=8, indexer_types=("full", "shared", "full", "shared"))
    validate_pipeline(cfg, 2, "1f1b", 2)
    assert [r.start for r in split_layers(cfg, 2, 64)] == [0, 2]
    with pytest.raises(FieldError, match="indexer_types marks 2 'full'"):
        validate_pipeline(cfg, 3, "1f1b", 3)


# ---- activation estimate: where the pieces sit -----------------------------------------------------------------
def test_activation_estimate_counts_this_ranks_share_of_the_expert_weights():
    """The routed experts' saved GEMM weights are the rank's 1/ep of them: going from ep 1 to 2 saves twice what
    going from 2 to 4 does, and something (tiny: 16 experts; int() truncation: at most 1 byte each)."""
    cfg = preset("tiny")
    a = [activation_bytes(cfg, 1, 0, "1f1b", 64, 1, "bf16", ep) for ep in (1, 2, 4)]
    assert a[0] - a[1] > 0
    assert abs((a[0] - a[1]) - 2 * (a[1] - a[2])) <= 3


def test_activation_estimate_puts_the_heads_and_mtp_on_the_last_stage():
    """1F1B on 2 ranks, 2 blocks (one a stage, forced): the first stage keeps 2 micro-batches in flight, the last
    one, so rank 0's half plus rank 1's is the one-process estimate (int(): within 2 bytes); the MTP blocks are the
    last stage's: adding one leaves rank 0 unchanged and grows rank 1."""
    def act(depth, pp, rank):
        return activation_bytes(preset("tiny", n_layers=2, mtp_depth=depth), pp, rank, "1f1b", 64, 1, "bf16")

    for depth in (0, 1):
        assert abs(act(depth, 2, 0) / 2 + act(depth, 2, 1) - act(depth, 1, 0)) <= 2
    assert act(1, 2, 0) == act(0, 2, 0) and act(1, 2, 1) > act(0, 2, 1)


def test_measured_gradient_bytes_count_only_existing_gradients():
    """measure_state_bytes counts the gradients that exist (a parameter without one adds nothing), the parameters
    each once, and every tensor of the optimizer state (exact byte counts)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2, bias=False))
    model[0].weight.grad = torch.zeros(5, 3)
    model[1].weight.grad = torch.zeros(2, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = measure_state_bytes(model, opt)
    assert got == {"param_bytes": 4 * (15 + 5 + 10), "grad_bytes": 4 * (15 + 10), "optimizer_bytes": 0}


def test_overlap_keeps_the_most_chunks_computed_at_once():
    """``OverlapFB.max_concurrent`` is the evidence that a forward and a backward computed at the same moment: the
    most at any time, kept after the overlap ends (a later lone chunk does not lower it)."""
    fb = OverlapFB()
    with fb._computing():
        with fb._computing():
            assert fb.max_concurrent == 2
    with fb._computing():
        pass
    assert fb.max_concurrent == 2 and fb._active == 0
