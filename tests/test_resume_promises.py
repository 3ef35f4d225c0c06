"""The newest promises of resume and of the runs around it, each through main.py (or launch.py) as a user runs it: a
resume with another exclusion or feature term refused, the default eval-mode teacher cache holding the eval-mode
teacher's features, a run stopped during its final test tested again, a teacher file's stored backbone used at test
time, launch.py's exit status of a killed process, and a signal sent mid-epoch by the run's own progress."""
import glob
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, classifier_file, data_args, run_main
from test_gldv2_settings import only_run_dir, read_json, read_text
from PIL import Image

import evaluation  # noqa: E402
import model

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--backbone_class', 'Resnet12',
         '--num_workers', '0', '--warmup_epoch', '0']
# as datasets.PIXEL_MEAN_BGR / PIXEL_STD_BGR: ImageNet's, in BGR order (written out, not read from the product)
MEAN_BGR, STD_BGR = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)


def environment() -> dict:
    variables = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        variables.pop(name, None)
    return variables


def listing(run_dir) -> dict:
    return {path: (os.path.getsize(path), os.stat(path).st_mtime_ns)
            for path in glob.glob(os.path.join(run_dir, '**'), recursive=True) if os.path.isfile(path)}


def stops_with_one_line(argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith('error: '), message
    return message


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A Resnet12 classifier file of 4 classes at 96 px, widths / 8, without a description: the teacher."""
    return classifier_file(tmp_path_factory.mktemp('teacher') / 'teacher.pth', seed=1)


@pytest.fixture(scope='module')
def cached_run(tiny_data, teacher, tmp_path_factory):
    """A student distilled one epoch from the teacher's cache, built in the default mode and dtype."""
    folder = tmp_path_factory.mktemp('cached')
    argv = SMALL + data_args(tiny_data)[:8] + [
        '--max_epoch', '1', '--is_distill', '--teacher_backbone_class', 'Resnet12', '--teacher_init_weights', teacher,
        '--head_fixed', '--teacher_cache', str(folder / 'cache'), '--save_dir', str(folder / 'runs')]
    run_main(argv)
    return {'argv': argv, 'cache': str(folder / 'cache'), 'run_dir': only_run_dir(folder / 'runs')}


@pytest.fixture(scope='module')
def excluded_run(tiny_data, tmp_path_factory):
    """A finished list-format run of one epoch with --exclude_landmarks (label 1)."""
    folder = tmp_path_factory.mktemp('excluded')
    excluded = folder / 'excluded.txt'
    excluded.write_text('1\n', encoding='utf-8')
    argv = SMALL + data_args(tiny_data)[:8] + ['--max_epoch', '1', '--exclude_landmarks', str(excluded),
                                               '--save_dir', str(folder / 'runs')]
    run_main(argv)
    return {'argv': argv, 'excluded': excluded, 'folder': folder, 'run_dir': only_run_dir(folder / 'runs')}


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# ------------------------------------------------------------------------------- a resume with other settings
def test_a_resume_with_another_exclusion_file_stops_naming_it(excluded_run):
    other = excluded_run['folder'] / 'other.txt'
    other.write_text('2\n', encoding='utf-8')
    before = listing(excluded_run['run_dir'])
    message = stops_with_one_line(with_flag(excluded_run['argv'], '--exclude_landmarks', str(other)))
    assert '--exclude_landmarks' in message and 'other settings' in message, message
    assert listing(excluded_run['run_dir']) == before


def test_a_resume_with_the_same_exclusion_path_but_edited_contents_stops_naming_it(excluded_run):
    path = excluded_run['excluded']
    original = path.read_text(encoding='utf-8')
    before = listing(excluded_run['run_dir'])
    try:
        path.write_text('1\n2\n', encoding='utf-8')  # the same file, another exclusion
        message = stops_with_one_line(excluded_run['argv'])
    finally:
        path.write_text(original, encoding='utf-8')
    assert '--exclude_landmarks' in message, message
    assert listing(excluded_run['run_dir']) == before


def test_a_resume_with_another_feature_kd_weight_stops_naming_it(cached_run):
    before = listing(cached_run['run_dir'])
    message = stops_with_one_line(cached_run['argv'] + ['--feature_kd_weight', '0.5'])
    assert re.search(r'--feature_kd_weight 0\.5 \(the checkpoint has 0(\.0)?\)', message), message
    assert listing(cached_run['run_dir']) == before


# ------------------------------------------------------------------------------------- the teacher cache's mode
def decoded_training_images(tiny_data) -> torch.Tensor:
    """The training images in list order, decoded here: PIL bilinear resize to 96 px, BGR, normalised."""
    mean, std = torch.tensor(MEAN_BGR)[:, None, None], torch.tensor(STD_BGR)[:, None, None]
    images = []
    with open(tiny_data['train'], encoding='utf-8') as handle:
        for line in handle:
            image = Image.open(os.path.join(tiny_data['root'], line.split('\t')[0])).convert('RGB')
            pixels = np.asarray(image.resize((96, 96), Image.BILINEAR))[:, :, ::-1].copy()
            images.append((torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(images)


def relative_errors(stored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (stored - reference).norm(dim=1) / reference.norm(dim=1)


def test_the_default_cache_holds_the_eval_mode_teachers_features(cached_run, tiny_data, teacher):
    stored = torch.from_numpy(np.load(os.path.join(cached_run['cache'], 'features.npy')).astype(np.float32))
    assert stored.shape == (1, 24, 128)  # one view (no --augment), 24 images, 1024 / 8
    images = decoded_training_images(tiny_data)
    backbone = model.load_backbone('Resnet12', teacher, 96, 8)
    with torch.no_grad():
        eval_features = backbone.eval()(images)
        backbone.train()  # the train-mode teacher: its dropout active, BatchNorm statistics frozen
        for module in backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        torch.manual_seed(0)
        train_features = backbone(images)
    # float16 storage: 2^-11 of each value, about 5e-4 of a row's norm
    assert relative_errors(stored[0], eval_features).max() < 2e-3
    # the check can fail: the train-mode teacher's features are far from the eval-mode teacher's
    assert relative_errors(train_features, eval_features).min() > 2e-2
    assert relative_errors(stored[0], train_features).min() > 2e-2


# ------------------------------------------------------------------------------- a stop during the final test
def test_a_run_stopped_during_its_final_test_is_tested_by_the_same_command(tiny_data, tmp_path, monkeypatch, capsys):
    argv = SMALL + data_args(tiny_data) + ['--num_classes', '4', '--max_epoch', '1', '--save_dir',
                                           str(tmp_path / 'runs')]
    extract, calls = evaluation.extract_features, []

    def signal_once(*arguments, **keywords):  # the final test is under way: stopped once, as by a preemption
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return extract(*arguments, **keywords)
    monkeypatch.setattr(evaluation, 'extract_features', signal_once)
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    run_dir = only_run_dir(tmp_path / 'runs')
    assert re.search(r'^stopped by SIGTERM during the final test', read_text(os.path.join(run_dir, 'record.txt')),
                     re.M)
    assert 'test' not in read_json(os.path.join(run_dir, 'results.json'))
    capsys.readouterr()
    run_main(argv)  # the same command: the test runs this time
    printed = capsys.readouterr().out
    assert 'this run is finished' not in printed
    assert re.search(r'^test acc: coarsegrained:', printed, re.M), printed[-2000:]
    results = read_json(os.path.join(run_dir, 'results.json'))
    assert 'test' in results and len(results['test']['student']['coarse']) == 8
    assert np.load(os.path.join(run_dir, 'opensetFeat.npy')).shape == (12, 128)
    assert len(results['epochs']) == 1  # the training was not redone


# ------------------------------------------------------------------------------- a teacher file's stored backbone
def described_file(path, seed: int) -> str:
    torch.manual_seed(seed)
    backbone = model.create_backbone('Resnet12', 96, 8)
    torch.save(model.student_weights(model.Classifier(backbone, model.CosFaceHead(4, backbone.feature_dim)), True,
                                     {'backbone': 'Resnet12', 'img_size': 96, 'width_divisor': 8}), path)
    return str(path)


def test_a_teacher_files_stored_backbone_builds_the_teacher_at_test_time(tiny_data, tmp_path):
    student, teacher = described_file(tmp_path / 'student.pth', 3), described_file(tmp_path / 'teacher.pth', 4)
    test = ['--test_only', '--init_weights', student, '--teacher_init_weights', teacher, '--test_root',
            tiny_data['root'], '--test_list', tiny_data['test'], '--num_workers', '0', '--batch_size', '4']
    # scoring.described_flags: a flag not given takes the file's value (--teacher_backbone_class's default is
    # Swin_base); one given with another value stops naming both
    run_main(test + ['--save_dir', str(tmp_path / 'tests')])
    test_dir, = glob.glob(str(tmp_path / 'tests' / 'test-student-*-96px'))
    figures = read_json(os.path.join(test_dir, 'results.json'))['test']
    assert {'student', 'teacher', 'cross'} <= set(figures), sorted(figures)
    assert 'teacher_backbone_class=Resnet12' in read_text(os.path.join(test_dir, 'record.txt'))
    message = stops_with_one_line(test + ['--teacher_backbone_class', 'Swin_tiny', '--save_dir',
                                          str(tmp_path / 'refused')])
    assert 'teacher_backbone_class Resnet12' in message and '--teacher_backbone_class Swin_tiny' in message, message
    assert teacher in message


# ------------------------------------------------------------------------------------------------- launch.py
def test_launch_reports_a_process_killed_by_sigkill_as_137(tmp_path):
    script = tmp_path / 'killed.py'
    script.write_text('import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n', encoding='utf-8')
    launched = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), '--standalone', '--nproc_per_node',
                               '1', str(script)], env=environment(), capture_output=True, text=True)
    assert launched.returncode == 128 + signal.SIGKILL, launched.stderr[-2000:]
    assert 'Traceback' not in launched.stderr


# ----------------------------------------------------------------------------------------- a mid-epoch signal
# main.py, held still right after its first checkpoint within an epoch until a signal arrives: the test signals it
# when the run itself says it is mid-epoch, whatever the machine's speed
HELD_AT_FIRST_CHECKPOINT = """
import sys, time
sys.path.insert(0, {root!r})
import checkpoints, flags, main, trainer
received = []
on_signal = trainer.StopSignals._on_signal
def noting_signal(self, number, frame):
    received.append(number)
    return on_signal(self, number, frame)
trainer.StopSignals._on_signal = noting_signal
save = checkpoints.Checkpoints.save_within_epoch
def save_then_hold(self, progress, current):
    save(self, progress, current)
    if not received:
        print(f'held at epoch {{progress.epoch + 1}} iteration {{progress.iteration}}', flush=True)
        while not received:
            time.sleep(0.01)
checkpoints.Checkpoints.save_within_epoch = save_then_hold
main.main(flags.parse_args(sys.argv[1:]))
"""


def test_a_signal_sent_mid_epoch_stops_after_the_next_iteration_and_the_rerun_resumes_there(tiny_data, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(HELD_AT_FIRST_CHECKPOINT.format(root=ROOT), encoding='utf-8')
    argv = SMALL + data_args(tiny_data)[:8] + ['--num_classes', '4', '--max_epoch', '1', '--checkpoint_minutes',
                                               '1e-9', '--save_dir', str(tmp_path / 'runs')]
    with open(tmp_path / 'stderr.txt', 'w') as errors:
        process = subprocess.Popen([sys.executable, str(runner)] + argv, env=environment(), stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
        printed = []
        for line in process.stdout:  # until the run says it is mid-epoch (or ends without saying so)
            printed.append(line)
            if line.startswith('held at '):
                break
        assert printed and printed[-1] == 'held at epoch 1 iteration 1\n', ''.join(printed)
        run_dir = only_run_dir(tmp_path / 'runs')
        progress = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)['progress']
        assert (progress['epoch'], progress['iteration']) == (0, 1)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, read_text(tmp_path / 'stderr.txt')[-2000:]
    # SIGTERM stops after the next iteration, with a checkpoint there
    assert re.search(r'^stopped by SIGTERM in epoch 1 after iteration 2: checkpoint written to .*checkpoint\.pth\.tar; '
                     'the same command resumes from there$', read_text(os.path.join(run_dir, 'record.txt')), re.M)
    progress = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)['progress']
    assert (progress['epoch'], progress['iteration']) == (0, 2)
    run_main(argv)  # the same command, in this process: it resumes there and finishes
    record = read_text(os.path.join(run_dir, 'record.txt'))
    assert f'resumed from {run_dir}/checkpoint.pth.tar at epoch 1 iteration 2' in record
    assert re.search(r'^epoch 1 .*eval_acc=', record, re.M)
    assert torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)['progress']['epoch'] == 1
