"""Pipeline-parallel schedules: bubble time and per-device memory for 1F1B, ZB1P, DualPipe and DualPipeV.

Notation (DualPipe README / DeepSeek-V3 report, Table 2): ``F`` is the time of one forward
chunk, ``B`` one full backward chunk, ``W`` the weight-gradient part of ``B``, ``FB`` a forward
and a backward chunk run overlapped (DualPipe's F&B), ``PP`` the number of stages.

====================  =====================  ===========  ===========
schedule              bubble                 parameters   activations
====================  =====================  ===========  ===========
1F1B                  (PP-1)(F+B)            1x           PP
ZB1P                  (PP-1)(F+B-2W)         1x           PP
DualPipe              (PP/2-1)(FB+B-3W)      2x           PP+1
DualPipeV             (PP-1)(FB+B-3W)/2      1x           PP+1/2
====================  =====================  ===========  ===========

Activations count the micro-batches whose activations the busiest (first) stage holds at once.

Every row is in the unit of one device's stage (its share of the layers, as in 1F1B). DualPipeV
(DualPipe README, "DualPipeV": DualPipe cut in half into a V): ``PP`` devices each hold two
chunks, stages ``d`` and ``2 PP - 1 - d`` of ``2 PP``, so a device holds the parameters of one
1F1B stage (1x), and the README's DualPipe row over ``2 PP`` stages, ``(2 PP / 2 - 1)(FB + B -
3W)`` in one chunk's times, is ``(PP - 1)(FB + B - 3W) / 2`` in a stage's (a chunk is half one).
Its activations, ``2 PP + 1`` chunk micro-batches, are ``PP + 1/2`` stage micro-batches.

Bubble fraction (``bubble_fraction``): the share of a device's step spent idle, bubble /
(bubble + M (F + B)), with ``M`` micro-batches per step (every schedule gives each device the
work of its stage for every micro-batch).
``simulate_1f1b`` replays the 1F1B schedule op by op as an independent check of its row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flyer.errors import FieldError

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class ScheduleCost:
    schedule: str
    pp: int
    bubble: float  # idle time per device per iteration, in the unit of F/B/W
    param_copies: int  # parameter (and gradient) copies per device, in units of one stage
    activation_microbatches: float  # in-flight micro-batches held by the first stage

    def as_dict(self) -> dict:
        return asdict(self)


def schedule_cost(schedule: str, pp: int, f: float = 1.0, b: float = 2.0, w: float = 1.0,
                  fb: float | None = None) -> ScheduleCost:
    """Bubble and memory multipliers of ``schedule`` on ``pp`` stages.

    ``fb`` defaults to ``f + b`` (no gain from overlapping a forward with a backward chunk).
    """
    if schedule not in SCHEDULES:
        raise FieldError("schedule", f"unknown schedule '{schedule}' (choose from: {', '.join(SCHEDULES)})")
    if pp < 1:
        raise FieldError("pp", f"must be >= 1 (got {pp})")
    for name, value in (("f", f), ("b", b), ("w", w)):
        if value < 0:
            raise FieldError(name, f"must be >= 0 (got {value})")
    if w > b:
        raise FieldError("w", f"the weight-gradient part must be <= the backward time {b} (got {w})")
    if fb is not None and fb < max(f, b):  # overlapping F with B cannot beat the longer of the two
        raise FieldError("fb", f"the overlapped F&B must be >= max(F, B) = {max(f, b):g} (got {fb:g})")
    if fb is not None and fb > f + b:  # nor take longer than running them one after the other
        raise FieldError("fb", f"the overlapped F&B must be <= F + B = {f + b:g} (got {fb:g})")
    fb = f + b if fb is None else fb
    if schedule == "dualpipev":  # a chunk is half a stage
        cost = ScheduleCost("dualpipev", pp, (pp - 1) * (fb + b - 3 * w) / 2, 1, pp + 0.5)
    elif schedule == "1f1b":
        cost = ScheduleCost("1f1b", pp, (pp - 1) * (f + b), 1, pp)
    elif schedule == "zb1p":
        cost = ScheduleCost("zb1p", pp, (pp - 1) * (f + b - 2 * w), 1, pp)
    elif pp % 2:
        raise FieldError("pp", f"must be even for DualPipe (got {pp})")
    else:
        cost = ScheduleCost("dualpipe", pp, (pp / 2 - 1) * (fb + b - 3 * w), 2, pp + 1)
    if cost.bubble < 0:  # the rows assume W small enough that deferring it fills (not overfills) the bubble
        raise FieldError("w", f"W = {w:g} gives {schedule} a negative bubble {cost.bubble:g} with F = {f:g}, "
                              f"B = {b:g}, F&B = {fb:g}; use a smaller weight-gradient part")
    return cost


def bubble_fraction(schedule: str, pp: int, microbatches: int, f: float = 1.0, b: float = 2.0, w: float = 1.0,
                    fb: float | None = None) -> float:
    """Idle share of a device's step: bubble / (bubble + ``microbatches`` (F + B)); F, B, W, FB of
    one stage (a device's share of the layers)."""
    cost = schedule_cost(schedule, pp, f, b, w, fb)
    work = microbatches * (f + b)
    return cost.bubble / (cost.bubble + work) if cost.bubble + work > 0 else 0.0


def simulate_1f1b(pp: int, microbatches: int, f: float, b: float) -> tuple[float, list[float]]:
    """Replay 1F1B op by op; returns (makespan, idle time per stage).

    Stage ``s`` runs ``pp - s - 1`` warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards. F(s, m) waits for F(s-1, m); B(s, m) waits for
    B(s+1, m) and F(s, m). Idle time per stage equals the formula's (PP-1)(F+B).
    """
    if microbatches < pp:
        raise FieldError("microbatches", f"1F1B needs at least the {pp} stages' worth (got {microbatches})")
    orders = []
    for s in range(pp):
        warm = pp - s - 1
        ops = [("F", m) for m in range(warm)]
        nf, nb = warm, 0
        while nb < microbatches:
            if nf < microbatches:
                ops.append(("F", nf))
                nf += 1
            ops.append(("B", nb))
            nb += 1
        orders.append(ops)
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    clock = [0.0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while pos[s] < len(orders[s]):
                kind, m = orders[s][pos[s]]
                deps = [("F", s - 1, m)] if kind == "F" and s > 0 else []
                if kind == "B":
                    deps = [("F", s, m)] + ([("B", s + 1, m)] if s < pp - 1 else [])
                if any(d not in done for d in deps):
                    break
                start = max([clock[s]] + [done[d] for d in deps])
                clock[s] = start + (f if kind == "F" else b)
                done[(kind, s, m)] = clock[s]
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for a valid 1F1B order
            raise RuntimeError("1F1B replay deadlocked")
    makespan = max(clock)
    busy = microbatches * (f + b)
    return makespan, [makespan - busy for _ in range(pp)]


def pipeline_report(schedule: str, pp: int, f: float, b: float, w: float, fb: float | None,
                    stage_param_gib: float = 0.0, microbatch_activation_gib: float = 0.0) -> dict:
    """Bubble plus per-device memory: param copies x stage parameters + in-flight activations."""
    c = schedule_cost(schedule, pp, f, b, w, fb)
    return {
        **c.as_dict(),
        "f": f, "b": b, "w": w, "fb": f + b if fb is None else fb,
        "param_memory_gib": c.param_copies * stage_param_gib,
        "activation_memory_gib": c.activation_microbatches * microbatch_activation_gib,
    }


def compare(pp: int, f: float, b: float, w: float, fb: float | None = None,
            stage_param_gib: float = 0.0, microbatch_activation_gib: float = 0.0) -> list[dict]:
    """All the schedules side by side (DualPipe skipped for odd ``pp``)."""
    names = [s for s in SCHEDULES if not (s == "dualpipe" and pp % 2)]
    return [pipeline_report(s, pp, f, b, w, fb, stage_param_gib, microbatch_activation_gib) for s in names]
