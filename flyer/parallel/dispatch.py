"""The exchanging dispatchers: move routed token copies to the ranks holding their experts and
combine the outputs back. The seam they implement (``Dispatcher``), the single-process
``LocalDispatcher`` (their oracle) and the list of kinds live with the model
(``flyer.model.dispatch``); this module adds:

- ``AllToAllDispatcher``: one ``all_to_all_single`` over the EP group; every copy travels from its
  token's rank straight to its expert's rank.
- ``HierarchicalDispatcher`` (DeepEP's normal kernels, node-aware): stage 1 sends each token once
  per destination node, to the rank with the same local index there (inter-node); stage 2 forwards
  it inside the node to the ranks holding its experts (intra-node). Combine runs the reverse path;
  the forwarding rank sums the weighted expert outputs of a (token, node) pair before the one
  inter-node return.

Both directions are differentiable: the backward of dispatch is a combine (a sum) of gradients,
the backward of combine a dispatch of gradients, and router weights receive their gradient.

Wire formats and their roundings: ``flyer.model.dispatch``.

Counters (``comm_stats``): rows and bytes this rank sends per layer, split by whether the
destination is another rank on the same node (intra) or on another node (inter); rows a rank
keeps are not counted, nor are the split-size exchanges. Routing metadata (hierarchical stages 1 and 2: expert
ids in dispatch, gate weights in combine; flat's FP8 backward: its gate weights) is counted apart as
``*_meta_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from flyer.config import ConfigError, ModelConfig
from flyer.model.dispatch import (
    Dispatcher,
    LocalDispatcher,
    combine_wire_dtype,
    dispatcher_kind,
    weighted_sum,
)
from flyer.model.moe import MoE
from flyer.model.wire import fp8_decode_rows, fp8_encode_rows

# ---- counters ---------------------------------------------------------------------------------
_COUNTER_KEYS = ("intra_node_tokens", "inter_node_tokens", "intra_node_bytes", "inter_node_bytes")


class CommCounter:
    """Rows and bytes one dispatcher (one layer) sent from this rank, per phase.

    Phases: ``dispatch``, ``combine`` (forward), ``dispatch_grad``, ``combine_grad`` (backward), and
    ``*_meta`` for routing metadata.
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}

    def reset(self) -> None:
        self.phases = {}

    def add(self, phase: str, send: list[int], kinds: list[str], rows: torch.Tensor) -> None:
        row_bytes = rows.shape[1:].numel() * rows.element_size()
        c = self.phases.setdefault(phase, dict.fromkeys(_COUNTER_KEYS, 0))
        for n, kind in zip(send, kinds):
            if kind != "self":
                c[f"{kind}_node_tokens"] += n
                c[f"{kind}_node_bytes"] += n * row_bytes

    def summary(self) -> dict[str, Any]:
        """Tokens: rows sent by forward dispatch. Bytes: every payload exchange (forward and
        backward); metadata bytes apart."""
        out = dict.fromkeys(_COUNTER_KEYS + ("intra_node_meta_bytes", "inter_node_meta_bytes"), 0)
        for phase, c in self.phases.items():
            if phase == "dispatch":
                out["intra_node_tokens"] += c["intra_node_tokens"]
                out["inter_node_tokens"] += c["inter_node_tokens"]
            meta = "_meta" if "meta" in phase else ""
            out[f"intra_node{meta}_bytes"] += c["intra_node_bytes"]
            out[f"inter_node{meta}_bytes"] += c["inter_node_bytes"]
        out["phases"] = {k: dict(v) for k, v in self.phases.items()}
        return out


def comm_stats(model: torch.nn.Module, reset: bool = True, group=None) -> dict[str, Any]:
    """Traffic of the model's MoE layers since the last reset: this rank's sends, or the sum over
    ``group`` when given (a collective: every rank of the group calls it).

    Keys: intra_node_tokens, inter_node_tokens, intra_node_bytes, inter_node_bytes,
    intra_node_meta_bytes, inter_node_meta_bytes, and ``layers``: one dict per MoE layer with
    ``layer`` (the id given to ``make_dispatcher``), ``module``, the same keys and (this rank's)
    ``phases``. Local dispatchers move nothing and are not listed.
    """
    keys = _COUNTER_KEYS + ("intra_node_meta_bytes", "inter_node_meta_bytes")
    layers = []
    for name, m in model.named_modules():
        counter = getattr(getattr(m, "dispatcher", None), "counter", None) if isinstance(m, MoE) else None
        if counter is None:
            continue
        layers.append({"layer": m.dispatcher.layer_id, "module": name, **counter.summary()})
        if reset:
            counter.reset()
    if group is not None and layers:
        device = next(model.parameters()).device
        flat = torch.tensor([float(layer[k]) for layer in layers for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(flat, group=group)
        values = iter(flat.tolist())
        for layer in layers:
            layer.update({k: int(next(values)) for k in keys})
    total: dict[str, Any] = {k: sum(layer[k] for layer in layers) for k in keys}
    total["layers"] = layers
    return total


# ---- exchange primitives ------------------------------------------------------------------------
@dataclass
class Stage:
    """Gather rows ``index`` of the previous buffer (``n_in`` rows), then, when ``group`` is set,
    exchange them: ``send[j]`` rows to group member j, ``recv[j]`` rows from it.

    ``slot`` marks the fan-out stage, where a token row becomes one row per expert: the flat
    (row * K + k) index of each outgoing copy, used to apply gate weights in combine.
    ``bwd_group`` (same members as ``group``) carries the backward's exchanges when set, so that a
    backward chunk can exchange while a forward chunk does (``flyer.parallel.overlap``).
    """

    index: torch.Tensor
    n_in: int
    group: Any = None
    send: list[int] = field(default_factory=list)
    recv: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per member: "self", "intra" or "inter" (node)
    slot: torch.Tensor | None = None
    bwd_group: Any = None

    @property
    def grad_group(self):
        """The group the backward exchanges over."""
        return self.group if self.bwd_group is None else self.bwd_group


@dataclass
class Plan:
    """The route of one dispatch (the ``ctx`` returned by ``dispatch``)."""

    stages: list[Stage]
    counts_local: torch.Tensor  # (n_local,) rows per local expert after dispatch
    n_tokens: int
    # hierarchical, per once-per-destination stage: the source row of each outgoing row, and which
    # of that row's K experts are at its destination (the gate weights travel along these)
    routes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` of rows with uneven splits (works on gloo and NCCL)."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """Exchange rows along a stage (``reverse``: the way back); backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stage: Stage, reverse: bool, counter: CommCounter, phase: str):
        ctx.stage, ctx.reverse, ctx.counter, ctx.phase = stage, reverse, counter, phase
        send, recv = (stage.recv, stage.send) if reverse else (stage.send, stage.recv)
        counter.add(phase, send, stage.kinds, x)
        return all_to_all_rows(x, send, recv, stage.group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        st = ctx.stage
        send, recv = (st.send, st.recv) if ctx.reverse else (st.recv, st.send)
        ctx.counter.add(ctx.phase + "_grad", send, st.kinds, g)
        return all_to_all_rows(g, send, recv, st.grad_group), None, None, None, None


class _Dispatch(torch.autograd.Function):
    """Route token rows along ``plan`` (FP8 bytes or the input dtype); backward sums gradients
    back along the reverse route, moving them in ``grad_dtype``."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: Plan, fp8: bool, grad_dtype: torch.dtype | None,
                counter: CommCounter, pow2: bool = False) -> torch.Tensor:
        ctx.plan, ctx.grad_dtype, ctx.counter, ctx.dtype = plan, grad_dtype, counter, x_TD.dtype
        buf = fp8_encode_rows(x_TD, pow2) if fp8 else x_TD
        for st in plan.stages:
            buf = buf.index_select(0, st.index)
            if st.group is not None:
                counter.add("dispatch", st.send, st.kinds, buf)
                buf = all_to_all_rows(buf, st.send, st.recv, st.group)
        return fp8_decode_rows(buf, x_TD.shape[1], x_TD.dtype) if fp8 else buf

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        buf = g
        for st in reversed(ctx.plan.stages):
            if st.group is not None:
                wire = buf.to(ctx.grad_dtype or g.dtype)
                ctx.counter.add("dispatch_grad", st.recv, st.kinds, wire)
                buf = all_to_all_rows(wire, st.recv, st.send, st.grad_group)
            buf = buf.new_zeros(st.n_in, g.shape[1], dtype=torch.float32).index_add_(0, st.index, buf.float())
        return buf.to(ctx.dtype), None, None, None, None, None


def _exchange_counts(counts: torch.Tensor, n_members: int, group) -> torch.Tensor:
    """counts (n_members * n,) to send -> (n_members, n) received: row j came from member j."""
    if group is None:
        return counts.view(1, -1)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out.view(n_members, -1)


def _fan_out(keys_N: torch.Tensor, n_members: int, n_local: int, group):
    """Copies with destination key ``member * n_local + local expert``: the order that sorts them
    by key, send and recv splits, the permutation of received rows from (source, expert) order
    to (expert, source) order, and the rows per local expert. Keys past the last expert (LongCat-Flash's
    identity picks, summed on the token's rank by the MoE) sort last and are left out of the order."""
    order = torch.argsort(keys_N, stable=True)
    counts = torch.bincount(keys_N, minlength=n_members * n_local)
    if counts.numel() > n_members * n_local:
        counts = counts[:n_members * n_local]
        order = order[:int(counts.sum())]
    recv_SE = _exchange_counts(counts, n_members, group)  # recv_SE[s, e]: rows from member s for expert e
    send = counts.view(n_members, n_local).sum(1).tolist()
    recv = recv_SE.sum(1).tolist()
    expert_of_row = torch.arange(n_local, device=keys_N.device).repeat(n_members).repeat_interleave(recv_SE.flatten())
    perm = torch.argsort(expert_of_row, stable=True)
    return order, send, recv, perm, recv_SE.sum(0)


def _once_per_destination(ids_RK: torch.Tensor, span: int, n_dest: int, group, kinds: list[str],
                          counter: CommCounter, bwd_group=None
                          ) -> tuple[Stage, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One row per (row, destination) for rows whose experts ``ids_RK`` (R, K; -1: none) lie on
    destinations of ``span`` consecutive experts each: however many of a row's experts a
    destination holds, the row goes there once, carrying their ids relative to it (-1 for the
    others). Returns the stage (rows ordered by destination, then row), the ids each received row
    carries, and the route (source row, on-destination mask) of the outgoing rows."""
    R, K = ids_RK.shape
    valid = ids_RK >= 0
    dest_RK = torch.where(valid, ids_RK.long() // span, -1)
    hit_DR = torch.zeros(n_dest, R, dtype=torch.bool, device=ids_RK.device)
    rows_RK = torch.arange(R, device=ids_RK.device).unsqueeze(1).expand(R, K)
    hit_DR[dest_RK[valid], rows_RK[valid]] = True
    pair_d, pair_r = hit_DR.nonzero(as_tuple=True)
    mask_PK = dest_RK[pair_r] == pair_d.unsqueeze(1)
    ids_PK = torch.where(mask_PK, ids_RK[pair_r].long() - pair_d.unsqueeze(1) * span, -1).to(torch.int32)
    if group is None:
        return Stage(pair_r, R), ids_PK, (pair_r, mask_PK)
    counts = torch.bincount(pair_d, minlength=n_dest)
    send = counts.tolist()
    recv = _exchange_counts(counts, n_dest, group).flatten().tolist()
    counter.add("dispatch_meta", send, kinds, ids_PK)
    stage = Stage(pair_r, R, group, send, recv, kinds, bwd_group=bwd_group)
    return stage, all_to_all_rows(ids_PK, send, recv, group), (pair_r, mask_PK)


def _fan_out_local(ids_RK: torch.Tensor, n_local: int) -> tuple[Stage, torch.Tensor]:
    """One copy per (row, local expert) of rows carrying local expert ids (-1: none), ordered by
    expert then row, with the flat (row * K + k) slot of each copy; and the rows per expert."""
    K = ids_RK.shape[1]
    flat = ids_RK.flatten().long()
    slots = (flat >= 0).nonzero().squeeze(1)
    slot = slots[torch.argsort(flat[slots], stable=True)]
    return Stage(slot // K, ids_RK.shape[0], slot=slot), torch.bincount(flat[slots], minlength=n_local)


def _kinds(mesh, members: list[int]) -> list[str]:
    return ["self" if r == mesh.rank else "intra" if mesh.node_of(r) == mesh.node else "inter" for r in members]


# ---- multi-process dispatchers ----------------------------------------------------------------
class _ExchangeDispatcher:
    """Shared part of the all-to-all and hierarchical dispatchers: a routing ``plan`` (index
    arithmetic and split-size exchanges, no gradients), the routed dispatch, and a combine made of
    differentiable exchanges, weighting and FP32 index sums."""

    def __init__(self, n_experts: int, mesh, layer_id: int = 0, fp8: bool = False,
                 combine_dtype: torch.dtype | None = None):
        if n_experts % mesh.ep:
            raise ConfigError(f"n_routed_experts={n_experts} is not divisible by --ep {mesh.ep}")
        self.n_experts, self.mesh, self.layer_id = n_experts, mesh, layer_id
        self.n_local = n_experts // mesh.ep
        self.first = mesh.ep_rank * self.n_local
        self.fp8 = fp8
        self.fp8_pow2 = False  # power-of-two wire scales (``flyer.model.dispatch.match_wire_scales``)
        self.combine_dtype = combine_wire_dtype(fp8, combine_dtype)
        self.counter = CommCounter()

    def local_experts(self) -> tuple[int, int]:
        return self.first, self.n_local

    def plan(self, topk_ids_TK: torch.Tensor) -> Plan:
        raise NotImplementedError

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        """x_TD (T, D) float, topk_ids_TK (T, K) int64 global expert ids (ids >= n_experts: identity picks, not
        sent) -> (x_sorted (N, D) rows for this rank's experts sorted by local expert, counts (n_local,), ctx)."""
        with torch.no_grad():
            plan = self.plan(topk_ids_TK)
        x_sorted = _Dispatch.apply(x_TD, plan, self.fp8, self.combine_dtype, self.counter, self.fp8_pow2)
        return x_sorted, plan.counts_local, plan

    def _fan_out_weights(self, weights_TK: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Gate weights where the fan-out stage runs, flattened (rows * K)."""
        return weights_TK.flatten()

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: Plan) -> torch.Tensor:
        """y_ND (N, D) expert outputs in dispatch order, weights_TK (T, K) -> y_TD (T, D) FP32:
        sum over k of weights_TK[t, k] * expert_k(x_t). Under FP8 dispatch the backward sends each token's output
        gradient to its experts in FP8 (``_Fp8GradCombine``)."""
        w = self._fan_out_weights(weights_TK.float(), plan)
        if self.fp8:
            return _Fp8GradCombine.apply(y_ND, w, plan, self)
        return self._combine(y_ND, w, plan)[0]

    def _combine(self, y_ND: torch.Tensor, w: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """(combined (T, D) FP32, the rows the gate weights ``w`` multiply)."""
        buf, D = y_ND, y_ND.shape[1]
        copies = True  # the rows are the expert outputs as they are (permuted) until the weighted sum
        weighed = y_ND
        for st in reversed(plan.stages):
            if st.group is not None:  # copies travel in their own dtype (BF16 under autocast: exact), sums in FP32
                wire = self.combine_dtype or (y_ND.dtype if copies else buf.dtype)
                buf = AllToAll.apply(buf.to(wire), st, True, self.counter, "combine")
            if st.slot is not None:
                weighed = buf
                buf = weighted_sum(buf, w[st.slot].unsqueeze(1), st.index, st.n_in)
                copies = False
            else:
                buf = buf.new_zeros(st.n_in, D, dtype=torch.float32).index_add(0, st.index, buf.float())
        return buf, weighed


class _Fp8GradCombine(torch.autograd.Function):
    """Combine whose backward moves each token's output gradient g (T, D) to its experts as FP8 dispatch moves
    its input: quantized once on the token's rank (1x128 E4M3 tiles, the dispatcher's scale rule), the same bytes
    forwarded along dispatch's route, dequantized where the gate weights apply. Flat applies them on the token's
    rank in forward, so its backward sends each copy's weight along (4 bytes, ``combine_grad_meta``) and the
    expert's rank multiplies. The values are ``LocalDispatcher``'s: its combine rounds g through the same wire
    (``Fp8RoundGrad``), then the weighted sum's backward runs as here."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, w: torch.Tensor, plan: Plan, disp: _ExchangeDispatcher) -> torch.Tensor:
        out, weighed = disp._combine(y_ND, w, plan)
        ctx.save_for_backward(weighed, w)
        ctx.plan, ctx.disp, ctx.y_dtype = plan, disp, y_ND.dtype
        return out

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):
        weighed, w = ctx.saved_tensors
        disp, D = ctx.disp, g_TD.shape[1]
        buf = fp8_encode_rows(g_TD, disp.fp8_pow2)
        w_rows = dw = g_rows = None  # g_rows: buf decoded, while it is the current buf
        for st in ctx.plan.stages:  # dispatch's route
            buf, g_rows = buf.index_select(0, st.index), None
            if w_rows is not None:
                w_rows = w_rows.index_select(0, st.index)
            if st.slot is not None:
                w_rows = w[st.slot]
                if ctx.needs_input_grad[1]:  # the weights' gradient where they apply, from the rounded g as well
                    g_rows = fp8_decode_rows(buf, D)
                    dw = torch.zeros_like(w).index_put_((st.slot,), (g_rows * weighed.float()).sum(1))
            if st.group is not None:
                disp.counter.add("combine_grad", st.send, st.kinds, buf)
                buf, g_rows = all_to_all_rows(buf, st.send, st.recv, st.grad_group), None
                if w_rows is not None:
                    disp.counter.add("combine_grad_meta", st.send, st.kinds, w_rows.unsqueeze(1))
                    w_rows = all_to_all_rows(w_rows, st.send, st.recv, st.grad_group)
        g_rows = fp8_decode_rows(buf, D) if g_rows is None else g_rows  # hierarchical weighs on the expert's rank
        dy = (g_rows * w_rows.unsqueeze(1)).to(weighed.dtype).to(ctx.y_dtype)
        return dy, dw, None, None


class AllToAllDispatcher(_ExchangeDispatcher):
    """Flat: every copy goes straight to its expert's rank in one all-to-all over the EP group."""

    def __init__(self, n_experts: int, mesh, layer_id: int = 0, fp8: bool = False,
                 combine_dtype: torch.dtype | None = None):
        super().__init__(n_experts, mesh, layer_id, fp8, combine_dtype)
        self.kinds = _kinds(mesh, mesh.ep_ranks)

    def plan(self, topk_ids_TK: torch.Tensor) -> Plan:
        T, K = topk_ids_TK.shape
        order, send, recv, perm, counts_local = _fan_out(topk_ids_TK.flatten(), self.mesh.ep, self.n_local,
                                                         self.mesh.ep_group)
        stages = [Stage(order // K, T, self.mesh.ep_group, send, recv, self.kinds, slot=order,
                        bwd_group=self.mesh.ep_group_bwd),
                  Stage(perm, sum(recv))]
        return Plan(stages, counts_local, T)


class HierarchicalDispatcher(_ExchangeDispatcher):
    """Node-aware, as DeepEP's normal kernels: a token crosses to each destination node once (to the
    rank with the same local index), carrying the node-local ids of its experts there; that rank
    forwards it once to each rank of the node holding any of them, carrying their rank-local ids;
    the expert rank fans it out to its experts. Combine retraces the route: the weighted outputs
    are summed per (token, rank) on the expert rank and per (token, node) on the forwarding rank,
    so each return crosses NVLink and the network once."""

    def __init__(self, n_experts: int, mesh, layer_id: int = 0, fp8: bool = False,
                 combine_dtype: torch.dtype | None = None):
        super().__init__(n_experts, mesh, layer_id, fp8, combine_dtype)
        self.inter_kinds = _kinds(mesh, mesh.inter_ranks)
        self.intra_kinds = _kinds(mesh, mesh.intra_ranks)

    def plan(self, topk_ids_TK: torch.Tensor) -> Plan:
        mesh = self.mesh
        P, L = mesh.ep_nodes, mesh.ep_ranks_per_node
        # LongCat-Flash's identity picks (ids past the experts) go nowhere: the MoE sums them on the token's rank
        ids = topk_ids_TK.masked_fill(topk_ids_TK >= self.n_experts, -1)
        s1, ids1, route1 = _once_per_destination(ids, L * self.n_local, P, mesh.inter_group,
                                                 self.inter_kinds, self.counter, mesh.inter_group_bwd)
        s2, ids2, route2 = _once_per_destination(ids1, self.n_local, L, mesh.intra_group, self.intra_kinds,
                                                 self.counter, mesh.intra_group_bwd)
        s3, counts_local = _fan_out_local(ids2, self.n_local)
        return Plan([s1, s2, s3], counts_local, topk_ids_TK.shape[0], [route1, route2])

    def _fan_out_weights(self, weights_TK: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Gate weights travel with the token (zero for experts elsewhere) to the expert rank."""
        w = weights_TK
        for st, (rows, on_dest_PK) in zip(plan.stages, plan.routes):
            w = w[rows] * on_dest_PK
            if st.group is not None:
                w = AllToAll.apply(w, st, False, self.counter, "combine_meta")
        return w.flatten()


def make_dispatcher(kind: str, n_experts: int, mesh=None, layer_id: int = 0, fp8: bool = False,
                    combine_dtype: torch.dtype | None = None) -> Dispatcher:
    """One dispatcher of ``kind`` ('local', 'flat' (alias 'all_to_all'), 'hierarchical'); the
    local one whenever ep == 1."""
    kind = dispatcher_kind(kind)
    if mesh is None or mesh.ep == 1:
        return LocalDispatcher(n_experts, fp8, combine_dtype)
    if kind == "local":
        raise ConfigError(f"dispatcher 'local' holds every expert in one process; it needs --ep 1, got --ep {mesh.ep}")
    cls = AllToAllDispatcher if kind == "flat" else HierarchicalDispatcher
    return cls(n_experts, mesh, layer_id, fp8, combine_dtype)


def dispatcher_factory(cfg: ModelConfig, mesh=None, kind: str = "hierarchical", fp8: bool = False,
                       combine_dtype: torch.dtype | None = None) -> Callable[[int], Dispatcher] | None:
    """``make_dispatcher(layer_id)`` for ``Transformer``; None (the model's default local
    dispatcher) when there is nothing to distribute and no wire rounding to emulate."""
    make_dispatcher(kind, cfg.n_routed_experts, mesh, fp8=fp8, combine_dtype=combine_dtype)  # validate now
    if (mesh is None or mesh.ep == 1) and not fp8 and combine_dtype is None:
        return None
    return lambda layer_id: make_dispatcher(kind, cfg.n_routed_experts, mesh, layer_id, fp8, combine_dtype)


__all__ = ["AllToAllDispatcher", "CommCounter", "HierarchicalDispatcher", "all_to_all_rows", "comm_stats",
           "dispatcher_factory", "make_dispatcher"]
