"""Process layout for pipeline, expert and data parallelism, built once from the torchrun environment.

Ranks are numbered node-major: rank r lives on node ``r // ranks_per_node`` at local index
``r % ranks_per_node``. ``ranks_per_node`` comes from ``LOCAL_WORLD_SIZE`` or is given explicitly
to simulate several nodes on one machine (4 processes as 2 nodes x 2).

With pipeline parallelism (``pp`` stages) the world is PP x DP, stage-major: rank r serves
pipeline stage (rank) ``r // dp`` as data-parallel replica ``r % dp`` (``dp = world / pp``), so a
stage's replicas are consecutive ranks, on the same nodes, as DeepSeek-V3 lays out PP 16 x DP 128
with EP 64 inside DP. Everything below applies inside one stage's ``dp`` ranks.

Routed experts are sharded over EP groups of ``ep`` consecutive ranks: EP group g is ranks
``[g*ep, (g+1)*ep)``, and EP rank e holds experts ``[e*E/ep, (e+1)*E/ep)``. An EP group is either
a set of whole nodes (``ep`` a multiple of ``ranks_per_node``) or lies inside one node (``ep`` a
divisor of it), so expert groups map to nodes. Everything else is data parallel over the stage's ranks.

Process groups (every rank creates every group, in the same order, as torch.distributed needs):

- ``dp_group``: this stage's replicas, over which non-expert gradients are averaged and router
  loads summed (the world when pp == 1).
- ``pp_group``: this replica's pipeline, one rank per stage (stage-to-stage sends, the global
  gradient norm); None when pp == 1.
- ``ep_group``: the EP group (flat all-to-all dispatch); None when ep == 1.
- ``expert_dp_group``: the ranks of this stage holding the same experts (same EP rank in every EP
  group), over which expert gradients are summed; None when ep == dp.
- ``inter_group``: EP-group ranks with this rank's local index, one per node of the EP group
  (stage 1 of hierarchical dispatch); None when the EP group spans one node.
- ``intra_group``: EP-group ranks on this node (stage 2); None when that is this rank alone.
- ``*_group_bwd``: a second copy of the three EP groups (``add_backward_groups``), over which the
  backward of dispatch and combine exchanges, so that a forward and a backward chunk can exchange
  at once (DualPipe's overlap: collectives of one group must be issued in one order on every rank);
  None (use the forward groups) until added.

A single-process run gets a ``LocalMesh``: the same interface (rank 0, world 1, ep 1) whose
collectives are identities, so a trainer has one code path for both. ``collective_errors`` turns a collective
that timed out or lost its peer into one line naming the ranks whose heartbeat stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from flyer.config import ModelConfig, resolve_device
from flyer.errors import ConfigError, FieldError, TrainingError
from flyer.parallel import grads

HEARTBEAT_S = 1.0  # seconds between a rank's heartbeats (start_heartbeat, silent_ranks)


@dataclass
class Mesh:
    rank: int
    world: int
    local_rank: int  # index inside the (possibly simulated) node
    ranks_per_node: int
    n_nodes: int
    node: int
    ep: int
    ep_rank: int  # index inside the EP group; this rank holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep)
    ep_group: Any  # ProcessGroup or None
    expert_dp_group: Any  # ProcessGroup or None
    device: torch.device
    backend: str
    ep_nodes: int = 1  # nodes spanned by one EP group
    ep_ranks_per_node: int = 1  # ranks of one EP group on one node
    ep_node: int = 0  # this rank's node index inside its EP group
    inter_group: Any = None
    intra_group: Any = None
    ep_ranks: list[int] = field(default_factory=list)  # global ranks of this EP group, by EP rank
    pp: int = 1
    pp_rank: int = 0  # the pipeline stage (rank) this process serves
    dp_rank: int = 0  # the replica index inside the stage
    dp_group: Any = None  # this stage's replicas (dense gradients, router loads); WORLD when pp == 1
    pp_group: Any = None  # this replica's pipeline (one rank per stage); None when pp == 1
    pp_ranks: list[int] = field(default_factory=list)  # global ranks of this pipeline, by stage
    timeout_s: float = 300
    ep_group_bwd: Any = None  # the backward exchanges' copies of ep/inter/intra_group (add_backward_groups)
    inter_group_bwd: Any = None
    intra_group_bwd: Any = None
    heartbeat: Any = field(default=None, repr=False)  # (stop event, thread) once start_heartbeat ran

    @property
    def world_group(self):
        """Every rank (job totals: metrics, traffic)."""
        return dist.group.WORLD

    @property
    def dp(self) -> int:
        """Replicas of one stage (the data-parallel degree)."""
        return self.world // self.pp

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def inter_ranks(self) -> list[int]:
        """Global ranks of ``inter_group`` by group index (= node index inside the EP group)."""
        base = self.ep_ranks[0]
        L = self.ep_ranks_per_node
        return [base + q * L + self.ep_rank % L for q in range(self.ep_nodes)]

    @property
    def intra_ranks(self) -> list[int]:
        """Global ranks of ``intra_group`` by group index (= local index inside the node's share)."""
        L = self.ep_ranks_per_node
        base = self.ep_ranks[0] + self.ep_node * L
        return [base + i for i in range(L)]

    def add_backward_groups(self) -> None:
        """Create ``ep_group_bwd``, ``inter_group_bwd`` and ``intra_group_bwd`` (once; every rank
        calls this at the same point, as ``new_group`` needs)."""
        if self.ep == 1 or self.ep_group_bwd is not None:
            return
        lists = _ep_rank_lists(self.world, self.pp, self.ep, self.ep_nodes, self.ep_ranks_per_node)
        self.ep_group_bwd, self.inter_group_bwd, self.intra_group_bwd = (
            _new_groups(ranks, self.rank, timedelta(seconds=self.timeout_s)) for ranks in lists)

    # ---- the collectives a trainer needs (``LocalMesh`` has the same, as identities) ----------
    def init_like_single_process(self, model: torch.nn.Module, seed: int) -> None:
        """Give every rank its slice of the one-process initialisation with ``seed`` (a plain seeded
        build would give every EP rank the same expert weights)."""
        grads.init_like_single_process(model, self, seed)

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """Sum gradients over replicas: those of one process on every rank's batch (``grads``)."""
        grads.sync_gradients(model, self)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the global norm (expert shards counted once); returns the norm before clipping."""
        return grads.clip_grad_norm_(model, max_norm, self)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` (name -> float, same names on every rank) averaged over all ranks."""
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj``, by rank, on rank 0; None on the other ranks."""
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Count, in the job's rendezvous store and from a daemon thread, this rank's heartbeats
        every ``every_s`` seconds; a stopped or dead rank's count stands still (``silent_ranks``)."""
        store = _store_client()
        if store is None:
            return
        stop = threading.Event()

        def beat() -> None:
            try:
                while not stop.is_set():
                    store.add(f"flyer/heartbeat/{self.rank}", 1)
                    stop.wait(every_s)
            except (RuntimeError, OSError):  # the store is gone: the job is ending
                return

        thread = threading.Thread(target=beat, name="flyer-heartbeat", daemon=True)
        thread.start()
        self.heartbeat = (stop, thread)

    def silent_ranks(self, every_s: float = HEARTBEAT_S) -> list[int]:
        """The ranks whose heartbeat count stands still over three beats (they stopped answering);
        empty when the store cannot be reached."""
        store = _store_client()
        if store is None:
            return []
        keys = [f"flyer/heartbeat/{r}" for r in range(self.world)]
        before = [store.add(k, 0) for k in keys]
        time.sleep(3 * every_s)
        return [r for r, k in enumerate(keys) if store.add(k, 0) == before[r]]

    def full_state_dict(self, model: torch.nn.Module, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """The single-process state dict (expert stacks gathered over the EP group; ``only_rank0``: on rank 0
        alone, ``grads.full_state_dict``); all ranks call."""
        return grads.full_state_dict(model, self, only_rank0)

    def load_full_state_dict(self, model: torch.nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
        """Load a single-process state dict, keeping this rank's slice of each expert stack."""
        grads.load_full_state_dict(model, full_sd, self)

    def destroy(self) -> None:
        # Stop the heartbeat first: a daemon thread inside the store's C++ call when the
        # interpreter exits aborts the process ("terminate called without an active exception").
        if self.heartbeat is not None:
            stop, thread = self.heartbeat
            stop.set()
            thread.join(timeout=15)
        destroy(self)


@dataclass
class LocalMesh:
    """One process on ``device``: the ``Mesh`` interface with nothing to communicate."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ranks_per_node: int = 1
    n_nodes: int = 1
    node: int = 0
    ep: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    expert_dp_group: Any = None
    world_group: Any = None  # None: this process is the whole job
    dp_group: Any = None
    pp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    dp: int = 1
    pp_group: Any = None

    def init_like_single_process(self, model: torch.nn.Module, seed: int) -> None:
        pass  # a model seeded and built in one process is that initialisation

    def sync_gradients(self, model: torch.nn.Module) -> None:
        pass

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the parameters that have a gradient."""
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def max_int(self, value: int) -> int:
        return value

    def start_heartbeat(self, every_s: float = 1.0) -> None:
        pass

    def silent_ranks(self, every_s: float = 1.0) -> list[int]:
        return []

    def barrier(self) -> None:
        pass

    def full_state_dict(self, model: torch.nn.Module, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_full_state_dict(self, model: torch.nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(full_sd)

    def destroy(self) -> None:
        pass


def _store_client():
    """A client of the job's rendezvous store (MASTER_ADDR:MASTER_PORT), or None."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=10))
    except (RuntimeError, ValueError):
        return None


def collective_failure(message: str) -> str | None:
    """How a collective failed, from its backend's error: "timeout", "closed" (the peer's connection reset or
    closed: it ended), or None (something else)."""
    if re.search(r"tim(ed )?out", message, re.I):
        return "timeout"
    if re.search(r"connection (reset|closed) by peer|broken pipe|connection refused", message, re.I):
        return "closed"
    return None


@contextlib.contextmanager
def collective_errors(mesh: Mesh | LocalMesh, timeout_s: float, step: Callable[[], int]):
    """While entered (the ranks' heartbeats running): a collective that timed out, or whose peer's connection closed
    (a rank that died: killed, out of memory), becomes a one-line ``TrainingError`` naming the ranks that stopped
    answering (their heartbeat stands still, ``Mesh.silent_ranks``) and the last step (``step()``), not the
    backend's trace."""
    mesh.start_heartbeat()
    try:
        yield
    except TrainingError:
        raise
    except RuntimeError as e:
        how = collective_failure(str(e))
        if mesh.world == 1 or how is None:
            raise
        silent = mesh.silent_ranks()
        who = f"rank(s) {', '.join(map(str, silent))}" if silent else "another rank"
        if how == "closed":
            raise TrainingError(f"rank {mesh.rank}: a collective's connection closed after step {step()}: {who} "
                                f"ended (its own lines say why)") from None
        raise TrainingError(f"rank {mesh.rank}: a collective got no answer within {timeout_s:g} s (the collective "
                            f"timeout) after step {step()}: {who} stopped answering") from None


def validate_layout(cfg: ModelConfig, world: int, ep: int, ranks_per_node: int, pp: int = 1) -> None:
    """Raise ``FieldError`` (one line, naming ``pp``, ``ep`` or ``ranks_per_node``; ``ConfigError`` for a world
    under 1) when the world cannot be laid out as ``pp`` stages of ``world / pp`` replicas with experts sharded
    ``ep`` ways."""
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    if ranks_per_node < 1 or world % ranks_per_node:
        raise FieldError("ranks_per_node", f"must divide the world size {world} (got {ranks_per_node})")
    if pp < 1 or world % pp:
        raise FieldError("pp", f"must divide the world size {world} (PP x DP = world; got {pp})")
    dp = world // pp
    if pp > 1 and dp % ranks_per_node and ranks_per_node % dp:
        raise FieldError("pp", f"each of the {pp} stages has {dp} ranks, which must be whole nodes or lie inside one "
                               f"node of {ranks_per_node} ranks (got {pp})")
    if ep < 1 or dp % ep:
        where = f"world size {world}" if pp == 1 else f"{dp} data-parallel ranks of a stage (world {world} / pp {pp})"
        raise FieldError("ep", f"must divide the {where} (got {ep})")
    if ep == 1:
        return
    E = cfg.n_routed_experts
    if E == 0 or not cfg.is_moe:
        raise FieldError("ep", f"needs routed experts, but the model has none (n_routed_experts={E}; got {ep})")
    if E % ep:
        raise FieldError("ep", f"must divide n_routed_experts={E} (got {ep})")
    if ep % ranks_per_node and ranks_per_node % ep:
        raise FieldError("ep", f"must be a multiple or a divisor of the {ranks_per_node} ranks per node, so that "
                               f"expert groups map to whole nodes (got {ep})")
    nodes = max(1, ep // ranks_per_node)
    G, M = cfg.n_expert_groups, cfg.n_limited_groups
    if nodes > 1 and G > 1 and M < G and G % nodes:
        raise FieldError("ep", f"node-limited routing (n_limited_groups={M}) needs n_expert_groups={G} to be a "
                               f"multiple of the {nodes} nodes of an EP group ({ranks_per_node} ranks per node), "
                               f"so that every expert group lies on one node (got {ep})")


def _new_groups(rank_lists: list[list[int]], rank: int, timeout: timedelta):
    """new_group for every list of two or more ranks (all ranks, same order); the one holding ``rank``."""
    mine = None
    for ranks in rank_lists:
        if len(ranks) < 2:
            continue
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def _ep_rank_lists(world: int, pp: int, ep: int, P: int, L: int) -> tuple[list[list[int]], ...]:
    """The ranks of every EP group, every inter-node group and every intra-node group (``P`` nodes of
    ``L`` ranks per EP group), in creation order."""
    dp = world // pp
    ep_lists = [list(range(g, g + ep)) for b in range(0, world, dp) for g in range(b, b + dp, ep)]
    inter = [[g[0] + q * L + i for q in range(P)] for g in ep_lists for i in range(L)]
    intra = [[g[0] + q * L + i for i in range(L)] for g in ep_lists for q in range(P)]
    return ep_lists, inter, intra


def build_mesh(cfg: ModelConfig, rank: int, world: int, ep: int, ranks_per_node: int, device: torch.device,
               backend: str, timeout_s: float = 300, pp: int = 1) -> Mesh:
    """Create the process groups on an initialised default group (all ranks must call this)."""
    validate_layout(cfg, world, ep, ranks_per_node, pp)
    timeout = timedelta(seconds=timeout_s)
    R = ranks_per_node
    P = max(1, ep // R)  # nodes per EP group
    L = ep // P  # EP ranks per node
    dp = world // pp
    pp_rank, dp_rank = divmod(rank, dp)
    ep_rank, first = rank % ep, rank - rank % ep
    stage_bases = range(0, world, dp)

    def groups(rank_lists: list[list[int]]):
        return _new_groups(rank_lists, rank, timeout)

    dp_group = dist.group.WORLD if pp == 1 else groups([list(range(b, b + dp)) for b in stage_bases])
    pp_lists = [list(range(d, world, dp)) for d in range(dp)]
    pp_group = groups(pp_lists) if pp > 1 else None
    ep_lists, inter_lists, intra_lists = _ep_rank_lists(world, pp, ep, P, L)
    ep_group = groups(ep_lists) if ep > 1 else None
    expert_dp_group = None
    if ep < dp:
        expert_dp_group = (groups([list(range(b + e, b + dp, ep)) for b in stage_bases for e in range(ep)])
                           if ep > 1 else dp_group)
    inter_group = intra_group = None
    if ep > 1:
        inter_group, intra_group = groups(inter_lists), groups(intra_lists)
    return Mesh(rank=rank, world=world, local_rank=rank % R, ranks_per_node=R, n_nodes=world // R, node=rank // R,
                ep=ep, ep_rank=ep_rank, ep_group=ep_group, expert_dp_group=expert_dp_group, device=device,
                backend=backend, ep_nodes=P, ep_ranks_per_node=L, ep_node=ep_rank // L, inter_group=inter_group,
                intra_group=intra_group, ep_ranks=list(range(first, first + ep)), pp=pp, pp_rank=pp_rank,
                dp_rank=dp_rank, dp_group=dp_group, pp_group=pp_group, pp_ranks=pp_lists[dp_rank],
                timeout_s=timeout_s)


def init_distributed(cfg: ModelConfig, ep: int = 1, ranks_per_node: int | None = None,
                     timeout_s: float = 300, device: str = "auto", pp: int = 1) -> Mesh | None:
    """Join the torchrun job (env: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).

    Returns None when not launched by torchrun (WORLD_SIZE unset) and ep, pp <= 1: a plain
    single-process run (ep or pp > 1 without torchrun: ``FieldError``). ``device``: ``cuda`` is NCCL with one
    GPU per local rank (an error when the machine has fewer GPUs than local ranks), ``cpu`` is gloo on CPU, and
    ``auto`` is ``cuda`` when there is a GPU for every local rank, else ``cpu``. ``timeout_s`` bounds every
    collective, so a mismatch fails, not hangs.
    """
    ep = ep or 1
    if "WORLD_SIZE" not in os.environ:
        if ep <= 1 and pp <= 1:
            return None
        name, n = ("pp", pp) if pp > 1 else ("ep", ep)
        raise FieldError(name, f"{n} needs a multi-process launch, e.g. torchrun --nproc-per-node {pp * ep} "
                               "-m flyer ...")
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", "0"))
    rpn = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    validate_layout(cfg, world, ep, rpn, pp)  # fail before any rendezvous
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device not in ("auto", "cpu", "cuda"):
        raise FieldError("device", f"under torchrun each rank uses its local GPU; give auto, cpu or cuda "
                                   f"(got {device!r})")
    if device == "cuda" and gpus < local_world:
        raise FieldError("device", f"cuda needs a GPU per local rank: {local_world} ranks on this machine, "
                                   f"{gpus} CUDA device(s); cpu runs over gloo on the CPU")
    if device == "cuda" or (device == "auto" and gpus >= local_world):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kw)
    return build_mesh(cfg, rank, world, ep, rpn, device, backend, timeout_s, pp)


def init_mesh(cfg: ModelConfig, ep: int = 1, ranks_per_node: int | None = None, device: str = "auto",
              what: str = "device", timeout_s: float = 300, pp: int = 1) -> Mesh | LocalMesh:
    """The job's mesh: ``init_distributed`` under a multi-rank launch or when ``ep`` or ``pp`` > 1
    (every collective bounded by ``timeout_s``), else a ``LocalMesh`` on ``device`` (auto, cpu,
    cuda, cuda:N; errors start with ``what``)."""
    if ep <= 1 and pp <= 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalMesh(resolve_device(device, what))
    return init_distributed(cfg, ep, ranks_per_node, timeout_s=timeout_s, device=device, pp=pp)


def destroy(mesh: Mesh | None) -> None:
    """Tear down every process group (the default one included), and drop the handles this process keeps on them.

    ``destroy_process_group`` leaves a group's worker threads running while any handle on it lives; a thread that
    finished a collective's cleanup after the interpreter had begun to exit aborted the rank ("terminate called
    without an active exception"), and torchrun then killed the others, at times before rank 0 had printed the
    run's error. Without handles a group is freed, and its threads joined, when the last object using it goes
    (the model's dispatchers, the trainer).
    """
    if mesh is not None and dist.is_initialized():
        dist.destroy_process_group()
        _release_default_groups()
    if isinstance(mesh, Mesh):
        for f in fields(mesh):
            if f.name.endswith(("_group", "_group_bwd")):  # every group handle the mesh holds
                setattr(mesh, f.name, None)


def _release_default_groups() -> None:
    """Set to None (the default group, as before any group existed) every default argument of torch.distributed's
    functions that holds a process group: ``group=dist.group.WORLD`` is evaluated when the module is imported, so a
    module first imported once the job's group existed (torch.distributed.nn.functional, imported by .optim and
    .pipelining; ZeroRedundancyOptimizer's helpers; FSDP's ShardedGradScaler) held that group for the life of the
    process."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("torch.distributed"):
            continue
        # type(), not isinstance(): that reads an object's __class__, which a deprecated alias answers with a warning
        for owner in (module, *(v for v in vars(module).values() if issubclass(type(v), type))):
            for f in list(vars(owner).values()):
                if type(f) in (staticmethod, classmethod):
                    f = f.__func__
                if type(f) is not types.FunctionType:
                    continue
                if any(issubclass(type(v), dist.ProcessGroup) for v in f.__defaults__ or ()):
                    f.__defaults__ = tuple(None if issubclass(type(v), dist.ProcessGroup) else v
                                           for v in f.__defaults__)


__all__ = ["Mesh", "LocalMesh", "collective_errors", "collective_failure", "validate_layout", "build_mesh",
           "init_distributed", "init_mesh", "destroy"]
