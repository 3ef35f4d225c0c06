"""The same computations on a GPU, where there is one (skipped otherwise).

The rest of the suite hides GPUs (see conftest.py) so that its exactness tests are exact; these tests run in
processes that see the GPUs and compare the GPU with the CPU within stated tolerances.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    DDP_RUNNER,
    ORIGINAL_CUDA_VISIBLE_DEVICES,
    ROOT,
    UPDATE_TOLERANCE,
    classifier_file,
    data_args,
    update_difference,
)

import helpers
import trainer

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
import os, numpy as np, torch, datasets, model, verification
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
transform = datasets.BatchTransform(augment=False)
assert torch.allclose(transform(images, train=False), transform(images.cuda(), train=False).cpu(), atol=1e-6)
cases = np.load(os.path.join(os.path.dirname(datasets.__file__), 'tests', 'data', 'original_tar_cases.npz'))
for name in ('lattice', 'clustered'):
    for grain in ('coarse', 'fine'):
        tars = verification.tar_at_far(cases[name + '_features'], labels=cases[name + '_' + grain], device='cuda')
        expected = cases[name + '_expected_' + grain]
        counts = np.unique(cases[name + '_' + grain], return_counts=True)[1]
        one_pair = 1.0 / (counts * (counts - 1) // 2).sum()     # a score on a bin edge may fall either way
        assert np.allclose(tars, expected, atol=0 if name == 'lattice' else one_pair + 1e-5), (name, grain, tars)
''')


# main.py with the random regularisers off (their masks would be other draws in another precision), printing the
# cross-entropy of every training step
LOSS_RUNNER = '''
import os
import sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, 'tests')]
import flags, main, model, trainer
from regularisers import regularisers_off

step, create_backbone = trainer.training_step, model.create_backbone


def recording(*arguments, **keywords):
    outputs = step(*arguments, **keywords)
    print('step_loss', float(outputs[1]), flush=True)
    return outputs


trainer.training_step = recording
model.create_backbone = lambda *arguments, **keywords: regularisers_off(create_backbone(*arguments, **keywords))
main.main(flags.parse_args(sys.argv[1:]))
'''


def gpu_step_losses(tiny_data, save_dir, runner, *switches) -> list[float]:
    argv = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '2', '--batch_size', '4',
            '--backbone_class', 'Swin_tiny', '--num_classes', '4', '--max_epoch', '1', '--warmup_epoch', '0',
            '--optim', 'SGD', '--lr', '0.002', '--fused_attention', '--save_dir', str(save_dir), *switches]
    finished = subprocess.run([sys.executable, str(runner)] + argv + data_args(tiny_data), env=gpu_environment(),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert 'test acc: coarsegrained:' in finished.stdout
    return [float(line.split()[1]) for line in finished.stdout.splitlines() if line.startswith('step_loss ')]


# (amp, relative tolerance of the first step's loss, of every step's): the first step is the forward pass alone;
# later ones carry the precision's differences in the updates too (as tests/test_training.py measures them on the
# CPU: bf16 4e-4 at the first step, 1.3% at most over 6).
@pytest.mark.parametrize('amp, first_tolerance, tolerance', [('bf16', 2e-3, 3e-2), ('fp16', 2e-3, 3e-2)])
def test_a_mixed_precision_run_on_the_gpu_takes_the_float32_runs_steps(tiny_data, tmp_path, amp, first_tolerance,
                                                                       tolerance):
    runner = tmp_path / 'runner.py'
    runner.write_text(LOSS_RUNNER.format(root=ROOT))
    reference = gpu_step_losses(tiny_data, tmp_path / 'float32', runner)
    losses = gpu_step_losses(tiny_data, tmp_path / amp, runner, '--amp', amp)
    assert len(losses) == len(reference) == 6
    assert losses[0] == pytest.approx(reference[0], rel=first_tolerance)
    assert losses == pytest.approx(reference, rel=tolerance)


def test_two_gpus_with_nccl_take_the_steps_of_one(tiny_data, tmp_path):
    """The update (trained - initial weights) of two GPUs equals one GPU's: dropout and drop-path off (DDP_RUNNER),
    SGD so that the update is the gradient itself. update_difference catches a wrong reduction on the CPU with gloo
    (tests/test_training.py), which is what makes this comparison able to fail."""
    count = run_on_gpu('import torch; print(torch.cuda.device_count())')
    if int(count) < 2:
        pytest.skip('one GPU: no NCCL run')
    runner = tmp_path / 'runner.py'
    runner.write_text(DDP_RUNNER.format(root=ROOT))
    # distilling, so that the KD term's scaling by the process count is exercised over NCCL too
    teacher = classifier_file(str(tmp_path / 'teacher.pth'), 'Swin_tiny', num_classes=4)
    common = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '8',
              '--backbone_class', 'Swin_tiny', '--is_distill', '--teacher_backbone_class', 'Swin_tiny',
              '--teacher_init_weights', teacher, '--head_fixed', '--max_epoch', '1', '--warmup_epoch', '0',
              '--optim', 'SGD', '--lr', '0.05'] + data_args(tiny_data)[:4]
    for processes, save_dir in ((1, 'one'), (2, 'two')):
        finished = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                                   str(processes), str(runner)] + common + ['--save_dir', str(tmp_path / save_dir)],
                                  env=gpu_environment(), capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = (torch.load(glob.glob(str(tmp_path / name / '*' / '*' / 'max_acc.pth'))[0], map_location='cpu',
                           weights_only=True)['params'] for name in ('one', 'two'))
    trainer.seed_epoch(0, 0, 0)
    initial = helpers.build_model('Swin_tiny', 96, None, None, teacher_name='Swin_tiny', teacher_weights=teacher,
                                  head_fixed=True, width_divisor=8).student.backbone.state_dict()
    assert update_difference(initial, one, two) < UPDATE_TOLERANCE
