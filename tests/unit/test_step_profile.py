"""benchmarks/step_profile.py: kernel names to categories, busy time and gaps, the summary, the adapter; and the
table tables.py renders from its rows."""

from __future__ import annotations

import pytest
import torch
from benchmarks import step_profile
from benchmarks.step_profile import ATTENTION, ELEMENTWISE, MATMUL, MEMORY, Kernel
from benchmarks.tables import PROFILE_CATEGORIES, step_profile_table

MS = 1_000_000  # ns

# Names as CUPTI reports them on H100 (cuBLAS, cuBLASLt, CUTLASS, cuDNN, FlashAttention, inductor, aten).
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": MATMUL,
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": MATMUL,
    "void cutlass::device_kernel<cutlass3x_sm90_tensorop_gemm_e4m3_e4m3_f32_bf16_bf16_128x128x128_1x1x1_0_tnt_"
    "align16_warpspecialized_cooperative_epi_tma>(T1::Params)": MATMUL,
    "triton_tem_fused_mm_0": MATMUL,
    "triton_tem_fused_addmm_gelu_3": MATMUL,
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(cublasLt::cublasSplitKParams<float>)": MATMUL,
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1": MATMUL,
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": ATTENTION,
    "flash_fwd_kernel": ATTENTION,
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>>(Flash_fwd_params)": ATTENTION,
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": ATTENTION,
    "triton_poi_fused_add_mul_0": ELEMENTWISE,
    "triton_red_fused__to_copy_mean_pow_1": ELEMENTWISE,
    "triton_per_fused_native_layer_norm_2": ELEMENTWISE,
    # Named after the ops they feed, yet pointwise: the RoPE before an SDPA, the epilogue after an addmm.
    "triton_poi_fused__scaled_dot_product_cudnn_attention_2": ELEMENTWISE,
    "triton_poi_fused_addmm_gelu_3": ELEMENTWISE,
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
    "c10::BFloat16, at::native::binary_internal::MulFunctor<float>>, std::array<char*, 3ul>>(int, T2, T3)": ELEMENTWISE,
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>(int, "
    "float, c10::BFloat16 const*, c10::BFloat16 const*)": ELEMENTWISE,
    "void cudnn::ops::convertTensor_kernel<float, __nv_bfloat16, float, (cudnnKernelDataType_t)0>": ELEMENTWISE,
    "Memcpy HtoD (Pageable -> Device)": MEMORY,
    "Memcpy DtoD (Device -> Device)": MEMORY,
    "Memset (Device)": MEMORY,
}


@pytest.mark.parametrize(("name", "category"), list(NAMES.items()))
def test_real_kernel_names_fall_in_their_category(name: str, category: str) -> None:
    assert step_profile.classify(name) == category


def test_the_table_is_ordered_and_every_category_is_known() -> None:
    assert {category for category, _ in step_profile.CLASSES} <= set(step_profile.CATEGORIES)
    order = [category for category, _ in step_profile.CLASSES]
    assert order.index(MEMORY) < order.index(ELEMENTWISE) < order.index(ATTENTION) < order.index(MATMUL)
    assert step_profile.classify("some_new_kernel") == ELEMENTWISE  # the default


# Busy time --------------------------------------------------------------------------------------------------------
def test_union_merges_overlapping_and_nested_intervals_and_adds_disjoint_ones() -> None:
    assert step_profile.union_ns([]) == 0
    assert step_profile.union_ns([(0, 10), (20, 30)]) == 20  # disjoint
    assert step_profile.union_ns([(0, 10), (5, 15)]) == 15  # overlapping
    assert step_profile.union_ns([(0, 100), (10, 20), (30, 40)]) == 100  # nested
    assert step_profile.union_ns([(50, 60), (0, 10), (5, 12), (12, 20)]) == 30  # unsorted, touching
    assert step_profile.union_ns([(0, 10), (0, 10)]) == 10  # the same twice


def test_clipped_keeps_the_parts_inside_the_window() -> None:
    kernels = [Kernel("a", 0, 10), Kernel("b", 5, 25), Kernel("c", 30, 40)]
    assert step_profile.clipped(kernels, 8, 20) == [Kernel("a", 8, 10), Kernel("b", 8, 20)]


# The summary ------------------------------------------------------------------------------------------------------
def marker(end_ms: float) -> Kernel:
    end = int(end_ms * MS)
    return Kernel("at::cuda::(anonymous namespace)::spin_kernel(long)", end - 1000, end)


def synthetic_call() -> list[Kernel]:
    """Text encoding, then 3 steps of 10 ms (gemm 4, flash 3, a fused norm 1, a 2 ms gap), then a copy."""
    kernels = [Kernel("vectorized_elementwise_kernel<encode>", 0, 2 * MS)]
    for step in range(3):
        t = 2 * MS + step * 10 * MS
        kernels += [
            Kernel("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", t, t + 4 * MS),
            Kernel("flash_fwd_kernel", t + 4 * MS, t + 7 * MS),
            Kernel("triton_per_fused_native_layer_norm_2", t + 7 * MS, t + 8 * MS),
            marker((t + 10 * MS) / MS),
        ]
    # A copy on another stream, overlapping the last matmul by 1 ms: summed, not busy, time.
    kernels.append(Kernel("Memcpy DtoH (Device -> Pageable)", 24 * MS, 25 * MS))
    return kernels


def test_the_whole_call_splits_wall_time_into_categories_busy_and_gaps() -> None:
    call = step_profile.summarise(synthetic_call(), steps=3)
    assert call["kernels"] == 3 * 3 + 2  # markers are not work
    assert call["wall_ms"] == 30.0  # 0 → the last norm's end at 30 ms
    assert call["gpu_busy_ms"] == 2 + 3 * 8  # the copy overlaps the matmul
    assert call["gaps_ms"] == 30 - 26
    assert call["kernel_sum_ms"] == 2 + 3 * 8 + 1
    assert call["busy_share"] == round(26 / 30, 4)
    cats = call["categories"]
    assert cats[MATMUL] == {"ms": 12.0, "ms_per_step": 4.0, "share": 0.4}
    assert cats[ATTENTION]["ms"] == 9.0 and cats[ATTENTION]["ms_per_step"] == 3.0
    assert cats[ELEMENTWISE]["ms"] == 2 + 3.0  # the text encoder's kernel and the norms
    assert cats[MEMORY]["ms"] == 1.0
    assert call["per_step"] == {"wall_ms": 10.0, "gpu_busy_ms": round(26 / 3, 3), "gaps_ms": round(4 / 3, 3)}
    top = call["top_kernels"]
    assert [k["name"] for k in top[:2]] == ["nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "flash_fwd_kernel"]
    assert top[0] == {"name": top[0]["name"], "ms": 12.0, "count": 3, "category": MATMUL}


def test_the_denoising_window_runs_from_the_first_to_the_last_step_end() -> None:
    result = step_profile.summarise_call(synthetic_call(), steps=3)
    assert result["call"]["steps"] == 3
    denoise = result["denoise"]
    # Markers end at 12, 22, 32 ms: two steps between them, each 10 ms with 8 ms of kernels and a 2 ms gap.
    assert denoise["steps"] == 2 and denoise["wall_ms"] == 20.0
    assert denoise["per_step"]["wall_ms"] == 10.0
    assert denoise["per_step"]["gpu_busy_ms"] == 8.0 and denoise["per_step"]["gaps_ms"] == 2.0
    assert denoise["categories"][MATMUL]["ms_per_step"] == 4.0
    assert denoise["categories"][MEMORY]["ms"] == 1.0


def test_without_markers_or_kernels_the_summary_still_stands() -> None:
    plain = [k for k in synthetic_call() if not step_profile.is_marker(k)]
    assert step_profile.summarise_call(plain, steps=3)["denoise"] is None
    empty = step_profile.summarise_call([], steps=28)
    assert empty["denoise"] is None
    assert empty["call"]["wall_ms"] == 0 and empty["call"]["busy_share"] is None
    assert empty["call"]["categories"][MATMUL]["share"] is None and empty["call"]["top_kernels"] == []


def test_top_kernels_are_ten_with_names_cut_to_80_characters() -> None:
    kernels = [Kernel(f"kernel_{i:02d}_" + "x" * 100, 0, (i + 1) * MS) for i in range(12)]
    top = step_profile.summarise(kernels, steps=1)["top_kernels"]
    assert len(top) == 10 and all(len(k["name"]) == 80 for k in top)
    assert top[0]["name"].startswith("kernel_11_") and top[0]["ms"] == 12.0


# The table --------------------------------------------------------------------------------------------------------
def test_the_table_has_a_line_per_tier_from_the_denoising_steps() -> None:
    row = {"tier": "L", "batch": 1, **step_profile.summarise_call(synthetic_call(), steps=3)}
    wide = {"tier": "XL", "batch": 4, **step_profile.summarise_call(synthetic_call(), steps=3)}
    plain = {"tier": "E", "batch": 1, "call": step_profile.summarise(synthetic_call(), 3), "denoise": None}
    failed = {"tier": "torchao", "error": "RuntimeError: no"}
    lines = step_profile_table([plain, row, wide, failed]).splitlines()
    assert lines[0] == "| tier | ms/step | matmul | attention | norm/elementwise | memcpy | gaps | busy % |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| E | 10.0 | 4.0 | 3.0 | 1.7 | 0.3 | 1.3 | 87 % |"  # the whole call, per step
    assert lines[3] == "| L | 10.0 | 4.0 | 3.0 | 1.0 | 0.5 | 2.0 | 80 % |"  # the denoising steps
    assert lines[4].startswith("| XL (batch 4) | 10.0 |")
    assert lines[5] == "| torchao | failed | - | - | - | - | - | - |"
    assert PROFILE_CATEGORIES == step_profile.CATEGORIES


# The adapter ------------------------------------------------------------------------------------------------------
def test_a_cpu_only_profile_gives_no_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
        a = torch.randn(64, 64)
        (a @ a).sum()
    assert step_profile.kernels_from_profiler(prof) == []
    assert step_profile.kernels_from_profiler(prof.profiler) == []  # the autograd profiler inside works too


def test_the_adapter_reads_device_work_and_skips_annotations() -> None:
    class Event:
        def __init__(self, name: str, activity: str, start: int, duration: int) -> None:
            self._name, self._activity, self._start, self._duration = name, activity, start, duration

        def name(self) -> str:
            return self._name

        def activity_type(self) -> str:
            return self._activity

        def start_ns(self) -> int:
            return self._start

        def duration_ns(self) -> int:
            return self._duration

        def device_type(self) -> object:
            return None

        def is_user_annotation(self) -> bool:
            return self._activity.endswith("user_annotation")

    class Results:
        def events(self) -> list[Event]:
            return [
                Event("aten::mm", "cpu_op", 0, 50),
                Event("cudaLaunchKernel", "cuda_runtime", 5, 3),
                Event("## Call CompiledFxGraph ##", "gpu_user_annotation", 10, 100),
                Event("nvjet_tst_64x8", "kernel", 10, 40),
                Event("Memset (Device)", "gpu_memset", 60, 2),
                Event("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 70, 5),
            ]

    class Profile:
        kineto_results = Results()

    assert step_profile.kernels_from_profiler(Profile()) == [
        Kernel("nvjet_tst_64x8", 10, 50),
        Kernel("Memset (Device)", 60, 62),
        Kernel("Memcpy HtoD (Pageable -> Device)", 70, 75),
    ]


@pytest.mark.gpu
def test_a_real_cuda_profile_sorts_matmul_attention_and_markers() -> None:
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 8, 1024, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            b = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            c = (a @ a).relu() + b.sum()
            torch.cuda._sleep(1)
        torch.cuda.synchronize()
    del c
    kernels = step_profile.kernels_from_profiler(prof)
    result = step_profile.summarise_call(kernels, steps=3)
    assert result["denoise"] is not None and result["denoise"]["steps"] == 2
    cats = result["call"]["categories"]
    assert cats[MATMUL]["ms"] > 0 and cats[ATTENTION]["ms"] > 0 and cats[ELEMENTWISE]["ms"] > 0
    assert result["call"]["gpu_busy_ms"] <= result["call"]["wall_ms"]
