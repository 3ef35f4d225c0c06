"""The precision a run computes in: bf16 autocast only where the device computes it natively, float32 on other CPUs,
fp16 never on a CPU; said in one line, through main.py as a user runs it."""
import os

import pytest
import torch

import precision
import utils
from test_bad_inputs import read, run_dirs, stops_with, train_argv
from conftest import run_main

AVX2_LAPTOP = 'processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw\n'
SAPPHIRE_RAPIDS = 'processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n'
ZEN4 = 'processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n'
GRAVITON3 = 'processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n'
GRAVITON2 = 'processor\t: 0\nFeatures\t: fp asimd atomics\n'


@pytest.fixture
def cpu_with(tmp_path, monkeypatch):
    """Make precision read the given /proc/cpuinfo text (None: a machine without the file)."""
    def stub(text):
        path = tmp_path / 'cpuinfo'
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(precision, 'CPU_INFO', str(path))
    return stub


@pytest.mark.parametrize('cpuinfo, amp', [(AVX2_LAPTOP, 'none'), (SAPPHIRE_RAPIDS, 'bf16'), (ZEN4, 'bf16'),
                                          (GRAVITON3, 'bf16'), (GRAVITON2, 'none'), (None, 'none')])
def test_auto_takes_bf16_only_on_a_cpu_with_native_bf16(cpu_with, cpuinfo, amp):
    cpu_with(cpuinfo)
    chosen, line = precision.choose_amp('auto', torch.device('cpu'))
    assert chosen == amp
    assert line.startswith(f'precision: {"bf16 autocast" if amp == "bf16" else "float32"} (--amp auto on this CPU: ')


def test_the_float32_choice_says_why(cpu_with):
    cpu_with(AVX2_LAPTOP)
    assert precision.choose_amp('auto', torch.device('cpu'))[1] == (
        'precision: float32 (--amp auto on this CPU: this CPU has no avx512_bf16 or amx_bf16: bf16 would be emulated)')
    cpu_with(ZEN4)
    assert 'this CPU has avx512_bf16' in precision.choose_amp('auto', torch.device('cpu'))[1]


@pytest.mark.parametrize('capability, amp', [((7, 0), 'fp16'), ((7, 5), 'fp16'), ((8, 0), 'bf16'), ((9, 0), 'bf16')])
def test_auto_on_a_gpu_takes_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    chosen, line = precision.choose_amp('auto', torch.device('cuda', 0))
    assert chosen == amp and f'compute capability {capability[0]}.{capability[1]}' in line


def test_this_machines_choice_follows_its_cpu_flags():
    with open('/proc/cpuinfo', encoding='utf-8') as handle:
        flags = next((set(line.split(':', 1)[1].split()) for line in handle if line.startswith(('flags', 'Features'))),
                     set())
    native = bool(flags & {'avx512_bf16', 'amx_bf16'}) or 'bf16' in flags
    assert precision.choose_amp('auto', torch.device('cpu'))[0] == ('bf16' if native else 'none')


def test_bf16_asked_on_a_cpu_without_it_runs_and_says_its_measured_cost(cpu_with, monkeypatch):
    cpu_with(AVX2_LAPTOP)
    monkeypatch.setattr(precision, 'emulated_bf16_cost', lambda: 7.93)
    chosen, line = precision.choose_amp('bf16', torch.device('cpu'))
    assert chosen == 'bf16'
    assert line == ('note: --amp bf16 on this CPU runs, but this CPU has no avx512_bf16 or amx_bf16: bf16 would be '
                    'emulated: a matrix product takes 7.9x as long as in float32 here; --amp auto (float32) is faster')


def test_the_emulation_cost_is_a_measured_ratio():
    cost = precision.emulated_bf16_cost(repeats=3)
    assert 0.05 < cost < 100


def test_fp16_on_a_cpu_is_refused_in_one_line():
    with pytest.raises(utils.RunError, match='--amp fp16 needs a GPU'):
        precision.choose_amp('fp16', torch.device('cpu'))


def test_an_unresolved_auto_never_reaches_autocast():
    with pytest.raises(ValueError):
        precision.autocast_context(torch.device('cpu'), 'auto')


def test_fp16_through_main_stops_before_anything_is_written(tiny_data, tmp_path):
    stops_with(train_argv(tiny_data, tmp_path / 'runs', '--amp', 'fp16'), r'^error: --amp fp16 needs a GPU: .*--amp auto')
    assert not os.path.exists(tmp_path / 'runs')


def test_auto_through_main_trains_in_float32_on_a_cpu_without_bf16_and_says_so(tiny_data, tmp_path, cpu_with):
    cpu_with(AVX2_LAPTOP)
    run_main(train_argv(tiny_data, tmp_path, '--amp', 'auto', '--max_epoch', '1'))
    run_dir, = run_dirs(tmp_path)
    record = read(os.path.join(run_dir, 'record.txt'))
    assert ' amp=none ' in record  # the resolved value is the one recorded (and checked on resume)
    assert 'precision: float32 (--amp auto on this CPU: this CPU has no avx512_bf16 or amx_bf16' in record
    checkpoint = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), map_location='cpu', weights_only=False)
    assert checkpoint['flags']['amp'] == 'none'
    cpu_with(ZEN4)  # the same command where auto means bf16: another trajectory, refused naming both values
    stops_with(train_argv(tiny_data, tmp_path, '--amp', 'auto', '--max_epoch', '1'), r'amp.*none.*bf16|amp.*bf16.*none')
