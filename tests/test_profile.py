"""PROFILE_STEPS: a kernel table of real training steps, taken after priming and undone before the
timed run, so a profiled run trains exactly like an unprofiled one."""
from __future__ import annotations

import re

from golf.profile import category
from tests.trainer_runs import run_trainer, summary, train_losses


def test_kernel_names_fall_into_categories():
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert category("aten::mm") == "matmul"
    assert category("triton_tem_fused_flex_attention_0") == "attention"
    assert category("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL") == "communication"
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "triton"
    assert category("Memcpy DtoD (Device -> Device)") == "memory"
    assert category("aten::tanh") == "other"


def test_profiled_run_trains_like_an_unprofiled_one(tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    run_trainer(plain, ITERATIONS="4", NUM_LOOPS="1", LOOP_START="0", LOOP_END="0", WARMUP_STEPS="1")
    run_trainer(profiled, ITERATIONS="4", NUM_LOOPS="1", LOOP_START="0", LOOP_END="0", WARMUP_STEPS="1",
                PROFILE_STEPS="2")
    assert train_losses(profiled) == train_losses(plain)
    log = (profiled / "t.txt").read_text()
    for phase in ("unlooped", "looped"):
        assert re.search(rf"^profile {phase}: \d+\.\d+ ms/step of kernel time; \w+:", log, re.M), phase
        p = summary(profiled)["profiles"][phase]
        assert p["per_step_ms"] > 0 and p["kernels"] and abs(sum(p["categories"].values()) - p["per_step_ms"]) < 1e-6
    assert summary(plain)["profiles"] == {}


def test_cuda_rows_count_kernels_once():
    """On CUDA an operator row (aten::mm) carries its kernels' device time: only kernel rows count,
    and one kernel listed twice (forward and backward threads) is one row."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from golf.profile import kernel_rows
    events = [E(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=3000.0, self_cpu_time_total=50.0, count=6),
              E(key="nvjet_gemm", device_type=DeviceType.CUDA, self_device_time_total=2000.0, self_cpu_time_total=0.0, count=4),
              E(key="nvjet_gemm", device_type=DeviceType.CUDA, self_device_time_total=1000.0, self_cpu_time_total=0.0, count=2),
              E(key="ProfilerStep#1", device_type=DeviceType.CPU, self_device_time_total=0.0, self_cpu_time_total=9.0, count=2)]
    assert kernel_rows(events, cuda=True, steps=2) == [("nvjet_gemm", 1.5, 3)]
    assert kernel_rows(events, cuda=False, steps=2) == [("aten::mm", 0.025, 3)]


def test_host_rows_count_launches_and_host_time():
    """Launch calls are counted per step; host rows take self CPU time of host events only."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    from golf.profile import host_rows
    events = [E(key="cudaLaunchKernel", device_type=DeviceType.CPU, self_cpu_time_total=400.0, count=40),
              E(key="cuLaunchKernel", device_type=DeviceType.CPU, self_cpu_time_total=200.0, count=20),
              E(key="aten::mm", device_type=DeviceType.CPU, self_cpu_time_total=100.0, count=6),
              E(key="nvjet_gemm", device_type=DeviceType.CUDA, self_cpu_time_total=0.0, count=6),
              E(key="ProfilerStep#1", device_type=DeviceType.CPU, self_cpu_time_total=9.0, count=2)]
    launches, rows = host_rows(events, steps=2)
    assert launches == 30
    assert sorted(rows) == [("aten::mm", 0.05, 3), ("cuLaunchKernel", 0.1, 10), ("cudaLaunchKernel", 0.2, 20)]
