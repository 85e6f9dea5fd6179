"""Pipeline schedules on 4 gloo ranks: throughput, measured bubble against ``flyer net pipeline``'s
prediction, and the share of EP communication DualPipeV's overlap hides.

Two layouts of 4 ranks, each training the same model (tiny preset with ``--n-layers`` blocks, so
that PP 4 DualPipeV has its 8 stages) on the same global batch (``--global-batch`` sequences of
``--seq-len`` tokens in ``--micro-batches`` micro-batches per pipeline):

- ``pp4``: PP 4 (no EP): 1F1B and DualPipeV.
- ``pp2_ep2``: PP 2 x DP 2 with EP 2 inside each stage (flat all-to-all dispatch): 1F1B, and
  DualPipeV with its forward/backward overlap (``flyer.parallel.overlap``) off and on.

Per run, step times are medians over ``--steps`` steps after one warm-up (the job's step: the
slowest rank's, every step starting at a barrier); the runs of a layout take turns step by step.
Definitions (also in the JSON's ``notes``):

- bubble of a rank = 1 - busy / step time, busy = the union of the intervals in which the rank
  computes a stage chunk (``forward_one_chunk`` with the loss, ``backward_one_chunk``,
  ``backward_weight_one_chunk``; the EP exchanges inside a chunk count as busy); ``bubble_<s>`` is
  the mean over ranks.
- predicted bubble = ``flyer.cluster.pipeline.bubble_fraction`` with F and B the measured forward
  and backward time per micro-batch of a rank (its chunks summed; mean over ranks), W = B / 2 and
  F&B = F + B (no gain assumed from overlap); DualPipeV's prediction uses the run without overlap.
- EP comm time = time inside the EP all-to-alls (``dispatch.all_to_all_rows`` and the split-size
  exchanges), per step, mean over ranks, with overlap off.
- ``comm_hidden_fraction_dualpipev`` = (step without overlap - step with overlap) / EP comm time,
  clamped to [0, 1]: what the overlap saved.
- ``comm_beside_compute_fraction_dualpipev``: with overlap, the share of the EP comm time during
  which the rank's other thread computed: how much the two chunks overlapped, whether or not the
  machine had a free core to turn that into a shorter step.

Peer: the same model and global batch in one process (one thread, as each rank), micro-batch by
micro-batch with gradient accumulation, run by rank 0 while the others wait, taking its turn with
the runs step by step; ``tokens_per_s_ratio_*`` divide by its tokens/s.

    python bench/pipeline.py [--steps 3] [--seq-len 32] [--global-batch 16] [--micro-batches 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
import torch.distributed as dist

from flyer.cluster.pipeline import bubble_fraction
from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.parallel import dispatch
from flyer.parallel.launch import run_ranks
from flyer.parallel.mesh import destroy, init_distributed
from flyer.parallel.pipeline import PipelineModel
from flyer.train.build import build_model

WORLD = 4
LAYOUTS = {"pp4": dict(pp=4, ep=1), "pp2_ep2": dict(pp=2, ep=2)}
RUNS = {"pp4": [("1f1b", False), ("dualpipev", False)],
        "pp2_ep2": [("1f1b", False), ("dualpipev", False), ("dualpipev", True)]}


def _cfg(args):
    return preset("tiny", vocab_size=args.vocab, n_layers=args.n_layers, max_seq_len=max(64, args.seq_len),
                  original_seq_len=max(64, args.seq_len))


def _data(args, step: int):
    g = torch.Generator().manual_seed(step)
    d = torch.randint(0, args.vocab, (args.global_batch, args.seq_len + 1), generator=g)
    return d[:, :-1], d[:, 1:]


class Recorder:
    """Intervals (start, end, kind, thread) of this rank's stage chunks (kind 'F' or 'B') and EP
    exchanges ('comm'), from any thread."""

    def __init__(self):
        self.intervals: list[tuple[float, float, str, int]] = []
        self.lock = threading.Lock()

    def timed(self, fn, kind: str):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t1 = time.perf_counter()
                with self.lock:
                    self.intervals.append((t0, t1, kind, threading.get_ident()))
        return wrapper

    def reset(self):
        self.intervals = []

    def spans(self, kinds: tuple[str, ...], thread: int | None = None, other_thread: int | None = None):
        return _merge([(a, b) for a, b, k, t in self.intervals if k in kinds and (thread is None or t == thread)
                       and (other_thread is None or t != other_thread)])

    def comm_beside_compute(self) -> float:
        """Seconds of EP exchanges in one thread while another thread computed (in a chunk, outside
        its own exchanges): the overlap at work."""
        total = 0.0
        for tid in {t for _, _, k, t in self.intervals if k == "comm"}:
            others = {t for *_, t in self.intervals if t != tid}
            compute = _merge([iv for o in others for iv in _subtract(self.spans(("F", "B"), thread=o),
                                                                     self.spans(("comm",), thread=o))])
            total += _overlap(self.spans(("comm",), thread=tid), compute)
        return total


def _merge(ivs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(ivs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merged intervals ``xs`` minus merged intervals ``ys``."""
    out = []
    for a, b in xs:
        for c, d in ys:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
        if a < b:
            out.append((a, b))
    return out


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


def _length(ivs: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in ivs)


def _instrument(pm: PipelineModel, rec: Recorder) -> None:
    for st in pm.pipe_stages:
        st.forward_one_chunk = rec.timed(st.forward_one_chunk, "F")
        st.backward_one_chunk = rec.timed(st.backward_one_chunk, "B")
        st.backward_weight_one_chunk = rec.timed(st.backward_weight_one_chunk, "B")
    pm.schedule._maybe_compute_loss = rec.timed(pm.schedule._maybe_compute_loss, "F")


def _worker(rank: int, args, layout: str) -> list[dict]:
    cfg = _cfg(args)
    lay = LAYOUTS[layout]
    mesh = init_distributed(cfg, ep=lay["ep"], pp=lay["pp"], timeout_s=600)
    rec = Recorder()
    # every EP exchange of every run goes through these two (module globals looked up per call)
    dispatch.all_to_all_rows = rec.timed(dispatch.all_to_all_rows, "comm")
    dispatch._exchange_counts = rec.timed(dispatch._exchange_counts, "comm")
    rows = args.global_batch // mesh.dp
    M = args.micro_batches
    peer, peer_s = OneProcess(args) if rank == 0 else None, []
    runs = []
    for schedule, overlap in RUNS[layout]:
        model = build_model(cfg, mesh, "fp32", seed=0, dispatcher="flat")
        pm = PipelineModel(model, mesh, schedule, M, rows // M, args.seq_len, overlap=overlap)
        _instrument(pm, rec)
        runs.append((pm, []))
    # the runs take turns step by step, so that a change of the machine's load falls on all of them
    for step in range(args.steps + 1):
        x_all, y_all = _data(args, step)
        dist.barrier()
        if peer is not None:  # the other ranks wait in the barrier (blocked, not spinning)
            t = peer.step(x_all, y_all)
            peer_s.extend([t] if step else [])
        dist.barrier()
        mine = slice(mesh.dp_rank * rows, (mesh.dp_rank + 1) * rows)
        x, y = x_all[mine], y_all[mine]
        for pm, steps in runs:
            pm.zero_grad(set_to_none=True)
            dist.barrier()
            rec.reset()
            t0 = time.perf_counter()
            pm.train_step(x, y)
            wall = time.perf_counter() - t0
            busy = _length(rec.spans(("F", "B")))
            f = sum(b - a for a, b, k, _ in rec.intervals if k == "F")
            bwd = sum(b - a for a, b, k, _ in rec.intervals if k == "B")
            comm = sum(b - a for a, b, k, _ in rec.intervals if k == "comm")
            if step:  # step 0 warms up (allocations, first sends)
                steps.append(dict(wall=wall, busy=busy, f=f / M, b=bwd / M, comm=comm,
                                  comm_beside=rec.comm_beside_compute()))
    out = []
    for pm, steps in runs:
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        walls = torch.tensor([s["wall"] for s in steps], dtype=torch.float64)
        dist.all_reduce(walls, op=dist.ReduceOp.MAX)  # the job's step: its slowest rank's
        comm = torch.tensor([s["comm"] for s in steps], dtype=torch.float64)
        dist.all_reduce(comm)
        out.append(dict(schedule=pm.schedule_name, overlap=pm.overlap, rank=rank, pp_rank=mesh.pp_rank,
                        step_s=float(walls.median()), steps_s=walls.tolist(), comm_steps_s=(comm / WORLD).tolist(),
                        rank_step_s=med["wall"], busy_s=med["busy"],
                        bubble=1 - med["busy"] / med["wall"], f_s=med["f"], b_s=med["b"], comm_s=med["comm"],
                        comm_beside_compute_s=med["comm_beside"],
                        peer_s=statistics.median(peer_s) if peer_s else None))
    destroy(mesh)  # joins the groups' threads: one left at exit can abort the rank
    return out


class OneProcess:
    """The peer: the same model in one process, the global batch micro-batch by micro-batch."""

    def __init__(self, args):
        torch.manual_seed(0)
        self.model, self.args = Transformer(_cfg(args)), args

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        M = self.args.micro_batches
        per = x.shape[0] // M
        self.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for i in range(M):
            rows = slice(i * per, (i + 1) * per)
            (self.model.compute_loss(x[rows], y[rows]).loss / M).backward()
        return time.perf_counter() - t0


def _summarise(ranks: list[list[dict]], pp: int, M: int, tokens: int) -> dict:
    peer_tps = tokens / ranks[0][0]["peer_s"]
    runs = {"tokens_per_s_one_process": peer_tps}
    for i, first in enumerate(ranks[0]):
        rs = [r[i] for r in ranks]
        name = first["schedule"] + ("_overlap" if first["overlap"] else "")
        F = statistics.mean(r["f_s"] for r in rs)
        B = statistics.mean(r["b_s"] for r in rs)
        tps = tokens / first["step_s"]
        runs[name] = dict(
            step_s=first["step_s"], tokens_per_s=tps, tokens_per_s_ratio_over_one_process=tps / peer_tps,
            bubble=statistics.mean(r["bubble"] for r in rs),
            bubble_predicted=bubble_fraction(first["schedule"], pp, M, F, B, B / 2),
            f_s_per_microbatch=F, b_s_per_microbatch=B,
            ep_comm_s=statistics.mean(r["comm_s"] for r in rs),
            ep_comm_beside_compute_fraction=(sum(r["comm_beside_compute_s"] for r in rs) / sum(r["comm_s"] for r in rs)
                                             if any(r["comm_s"] for r in rs) else None),
            per_rank=[dict(rank=r["rank"], pp_rank=r["pp_rank"], bubble=round(r["bubble"], 4),
                           step_s=round(r["rank_step_s"], 4), busy_s=round(r["busy_s"], 4),
                           ep_comm_s=round(r["comm_s"], 4)) for r in rs])
    off, on = runs.get("dualpipev"), runs.get("dualpipev_overlap")
    if off and on and off["ep_comm_s"] > 0:
        runs["comm_hidden_fraction_dualpipev"] = min(1.0, max(0.0, (off["step_s"] - on["step_s"]) / off["ep_comm_s"]))
        # the same, step by step (the runs take turns, so step i of both saw about the same load): its spread
        i_off = next(i for i, r in enumerate(ranks[0]) if r["schedule"] == "dualpipev" and not r["overlap"])
        i_on = next(i for i, r in enumerate(ranks[0]) if r["schedule"] == "dualpipev" and r["overlap"])
        a, b, c = ranks[0][i_off]["steps_s"], ranks[0][i_on]["steps_s"], ranks[0][i_off]["comm_steps_s"]
        per_step = sorted((x - y) / z for x, y, z in zip(a, b, c))
        runs["comm_hidden_fraction_dualpipev_per_step"] = dict(
            min=per_step[0], median=statistics.median(per_step), max=per_step[-1])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run (after one warm-up)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step, over all replicas")
    ap.add_argument("--micro-batches", type=int, default=8, help="per pipeline (DualPipeV on PP 4 needs 8)")
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = ap.parse_args()
    for name in args.layouts:
        dp = WORLD // LAYOUTS[name]["pp"]
        if args.global_batch % (dp * args.micro_batches):
            ap.error(f"--global-batch must be a multiple of {dp} replicas x --micro-batches {args.micro_batches} "
                     f"(layout {name}; got {args.global_batch})")
    tokens = args.global_batch * args.seq_len
    layouts = {}
    for name in args.layouts:
        ranks = run_ranks(_worker, WORLD, args, name)
        layouts[name] = _summarise(ranks, LAYOUTS[name]["pp"], args.micro_batches, tokens)
    top = layouts.get("pp4") or next(iter(layouts.values()))
    ep = layouts.get("pp2_ep2", {})
    print(json.dumps({
        "ranks": WORLD, "backend": "gloo", "threads_per_rank": 1, "n_layers": args.n_layers, "seq_len": args.seq_len,
        "global_batch": args.global_batch, "micro_batches": args.micro_batches, "steps": args.steps,
        "tokens_per_step": tokens,
        "top_level_layout": "pp4" if "pp4" in layouts else args.layouts[0],
        "tokens_per_s_one_process": top["tokens_per_s_one_process"],
        "tokens_per_s_1f1b": top["1f1b"]["tokens_per_s"],
        "tokens_per_s_dualpipev": top["dualpipev"]["tokens_per_s"],
        "bubble_1f1b": top["1f1b"]["bubble"],
        "bubble_dualpipev": top["dualpipev"]["bubble"],
        "bubble_predicted_1f1b": top["1f1b"]["bubble_predicted"],
        "bubble_predicted_dualpipev": top["dualpipev"]["bubble_predicted"],
        "comm_hidden_fraction_dualpipev": ep.get("comm_hidden_fraction_dualpipev"),
        "comm_beside_compute_fraction_dualpipev":
            ep.get("dualpipev_overlap", {}).get("ep_comm_beside_compute_fraction"),
        "layouts": layouts,
        "notes": {
            "bubble": "per rank 1 - busy / step time, busy = union of the stage-chunk compute intervals (forward "
                      "with the loss, backward; EP exchanges inside a chunk count as busy); mean over ranks",
            "bubble_predicted": "flyer.cluster.pipeline.bubble_fraction: bubble / (bubble + M (F + B)), F and B the "
                                "measured per-micro-batch times of a rank (mean over ranks), W = B/2, F&B = F + B",
            "comm_hidden_fraction_dualpipev": "pp2_ep2: (step without overlap - step with overlap) / EP all-to-all "
                                              "time per step without overlap (mean over ranks), clamped to [0, 1]; "
                                              "layouts.pp2_ep2.comm_hidden_fraction_dualpipev_per_step: the same for "
                                              "each pair of steps taken in turn (min, median, max; not clamped)",
            "comm_beside_compute_fraction_dualpipev": "pp2_ep2 with overlap: the share of the EP all-to-all time in "
                                                      "which this rank's other thread computed (inside a chunk, "
                                                      "outside its own exchanges), summed over ranks",
            "step": "median over steps of the slowest rank's train_step, every step starting at a barrier",
            "peer": "one process, one thread, the same model and global batch in the same micro-batches, on rank "
                    "0 while the other ranks wait in a barrier, taking its turn beside the runs step by step",
        },
    }, indent=1))


if __name__ == "__main__":
    main()
