#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (what CI cannot do: it has no GPU): the CUDA tests,
# the serving bench on the GPU, the whole test suite (`auto` devices pick the GPU), FP8 GEMMs
# against bf16, the default training run in bf16 and FP8, the model step, and training throughput
# against transformers. Results go to $OUT (default runs/cuda-checks). Name checks to run only
# those, in the order given (a short device lease):
#
#     bash bench/cuda_checks.sh [cuda-tests] [graphs] [serve] [suite] [fp8] [train] [model-step] [throughput] [window]
#
# window: sliding-window attention's CUDA test (its band kept once, not padded per chunk), then its bench in BF16.
# graphs: the CUDA-graph tests, then the engine's decode steps (small, 1 and 16 requests at 128 tokens of context)
# and steps of 16 decoding requests and a 256-token prompt replayed from graphs against eager, side by side (JSON).
#
# PYTHON=python3 by default; flyer importable.
set -u
out=${OUT:-runs/cuda-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "== $1 ($(date +%T))"; }
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")

step device
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

for check in "${@:-cuda-tests graphs serve suite fp8 train model-step throughput window}"; do for c in $check; do
  step "$c"
  case $c in
    cuda-tests) timeout 150 $py -m pytest -q -ra -p no:cacheprovider -m cuda 2>&1 | tee "$out/pytest-cuda.log" | tail -15 ;;
    graphs)
      timeout 120 $py -m pytest -q -ra -p no:cacheprovider -m cuda tests/test_serve_graphs.py 2>&1 | tail -5
      timeout 150 $py -c "import sys, torch; sys.path.insert(0, 'bench'); from _serve_engine import decode_steps, \
mixed_steps; from flyer.config import preset; from flyer.model.transformer import Transformer; torch.manual_seed(0); \
m = Transformer(preset('small')).cuda().eval(); print({**decode_steps(m, (1, 16), 128), **mixed_steps(m, 16, 128, 256)})" \
        | tee "$out/graphs.json" ;;
    # --no-peer-serve: the peer is transformers' batched generate, which fits the lease; transformers 5.25's
    # server (bench/serve.py's peer by default) serves DeepseekV3's MLA too, at the cost of its own start-up;
    # 1 and 16 clients, the two targets, as docs/performance.md's GPU table runs them
    serve) timeout 200 $py bench/serve.py --device cuda --no-peer-serve --concurrency 1 16 | tee "$out/serve.json" ;;
    suite) timeout 330 $py -m pytest -q -ra -p no:cacheprovider $xdist 2>&1 | tee "$out/pytest.log" | tail -25 ;;
    # timing windows of 0.3 s for a short lease (docs/performance.md's table: the default 0.5)
    fp8) timeout 120 $py bench/fp8_gemm.py --device cuda --seconds 0.3 | tee "$out/fp8_gemm.json" ;;
    train)
      timeout 120 $py -m flyer train --device cuda --out "$out/train-bf16" --no-progress 2>&1 | tail -3
      timeout 120 $py -m flyer train --device cuda --precision fp8 --out "$out/train-fp8" --no-progress 2>&1 | tail -3 ;;
    model-step) timeout 90 $py bench/model_step.py --device cuda --batch-size 32 --seq-len 512 | tee "$out/model_step.json" ;;
    throughput) timeout 150 $py bench/train_throughput.py --device cuda --batch-size 32 --seq-len 512 \
      | tee "$out/train_throughput.json" ;;
    window)
      timeout 60 $py -m pytest -q -ra -p no:cacheprovider -m cuda tests/test_sliding_window.py 2>&1 | tail -3
      timeout 120 $py bench/window_attention.py --device cuda --dtype bf16 --seq-lens 8192 32768 --window 4096 \
        | tee "$out/window_attention.json" ;;
    *) echo "unknown check '$c' (cuda-tests, graphs, serve, suite, fp8, train, model-step, throughput, window)"
       exit 2 ;;
  esac
done; done
step done
