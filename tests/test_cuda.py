"""The same computations on a GPU, where there is one (skipped otherwise).

The rest of the suite hides GPUs (see conftest.py) so that its exactness tests are exact; these tests run in
processes that see the GPUs and compare the GPU with the CPU within stated tolerances.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ORIGINAL_CUDA_VISIBLE_DEVICES, ROOT, data_args

pytestmark = pytest.mark.skipif(shutil.which('nvidia-smi') is None or ORIGINAL_CUDA_VISIBLE_DEVICES == '',
                                reason='no GPU on this machine')


def gpu_environment():
    environment = dict(os.environ, PYTHONPATH=ROOT)
    if ORIGINAL_CUDA_VISIBLE_DEVICES is None:
        environment.pop('CUDA_VISIBLE_DEVICES', None)
    else:
        environment['CUDA_VISIBLE_DEVICES'] = ORIGINAL_CUDA_VISIBLE_DEVICES
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        environment.pop(name, None)
    return environment


def run_on_gpu(code: str):
    finished = subprocess.run([sys.executable, '-c', code], env=gpu_environment(), capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def test_head_transform_and_tar_at_far_agree_with_the_cpu():
    run_on_gpu('''
import os, numpy as np, torch, helpers, model, evaluation
assert torch.cuda.is_available()
torch.manual_seed(0)
head = model.CosFaceHead(1000, 64)
features, labels = torch.randn(16, 64), torch.randint(0, 1000, (16,))
cpu = head(features, labels)
gpu = head.cuda()(features.cuda(), labels.cuda()).cpu()
assert torch.allclose(cpu, gpu, atol=1e-4), (cpu - gpu).abs().max()   # float32 logits at s = 32
with torch.autocast('cuda', dtype=torch.bfloat16):
    assert head(features.cuda(), labels.cuda()).dtype == torch.float32
images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
transform = helpers.BatchTransform(augment=False)
assert torch.allclose(transform(images, train=False), transform(images.cuda(), train=False).cpu(), atol=1e-6)
cases = np.load(os.path.join(os.path.dirname(helpers.__file__), 'tests', 'data', 'original_tar_cases.npz'))
for name in ('lattice', 'clustered'):
    for grain in ('coarse', 'fine'):
        tars = evaluation.tar_at_far(cases[name + '_features'], labels=cases[name + '_' + grain], device='cuda')
        expected = cases[name + '_expected_' + grain]
        counts = np.unique(cases[name + '_' + grain], return_counts=True)[1]
        one_pair = 1.0 / (counts * (counts - 1) // 2).sum()     # a score on a bin edge may fall either way
        assert np.allclose(tars, expected, atol=0 if name == 'lattice' else one_pair + 1e-5), (name, grain, tars)
''')


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_a_training_run_on_the_gpu(tiny_data, tmp_path, amp):
    argv = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '2', '--batch_size', '4',
            '--backbone_class', 'Swin_tiny', '--num_classes', '4', '--max_epoch', '2', '--amp', amp,
            '--fused_attention', '--save_dir', str(tmp_path)] + data_args(tiny_data)
    finished = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py')] + argv, env=gpu_environment(),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert 'test acc: coarsegrained:' in finished.stdout


def test_two_gpus_with_nccl_take_the_steps_of_one(tiny_data, tmp_path):
    count = run_on_gpu('import torch; print(torch.cuda.device_count())')
    if int(count) < 2:
        pytest.skip('one GPU: no NCCL run')
    common = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '8',
              '--backbone_class', 'Swin_tiny', '--num_classes', '4', '--max_epoch', '1', '--warmup_epoch', '0',
              '--optim', 'SGD', '--lr', '0.05'] + data_args(tiny_data)[:4]
    for processes, save_dir in ((1, 'one'), (2, 'two')):
        finished = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                                   str(processes), os.path.join(ROOT, 'main.py')] + common +
                                  ['--save_dir', str(tmp_path / save_dir)], env=gpu_environment(),
                                  capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
    run_on_gpu(f'''
import glob, torch
one, two = (torch.load(glob.glob('{tmp_path}/' + name + '/*/*/max_acc.pth')[0], weights_only=True)['params']
            for name in ('one', 'two'))
for key, value in one.items():
    if value.is_floating_point():
        # the GPU's reductions differ in order between one and two processes: agreement, not identity
        assert torch.allclose(value, two[key], atol=1e-3, rtol=1e-3), key
''')
