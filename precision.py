"""Which precision a run computes in: autocast where the device computes it natively, float32 elsewhere.

A CPU without native bf16 (x86 without avx512_bf16 or AMX, most laptops) emulates it about 8x slower than float32;
a CPU has no float16 kernels at all; GPUs compute bf16 natively from compute capability 8.0 (Ampere) on, fp16 before.
"""
import os
import platform
import statistics
import time

import torch

import utils

AMP_CHOICES = ('auto', 'none', 'bf16', 'fp16')
CPU_INFO = '/proc/cpuinfo'
# the x86 flags of native bf16 arithmetic (AVX-512 BF16, AMX), and the arm64 feature of the BF16 instructions
NATIVE_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
ARM_BF16_FEATURE = 'bf16'


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, arm64 `Features` of /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open(CPU_INFO, encoding='utf-8', errors='replace') as handle:
            for line in handle:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        return None
    return None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why (said in the run's precision line)."""
    if device.type == 'cuda':
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f'compute capability {major}.{minor}' + ('' if major >= 8 else ', before 8.0')
    flags = cpu_flags()
    if flags is None:
        return False, f'the CPU flags of this {platform.system()} machine cannot be read'
    found = sorted(flags & set(NATIVE_BF16_FLAGS)) or sorted(flags & {ARM_BF16_FEATURE})
    if found:
        return True, f'this CPU has {" and ".join(found)}'
    return False, f'this CPU has no {" or ".join(NATIVE_BF16_FLAGS)}: bf16 would be emulated'


def emulated_bf16_cost(repeats: int = 5) -> float:
    """How many times longer a layer-sized matrix product takes in bf16 autocast than in float32 on this CPU."""
    features, weight = torch.randn(512, 512), torch.randn(512, 512)

    def median_seconds(enabled: bool) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=enabled):
                torch.nn.functional.linear(features, weight)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    median_seconds(True)  # the first call builds the kernels
    return median_seconds(True) / median_seconds(False)


def choose_amp(requested: str, device: torch.device) -> tuple[str, str]:
    """(the autocast to run: none, bf16 or fp16; the line saying why) for `--amp requested` on `device`. `auto` is
    bf16 where the device computes it natively, else fp16 on a GPU and float32 on a CPU; fp16 on a CPU is refused."""
    native, reason = native_bf16(device)
    where = 'GPU' if device.type == 'cuda' else 'CPU'
    if requested == 'auto':
        amp = 'bf16' if native else ('fp16' if device.type == 'cuda' else 'none')
        return amp, f'precision: {describe(amp)} (--amp auto on this {where}: {reason})'
    if requested == 'fp16' and device.type == 'cpu':
        raise utils.RunError('--amp fp16 needs a GPU: a CPU has no float16 kernels (many times slower than float32); '
                             'use --amp auto, which takes bf16 where the CPU computes it natively, else float32')
    if requested == 'bf16' and device.type == 'cpu' and not native:
        return 'bf16', (f'note: --amp bf16 on this CPU runs, but {reason}: a matrix product takes '
                        f'{emulated_bf16_cost():.1f}x as long as in float32 here; --amp auto (float32) is faster')
    return requested, f'precision: {describe(requested)} (--amp {requested})'


def describe(amp: str) -> str:
    """'bf16 autocast', 'fp16 autocast with a gradient scaler' or 'float32'."""
    return {'none': 'float32', 'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast with a gradient scaler'}[amp]


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for a chosen `amp` (bf16 or fp16), disabled for `none`."""
    if amp == 'auto':
        raise ValueError("amp 'auto' must be resolved by choose_amp before autocasting")
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'none')


def environment_line(device: torch.device) -> str:
    """The machine a figure comes from: the device, and for a CPU its cores, vector capability and bf16 support."""
    if device.type == 'cuda':
        return f'device: {torch.cuda.get_device_name(device)} ({native_bf16(device)[1]})'
    native, reason = native_bf16(device)
    return (f'device: CPU, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, '
            f'bf16 {"native" if native else "emulated"} ({reason})')
