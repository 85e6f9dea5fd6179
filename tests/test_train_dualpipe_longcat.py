"""`flyer train --pp 2 --ep 2 --pp-schedule dualpipev` on a tiny LongCat-Flash (``shortcut_moe``, zero-computation
experts) under torchrun (gloo, CPU) on 4 ranks against one process on the same rows, over two steps: the loss terms,
the expert loads (identity columns too) and the router statistics.

DualPipeV on PP 2 cuts the model into 4 stages of whole pairs, so 8 blocks (4 pairs, one a stage; rank r holds
stages r and 3 - r). With EP > 1 its paired forward and backward chunks run concurrently (``OverlapFB``): a forward
in a worker thread, through its pair's shortcut MoE and the all-to-alls, while a backward of the rank's other stage
runs beside it. The ranks run this file (``__main__``), which counts those paired actions and logs them, so the test
sees that the overlap ran. The rows and tolerances are tests/test_train_ep_longcat.py's PP 2 x EP 2 case (DP 2, each
replica's M micro-batches of its own stream; the one process draws them with ``TwoStreams``, in this process).
"""

from __future__ import annotations

import re
import sys

from ranks import needs_split_backward
from test_train_ep_longcat import one_process
from test_train_pp import _records, _run
from test_train_pp_longcat import BATCH, MODEL, SEQ_LEN, _args, _toml, check_steps

EP, M = 2, 4  # DualPipeV on 2 pipeline ranks needs 4 micro-batches
MODEL_8 = {**MODEL, "n_layers": 8}
N_PARAMS = 0.5e6 * 1.2  # "0.5M params" in the log, rounded up


@needs_split_backward
def test_pp2_ep2_dualpipev_equals_one_process_on_the_same_rows(tmp_path, data_cache, monkeypatch):
    config = _toml(tmp_path / "longcat.toml", MODEL_8)
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", __file__, "train"]
    err = _run(ranks + _args(tmp_path / "pp", data_cache, config, "--pp", "2", "--ep", str(EP), "--pp-schedule",
                             "dualpipev", "--micro-batches", str(M))).stderr
    assert f"PP 2 x DP 2, EP 2, dualpipev over {M} micro-batches" in err, err[-3000:]
    overlapped = {int(r): int(n) for r, n in re.findall(r"rank (\d): (\d+) overlapped forward/backward pairs", err)}
    assert sorted(overlapped) == [0, 1, 2, 3] and min(overlapped.values()) > 0, err[-3000:]
    one_process(monkeypatch, _args(tmp_path / "one", data_cache, config, "--grad-accum", str(EP * M)))
    pp, one = _records(tmp_path / "pp"), _records(tmp_path / "one")
    check_steps(pp, one, MODEL_8, N_PARAMS)  # each stage's pair and its shortcut MoE, overlapped or not
    picks = EP * M * BATCH * SEQ_LEN * MODEL["n_activated_experts"]  # both replicas' micro-batches, per pair
    assert all(sum(x) == picks for r in pp.values() for x in r["expert_load"])


if __name__ == "__main__":  # a rank of the run above: `flyer train`, logging at exit how many chunk pairs overlapped
    import atexit
    import os

    import flyer.parallel.overlap
    from flyer.cli import main

    made = []

    class CountedOverlap(flyer.parallel.overlap.OverlapFB):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    flyer.parallel.overlap.OverlapFB = CountedOverlap  # the pipeline imports it when it builds the schedule
    atexit.register(lambda: print(f"rank {os.environ['RANK']}: {sum(o.runs for o in made)} overlapped "
                                  f"forward/backward pairs", file=sys.stderr))
    sys.exit(main(sys.argv[1:]))
