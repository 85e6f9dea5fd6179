"""Expert-parallel dispatch and gradient/state edges a mutation sweep of ``flyer.parallel.dispatch`` and
``flyer.parallel.grads`` found unpinned: the traffic counters (forward dispatch rows, metadata apart, per rank under
skewed routing, reset), the dispatcher's divisibility check, coalesced buckets of one dtype, clipping that only
scales down, refused stacks of another size and parameters the build lacks, buffers drawn at init, and on gloo
ranks: expert replicas broadcast from their own group, averaged gradients with missing ones zero-filled, rank 0's
checkpoint state and the first replica's weight parts, and pipeline stages' own source and gather ranks."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flyer.config import ConfigError, preset
from flyer.model.moe import MoE
from flyer.model.transformer import Transformer
from flyer.parallel import grads
from flyer.parallel.dispatch import CommCounter, comm_stats, dispatcher_factory, make_dispatcher
from flyer.parallel.mesh import Mesh, init_distributed
from ranks import run_ranks


def _counter() -> CommCounter:
    c = CommCounter()
    rows = torch.zeros(5, 8)  # 32 bytes a row
    kinds = ["self", "intra", "inter"]
    c.add("dispatch", [1, 2, 3], kinds, rows)
    c.add("dispatch_grad", [10, 20, 30], kinds, rows)
    c.add("combine", [100, 200, 300], kinds, rows.bfloat16())  # 16 bytes a row
    c.add("dispatch_meta", [7, 5, 11], kinds, torch.zeros(4, 4, dtype=torch.int32))  # 16 bytes a row
    c.add("combine_meta", [1, 1, 2], kinds, torch.zeros(3, 1))  # 4 bytes a row
    return c


def test_counter_summary_counts_forward_dispatch_rows_and_keeps_metadata_apart():
    """Tokens are the forward dispatch's rows sent off the rank; bytes the payload phases', metadata apart."""
    s = _counter().summary()
    # tokens: forward dispatch's rows only, self rows not counted
    assert s["intra_node_tokens"] == 2 and s["inter_node_tokens"] == 3
    # payload bytes: dispatch + dispatch_grad + combine (not the *_meta phases)
    assert s["intra_node_bytes"] == 2 * 32 + 20 * 32 + 200 * 16
    assert s["inter_node_bytes"] == 3 * 32 + 30 * 32 + 300 * 16
    assert s["intra_node_meta_bytes"] == 5 * 16 + 1 * 4
    assert s["inter_node_meta_bytes"] == 11 * 16 + 2 * 4
    assert s["phases"]["dispatch"]["intra_node_tokens"] == 2


def test_comm_stats_resets_the_counters_unless_told_not_to():
    """``comm_stats`` sums every MoE layer's counters, and resets them unless ``reset=False``."""
    cfg = preset("tiny", vocab_size=64, n_layers=2, max_seq_len=16, original_seq_len=16)
    model = Transformer(cfg)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes
    for i, m in enumerate(moes):
        m.dispatcher.counter = _counter()
        m.dispatcher.layer_id = i
    want = _counter().summary()
    kept = comm_stats(model, reset=False)
    assert kept["inter_node_bytes"] == len(moes) * want["inter_node_bytes"] > 0
    first = comm_stats(model)  # reset=True by default
    assert first["inter_node_bytes"] == kept["inter_node_bytes"]
    assert [layer["layer"] for layer in first["layers"]] == list(range(len(moes)))
    after = comm_stats(model)
    assert all(after[k] == 0 for k in after if k != "layers"), after


def _tiny():
    return Transformer(preset("tiny", vocab_size=64, n_layers=2, max_seq_len=16, original_seq_len=16))


def test_coalesced_buckets_never_mix_dtypes():
    """A bucket is one flat tensor: mixing int64 and float32 would round the integers through float32."""
    a = torch.randn(3)
    b = torch.tensor([2**40 + 1, -(2**30) - 3], dtype=torch.int64)  # not representable in float32
    c = torch.randn(2)
    assert [[t.dtype for t in bk] for bk in grads._buckets([a, b, c])] == [[torch.float32], [torch.int64],
                                                                          [torch.float32]]
    b0 = b.clone()
    grads._coalesced([a, b, c], lambda flat: None)  # an identity collective
    assert torch.equal(b, b0)


def test_clip_grad_norm_leaves_gradients_below_the_limit_alone():
    """clip_grad_norm_ only scales down (torch's clamp(max=1)): below max_norm the gradients are kept."""
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    ps = list(model.parameters())
    want = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps))  # FP64 reference
    # FP32 error of the norm: one rounding per square, a cascade sum of n terms (log2 n + 1 roundings deep),
    # P sequential tensor sums, the sqrt; relative, in units of 2**-24
    rtol = (math.ceil(math.log2(max(p.numel() for p in ps))) + 2 + len(ps) + 1) * 2**-24
    total = grads.clip_grad_norm_(model, want * 10, None)
    assert abs(float(total) - want) <= rtol * want
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n
    # above the limit: scaled to max_norm (coef = max_norm / (norm + 1e-6), the 1e-6 negligible at norm ~1e3)
    grads.clip_grad_norm_(model, want / 4, None)
    clipped = math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps))
    assert abs(clipped - want / 4) <= (2 * rtol + 3 * 2**-24) * want / 4 + 1e-6


def test_init_like_single_process_refuses_a_parameter_the_build_lacks():
    """A parameter the one-process build has no weights for is refused, not left uninitialised."""
    model = _tiny()
    model.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="no one-process weights"):
        grads.init_like_single_process(model, None, 0)


def _with_wider_stack(sd: dict) -> tuple[dict, str]:
    name = sorted(grads.expert_param_names(_tiny()))[0]
    sd = dict(sd)
    sd[name] = torch.cat([sd[name], sd[name]])  # twice the model's experts
    return sd, name


def test_load_full_state_dict_refuses_a_stack_of_another_size():
    """An expert stack of twice the model's experts is refused naming the counts."""
    model = _tiny()
    sd, name = _with_wider_stack(model.state_dict())
    with pytest.raises(ValueError, match="experts, the model"):
        grads.load_full_state_dict(model, sd, None)


def test_load_state_file_refuses_a_stack_of_another_size(tmp_path):
    """The same from a safetensors file, read by slices."""
    model = _tiny()
    sd, name = _with_wider_stack({n: t.contiguous() for n, t in model.state_dict().items()})
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="experts, the model"):
        grads.load_state_file(model, {n: path for n in sd}, None)


# ---- 4 gloo ranks as 2 nodes x 2 (one spawn for both tests) ---------------------------------------
_E, _K, _D, _T = 16, 4, 8, 16


def _mp_worker(rank: int) -> dict:
    out = {}
    # per-rank traffic: every token of every rank picks experts 0..K-1 (all on rank 0, node 0)
    cfg = preset("tiny", n_routed_experts=_E, n_activated_experts=_K, dim=_D)
    mesh = init_distributed(cfg, ep=4, ranks_per_node=2, timeout_s=60)
    for kind in ("flat", "hierarchical"):
        disp = make_dispatcher(kind, _E, mesh, combine_dtype=torch.float32)
        x = torch.randn(_T, _D, requires_grad=True)
        w = torch.rand(_T, _K, requires_grad=True)
        xs, counts, ctx = disp.dispatch(x, torch.arange(_K).repeat(_T, 1))
        disp.combine(xs, w, ctx).sum().backward()
        out[kind] = {p: dict(c) for p, c in disp.counter.phases.items()}
    dist.destroy_process_group()
    return out


def _mp_worker2(rank: int) -> dict:
    out = {}
    # broadcast_parameters on 4 ranks, EP 2: two replicas of each expert shard (expert_dp_group)
    cfg = preset("tiny", vocab_size=64, n_layers=2, max_seq_len=16, original_seq_len=16)
    mesh = init_distributed(cfg, ep=2, ranks_per_node=2, timeout_s=60)
    torch.manual_seed(100 + rank)  # every rank its own values
    model = Transformer(cfg, dispatcher_factory(cfg, mesh, "flat"))
    grads.broadcast_parameters(model, mesh)
    out["ep_rank"] = mesh.ep_rank
    out["state"] = {n: t.clone() for n, t in model.state_dict().items()}
    out["experts"] = grads.expert_param_names(model)
    # full_state_dict for a checkpoint (only_rank0): 4 replicas-of-stage ranks, EP 2 -> rank 0 gets everything
    out["full0"] = grads.full_state_dict(model, mesh, only_rank0=True)
    out["part"] = grads.weight_part(model, mesh)  # ranks 2, 3 (dp_rank >= ep) hold no part
    # sync_gradients: every rank's gradient rank + 1 (exact in FP32), two parameters without a gradient
    names = [n for n, _ in model.named_parameters()]
    skip = {sorted(out["experts"])[0], next(n for n in names if n not in out["experts"])}
    for n, p in model.named_parameters():
        p.grad = None if n in skip else torch.full_like(p, rank + 1.0)
    grads.sync_gradients(model, mesh)
    out["skip"], out["synced"] = skip, {n: p.grad.clone() for n, p in model.named_parameters()}
    dist.destroy_process_group()
    return out


@functools.cache
def _mp(which: int = 1):
    """One spawn of 4 ranks per worker, shared by the tests that read it."""
    return run_ranks(_mp_worker if which == 1 else _mp_worker2, 4)


def test_each_rank_counts_the_rows_it_sends():
    """Skewed routing (every copy to rank 0): the counters are per rank, so only the senders count.
    Rows a rank sends (D=8 FP32: 32 bytes a row; ids and gate weights: K * 4 bytes a row)."""
    res = _mp(1)
    row = 4 * _D
    for rank, r in enumerate(res):
        flat = r["flat"]
        # flat dispatch: every copy straight to rank 0: rank 1 intra, ranks 2, 3 inter; rank 0 keeps its own
        intra, inter = (_T * _K if rank == 1 else 0), (_T * _K if rank >= 2 else 0)
        assert flat["dispatch"]["intra_node_tokens"] == intra and flat["dispatch"]["inter_node_tokens"] == inter, rank
        assert flat["dispatch"]["inter_node_bytes"] == inter * row
        # combine: the way back, rank 0 sends every other rank's copies
        assert flat["combine"]["intra_node_bytes"] == (_T * _K * row if rank == 0 else 0), rank
        assert flat["combine"]["inter_node_bytes"] == (2 * _T * _K * row if rank == 0 else 0), rank
        hier = r["hierarchical"]
        # stage 1: ranks 2, 3 send each token once to ranks 0, 1; stage 2: rank 1 forwards its 2T rows to rank 0
        s_inter = _T if rank >= 2 else 0
        s_intra = 2 * _T if rank == 1 else 0
        assert hier["dispatch"]["inter_node_tokens"] == s_inter, rank
        assert hier["dispatch"]["intra_node_tokens"] == s_intra, rank
        assert hier["dispatch_meta"]["inter_node_bytes"] == s_inter * _K * 4, rank
        assert hier["dispatch_meta"]["intra_node_bytes"] == s_intra * _K * 4, rank
        assert hier["combine_meta"]["inter_node_bytes"] == s_inter * _K * 4, rank
        # combine retraces it: rank 0 returns 2T rows to rank 1, ranks 0, 1 return T rows each across nodes
        assert hier["combine"]["intra_node_bytes"] == (2 * _T * row if rank == 0 else 0), rank
        assert hier["combine"]["inter_node_bytes"] == (_T * row if rank < 2 else 0), rank


def test_broadcast_parameters_makes_expert_replicas_identical():
    """Dense weights from rank 0; each expert shard from its replica in EP group 0 (ranks 0, 1)."""
    res = _mp(2)
    for rank, r in enumerate(res):
        src = res[r["ep_rank"]]  # ranks 0, 1 are EP group 0: ep_rank == rank there
        for n, t in r["state"].items():
            want = src["state"][n] if n in r["experts"] else res[0]["state"][n]
            assert torch.equal(t, want), (rank, n)
    name = sorted(res[0]["experts"])[0]
    assert not torch.equal(res[0]["state"][name], res[1]["state"][name])  # the two shards differ


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_make_dispatcher_refuses_experts_not_divisible_by_ep(kind):
    """The dispatcher's own check (no process group needed: it refuses before any exchange)."""
    mesh = Mesh(rank=0, world=3, local_rank=0, ranks_per_node=3, n_nodes=1, node=0, ep=3, ep_rank=0,
                ep_group=None, expert_dp_group=None, device=torch.device("cpu"), backend="gloo",
                ep_nodes=1, ep_ranks_per_node=3, ep_ranks=[0, 1, 2])
    with pytest.raises(ConfigError, match="not divisible"):
        make_dispatcher(kind, 16, mesh)
    assert make_dispatcher(kind, 15, mesh).local_experts() == (0, 5)  # a divisible count is accepted


def test_sync_gradients_averages_replicas_and_zero_fills_missing_gradients():
    """Dense: the mean over the 4 ranks' (1, 2, 3, 4) = 2.5; an expert shard: the sum over its 2 replicas
    (ranks r, r + 2) divided by dp = 4; a parameter no rank has a gradient for: zeros (same collectives)."""
    res = _mp(2)
    for rank, r in enumerate(res):
        for n, g in r["synced"].items():
            if n in r["skip"]:
                want = 0.0
            elif n in r["experts"]:
                want = ((rank % 2 + 1) + (rank % 2 + 3)) / 4
            else:
                want = 2.5
            assert torch.equal(g, torch.full_like(g, want)), (rank, n)


def test_full_state_dict_for_a_checkpoint_is_rank0s_alone():
    """only_rank0 on 4 ranks, EP 2: rank 0 holds the whole single-process state (both shards, in EP order), ranks 1
    (its EP peer, which sends its shard) and 2, 3 (the second replica, dp_rank >= ep: no part) get nothing."""
    res = _mp(2)
    assert all(r["full0"] == {} for r in res[1:])
    full = res[0]["full0"]
    assert set(full) == set(res[0]["state"])
    for n, t in full.items():
        want = torch.cat([res[0]["state"][n], res[1]["state"][n]]) if n in res[0]["experts"] else res[0]["state"][n]
        assert torch.equal(t, want), n


def test_weight_parts_split_the_state_between_the_first_replicas_ranks():
    """``weight_part``: the first replica's ranks (dp_rank < ep) split the state, stack k on rank k mod ep; the other
    replicas hold none."""
    res = _mp(2)
    assert res[2]["part"] == {} and res[3]["part"] == {}
    p0, p1 = res[0]["part"], res[1]["part"]
    assert not set(p0) & set(p1) and set(p0) | set(p1) == set(res[0]["full0"])
    for n, t in {**p0, **p1}.items():
        assert torch.equal(t, res[0]["full0"][n]), n
    stacks = sorted(res[0]["experts"])
    assert [n in p1 for n in stacks] == [k % 2 == 1 for k in range(len(stacks))]  # the k-th stack on rank k mod ep


def test_init_like_single_process_sets_drawn_buffers():
    """DeepSeek-V4's hash-routed gate draws its tid2eid buffer in init: the replay must set it as the seeded build."""
    cfg = preset("tiny-v4", vocab_size=512)
    assert cfg.n_hash_layers > 0
    torch.manual_seed(7)
    ref = Transformer(cfg)
    torch.manual_seed(8)
    model = Transformer(cfg)
    for b in model.buffers():
        b.zero_()
    grads.init_like_single_process(model, None, 7)
    tables = [n for n, _ in ref.named_buffers() if n.endswith("tid2eid")]
    assert tables and any(ref.get_buffer(n).any() for n in tables)
    for n, b in ref.named_buffers():
        assert torch.equal(model.get_buffer(n), b), n


def _mp_worker_pp(rank: int) -> dict:
    """4 ranks as pp 2 x (dp 2 = ep 2): stage s is ranks 2s, 2s + 1 (a whole model on each: only the collectives'
    groups and source ranks are under test)."""
    cfg = preset("tiny", vocab_size=64, n_layers=2, max_seq_len=16, original_seq_len=16)
    mesh = init_distributed(cfg, ep=2, pp=2, ranks_per_node=4, timeout_s=60)
    torch.manual_seed(200 + rank)
    model = Transformer(cfg, dispatcher_factory(cfg, mesh, "flat"))
    grads.broadcast_parameters(model, mesh)
    out = dict(pp_rank=mesh.pp_rank, state={n: t.clone() for n, t in model.state_dict().items()},
               experts=grads.expert_param_names(model))
    out["full0"] = grads.full_state_dict(model, mesh, only_rank0=True)
    dist.destroy_process_group()
    return out


def test_pipeline_stages_broadcast_from_and_gather_to_their_own_first_rank():
    """pp 2 x ep 2: each stage broadcasts its dense weights from its own first rank, and gathers its expert stacks
    there for a checkpoint."""
    res = run_ranks(_mp_worker_pp, 4)
    assert [r["pp_rank"] for r in res] == [0, 0, 1, 1]
    for rank, r in enumerate(res):
        first = res[2 * (rank // 2)]  # the stage's first rank: dense weights from there
        for n, t in r["state"].items():
            if n not in r["experts"]:
                assert torch.equal(t, first["state"][n]), (rank, n)
    assert res[1]["full0"] == {} and res[3]["full0"] == {}  # only the stages' first ranks keep what they gather
    for n in sorted(res[0]["experts"]):  # stage 1's stacks gathered on its first rank, 2
        assert torch.equal(res[2]["full0"][n], torch.cat([res[2]["state"][n], res[3]["state"][n]])), n
    full = res[0]["full0"]
    stacks = sorted(res[0]["experts"])
    assert stacks and set(full) == set(res[0]["state"])
    for n in stacks:  # each stage's shards gathered on its own first rank (the dict of the last stage wins)
        assert any(torch.equal(full[n], torch.cat([res[s]["state"][n], res[s + 1]["state"][n]])) for s in (0, 2)), n


def test_init_like_single_process_gives_a_first_stage_the_tied_weights_last_draw():
    """Tied embeddings: the one-process build's single table holds the head's draw, the last module's. A first
    pipeline stage holds the embedding alone (the head on the meta device, untied there): the replay must give it
    that draw, not the embedding module's own earlier one."""
    cfg = preset("tiny", vocab_size=64, n_layers=2, max_seq_len=16, original_seq_len=16, tie_embeddings=True)
    torch.manual_seed(5)
    ref = Transformer(cfg)
    assert ref.head.weight is ref.embed.weight
    model = Transformer(cfg)
    model.head.weight = torch.nn.Parameter(torch.empty_like(model.head.weight, device="meta"))  # another stage's
    grads.init_like_single_process(model, None, 5)
    assert torch.equal(model.embed.weight, ref.embed.weight)
