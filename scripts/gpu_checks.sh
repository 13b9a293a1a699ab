#!/usr/bin/env bash
# GPU checks and benchmarks in a few batches (Hopper GPUs, CuTe DSL installed, repo on PYTHONPATH). Each
# stage fits in 10 minutes:
#   scripts/gpu_checks.sh single-tests OUTDIR   one GPU: every single-GPU GPU test
#   scripts/gpu_checks.sh single-bench OUTDIR   one GPU: MoE layer (bf16, W4A16, torch._grouped_mm), W4A16 experts
#   scripts/gpu_checks.sh w4a16-sweep OUTDIR    one GPU: W4A16 experts with the opt-in decode tiles beside the table's
#   scripts/gpu_checks.sh w4a16-sweep-mid OUTDIR    the same for the mid tiles (T = 32..256)
#   scripts/gpu_checks.sh w4a16-tma-tests OUTDIR   one GPU: the GPU tests of the TMA token rows (opt-in tiles)
#   scripts/gpu_checks.sh w4a16-prefill-sweep OUTDIR   one GPU: W4A16 prefill tiles (256x128, 128x256, with and
#                                               without TMA token rows), up and down alone (--split)
#   scripts/gpu_checks.sh ncu OUTDIR            one GPU: Nsight Compute on the W4A16 kernels (T=1, 64, 4096) and
#                                               the bf16 kernel (T=4096); if that outruns one call, split it:
#                                               NCU_TOKENS="1 64" NCU_SKIP_BF16=1, then NCU_TOKENS=4096
#   scripts/gpu_checks.sh direct-ncu OUTDIR     one GPU: Nsight Compute on the W4A16 decode kernels at T = 1 and 8: the
#                                               wgmma table tile, the direct kernel's whole units and its stream-K
#   scripts/gpu_checks.sh multi-tests OUTDIR    2+ GPUs: expert-parallel GPU tests
#   scripts/gpu_checks.sh multi-bench OUTDIR    2+ GPUs: bench ep with the fixed-capacity exchange (graphs), read back
#                                               each step (sync), with async output processing, then with async
#                                               scheduling (the default); EP size:
#                                               every visible GPU, or $EP_SIZE (~7 min at EP=4)
#   scripts/gpu_checks.sh multi-bench-variable OUTDIR   bench ep with variable splits only
#   scripts/gpu_checks.sh ep-profile OUTDIR     2+ GPUs: where a decode step's time goes on every rank, EP=1 vs EP=N
#                                               (scripts/profile_ep_step.py; reports per rank in OUTDIR)
#   scripts/gpu_checks.sh whole-tests OUTDIR    one GPU: the whole-model GPU tests (attention, norm / rope, W4A16
#                                               linear kernels; engine with decode and piecewise prefill graphs)
#   scripts/gpu_checks.sh whole-bench-4 OUTDIR  one GPU: bench e2e of the 4-layer Mixtral shape (bf16: B = 1/16/64,
#                                               TTFT; long context 2048 + 128 at B = 64) and a step profile; with
#                                               BASELINE=DIR (an older light_moe tree) the same e2e for it first
#   scripts/gpu_checks.sh whole-bench-32 OUTDIR one GPU: bench e2e of the 32-layer shape, W4A16 experts (and
#                                               W4A16 attention too), B = 1/16/64 + TTFT; BASELINE as above
#   scripts/gpu_checks.sh serve-4 OUTDIR        one GPU: the server (bench serve: concurrency 1/16/64/256, a rate
#                                               sweep and its plot) against bench e2e, 4-layer shape, bf16
#   scripts/gpu_checks.sh serve-32 OUTDIR       the same on the 32-layer shape with W4A16 experts
#   scripts/gpu_checks.sh p2p OUTDIR            2+ GPUs: the NVLink peer-to-peer exchange's GPU tests, then bench ep
#                                               with --exchange p2p (NCCL and p2p exchange times side by side)
#   scripts/gpu_checks.sh backlog OUTDIR        one GPU: what session 13 left unrun (gpt-oss engine, warm-up and split
#                                               server GPU tests; the W4A16 GPU tests)
#   scripts/gpu_checks.sh w4a16-ab OUTDIR       one GPU: W4A16 decode experts against BASELINE=DIR (an older tree),
#                                               with the deferred group scale (opt-in tiles) beside the table's
#   scripts/gpu_checks.sh w4a16-confirm OUTDIR  one GPU: W4A16 GPU tests, decode experts, 32-layer W4A16 bench e2e
#                                               against BASELINE=DIR (the deferred group scale in the tile table)
#   scripts/gpu_checks.sh followup OUTDIR       one GPU: engine GPU tests (gpt-oss included), the W4A16 MoE layer at
#                                               every T (3 rounds), the 32-layer W4A16 step profile at B = 64
#   scripts/gpu_checks.sh warmup-ab OUTDIR      one GPU: bench serve at 64 streams with and without --warmup-graphs
#   scripts/gpu_checks.sh new-kernels OUTDIR    one GPU: the GPU tests of the kernels written in session 12 without a GPU
#                                               (default router after its refactor first; skinny GEMM; router variants;
#                                               expert epilogues; attention sinks / window; MLA decode; engine tests)
#   scripts/gpu_checks.sh skinny-ab OUTDIR      one GPU: bench_skinny_gemm (with --sweep), then bench e2e of the 4- and
#                                               32-layer (W4A16) Mixtral shapes with --no-skinny-gemm and with the default
#   scripts/gpu_checks.sh verify-15 OUTDIR      one GPU: the GPU tests of what session 15 wrote without a GPU run, then
#                                               the router's decode chain (first call of session 16)
#   scripts/gpu_checks.sh skinny64 OUTDIR       one GPU: the skinny GEMM up to 64 rows: its GPU tests, the kernel against
#                                               cuBLAS at M = 16 / 32 / 64, bench e2e at B = 64 with
#                                               --skinny-gemm-max-rows 16 and 64 (32 layers W4A16, then 4 layers bf16)
#   scripts/gpu_checks.sh verify-16 OUTDIR      one GPU: what session 16 changed without a GPU run (DeepSeek's MLA projections,
#                                               dense MLPs and shared experts on the skinny GEMM; the combine fused
#                                               into the norm): the DeepSeek, engine and norm GPU tests, bench e2e of deepseek-v2-lite (27 layers), its B = 1
#                                               step profile
#   scripts/gpu_checks.sh verify-17 OUTDIR      one GPU: verify-16's GPU tests plus the decode attention's in-kernel merge
#                                               (kernel and engine tests), then the decode-attention bench (merged column)
#   scripts/gpu_checks.sh merge-ab OUTDIR       one GPU: bench e2e of the 32-layer W4A16 shape: both fusions off, the attention
#                                               merge alone, both (the defaults); the 4-layer prefill profile
#   scripts/gpu_checks.sh direct-18 OUTDIR      one GPU: the direct W4A16 decode kernel (session 18, written without a GPU):
#                                               its GPU tests and the engine's, the decode experts against the table's
#                                               wgmma tiles (3 rounds, up and down alone), then bench e2e of the 32-layer
#                                               W4A16 shape at B = 1 / 4 / 16 with --w4a16-decode-kernel wgmma and direct;
#                                               two calls: ONLY="direct_tests direct_experts", then ONLY="e2e32_wgmma e2e32_direct"
#   scripts/gpu_checks.sh router-ab OUTDIR      one GPU: the router's last-CTA counts (session 20): the router, routing and
#                                               engine GPU tests, then bench e2e (32 layers W4A16 at B = 64, 4 layers bf16
#                                               TTFT) against BASELINE=DIR (the tree before it) in the same call, and the
#                                               4-layer prefill profile with its chrome trace
#   scripts/gpu_checks.sh verify-21 OUTDIR      one GPU, first call of a session with a GPU: the GPU tests of everything written
#                                               without one in sessions 20-21 (the router's last-CTA counts once re-applied,
#                                               see router-ab; two-CTA clusters; the down weights' prefetch; the fused
#                                               up + down decode kernel), each under its own limit; then cluster-21 and
#                                               decode-21 measure
#   scripts/gpu_checks.sh cluster-21 OUTDIR     one GPU: the bf16 grouped GEMM's two-CTA clusters (session 21, written
#                                               without a GPU): their GPU tests (deadlock-bounded), then the tiles side by
#                                               side (bench expert_tiles: table, 256x64, 256x128p, each with @2) at
#                                               T = 256 / 1024 / 4096 / 16384, 3 rounds, and the CUTLASS balanced GEMM if
#                                               CUTLASS_EXAMPLE_DIR names a copy of its example
#   scripts/gpu_checks.sh decode-21 OUTDIR      one GPU: session 21's two W4A16 decode candidates (written without a GPU): the
#                                               direct up kernel's L2 prefetch of the down weights and the fused up + down
#                                               kernel: the decode experts with both (3 rounds, up and down alone), then
#                                               bench e2e of the 32-layer W4A16 shape at B = 1 / 4 / 16 plain, with
#                                               --w4a16-prefetch-down, with --w4a16-fused-decode (if one call is too short:
#                                               ONLY="decode_experts e2e32_plain e2e32_fused", then ONLY=e2e32_prefetch)
#   scripts/gpu_checks.sh serve-api OUTDIR      one GPU: bench e2e B = 64 (4 layers bf16), then bench serve at 64 streams with
#                                               --api-server-count 1 and 4 (API_SERVERS="1 4"), same call
#   scripts/gpu_checks.sh short-17 OUTDIR       one GPU, one call when device time is short: the GPU tests of what sessions
#                                               16-17 wrote (attention merge, combine + norm, DeepSeek), bench e2e of the
#                                               4-layer shape plain and with both fusions, bench serve at 64 streams with
#                                               one and four API processes
#   scripts/gpu_checks.sh families OUTDIR       one GPU: the MLA decode kernel against the torch path
#                                               (scripts/bench_mla_decode.py), bench e2e of the whole gpt-oss-20b (24 layers) and
#                                               deepseek-v2-lite (27) shapes (gpt-oss also with W4A16 experts, g = 32)
# ONLY="step names" runs just those steps of a stage (to split a stage over calls).
# Logs and JSON land in OUTDIR; the last lines of each step are printed. Each step has its own time limit
# so that one stuck step cannot eat the whole run.
set -u
stage=${1:?whole-tests, whole-bench-4, whole-bench-32, single-tests, single-bench, w4a16-sweep, w4a16-sweep-mid, w4a16-tma-tests, w4a16-prefill-sweep, ncu, multi-tests, multi-bench, multi-bench-variable, ep-profile, serve-4, serve-32, p2p, backlog, w4a16-ab, w4a16-confirm, followup, warmup-ab, new-kernels, skinny-ab, families, skinny64, verify-16, verify-17, merge-ab, serve-api, verify-21, cluster-21, decode-21, short-17 or verify-15}
out=${2:?output folder}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the baseline steps run from another directory
py=${PYTHON:-python3}
commit=${LIGHT_MOE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# a copy of a working tree may carry a stale .git (its HEAD then names an older commit than the files that run):
# the results must name the tree that ran, so say so loudly and mark the commit
if [ -z "${LIGHT_MOE_GIT_COMMIT:-}" ] && ! git diff --quiet HEAD -- 2>/dev/null; then
    echo "WARNING: the tree differs from its HEAD ($commit): pass LIGHT_MOE_GIT_COMMIT=<the sha that was copied>" >&2
    commit="$commit+changes"
fi
export LIGHT_MOE_GIT_COMMIT=$commit PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1

step() {  # step NAME SECONDS CMD...: run with a limit, keep the log, show its tail; ONLY="a b" runs just those
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc ($((SECONDS - start)) s)"
    # logs get committed: no machine paths (repository files relative to its root, packages as <site-packages>)
    sed -i -E -e "s#$out/##g" -e "s#$PWD/##g" -e "s#[^ :'\"(]*/(site|dist)-packages/#<site-packages>/#g" "$out/$name.log"
    grep -v -i warn "$out/$name.log" | tail -n "${TAIL:-6}"
}

serve_c64() {  # serve_c64 NAME SECONDS EXTRA...: bench serve of the 4-layer bf16 shape at 64 streams, 128 in /
    # 256 out, graphs captured at start, 256 requests; EXTRA: more bench serve flags
    local name=$1 limit=$2
    shift 2
    TAIL=6 step "$name" "$limit" $py -m light_moe.cli bench serve --shape mixtral --layers 4 --dtype bfloat16 \
        --device cuda --warmup-graphs --num-prompts 1024 --input-len 128 --output-len 256 --sweep-concurrency 64 \
        --prompts-per-concurrency 4 --slo-ttft-ms 200 --slo-tpot-ms 50 "$@" --output "$out/$name.json"
}

case $stage in
single-tests)
    # the Mixtral-shape cases take several GB each: serially, after the rest in 4 workers
    step gpu_tests 420 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels tests/test_cute_engine_gpu.py \
        tests/test_fidelity_gpu.py -k "not mixtral_shape" -ra
    step gpu_tests_mixtral_shape 150 $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels -k mixtral_shape -ra
    ;;
single-bench)
    step moe_layer 400 $py -m light_moe.cli bench moe-layer --quant w4a16 --rounds 3 --output "$out/moe_layer.json"
    step w4a16_experts 150 $py -m light_moe.bench.w4a16_experts --output "$out/w4a16_experts.json"
    ;;
w4a16-sweep)
    # decode tiles (T = 1..32): 64 vs 128 rows with split K 4 (the table switches by wave fill), 16 columns,
    # two k-tiles per stage, 256x32, int4 by cp.async.bulk (w); alternating rounds (bench --rounds): medians
    step w4a16_decode_configs 560 $py -m light_moe.bench.w4a16_experts --tokens 1 2 4 8 16 32 --rounds 3 \
        --configs 64x8x4 128x8x4 128x16x4 64x8x4x2 128x8x4x2 256x32x1 64x8x4w 128x8x4w \
        --output "$out/w4a16_decode_configs.json"
    ;;
w4a16-sweep-mid)
    # mid tiles (T = 32..256): 256 weight rows with 32 / 64 / 128 token columns, one or two k-tiles per stage
    step w4a16_mid_configs 560 $py -m light_moe.bench.w4a16_experts --tokens 32 64 128 256 --rounds 3 \
        --configs 256x32x1 256x32x1x2 256x64x1 256x64x1x2 256x128x1cb \
        --output "$out/w4a16_mid_configs.json"
    ;;
w4a16-tma-tests)
    # the TMA token rows (TileConfig.tma_tokens) alone (also part of single-tests): a hang ends at the limit
    step w4a16_tma_tests 540 $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_w4a16_gpu.py \
        -k tma_token_rows -x -ra
    ;;
w4a16-prefill-sweep)
    # prefill, where W4A16 trails bf16 by 2-3% at T=16384 on an H200 (power-bound: ~8% of its per-cycle rate
    # goes to dequant instructions, benchmarks/results/prefill_power_h200_session8/): up and down alone
    # (--split), 256x128 with and without TMA token rows (the table: TMA in the up projection only) and
    # 128x256 (half the dequant per FLOP), benchmarks/results/smem_dequant_h200_session9/.
    step w4a16_prefill_configs 560 $py -m light_moe.bench.w4a16_experts --tokens 1024 4096 16384 --rounds 3 --split \
        --configs 256x128x1cbw 256x128x1cbwt 128x256x1cbwt 128x256x1cwt 128x256x1ct \
        --output "$out/w4a16_prefill_configs.json"
    ;;
ncu)
    # Nsight Compute (clocks left alone) on the W4A16 kernels at T=1 (decode, issue-bound), T=64 (256x32) and
    # T=4096 (256x128, 3-5% slower than bf16 on an H200), and on the bf16 kernel at T=4096; the rules' OPT /
    # INF lines name the dominant stalls
    for t in ${NCU_TOKENS:-1 64 4096}; do
        TAIL=40 step "ncu_w4a16_t$t" 240 ncu --clock-control none --set detailed -k regex:w4a16 --launch-skip 4 \
            --launch-count 2 $py -m light_moe.bench.w4a16_experts --tokens "$t"
    done
    [ -n "${NCU_SKIP_BF16:-}" ] || TAIL=40 step ncu_bf16_t4096 240 ncu --clock-control none --set detailed -k regex:grouped_gemmGroupedGemm \
        --launch-skip 4 --launch-count 2 $py -m light_moe.bench.w4a16_experts --tokens 4096
    ;;
direct-ncu)
    # why whole units beat stream-K in the direct W4A16 kernel (BENCHMARKS.md, session 19): Nsight Compute on the
    # Mixtral experts at T = 1 and 8, wgmma table tile / direct whole units / direct stream-K, up then down each
    # (DRAM throughput, L2 hit rates, stalls); the report holds 6 kernels per T in that order
    for t in ${NCU_TOKENS:-1 8}; do
        TAIL=60 step "ncu_direct_t$t" 280 ncu --clock-control none --set detailed -k 'regex:[Ww]4[Aa]16' \
            $py scripts/profile_expert_gemms.py --cases "w4a16:$t" "w4a16:$t:64x8g8e" "w4a16:$t:64x8g8ek"
    done
    ;;
multi-tests)
    # one case per family and GPU count, in parallel (each spawns its own ranks; ~2 min a case at 4 GPUs)
    step ep_tests 540 $py -m pytest -q -m "gpu and multigpu" -n 8 -p no:cacheprovider tests/test_ep_gpu.py -ra
    ;;
multi-bench)
    n=${EP_SIZE:-$($py -c "import torch; print(torch.cuda.device_count())")}  # honours CUDA_VISIBLE_DEVICES
    step bench_ep_fixed 300 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" --batch-size 16 \
        --fixed-capacity 256 --time-exchange --no-async-scheduling --output "$out/ep${n}_fixed256.json"
    step bench_ep_async_outputs 200 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" \
        --batch-size 16 --fixed-capacity 256 --no-async-scheduling --async-output-processing \
        --output "$out/ep${n}_fixed256_async_out.json"
    step bench_ep_async_scheduling 200 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" \
        --batch-size 16 --fixed-capacity 256 --output "$out/ep${n}_fixed256_async_sched.json"
    ;;
multi-bench-variable)
    n=${EP_SIZE:-$($py -c "import torch; print(torch.cuda.device_count())")}
    step bench_ep_variable 240 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" --batch-size 16 \
        --fixed-capacity 0 --output "$out/ep${n}_variable.json"
    ;;
ep-profile)
    n=${EP_SIZE:-$($py -c "import torch; print(torch.cuda.device_count())")}
    TAIL=${TAIL:-12} step ep_profile 200 $py scripts/profile_ep_step.py --ep 1 "$n" --shape mixtral --layers 4 \
        --batch-size 16 --steps 32 --report-dir "$out" --print-ranks --no-async-scheduling
    mkdir -p "$out/async"
    TAIL=${TAIL:-12} step ep_profile_async 200 $py scripts/profile_ep_step.py --ep 1 "$n" --shape mixtral \
        --layers 4 --batch-size 16 --steps 32 --report-dir "$out/async" --print-ranks
    ;;
whole-tests)
    step whole_kernel_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_decode_attention_gpu.py \
        tests/kernels/test_prefill_attention_gpu.py tests/kernels/test_fused_norm_rope_gpu.py \
        tests/kernels/test_w4a16_linear_gpu.py -ra
    step whole_engine_tests 300 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/test_cute_ops_gpu.py tests/test_cute_engine_gpu.py \
        tests/test_fidelity_gpu.py -ra
    ;;
whole-bench-4)
    m="--shape mixtral --layers 4 --dtype bfloat16 --device cuda"
    if [ -n "${BASELINE:-}" ]; then
        # python -m puts the working directory first on sys.path: run from inside the baseline tree
        (cd "$BASELINE" && step e2e4_baseline 150 $py -m light_moe.cli bench e2e $m --output "$out/e2e4_baseline.json")
    fi
    step e2e4 200 $py -m light_moe.cli bench e2e $m --output "$out/e2e4.json"
    step e2e4_long 150 $py -m light_moe.cli bench e2e $m --batch-sizes 64 --input-len 2048 --output-len 128 \
        --repeats 1 --ttft-repeats 3 --output "$out/e2e4_long.json"
    step profile4 120 $py -m light_moe.cli bench profile-step $m --batch-size 16 --steps 8 --prefill \
        --output "$out/profile4.json"
    ;;
whole-bench-32)
    m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16"
    if [ -n "${BASELINE:-}" ]; then
        (cd "$BASELINE" && step e2e32_baseline 240 $py -m light_moe.cli bench e2e $m --repeats 1 \
            --output "$out/e2e32_baseline.json")
    fi
    step e2e32 240 $py -m light_moe.cli bench e2e $m --repeats 1 --output "$out/e2e32.json"
    step e2e32_attn 240 $py -m light_moe.cli bench e2e $m --quant-attention --repeats 1 \
        --output "$out/e2e32_attn.json"
    ;;
serve-4|serve-32)
    # the server on the GPU against the offline engine on the same shape in the same call (issue 20): bench e2e
    # decode at B = 1 / 16 / 64 with 256 new tokens, then bench serve on one server: concurrency 1 / 16 / 64 /
    # 256 (4 x concurrency requests each, rate inf), then a Poisson rate sweep (the latency-throughput plot)
    # the server captures its graphs at start (--warmup-graphs, its default; WARMUP=--no-warmup-graphs for first-use
    # capture): the first
    # H100 run (session 13) showed first-use compiles and captures dominating TTFT p99
    warm=${WARMUP---warmup-graphs}
    if [ "$stage" = serve-4 ]; then
        m="--shape mixtral --layers 4 --dtype bfloat16 --device cuda"; tag=4; conc="1 16 64 256"; rates="8 32 128 inf"
    else
        m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16"; tag=32; conc="1 16 64"
        rates="4 16 inf"
    fi
    conc=${CONC:-$conc}; rates=${RATES:-$rates}  # CONC="16 64", RATES="8 inf": a shorter sweep
    step "e2e${tag}_offline" 200 $py -m light_moe.cli bench e2e $m --batch-sizes 1 16 64 --input-len 128 \
        --output-len 256 --repeats 1 --ttft-repeats 3 --output "$out/e2e${tag}_offline.json"
    TAIL=12 step "serve${tag}" "${SERVE_LIMIT:-300}" $py -m light_moe.cli bench serve $m $warm --num-prompts 1024 \
        --input-len 128 --output-len 256 --sweep-concurrency $conc --prompts-per-concurrency 4 \
        --slo-ttft-ms 200 --slo-tpot-ms 50 --save-detailed --output "$out/serve${tag}_concurrency.json"
    # the same concurrency sweep with the engine in the server's process (the split's gain, same call)
    [ -n "${SKIP_INPROCESS:-}" ] || TAIL=8 step "serve${tag}_inprocess" "${SERVE_LIMIT:-300}" $py -m light_moe.cli \
        bench serve $m $warm --no-engine-process --num-prompts 1024 --input-len 128 --output-len 256 \
        --sweep-concurrency $conc --prompts-per-concurrency 4 --slo-ttft-ms 200 --slo-tpot-ms 50 \
        --output "$out/serve${tag}_concurrency_inprocess.json"
    [ -n "${SKIP_RATES:-}" ] || TAIL=8 step "serve${tag}_rates" 240 $py -m light_moe.cli bench serve $m $warm \
        --num-prompts 128 --input-len 128 --output-len 128 --range-ratio 0.5 --sweep-rates $rates \
        --max-concurrency 256 --slo-ttft-ms 200 --slo-tpot-ms 50 --output "$out/serve${tag}_rates.json"
    ;;
backlog)
    # what session 13 left unrun: the gpt-oss engine test after its prefill-graph fix, the warm-up test, the
    # split server on CUDA (needs the openai, distro and jiter wheels: add them to prepare.sh); the W4A16 tests
    # (the producer's running ring counters, f1bdbbd, changed the default kernel)
    step backlog_tests 200 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/test_gpt_oss_gpu.py \
        tests/test_server_split.py "tests/test_cute_engine_gpu.py::test_warmup_graphs_capture_at_start" \
        "tests/test_cute_engine_gpu.py::test_skinny_gemm_engine_matches_reference" -ra
    # (with the deferred group scale's tests: TileConfig.deferred_scale, opt-in)
    step w4a16_tests 360 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_w4a16_gpu.py -ra
    ;;
w4a16-ab)
    # the decode experts against BASELINE (a light_moe tree of 4cad8b4 or older: before the producer's running
    # ring counters) in the same call, and the deferred group scale (suffix d) on the decode and mid tiles, and
    # TMA token rows at decode (t: no consumer proxy fence left; the up projection gathers x first, timed)
    if [ -n "${BASELINE:-}" ]; then
        (cd "$BASELINE" && step w4a16_decode_baseline 90 $py -m light_moe.bench.w4a16_experts --tokens 1 4 16 64 \
            --rounds 3 --split --output "$out/w4a16_decode_baseline.json")
    fi
    TAIL=12 step w4a16_decode 300 $py -m light_moe.bench.w4a16_experts --tokens 1 4 16 64 --rounds 3 --split \
        --configs 64x8x4d 64x8x4t 64x8x4td 128x8x4d 128x8x4x2d 256x32x1wd --output "$out/w4a16_decode.json"
    ;;
w4a16-confirm)
    # the deferred group scale in the tile table (decode 64-row and 256 x 32 tiles): the W4A16 GPU tests (two
    # workers: the Mixtral-shape cases take ~25 GB each), the W4A16 linear, the decode experts timed, then the
    # 32-layer W4A16 model against BASELINE in the same call
    step w4a16_tests 300 $py -m pytest -q -m gpu -n 2 -p no:cacheprovider tests/kernels/test_w4a16_gpu.py \
        tests/kernels/test_w4a16_linear_gpu.py "tests/test_cute_engine_gpu.py::test_skinny_gemm_engine_matches_reference" -ra
    step w4a16_decode 90 $py -m light_moe.bench.w4a16_experts --tokens 1 4 16 64 --rounds 3 --split \
        --output "$out/w4a16_decode.json"
    m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16"
    if [ -n "${BASELINE:-}" ]; then
        (cd "$BASELINE" && step e2e32_baseline 200 $py -m light_moe.cli bench e2e $m --repeats 1 \
            --output "$out/e2e32_baseline.json")
    fi
    step e2e32 200 $py -m light_moe.cli bench e2e $m --repeats 1 --output "$out/e2e32.json"
    ;;
followup)
    # what session 14 left to verify: the engine tests after the prefix-cache reset in the forced-routing helper
    # (gpt-oss graph vs eager), the W4A16 layer with the deferred scale (issue 21: T=1 <= 85 us, never slower
    # than bf16), the 32-layer W4A16 decode step profiled at B = 64 (issue 24: the 2 ms of non-MoE time at B = 64)
    step followup_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/test_gpt_oss_gpu.py \
        tests/test_cute_engine_gpu.py -ra
    step moe_layer 300 $py -m light_moe.cli bench moe-layer --quant w4a16 --rounds 3 --output "$out/moe_layer.json"
    m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16"
    # the chrome trace too: where the 297 us per step between kernels (session 15) sits on the timeline
    TAIL=24 step profile32_b64 120 $py -m light_moe.cli bench profile-step $m --batch-size 64 --steps 8 \
        --trace "$out/profile32_b64_trace.json" --output "$out/profile32_b64.json"
    ;;
warmup-ab)
    m="--shape mixtral --layers 4 --dtype bfloat16 --device cuda"
    # the server with and without the start-up graph capture at 64 streams (4 layers), same call
    for w in cold warm; do
        flag="--no-warmup-graphs"; [ "$w" = warm ] && flag="--warmup-graphs"
        TAIL=4 step "serve4_c64_$w" 150 $py -m light_moe.cli bench serve $m $flag --num-prompts 1024 --input-len 128 \
            --output-len 256 --sweep-concurrency 64 64 --prompts-per-concurrency 8 --slo-ttft-ms 200 \
            --slo-tpot-ms 50 --output "$out/serve4_c64_$w.json"
    done
    ;;
new-kernels)
    # the default (Mixtral) router's selection was refactored for the routing variants: its tests first
    step router_tests 90 $py -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_routing_kernels_gpu.py -k router -ra
    step skinny_tests 150 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_skinny_gemm_gpu.py -ra
    step family_kernel_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_router_select_gpu.py \
        tests/kernels/test_expert_epilogue_gpu.py tests/kernels/test_decode_attention_gpu.py \
        tests/kernels/test_prefill_attention_gpu.py tests/kernels/test_mla_decode_gpu.py -ra
    step engine_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/test_cute_engine_gpu.py tests/test_gpt_oss_gpu.py \
        tests/test_deepseek_cute_gpu.py tests/test_server_split.py -ra
    ;;
skinny-ab)
    step skinny_bench 200 $py scripts/bench_skinny_gemm.py --rounds 3 --sweep --out "$out/skinny_gemm.json"
    for tag in 4 32; do
        m="--shape mixtral --layers $tag --dtype bfloat16 --device cuda"
        [ "$tag" = 32 ] && m="$m --quantization w4a16"
        step "e2e${tag}_cublas" 200 $py -m light_moe.cli bench e2e $m --repeats 1 --no-skinny-gemm \
            --output "$out/e2e${tag}_cublas.json"
        step "e2e${tag}_skinny" 200 $py -m light_moe.cli bench e2e $m --repeats 1 --output "$out/e2e${tag}_skinny.json"
    done
    ;;
families)
    # the released models' whole depth (issue 22's must-show: full shapes; --layers defaults to 4): gpt-oss-20b
    # 24 layers, DeepSeek-V2-Lite 27 (the first dense); ~42 and ~32 GB of bf16 random weights
    # the MLA rotary + latent write kernel (written in session 15 without a GPU) and the family engine tests
    step family_tests 280 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_mla_rope_kv_gpu.py \
        tests/test_deepseek_cute_gpu.py tests/test_gpt_oss_gpu.py -ra
    step mla_decode_bench 150 $py scripts/bench_mla_decode.py --out "$out/mla_decode.json"
    step e2e_gpt_oss_20b 280 $py -m light_moe.cli bench e2e --shape gpt-oss-20b --layers 24 --dtype bfloat16 \
        --device cuda --repeats 1 --output "$out/e2e_gpt_oss_20b.json"
    # W4A16 experts at g = 32 (128 does not divide gpt-oss's 2880)
    step e2e_gpt_oss_20b_w4a16 280 $py -m light_moe.cli bench e2e --shape gpt-oss-20b --layers 24 --dtype bfloat16 \
        --device cuda --quantization w4a16 --quant-group-size 32 --repeats 1 --output "$out/e2e_gpt_oss_20b_w4a16.json"
    step e2e_deepseek_v2_lite 280 $py -m light_moe.cli bench e2e --shape deepseek-v2-lite --layers 27 --dtype bfloat16 \
        --device cuda --repeats 1 --output "$out/e2e_deepseek_v2_lite.json"
    ;;
skinny64)
    # issue 24 (B = 64 at 78-82% of bound): q/k/v and o_proj at 64 rows run on cuBLAS at 2.25-2.45 TB/s
    step skinny64_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_skinny_gemm_gpu.py -ra
    TAIL=12 step skinny64_bench 120 $py scripts/bench_skinny_gemm.py --tokens 16 32 64 --rounds 3 \
        --out "$out/skinny64_bench.json"
    for tag in 32 4; do
        m="--shape mixtral --layers $tag --dtype bfloat16 --device cuda"
        [ "$tag" = 32 ] && m="$m --quantization w4a16"
        for rows in 16 64; do
            step "e2e${tag}_b64_rows$rows" 150 $py -m light_moe.cli bench e2e $m --batch-sizes 64 --repeats 1 \
                --ttft-repeats 1 --skinny-gemm-max-rows "$rows" --output "$out/e2e${tag}_b64_rows$rows.json"
        done
    done
    ;;
verify-16)
    # session 16 moved DeepSeek's MLA projections, the dense SwiGLU MLPs and the shared experts onto DenseLinear
    # (decode rows on the skinny GEMM; session 16's B = 1 profile had 9 cuBLAS GEMMs per layer) and wrote the
    # combine prologue of the RMSNorm kernel (--fuse-combine-norm, off by default): correctness first,
    # then the family's e2e (session 16 before the change: 270.2 / 1,525.6 / 4,956.5 tok/s) and its profile
    step verify16_tests 300 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/test_deepseek_cute_gpu.py \
        tests/test_cute_engine_gpu.py tests/kernels/test_skinny_gemm_gpu.py tests/kernels/test_fused_norm_rope_gpu.py -ra
    step e2e_deepseek_v2_lite 200 $py -m light_moe.cli bench e2e --shape deepseek-v2-lite --layers 27 --dtype bfloat16 \
        --device cuda --repeats 1 --output "$out/e2e_deepseek_v2_lite.json"
    TAIL=24 step profile_dsv2_b1 120 $py -m light_moe.cli bench profile-step --shape deepseek-v2-lite --layers 27 \
        --dtype bfloat16 --device cuda --batch-size 1 --steps 8 --output "$out/profile_dsv2_b1.json"
    ;;
verify-17)
    # session 17's decode-attention merge in the last split CTA (--fuse-attention-merge), with what session 16
    # left unverified (verify-16's tests: DeepSeek on DenseLinear, the combine prologue of the norm)
    step verify17_tests 420 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_decode_attention_merge_gpu.py \
        tests/kernels/test_decode_attention_gpu.py tests/test_deepseek_cute_gpu.py tests/test_cute_engine_gpu.py \
        tests/kernels/test_skinny_gemm_gpu.py tests/kernels/test_fused_norm_rope_gpu.py -ra
    TAIL=12 step bench_decode_attention 150 $py scripts/bench_decode_attention.py --batches 1,16,64 --contexts 256,2048 \
        --out "$out/decode_attention.json"
    ;;
merge-ab)
    # the fused decode-attention merge and the fused combine + norm against plain, 32 layers W4A16, same call
    m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16 --repeats 1"
    # both fusions are the defaults since session 17: "plain" turns them off
    step e2e32_plain 180 $py -m light_moe.cli bench e2e $m --no-fuse-attention-merge --no-fuse-combine-norm \
        --output "$out/e2e32_plain.json"
    step e2e32_merge 180 $py -m light_moe.cli bench e2e $m --no-fuse-combine-norm --output "$out/e2e32_merge.json"
    step e2e32_both 180 $py -m light_moe.cli bench e2e $m --output "$out/e2e32_both.json"
    # where the 4-layer TTFT goes (5.0 ms against 4.5): one 128-token prompt alone, profiled
    TAIL=40 step profile4_prefill 120 $py -m light_moe.cli bench profile-step --shape mixtral --layers 4 \
        --dtype bfloat16 --device cuda --batch-size 1 --steps 4 --prefill --output "$out/profile4_prefill.json"
    ;;
router-ab)
    # kernels/router.py's last-CTA counts (T > 16: no memset, the routing metadata from the router launch; written in
    # session 20 and reverted until GPU-tested: re-apply with git revert of the commit "Revert the router's last-CTA
    # counts" first): GPU tests first (the engine's too: every decode and prefill step routes through it), then the
    # same call's A/B
    step router_tests 300 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_router_last_cta_gpu.py \
        tests/kernels/test_routing_kernels_gpu.py tests/kernels/test_router_select_gpu.py \
        tests/kernels/test_decode_attention_merge_gpu.py tests/test_cute_ops_gpu.py tests/test_cute_engine_gpu.py -ra
    m32="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16 --repeats 1 --batch-sizes 64"
    m4="--shape mixtral --layers 4 --dtype bfloat16 --device cuda --repeats 1 --batch-sizes 64 --ttft-repeats 5"
    if [ -n "${BASELINE:-}" ]; then  # an older tree: its own defaults but the direct decode kernel (session 20's)
        (cd "$BASELINE" && step e2e32_b64_baseline 150 $py -m light_moe.cli bench e2e $m32 --ttft-repeats 0 \
            --w4a16-decode-kernel direct --output "$out/e2e32_b64_baseline.json")
        (cd "$BASELINE" && step e2e4_baseline 120 $py -m light_moe.cli bench e2e $m4 --output "$out/e2e4_baseline.json")
    fi
    step e2e32_b64 150 $py -m light_moe.cli bench e2e $m32 --ttft-repeats 0 --output "$out/e2e32_b64.json"
    step e2e4 120 $py -m light_moe.cli bench e2e $m4 --output "$out/e2e4.json"
    # where the 4-layer TTFT's host time goes: the prefill profile's chrome trace (CPU and CUDA activities)
    TAIL=25 step profile4_prefill_trace 120 $py -m light_moe.cli bench profile-step --shape mixtral --layers 4 \
        --dtype bfloat16 --device cuda --batch-size 1 --steps 2 --prefill --trace "$out/trace4.json" \
        --output "$out/profile4_prefill_trace.json"
    ;;
verify-21)
    if [ -f tests/kernels/test_router_last_cta_gpu.py ]; then  # present once the reverted router change is re-applied
        step router_tests 300 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_router_last_cta_gpu.py \
            tests/kernels/test_routing_kernels_gpu.py tests/kernels/test_router_select_gpu.py tests/test_cute_ops_gpu.py \
            tests/test_cute_engine_gpu.py -ra
    fi
    step cluster_tests 240 $py -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_grouped_gemm_gpu.py \
        -k "cluster" -ra
    step prefetch_tests 300 $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_w4a16_direct_gpu.py \
        tests/test_cute_engine_gpu.py -k "prefetch" -ra
    # a wrong ticket or dependency count hangs rather than fails: one worker, stop at the first failure
    step fused_tests 300 $py -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_w4a16_fused_gpu.py \
        tests/test_cute_engine_gpu.py -k "fused" -ra
    ;;
cluster-21)
    # issue 21 item 1: TileConfig.cluster_t = 2 (the weight tile multicast to the two CTAs of a cluster). A wrong
    # barrier count hangs rather than fails: the tests run under a short limit, one worker, cluster cases first
    step cluster_tests 240 $py -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_grouped_gemm_gpu.py \
        -k "cluster" -ra
    step cluster_regression_tests 240 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider \
        tests/kernels/test_grouped_gemm_gpu.py -k "not cluster" -ra
    TAIL=12 step expert_tiles 420 $py -m light_moe.bench.expert_tiles --tokens 256 1024 4096 16384 \
        --configs table 256x64 256x64@2 256x128p 256x128p@2 128x128@2 128x256@2 --rounds 3 \
        --output "$out/expert_tiles.json"
    if [ -n "${CUTLASS_EXAMPLE_DIR:-}" ]; then
        step cutlass_baseline 300 $py scripts/cutlass_baseline.py --example-dir "$CUTLASS_EXAMPLE_DIR" \
            --out "$out/cutlass_baseline.json" --quick
    fi
    ;;
decode-21)
    # issue 24 (B = 1) and issue 21 item 4: the down weights' L2 prefetch from the up kernel's tail and the fused
    # up + down kernel; both are checked against their baselines bit for bit inside the bench before timing
    TAIL=8 step decode_experts 300 $py -m light_moe.bench.w4a16_experts --tokens 1 2 4 8 16 --decode-kernel direct \
        --prefetch-down 0.2 0.333 0.5 1.0 --fused --rounds 3 --split --output "$out/decode_experts.json"
    m32="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16 --repeats 1 --batch-sizes 1 4 16"
    step e2e32_plain 200 $py -m light_moe.cli bench e2e $m32 --ttft-repeats 0 --output "$out/e2e32_plain.json"
    step e2e32_fused 200 $py -m light_moe.cli bench e2e $m32 --ttft-repeats 0 --w4a16-fused-decode \
        --output "$out/e2e32_fused.json"
    step e2e32_prefetch 200 $py -m light_moe.cli bench e2e $m32 --ttft-repeats 0 --w4a16-prefetch-down \
        --output "$out/e2e32_prefetch.json"
    ;;
serve-api)
    # issue 20: one API process against several (--api-server-count), 64 streams, against the offline engine
    m="--shape mixtral --layers 4 --dtype bfloat16 --device cuda"
    step e2e4_offline 150 $py -m light_moe.cli bench e2e $m --batch-sizes 64 --input-len 128 --output-len 256 \
        --repeats 1 --ttft-repeats 3 --output "$out/e2e4_offline.json"
    for n in ${API_SERVERS:-1 4}; do
        serve_c64 "serve4_c64_api$n" 200 --api-server-count "$n"
    done
    # fixed output lengths make the 64 streams finish and restart in waves whose prefills run alone (BENCHMARKS.md,
    # "Session 17, several API processes"); lengths +-50% (inputs 64..192, outputs 128..384, the same means)
    # desynchronise them, so a prompt's prefill shares a decode step with the other streams
    serve_c64 serve4_c64_api4_mixed 200 --range-ratio 0.5 --api-server-count 4
    # 256 requests at 64 streams end in a long drain with mixed lengths (BENCHMARKS.md, session 20): 16 requests per
    # stream (1,024) make the drain a small part of the run, so out tok/s reads the steady state
    serve_c64 serve4_c64_api1_mixed16 200 --range-ratio 0.5 --prompts-per-concurrency 16
    ;;
short-17)
    step tests17 180 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_decode_attention_merge_gpu.py \
        tests/test_cute_engine_gpu.py::test_fuse_attention_merge_changes_no_token \
        tests/test_cute_engine_gpu.py::test_fuse_combine_norm_changes_no_token \
        tests/kernels/test_fused_norm_rope_gpu.py::test_combine_rms_norm_is_combine_then_rms_norm_bit_for_bit \
        tests/test_deepseek_cute_gpu.py -ra
    m="--shape mixtral --layers 4 --dtype bfloat16 --device cuda"
    e="--batch-sizes 1 64 --input-len 128 --output-len 256 --repeats 1 --ttft-repeats 3"
    step e2e4_plain 100 $py -m light_moe.cli bench e2e $m $e --no-fuse-attention-merge --no-fuse-combine-norm \
        --output "$out/e2e4_plain.json"
    step e2e4_fused 100 $py -m light_moe.cli bench e2e $m $e --output "$out/e2e4_fused.json"  # the defaults
    for n in 1 4; do
        serve_c64 "serve4_c64_api$n" 110 --api-server-count "$n"
    done
    ;;
direct-18)
    # kernels/w4a16_direct.py: correctness first (the timings mean nothing if it fails), then the experts alone,
    # then the model
    step direct_tests 240 $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_w4a16_direct_gpu.py \
        "tests/test_cute_engine_gpu.py::test_w4a16_direct_decode_kernel_matches_the_dequantising_reference" -x -ra
    # decode experts: the table's tile (w4a16) beside the direct kernel at 8 / 4 / 2 warps per CTA (e: the down
    # projection's int4 before its wait; up ignores it) and at 8 warps without it
    # (k: stream-K, opt-in; DIRECT_CONFIGS overrides the list)
    TAIL=30 step direct_experts 200 $py -m light_moe.bench.w4a16_experts --tokens 1 2 4 8 16 --rounds 3 --split \
        --configs ${DIRECT_CONFIGS:-64x8g8ek 64x8g8e 64x8g4ek 64x8g2ek} --output "$out/direct_experts.json"
    m="--shape mixtral --layers 32 --dtype bfloat16 --device cuda --quantization w4a16 --repeats 1"
    for k in wgmma direct; do
        step "e2e32_$k" 150 $py -m light_moe.cli bench e2e $m --batch-sizes 1 4 16 --ttft-repeats 1 \
            --w4a16-decode-kernel "$k" --output "$out/e2e32_$k.json"
    done
    ;;
verify-15)
    # what session 15 wrote or changed without a GPU run: the MLA rotary + latent write kernel and the DeepSeek
    # engine on it, the gpt-oss prefill-logit check under forced routing, the piecewise-graph test without prefix
    # cache, the wide decode router CTA; then the router's decode chain timing
    step verify15_tests 360 $py -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_mla_rope_kv_gpu.py \
        tests/test_deepseek_cute_gpu.py tests/test_gpt_oss_gpu.py tests/test_cute_engine_gpu.py \
        tests/kernels/test_routing_kernels_gpu.py -ra
    # the down projection's L2 prefetch before its wait (opt-in 'f'): its GPU test, then the decode experts with
    # and without it (up ignores the flag), 3 rounds alternating
    step w4a16_prefetch_tests 150 $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_w4a16_gpu.py \
        -k l2_prefetch -ra
    TAIL=10 step w4a16_prefetch_ab 150 $py -m light_moe.bench.w4a16_experts --tokens 1 4 16 --rounds 3 \
        --configs 64x8x4d 64x8x4df --output "$out/w4a16_prefetch_ab.json"
    ;;
p2p)
    n=${EP_SIZE:-$($py -c "import torch; print(torch.cuda.device_count())")}
    step p2p_tests 360 $py -m pytest -q -m "gpu and multigpu" -p no:cacheprovider tests/test_p2p_exchange.py -ra
    step bench_ep_p2p 240 $py -m light_moe.cli bench ep --shape mixtral --layers 4 --ep "$n" --batch-size 16 \
        --fixed-capacity 256 --exchange p2p --output "$out/ep${n}_p2p.json"
    ;;
*)
    echo "unknown stage $stage (single-tests, single-bench, w4a16-sweep, w4a16-sweep-mid, w4a16-tma-tests, w4a16-prefill-sweep, ncu, multi-tests, multi-bench, multi-bench-variable, ep-profile, whole-tests, whole-bench-4, whole-bench-32, serve-4, serve-32, p2p, backlog, w4a16-ab, w4a16-confirm, followup, warmup-ab, new-kernels, skinny-ab, families, skinny64, verify-16, verify-17, merge-ab, serve-api, router-ab, short-17, direct-18 or verify-15)" >&2
    exit 2
    ;;
esac
