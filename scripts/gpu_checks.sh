#!/usr/bin/env bash
# GPU checks and benchmarks in a few batches (Hopper GPUs, CuTe DSL installed, repo on PYTHONPATH).
#   scripts/gpu_checks.sh single OUTDIR   one GPU: every GPU test, then the MoE layer / W4A16 benchmarks
#   scripts/gpu_checks.sh multi OUTDIR    2+ GPUs: expert-parallel GPU tests, then bench ep (fixed 256 and 0)
# Logs and JSON land in OUTDIR; the last lines of each step are printed. Each step has its own time limit
# so that one stuck step cannot eat the whole run.
set -u
stage=${1:?single or multi}
out=${2:?output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
commit=${LIGHT_MOE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LIGHT_MOE_GIT_COMMIT=$commit PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1

step() {  # step NAME SECONDS CMD...: run with a limit, keep the log, show its tail
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $?"
    grep -v -i warn "$out/$name.log" | tail -n "${TAIL:-6}"
}

case $stage in
single)
    step gpu_tests 400 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels tests/test_cute_engine_gpu.py \
        tests/test_fidelity_gpu.py -ra
    step moe_layer 420 $py -m light_moe.cli bench moe-layer --quant w4a16 --output "$out/moe_layer.json"
    step w4a16_experts 150 $py -m light_moe.bench.w4a16_experts --output "$out/w4a16_experts.json"
    ;;
multi)
    step ep_tests 420 $py -m pytest -q -m "gpu and multigpu" -p no:cacheprovider tests/test_expert_parallel.py -ra
    n=$(nvidia-smi -L | wc -l)
    step bench_ep_fixed 300 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" --batch-size 16 \
        --fixed-capacity 256 --time-exchange --output "$out/ep${n}_fixed256.json"
    step bench_ep_variable 300 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" --batch-size 16 \
        --fixed-capacity 0 --output "$out/ep${n}_variable.json"
    ;;
*)
    echo "unknown stage $stage (single or multi)" >&2
    exit 2
    ;;
esac
