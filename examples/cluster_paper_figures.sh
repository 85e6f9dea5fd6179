#!/usr/bin/env bash
# Inputs that reproduce each published cluster figure with `flyer plan` / `flyer net`.
# Every output is computed from the preset, the hardware table and formulas; the published
# figure each command should land on is in the comment above it. Run from the repository root:
#   bash examples/cluster_paper_figures.sh            (tables)
#   JSON=--json bash examples/cluster_paper_figures.sh (one JSON document per command)
set -euo pipefail
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python  # make's environment, where it is set up
FLYER="${FLYER:-$PY -m flyer}"
JSON="${JSON:-}"
OUT="${OUT:-$(mktemp -d)}"  # the plots; OUT=DIR keeps them where you say
mkdir -p "$OUT"
echo "plots in $OUT" >&2

# DeepSeek-V3 report: 250 GFLOPs/token at sequence 4096; 19.926 s a step of 15,360 sequences on 2,048 H800
# -> 272.80B tokens/day, 180K GPU-hours per trillion tokens, 2,664K GPU-hours for 14.8T tokens,
# 385 / 432 TFLOPS, MFU 38.94% / 43.73% (causal / non-causal) against the ~989 TFLOPS BF16 dense peak.
$FLYER plan --preset dsv3 --gpu h800 --gpus 2048 --tokens 14.8e12 --seq-len 4096 \
    --step-seconds 19.926 --batch-size 15360 $JSON

# Whole run: 2,664K + 119K context extension + 5K post-training = 2,788K GPU-hours = $5.576M
# at $2/GPU-hour (the two later stages enter as GPU-hours, their throughput is not published);
# flyer lands on 2,791K and $5.581M: the pretraining's 2,667K from the report's rounded 272.8B tokens/day.
$FLYER plan --preset dsv3 --gpu h800 --gpus 2048 --tokens 14.8e12 --seq-len 4096 \
    --tokens-per-day 272.8e9 --extra-gpu-hours 124e3 --price-per-gpu-hour 2 $JSON

# ISCA 2025, Table 3 (64-port switches): endpoints / switches / links / cost per endpoint
#   FT2 2,048 / 96 / 2,048 / $4.39K      MPFT 16,384 / 768 / 16,384 / $4.39K
#   FT3 65,536 / 5,120 / 131,072 / $7.5K SF 32,928 / 1,568 / 32,928 / $4.4K
#   DF 261,632 / 16,352 / 384,272 / $5.8K; MPFT about 41% cheaper per endpoint than FT3.
$FLYER net topology --radix 64 --plot "$OUT/topology_radix64.png" $JSON

# ISCA 2025, decode bound on 400 Gb/s IB: (1+2) x 32 x 9 x 7K / 50 GB/s = 120.96 us per EP step,
# 2 micro-batches -> 241.92 us per layer, 61 layers -> 14.76 ms per output token, ~67 tokens/s.
$FLYER net ep $JSON
# ... and on a GB200 NVL72 domain (900 GB/s): ~1,200 tokens/s.
$FLYER net ep --fabric nvl72 $JSON

# ISCA 2025: 64-byte latency IB 2.8 / 3.7 us, RoCE 3.6 / 5.6 us (same / cross leaf), NVLink 3.33 us.
$FLYER net latency $JSON

# ISCA 2025: MPFT and MRFT give the same all-to-all bandwidth; ECMP loses bandwidth that
# static or adaptive routing keeps.
$FLYER net simulate --plot "$OUT/alltoall.png" $JSON

# 3FS: 180 nodes x 2 x 200 Gb/s, 16 x 14 TiB NVMe -> ~6.6 TiB/s aggregate read.
$FLYER net storage $JSON

# DualPipe README: bubbles (PP-1)(F+B), (PP-1)(F+B-2W), (PP/2-1)(F&B+B-3W); 2x params, PP+1 activations.
$FLYER net pipeline --pp 16 --f 1 --b 2 --w 1 $JSON
