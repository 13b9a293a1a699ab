"""`light-moe bench profile-step`: the kernel classification on kernel names seen on Hopper (ours, cuBLAS,
PyTorch, cuDNN), the per-step summary on made-up records, and a CPU smoke run on the bundled model."""
import json

import pytest
import torch

from light_moe.bench.step_profile import (
    KernelRecord,
    busy_us,
    classify_kernel,
    graph_launches,
    kernel_records,
    summarize,
)
from light_moe.cli import main

KERNELS = [
    ("kernel_cutlass_kernel_light_moekernelsgrouped_gemmGroupedGemmSm90_object_at__Copy_Atom", "moe", "grouped_gemm"),
    ("kernel_cutlass_kernel_light_moekernelsw4a16_gemmW4A16GroupedGemmSm90_object_at__tensorptri", "moe", "w4a16"),
    ("kernel_cutlass_kernel_light_moekernelsw4a16_dequantDequantKernel_object_at_", "moe", "w4a16"),
    ("kernel_cutlass_kernel_light_moekernelsrouterRouterKernel_object_at__tensorptri32_gmem", "moe", "router"),
    ("kernel_cutlass_topk_kernel_light_moekernelsrouterRouterKernel_object_at_", "moe", "router"),
    ("kernel_cutlass_scatter_kernel_light_moekernelsroutingRoutingKernel_object_at__tensorptri32", "moe", "routing"),
    ("kernel_cutlass_count_kernel_light_moekernelsroutingRoutingKernel_object_at__tensorptri32_g", "moe", "routing"),
    ("kernel_cutlass_kernel_light_moekernelscombineCombineKernel_object_at__tensorptrbf16_gmem_a", "moe", "combine"),
    ("kernel_cutlass_kernel_light_moekernelsdecode_attentionDecodeAttention_object_at_", "attention", None),
    ("kernel_cutlass_combine_kernel_light_moekernelsdecode_attentionDecodeAttentionSm90_objec", "attention", None),
    ("kernel_cutlass_kernel_light_moekernelsprefill_attentionPrefillAttention_object_at_", "attention", None),
    ("kernel_cutlass_kernel_light_moekernelsrms_normRMSNormKernel_object_at__tensorptrbf16", "elementwise", None),
    ("kernel_cutlass_kernel_light_moekernelsskinny_gemmSkinnyGemmSm90_object_at__tensorptrbf16", "gemm", None),
    ("kernel_cutlass_kernel_light_moekernelsmla_decode_attentionMlaDecodeAttention_object_at_", "attention", None),
    ("nvjet_sm90_tst_64x16_64x16_2x1_v_bz_splitK_TNT", "gemm", None),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16>", "gemm", None),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm", None),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>", "gemm", None),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x128_4x1x1", "attention", None),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>, true>", "attention", None),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>)", "attention", None),
    ("void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<>>", "elementwise", None),
    ("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long>", "elementwise", None),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda>", "elementwise", None),
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "elementwise", None),
    ("Memcpy DtoH (Device -> Pinned)", "elementwise", None),
    ("Memset (Device)", "elementwise", None),
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "communication", None),
    ("aten::linear", "gemm", None),
    ("aten::addmm", "gemm", None),
    ("aten::scaled_dot_product_attention", "attention", None),
    ("aten::_grouped_mm", "moe", "grouped_gemm"),
    ("aten::index_select", "elementwise", None),
    ("aten::topk", "elementwise", None),
]


@pytest.mark.parametrize("name,group,part", KERNELS)
def test_classify_kernel(name, group, part):
    assert classify_kernel(name) == (group, part)


def test_summarize_per_step_groups_busy_time_and_gap():
    router = "kernel_cutlass_kernel_light_moekernelsrouterRouterKernel_object_at_"
    records = []
    for step in range(2):  # 2 steps of 100 us wall: router 5 us, a GEMM 20 us overlapping a copy by 5 us
        t = 100.0 * step
        records += [KernelRecord(router, t, 5.0), KernelRecord("nvjet_sm90_tst_64x16", t + 10, 20.0),
                    KernelRecord("Memcpy DtoD (Device -> Device)", t + 25, 10.0)]
    assert busy_us(records) == pytest.approx(2 * (5 + 25))
    s = summarize(records, steps=2, wall_us=100.0, top=2)
    assert s["kernels_per_step"] == 3 and s["kernel_us_per_step"] == pytest.approx(35)
    assert s["busy_us_per_step"] == pytest.approx(30) and s["gap_us_per_step"] == pytest.approx(70)
    assert s["groups"]["moe"] == dict(count_per_step=1, us_per_step=5, share=pytest.approx(5 / 35))
    assert s["moe_parts"]["router"]["us_per_step"] == 5 and s["moe_parts"]["grouped_gemm"]["count_per_step"] == 0
    assert s["groups"]["gemm"]["us_per_step"] == 20 and s["groups"]["elementwise"]["us_per_step"] == 10
    assert sum(g["share"] for g in s["groups"].values()) == pytest.approx(1)
    assert [k["name"] for k in s["top"]] == ["nvjet_sm90_tst_64x16", "Memcpy DtoD (Device -> Device)"]
    assert s["top"][0]["calls_per_step"] == 1 and s["top"][0]["group"] == "gemm"


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _Event:
    def __init__(self, name, device, start, end, parent=None, annotation=False):
        from torch.autograd import DeviceType

        self.name, self.time_range, self.cpu_parent = name, _Range(start, end), parent
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        self.is_async, self.is_user_annotation = False, annotation


class _Profile:
    def __init__(self, events):
        self._events = events

    def events(self):
        return self._events


def test_kernel_records_keep_the_device_events_inside_the_host_window():
    linear = _Event("aten::linear", "cpu", 0.0, 900.0)
    prof = _Profile([
        linear, _Event("aten::addmm", "cpu", 10.0, 800.0, parent=linear), _Event("cudaGraphLaunch", "cpu", 5.0, 9.0),
        _Event("cudaGraphLaunch", "cpu", 500.0, 504.0),
        _Event("nvjet_sm90_tst_64x16", "cuda", 100.0, 120.0),
        _Event("Memcpy DtoH (Device -> Pinned)", "cuda", 950.0, 960.0),
        _Event("kernel_cutlass_kernel_light_moekernelscombineCombineKernel", "cuda", -1e11, -1e11 + 3),  # other clock
        _Event("light_moe::step", "cuda", 0.0, 1000.0, annotation=True),
    ])
    records, dropped = kernel_records(prof, on_gpu=True)
    assert [r.name for r in records] == ["nvjet_sm90_tst_64x16", "Memcpy DtoH (Device -> Pinned)"] and dropped == 1
    assert records[0].duration_us == 20.0 and records[0].start_us == 100.0
    assert graph_launches(prof) == 2
    cpu_records, _ = kernel_records(prof, on_gpu=False)  # top-level ATen ops only
    assert [r.name for r in cpu_records] == ["aten::linear"] and cpu_records[0].duration_us == 900.0


@pytest.fixture
def one_thread():
    """The demo model is tiny: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_profile_step_runs_on_cpu_with_the_bundled_model(tmp_path, capsys, one_thread):
    out, trace = tmp_path / "profile.json", tmp_path / "traces" / "step.json"
    assert main(["bench", "profile-step", "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
                 "--steps", "2", "--warmup-steps", "0", "--input-len", "8", "--prefill", "--top", "5",
                 "--trace", str(trace), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["activity"] == "cpu" and result["benchmark"] == "profile-step" and result["env"]["commit"]
    decode, prefill = result["decode"], result["prefill"]
    assert decode["batch"] == 2 and decode["steps"] == 2
    for s in (decode, prefill):
        assert s["groups"]["gemm"]["count_per_step"] > 0 and s["groups"]["attention"]["count_per_step"] > 0
        assert s["kernels_per_step"] == pytest.approx(sum(g["count_per_step"] for g in s["groups"].values()))
        assert s["wall_us_per_step"] > 0 and len(s["top"]) == 5
    assert prefill["input_len"] == 8 and prefill["engine_step_calls"] >= 1
    for path in (trace, trace.with_name("step.prefill.json")):
        assert "traceEvents" in json.loads(path.read_text())
    # the prefill profile marks the engine's phases (bench/idle_gaps.py); the decode profile does not
    phases = {e.get("name") for e in json.loads(trace.with_name("step.prefill.json").read_text())["traceEvents"]}
    assert {"phase::schedule", "phase::prepare", "phase::execute", "phase::sample", "phase::read_back"} <= phases
    assert not any(str(e.get("name")).startswith("phase::") for e in json.loads(trace.read_text())["traceEvents"])
    printed = capsys.readouterr().out
    assert "decode step: batch 2" in printed and "prefill: one prompt of 8 tokens" in printed
    assert "note: no GPU" in printed
