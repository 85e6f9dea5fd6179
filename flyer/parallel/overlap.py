"""DualPipe's computation-communication overlap: a forward chunk and a backward chunk run at once.

DualPipeV pairs, in its steady phase, the forward chunk of one micro-batch with the backward chunk
of another (PyTorch's ``OVERLAP_F_B`` action, whose two sub-actions its runtime runs one after the
other). ``OverlapFB`` runs them concurrently: the forward in a worker thread, the backward in the
caller, so while one waits in an EP all-to-all the other computes (DeepSeek-V3 report, section
3.2.1: "the all-to-all and PP communication can be fully hidden").

Two rules make this correct:

- Collectives over one process group must be issued in the same order on every rank. The forward
  exchanges over the EP groups and the backward over a second copy of them
  (``Mesh.add_backward_groups``; ``dispatch.Stage.grad_group``), so each group sees one stream of
  collectives, in schedule order, whatever the interleaving between the two threads.
- The schedule's bookkeeping (receiving a stage's input, the backward counters, the losses, handing
  a result to the neighbouring stage on this rank) runs in the caller, before and after the two
  chunks, exactly as PyTorch's runtime does it for FORWARD and FULL_BACKWARD
  (``torch/distributed/pipelining/schedules.py``, ``_PipelineScheduleRuntime._step_microbatches``);
  only ``forward_one_chunk`` (with the loss) and ``backward_one_chunk`` run concurrently. They touch
  different stages; the one module two stages may share (the embedding, first and last stage on
  pipeline rank 0) is read by the forward and accumulates its gradient in the backward.

Grad mode and autocast are thread-local: the worker re-enters the caller's, and flyer's own switches
(``flyer.runtime.carried``). On CUDA the worker issues its kernels on a side stream (ordered after the
caller's stream at the start; the caller's stream waits for it at the end), so the two chunks overlap on
the device too.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    _Action,
    _PipelineContext,
    _wait_batch_p2p,
)

from flyer.runtime import carried


class OverlapFB:
    """The ``OVERLAP_F_B`` function of a ``_PipelineScheduleRuntime``
    (``schedule.register_custom_function(OVERLAP_F_B, OverlapFB())``): runs the action's FORWARD
    sub-action in a worker thread while its FULL_BACKWARD sub-action runs in the caller.
    ``save_forward_output``: keep the forward's outputs (a step with ``return_outputs=True``).

    Counters: ``runs`` (actions run), ``max_concurrent`` (2 once the two chunks computed at the
    same moment: evidence that they overlapped)."""

    def __init__(self, save_forward_output: bool = False):
        self.save_forward_output = save_forward_output
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flyer-overlap")
        self._side_stream = None
        self.runs = 0
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _computing(self):
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def __call__(self, action: _Action, ctx: _PipelineContext) -> None:
        sched = ctx.schedule_ref
        fwd, bwd = action.sub_actions
        if fwd.computation_type != FORWARD or bwd.computation_type != FULL_BACKWARD:
            raise AssertionError(f"OVERLAP_F_B expects (FORWARD, FULL_BACKWARD), got {action.sub_actions}")
        stages = {st.stage_index: st for st in sched._stages}
        f_idx, f_mb, b_idx, b_mb = fwd.stage_index, fwd.microbatch_index, bwd.stage_index, bwd.microbatch_index
        f_stage, b_stage = stages[f_idx], stages[b_idx]

        # bookkeeping before: inputs received, the loss to backpropagate, the backward counter
        if not f_stage.is_first and f_idx - 1 not in stages:
            _wait_batch_p2p(sched.fwd_recv_ops.pop((f_idx, f_mb)))
        if not b_stage.is_last and b_idx + 1 not in stages:
            _wait_batch_p2p(sched.bwd_recv_ops.pop((b_idx, b_mb)))
        loss = sched._maybe_get_loss(b_stage, b_mb)
        sched.backward_counter[b_idx] += 1
        last_backward = sched.backward_counter[b_idx] == sched._n_microbatches

        device = f_stage.device
        grad_enabled = torch.is_grad_enabled()
        autocast_on = torch.is_autocast_enabled(device.type)
        autocast_dtype = torch.get_autocast_dtype(device.type)
        stream = self._stream(device)

        def forward():
            with torch.set_grad_enabled(grad_enabled), \
                    torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_on), \
                    (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
                    self._computing():
                out = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb],
                                                save_forward_output=self.save_forward_output)
                sched._maybe_compute_loss(f_stage, out, ctx.target_mbs, f_mb)
                return out

        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        pending = self._worker.submit(carried(forward))  # under this thread's flyer switches
        try:
            with self._computing():
                b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last_backward)
        finally:
            output = pending.result()  # the forward's error, if any, raises here
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        self.runs += 1

        # bookkeeping after: hand results to the neighbouring stage when it lives on this rank
        if f_idx + 1 in stages:
            stages[f_idx + 1].set_local_fwd_input(output, f_mb)
        if b_idx - 1 in stages:
            stages[b_idx - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        return self._side_stream

    def close(self) -> None:
        self._worker.shutdown(wait=True)


__all__ = ["OverlapFB"]
