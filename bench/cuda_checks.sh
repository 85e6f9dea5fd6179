#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (what CI cannot do: it has no GPU):
# the whole test suite (the CUDA tests run instead of skipping, `auto` devices pick the GPU),
# FP8 GEMMs against bf16, the model step, training throughput against transformers, and the
# default training run in bf16 and FP8. Results go to $OUT (default runs/cuda-checks).
#
#     bash bench/cuda_checks.sh            # PYTHON=python3 by default; flyer importable
set -u
out=${OUT:-runs/cuda-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "== $1 ($(date +%T))"; }

step device
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

step "test suite"
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 330 $py -m pytest -q -ra -p no:cacheprovider $xdist 2>&1 | tee "$out/pytest.log" | tail -25

step "fp8 gemm"
timeout 120 $py bench/fp8_gemm.py --device cuda --seconds 0.3 | tee "$out/fp8_gemm.json"

step "train bf16 (default run)"
timeout 120 $py -m flyer train --device cuda --out "$out/train-bf16" --no-progress 2>&1 | tail -3
step "train fp8"
timeout 120 $py -m flyer train --device cuda --precision fp8 --out "$out/train-fp8" --no-progress 2>&1 | tail -3

step "model step"
timeout 90 $py bench/model_step.py --device cuda --batch-size 32 --seq-len 512 | tee "$out/model_step.json"

step "train throughput vs transformers"
timeout 150 $py bench/train_throughput.py --device cuda --batch-size 32 --seq-len 512 | tee "$out/train_throughput.json"
step done
