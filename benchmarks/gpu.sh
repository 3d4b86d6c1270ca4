#!/usr/bin/env bash
# Everything to measure on a lent GPU machine, in one call, each stage under its own time limit,
# so a failing or slow stage still leaves the others' figures. From the project's root there:
#
#   bash ../shared/gpu/make-bundle.sh && cp ../shared/gpu/run-on-gpu.sh .gpu/     # here, beforehand
#   device run (carry .gpu):  bash benchmarks/gpu.sh                               # there; figures in $OUT
#
# Stages (about 9 minutes in all on one H200): the CUDA tests; hrnet_w48 blend and crop end to end
# beside the model alone with the feed rates (8192²); hrnet_w18_small_v1 crop (its decode ceiling is
# the feed rate times the cores); the whole job on a 16384² scene.
set -u
OUT=${OUT:-/tmp/satseg-gpu}
mkdir -p "$OUT"
run() {  # run LIMIT NAME CMD...: one stage, its log in $OUT/NAME.log
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" bash .gpu/run-on-gpu.sh "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after ${SECONDS}s in all"; tail -n 25 "$OUT/$name.log"
}
B="--out /tmp/satseg-bench --record $OUT/results.jsonl"
run 150 cuda-tests python3 -m pytest -q -x tests/test_cuda.py tests/test_predictor.py -k "not compile"
run 170 hrnet_w48-8192 python3 benchmarks/pipeline.py --size 8192 --model hrnet_w48 --stitch blend crop $B
run 90 hrnet_w18_small_v1-8192 python3 benchmarks/pipeline.py --size 8192 --model hrnet_w18_small_v1 --stitch crop --no-feed $B
run 150 hrnet_w48-16384 python3 benchmarks/pipeline.py --size 16384 --model hrnet_w48 --stitch crop --no-feed --no-probe $B
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$OUT/nvidia-smi.csv" 2>&1
