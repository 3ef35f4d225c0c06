"""main.py and trainer.py: losses, schedule, run directory outputs, DDP equivalence, exact resume, test-only."""
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DDP_RUNNER,
    ROOT,
    UPDATE_TOLERANCE,
    classifier_file,
    data_args,
    run_main,
    update_difference,
)
from regularisers import regularisers_off

import checkpoints
import datasets  # noqa: E402
import evaluation
import helpers
import losses  # noqa: E402
import flags
import main
import model as models
import precision
import trainer
import utils
import verification  # noqa: E402

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4',
         '--log_interval', '1', '--warmup_epoch', '1']


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    return classifier_file(str(tmp_path_factory.mktemp('teacher') / 'teacher.pth'), num_classes=40)


def record_of(run_dir: str) -> str:
    with open(os.path.join(run_dir, 'record.txt'), encoding='utf-8') as handle:
        return handle.read()


def only_run_dir(save_dir) -> str:
    """The one directory with a record.txt: a training run's, or a --test_only run's in `save_dir` or in a run's."""
    records = (glob.glob(os.path.join(str(save_dir), '*', '*', 'record.txt')) +
               glob.glob(os.path.join(str(save_dir), 'test-*', 'record.txt')) +
               glob.glob(os.path.join(str(save_dir), '*', '*', 'test-*', 'record.txt')))
    assert len(records) == 1, records
    return os.path.dirname(records[0])


# ------------------------------------------------------------------------------------------------ losses
def reference_kd(student_logits, teacher_logits, temperature):
    total = 0.0
    for student_row, teacher_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        teacher_probs = [math.exp(v) / sum(math.exp(w) for w in teacher_row) for v in teacher_row]
        scaled = [v / temperature for v in student_row]
        log_norm = math.log(sum(math.exp(v) for v in scaled))
        total += sum(p * (math.log(p) - (s - log_norm)) for p, s in zip(teacher_probs, scaled))
    return total


def test_kd_loss_untempered_teacher_summed_over_the_batch():
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(3, 5) * 4, torch.randn(3, 5) * 4
    labels = torch.tensor([0, 3, 4])
    features = torch.zeros(3, 2)
    loss, cross_entropy, distillation = losses.DistillationLoss('KD', weight=0.5)(
        features, student_logits, features, teacher_logits, labels)
    expected_ce = -sum(math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
                       for row, label in zip(student_logits.tolist(), labels.tolist())) / 3
    expected_kd = reference_kd(student_logits, teacher_logits, 4.0)
    assert cross_entropy.item() == pytest.approx(expected_ce, rel=1e-5)
    assert distillation.item() == pytest.approx(expected_kd, rel=1e-5)
    assert loss.item() == pytest.approx(expected_ce + 0.5 * expected_kd, rel=1e-5)


def test_kd_is_scaled_by_world_size_so_ddp_averaging_gives_the_global_sum():
    torch.manual_seed(1)
    student_logits, teacher_logits = torch.randn(2, 4), torch.randn(2, 4)
    features, labels = torch.zeros(2, 2), torch.tensor([1, 2])
    one = losses.DistillationLoss('KD', world_size=1)(features, student_logits, features, teacher_logits, labels)
    two = losses.DistillationLoss('KD', world_size=2)(features, student_logits, features, teacher_logits, labels)
    assert two[2].item() == pytest.approx(2 * one[2].item(), rel=1e-6)
    assert two[1].item() == pytest.approx(one[1].item(), rel=1e-6)


def test_the_feature_term_is_one_minus_the_cosine_summed_and_pulls_toward_the_teacher():
    # the first student feature at right angles to the teacher's, the second along it and twice as long
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    loss, cross_entropy, _ = losses.DistillationLoss('KD', weight=0.0, world_size=2, feature_weight=0.5)(
        student, logits, teacher, logits, labels)
    # ln 3 for uniform logits, plus 0.5 x 2 processes x ((1 - cos 90°) + (1 - cos 0°)) = 1
    assert cross_entropy.item() == pytest.approx(math.log(3), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(3) + 1.0, rel=1e-6)
    loss.backward()
    # d(1 - cos)/ds = -(t / (|s| |t|) - cos s / |s|^2): -(0, 1) at the first, 0 at the aligned second
    torch.testing.assert_close(student.grad, torch.tensor([[0.0, -1.0], [0.0, 0.0]]))
    published = losses.DistillationLoss('KD', weight=0.0)(student, logits, teacher, logits, labels)[0]
    assert published.item() == pytest.approx(math.log(3), rel=1e-6)  # without the weight, the published loss


def test_the_feature_term_needs_a_teacher():
    args = flags.get_parser().parse_args(['--train_list', 'l', '--train_root', 'r', '--feature_kd_weight', '0.5'])
    assert "--feature_kd_weight pulls the student's features toward the teacher's: add --is_distill and a teacher" \
        in flags.combination_problems(args, 1)
    args = flags.get_parser().parse_args(['--feature_kd_weight', '-1'])
    assert '--feature_kd_weight must not be negative, not -1.0' in flags.number_problems(args)


def test_main_hands_the_feature_weight_to_the_step(tiny_data, teacher_file, tmp_path, monkeypatch):
    criteria, step = [], trainer.training_step

    def recording_step(parts, *arguments):
        criteria.append(parts.criterion)
        return step(parts, *arguments)
    monkeypatch.setattr(trainer, 'training_step', recording_step)
    run_main(SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Resnet12', '--is_distill', '--teacher_backbone_class', 'Resnet12',
        '--teacher_init_weights', teacher_file, '--head_fixed', '--max_epoch', '1', '--feature_kd_weight', '0.25',
        '--save_dir', str(tmp_path)])
    assert criteria and {criterion.feature_weight for criterion in criteria} == {0.25}


def test_global_kd_tempered_kd_and_ce_only():
    torch.manual_seed(2)
    student_features, teacher_features = torch.randn(3, 4), torch.randn(3, 4)
    student_logits, teacher_logits = torch.randn(3, 6), torch.randn(3, 6)
    labels = torch.tensor([5, 0, 2])
    arguments = (student_features, student_logits, teacher_features, teacher_logits, labels)
    _, _, squared = losses.DistillationLoss('global_KD')(*arguments)
    assert squared.item() == pytest.approx(((student_features - teacher_features) ** 2).sum().item(), rel=1e-6)
    _, _, tempered = losses.DistillationLoss('tempered_KD')(*arguments)
    expected = 16 * sum(
        sum(p * (math.log(p) - math.log(q)) for p, q in zip(F.softmax(t / 4, 0).tolist(), F.softmax(s / 4, 0).tolist()))
        for s, t in zip(student_logits, teacher_logits)) / 3
    assert tempered.item() == pytest.approx(expected, rel=1e-5)
    loss, cross_entropy, distillation = losses.DistillationLoss(None)(None, student_logits, None, None, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(student_logits, labels).item()) and distillation.item() == 0


# ---------------------------------------------------------------------------------------------- schedule
def schedule(progress, epoch, scheduler='cosine', warmup=10, steps=(30,)):
    return trainer.learning_rate(progress, epoch, base_lr=0.001, min_lr=1e-5, warmup_epochs=warmup, max_epoch=200,
                                 scheduler=scheduler, step_size=list(steps), gamma=0.1)


def test_warmup_then_cosine_at_chosen_iterations():
    assert schedule(1.0, 1) == pytest.approx(0.001 * 1 / 10)
    assert schedule(5.5, 5) == pytest.approx(0.001 * 5.5 / 10)
    assert schedule(10.0, 10) == pytest.approx(0.001)
    assert schedule(110.0, 110) == pytest.approx(1e-5 + (0.001 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 100 / 200)))
    assert trainer.learning_rate(1.25, 1, base_lr=0.01, min_lr=0.0, warmup_epochs=0, max_epoch=40, scheduler='cosine',
                                 step_size=[30], gamma=0.1) == pytest.approx(
        0.01 * 0.5 * (1 + math.cos(math.pi * 1.25 / 40)))


def test_step_and_multistep_really_decay():
    assert schedule(30.9, 30, 'step', warmup=0) == pytest.approx(0.001)
    assert schedule(31.0, 31, 'step', warmup=0) == pytest.approx(0.0001)
    assert schedule(61.5, 61, 'step', warmup=0) == pytest.approx(0.00001)
    assert schedule(20.0, 20, 'multistep', warmup=0, steps=(20, 50)) == pytest.approx(0.001)
    assert schedule(21.0, 21, 'multistep', warmup=0, steps=(20, 50)) == pytest.approx(0.0001)
    assert schedule(51.0, 51, 'multistep', warmup=0, steps=(20, 50)) == pytest.approx(0.00001)
    assert schedule(2.0, 2, 'step', warmup=5) == pytest.approx(0.001 * 2 / 5)


# --------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize('extra, message', [
    (['--is_distill'], '--is_distill needs --teacher_init_weights'),
    (['--head_fixed'], '--head_fixed shares'),
    (['--train_list', '/nonexistent/train.txt'], 'no such file'),
    (['--step_size', 'ten', '--lr_scheduler', 'step'], '--step_size'),
    (['--step_size', '0', '--lr_scheduler', 'step'], '--step_size'),
    (['--eval_interval', '0'], '--eval_interval must be at least 1'),
    (['--lr', '-1'], '--lr must be positive, not -1.0'),
    (['--max_bad_images', '-0.5'], '--max_bad_images must not be negative'),
    (['--max_epoch', '0', '--backbone_class', 'Resnet12'], 'nothing to do'),
    (['--backbone_class', 'Swin_tiny', '--img_size', '224'],
     '--img_size 224: img_size 224 gives a 56-token grid in Swin stage 0, which neither fits one 12x12 window nor '
     'splits into such windows; Swin takes --img_size 32, 96, 192, 384, 768'),
    (['--batch_size', '64', '--num_classes', '4'],
     'the training lists hold 24 images, fewer than one batch of --batch_size 64'),
])
def test_bad_arguments_are_refused_with_the_fix(tiny_data, tmp_path, extra, message):
    argv = SMALL + data_args(tiny_data) + ['--save_dir', str(tmp_path)]
    if message == 'nothing to do':
        argv = SMALL + data_args(tiny_data)[:8] + ['--save_dir', str(tmp_path)]
    if extra[0] == '--train_list':
        argv += ['--train_root', tiny_data['root']]
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_main(argv + extra)


def test_global_batch_must_divide_among_processes():
    args = flags.get_parser().parse_args(['--batch_size', '5', '--test_only', '--test_root', '.', '--test_list',
                                         __file__])
    with pytest.raises(utils.RunError, match='divisible by the 2 processes'):
        flags.check_args(args, world_size=2)


# -------------------------------------------------------------------------------------------- end to end
def tensorboard_tags(run_dir: str) -> set[str]:
    """The scalar tags of a run's tensorboard files (TFRecord framing: length, its crc, the event, its crc)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
        data, position = open(path, 'rb').read(), 0
        while position < len(data):
            length = int.from_bytes(data[position:position + 8], 'little')
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            position += 12 + length + 4
    return tags


def test_distillation_run_writes_every_output_of_a_run(tiny_data, teacher_file, tmp_path, monkeypatch):
    argv = SMALL + data_args(tiny_data) + [
        '--backbone_class', 'Resnet12', '--is_distill', '--teacher_backbone_class', 'Resnet12',
        '--teacher_init_weights', teacher_file, '--head_fixed', '--max_epoch', '2', '--warmup_epoch', '1',
        '--lr', '0.01', '--optim', 'SGD', '--save_dir', str(tmp_path), '--augment']
    written, plotted = set(), []
    write_atomically, plot_roc = utils.write_atomically, evaluation.plot_roc

    def recording_write(path, *arguments, **keywords):
        written.add(os.path.basename(path))
        return write_atomically(path, *arguments, **keywords)

    def recording_plot(curves, path):
        plotted.extend(curves)
        return plot_roc(curves, path)
    monkeypatch.setattr(utils, 'write_atomically', recording_write)
    monkeypatch.setattr(evaluation, 'plot_roc', recording_plot)
    run_main(argv)
    # every output goes through the atomic writer (tested for kills and a full disk in test_reliability and
    # test_bad_inputs); the ROC plot holds both grains of the student, teacher and cross figures; tensorboard the
    # losses, accuracy, rate, validation and test TARs
    assert {'checkpoint.pth.tar', 'max_acc.pth', 'results.json', 'opensetFeat.npy', 'roc.png'} <= written
    assert plotted == ['student coarse', 'student fine', 'teacher coarse', 'teacher fine', 'cross coarse', 'cross fine']
    run_dir = os.path.join(str(tmp_path), 'TLD-Resnet12-KD-1.0', 'lr0.01_SGD_cosine_epoch2_warmup1_bs4-head_fixed')
    record = record_of(run_dir)
    feature_dim = 1024 // 8
    backbone_parameters = sum(p.numel() for p in models.create_backbone('Resnet12', 96, 8).parameters())
    head_parameters = 40 * feature_dim
    assert (f'student para trainable/sum {backbone_parameters}/{backbone_parameters + head_parameters}; '
            f'teacher para trainable/sum 0/{backbone_parameters + head_parameters}') in record
    epoch_lines = re.findall(r'^epoch (\d+)  lr [0-9.e-]+: train_acc=[0-9.]+, eval_loss=[0-9.]+, '
                             r'eval_acc=[0-9.]+\+[0-9.]+, avg_ce_loss=[0-9.]+, avg_kd_loss=[0-9.]+$', record, re.M)
    assert epoch_lines == ['1', '2']
    assert re.search(r'^test acc: coarsegrained:\[.*\]--finegrained:\[.*\]$', record, re.M)
    assert re.search(r'^cross acc: coarsegrained:\[.*\]--finegrained:\[.*\]$', record, re.M)
    features = np.load(os.path.join(run_dir, 'opensetFeat.npy'))
    assert features.shape == (12, feature_dim) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    best = torch.load(os.path.join(run_dir, 'max_acc.pth'), weights_only=True)
    assert not any(key.startswith('head') for key in best['params'])
    assert os.path.isfile(os.path.join(run_dir, 'roc.png'))
    assert glob.glob(os.path.join(run_dir, '**', 'events.out.tfevents.*'), recursive=True)
    # tensorboard stores a tag's '@' as '_'
    assert {'train/ce_loss', 'train/kd_loss', 'train/lr', 'train/accuracy', 'val/loss', 'val/accuracy',
            'test/student_coarse_tar_far1e-01', 'test/cross_fine_tar_far1e-01'} <= tensorboard_tags(run_dir)
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as handle:
        results = json.load(handle)
    assert results['parameters']['student_backbone'] == backbone_parameters
    assert [entry['epoch'] for entry in results['epochs']] == [1, 2]
    assert all(entry['val_accuracy'] is not None for entry in results['epochs'])
    line = re.search(r'^test acc: coarsegrained:\[(.*)\]--finegrained', record, re.M).group(1)
    assert results['test']['student']['coarse'] == pytest.approx([float(value) for value in line.split(',')])
    assert set(results['test']) == {'student', 'teacher', 'cross'}
    assert len(results['test']['cross']['fine_curve']['far']) == 2000
    # the teacher's test features, decoded and computed here: the cross figures score the student's queries against
    # them (each image's nearest other image in the teacher's gallery), the teacher's its own
    with torch.no_grad():
        teacher = F.normalize(models.load_backbone('Resnet12', teacher_file, 96, 8)(evaluation_batch(tiny_data)),
                              dim=1).numpy()
    labels = np.array([10 + label for label in range(3) for _ in range(4)])
    for name, queries, gallery in (('cross', features, teacher), ('teacher', teacher, teacher),
                                   ('student', features, features)):
        scores = queries @ gallery.T
        np.fill_diagonal(scores, -np.inf)
        assert results['test'][name]['coarse_nn_accuracy'] == pytest.approx(
            float((labels[scores.argmax(axis=1)] == labels).mean())), name
    assert results['test']['cross']['coarse'] == pytest.approx(
        evaluation.evaluate_features(features, labels, None, gallery_features=teacher)['coarse'], abs=1e-6)
    assert results['test']['cross']['coarse'] != results['test']['student']['coarse']


def test_only_validated_epochs_compete_for_max_acc(tiny_data, tmp_path):
    run_main(SMALL + data_args(tiny_data)[:8] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                                 '--max_epoch', '2', '--eval_interval', '2', '--optim', 'SGD',
                                                 '--save_dir', str(tmp_path)])
    record = record_of(only_run_dir(tmp_path))
    assert re.search(r'^best epoch 2: eval_acc=[0-9.]+$', record, re.M)
    state = torch.load(os.path.join(only_run_dir(tmp_path), 'checkpoint.pth.tar'), weights_only=True)
    assert state['progress']['best_epoch'] == 2


def test_teacher_training_without_distillation_keeps_its_head(tiny_data, tmp_path):
    run_main(SMALL + data_args(tiny_data) + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                             '--max_epoch', '1', '--warmup_epoch', '0', '--optim', 'SGD',
                                             '--lr', '0.05', '--save_dir', str(tmp_path)])
    run_dir = only_run_dir(tmp_path)
    assert os.path.basename(os.path.dirname(run_dir)) == 'TLD-Resnet12-no_distill-NoAug'
    best = torch.load(os.path.join(run_dir, 'max_acc.pth'), weights_only=True)
    assert best['params']['head.weight'].shape == (4, 128)
    teacher = models.load_classifier('Resnet12', os.path.join(run_dir, 'max_acc.pth'), 96, 8)
    assert teacher.head.weight.shape == (4, 128)


def test_test_only_on_a_student_in_the_original_file_layout(tiny_data, tmp_path):
    """A multi-GPU student file as the original wrote it ({'params': {'encoder.module.<key>'}}, distill_layer keys
    beside), its keys those of the original's own ResNet12 state dict."""
    torch.manual_seed(3)
    backbone = models.create_backbone('Resnet12', 96, 8)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'original_state_dict_keys.json'),
              encoding='utf-8') as handle:
        assert [key for key, _, _ in json.load(handle)['Resnet12']] == list(backbone.state_dict())
    original = {f'encoder.module.{key}': value for key, value in backbone.state_dict().items()}
    original['distill_layer.encoder.some.weight'] = torch.zeros(3)
    path = str(tmp_path / 'original_max_acc.pth')
    torch.save({'params': original}, path)
    run_main(SMALL + ['--backbone_class', 'Resnet12', '--test_only', '--init_weights', path,
                      '--test_root', tiny_data['root'], '--test_list', tiny_data['test'],
                      '--save_dir', str(tmp_path / 'runs')])
    run_dir = only_run_dir(tmp_path / 'runs')
    record = record_of(run_dir)
    line = re.search(r'^test acc: coarsegrained:\[(.*)\]--finegrained:\[(.*)\]$', record, re.M)
    coarse = [float(value) for value in line.group(1).split(',')]
    features = np.load(os.path.join(run_dir, 'opensetFeat.npy'))
    assert features.shape == (12, 128)
    with torch.no_grad():
        reference = F.normalize(models.load_backbone('Resnet12', path, 96, 8)(evaluation_batch(tiny_data)), dim=1)
    np.testing.assert_allclose(features, reference.numpy(), atol=1e-4)
    coarse_labels = np.array([10 + label for label in range(3) for _ in range(4)])
    assert coarse == pytest.approx(verification.tar_at_far(torch.from_numpy(features), coarse_labels), abs=1e-5)


def evaluation_batch(tiny_data, list_name: str = 'test') -> torch.Tensor:
    """The images of a list through the evaluation transform, written out independently of helpers.py."""
    from PIL import Image
    mean, std = torch.tensor([0.406, 0.456, 0.485]), torch.tensor([0.225, 0.224, 0.229])
    images = []
    with open(tiny_data[list_name], encoding='utf-8') as handle:
        for line in handle:
            image = Image.open(os.path.join(tiny_data['root'], line.split('\t')[0])).convert('RGB')
            pixels = np.asarray(image.resize((96, 96), Image.BILINEAR))[:, :, ::-1].copy()
            tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
            images.append((tensor - mean[:, None, None]) / std[:, None, None])
    return torch.stack(images)


def spoil_losses(monkeypatch, spoilt, factor):
    """Multiply the loss of the training steps for which spoilt(step number from 1) holds by `factor` (nan or
    inf)."""
    original_forward = losses.DistillationLoss.forward
    calls = []

    def forward_with_spoilt_steps(self, *arguments):
        loss, cross_entropy, distillation = original_forward(self, *arguments)
        calls.append(1)
        return (loss * factor if spoilt(len(calls)) else loss), cross_entropy, distillation
    monkeypatch.setattr(losses.DistillationLoss, 'forward', forward_with_spoilt_steps)


def test_non_finite_loss_stops_with_epoch_and_iteration_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    spoil_losses(monkeypatch, lambda step: step > 6, float('nan'))  # from the first step of epoch 2
    argv = SMALL + data_args(tiny_data) + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                           '--max_epoch', '3', '--save_dir', str(tmp_path)]
    with pytest.raises(SystemExit, match='epoch 2 iteration 0: the loss is not finite'):
        run_main(argv)
    state = torch.load(os.path.join(only_run_dir(tmp_path), 'checkpoint.pth.tar'), weights_only=True)
    assert state['progress']['epoch'] == 1
    assert all(torch.isfinite(value).all() for value in state['student'].values() if value.is_floating_point())


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth.tar')
    checkpoints.save_atomically({'epoch': 1, 'weight': torch.ones(3)}, path)
    real_save = torch.save

    def save_then_crash(obj, file, *arguments, **keywords):
        real_save({'partial': torch.zeros(1)}, file)
        raise KeyboardInterrupt('killed while writing')
    monkeypatch.setattr(torch, 'save', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomically({'epoch': 2, 'weight': torch.zeros(3)}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    state = torch.load(path, weights_only=True)
    assert state['epoch'] == 1 and torch.equal(state['weight'], torch.ones(3))
    assert os.listdir(str(tmp_path)) == ['checkpoint.pth.tar']


def test_a_checkpoint_that_does_not_read_back_replaces_nothing(tmp_path, monkeypatch):
    path, previous = str(tmp_path / 'checkpoint.pth.tar'), str(tmp_path / 'previous.pth.tar')
    checkpoints.save_atomically({'epoch': 1}, path)
    monkeypatch.setattr(torch, 'save', lambda obj, file, *arguments, **keywords: file.write(b'not a checkpoint'))
    with pytest.raises(utils.RunError, match=r'checkpoint\.pth\.tar: the file just written does not read back .*'
                                             r'the one that was there is kept'):
        checkpoints.save_atomically({'epoch': 2}, path, previous_path=previous, verify=True)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    assert os.listdir(str(tmp_path)) == ['checkpoint.pth.tar']


# ------------------------------------------------------------------------------------ processes and resume
def subprocess_env():
    environment = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        environment.pop(name, None)
    return environment


def test_sigkill_after_epoch_one_then_rerun_equals_an_uninterrupted_run(tiny_data, tmp_path):
    argv = [sys.executable, os.path.join(ROOT, 'main.py')] + SMALL + data_args(tiny_data)[:8] + [
        '--backbone_class', 'Resnet12', '--num_classes', '4', '--max_epoch', '3', '--warmup_epoch', '1',
        '--optim', 'AdamW', '--lr', '0.003', '--augment', '--seed', '7']
    subprocess.run(argv + ['--save_dir', str(tmp_path / 'straight')], check=True, env=subprocess_env(),
                   capture_output=True)
    crashed = tmp_path / 'crashed'
    process = subprocess.Popen(argv + ['--save_dir', str(crashed)], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(str(crashed / '*' / '*' / 'checkpoint.pth.tar')) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = only_run_dir(crashed)
    assert torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)['progress']['epoch'] < 3
    subprocess.run(argv + ['--save_dir', str(crashed)], check=True, env=subprocess_env(), capture_output=True)
    assert 'resumed from' in record_of(run_dir)
    for name in ('max_acc.pth', 'checkpoint.pth.tar'):
        straight = torch.load(os.path.join(only_run_dir(tmp_path / 'straight'), name), weights_only=True)
        resumed = torch.load(os.path.join(run_dir, name), weights_only=True)
        key = 'params' if name == 'max_acc.pth' else 'student'
        assert straight[key].keys() == resumed[key].keys()
        for tensor_name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][tensor_name]), tensor_name


def test_two_processes_take_the_same_steps_as_one_and_a_wrong_reduction_is_caught(tiny_data, teacher_file, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(DDP_RUNNER.format(root=ROOT))
    teacher = classifier_file(str(tmp_path / 'swin_teacher.pth'), 'Swin_tiny', num_classes=40)
    argv = SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Swin_tiny', '--is_distill', '--teacher_backbone_class', 'Swin_tiny',
        '--teacher_init_weights', teacher, '--head_fixed', '--max_epoch', '1', '--warmup_epoch', '0',
        '--optim', 'SGD', '--lr', '0.5', '--batch_size', '8', '--feature_kd_weight', '0.5']
    two_processes = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    for name, launcher, environment in (('one', [sys.executable], subprocess_env()),
                                        ('two', two_processes, subprocess_env()),
                                        ('wrong', two_processes, dict(subprocess_env(), WRONG_REDUCTION='1'))):
        finished = subprocess.run(launcher + [str(runner)] + argv + ['--save_dir', str(tmp_path / name)],
                                  env=environment, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two, wrong = (torch.load(os.path.join(only_run_dir(tmp_path / name), 'max_acc.pth'),
                                  weights_only=True)['params'] for name in ('one', 'two', 'wrong'))
    trainer.seed_epoch(0, 0, 0)
    initial = helpers.build_model('Swin_tiny', 96, None, None, teacher_name='Swin_tiny', teacher_weights=teacher,
                                  head_fixed=True, width_divisor=8).student.backbone.state_dict()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5)
    # the epoch's logged figures are over the global batch: the two processes' sums, as one process's
    logged = {name: json.load(open(os.path.join(only_run_dir(tmp_path / name), 'results.json'), encoding='utf-8'))
              ['epochs'][0] for name in ('one', 'two')}
    for figure in ('loss', 'ce', 'kd', 'train_accuracy'):
        assert logged['two'][figure] == pytest.approx(logged['one'][figure], rel=1e-5), figure
    # the check tests/test_cuda.py makes of two GPUs: it passes the right reduction and fails the wrong one
    assert update_difference(initial, one, two) < 1e-3
    assert update_difference(initial, one, wrong) > UPDATE_TOLERANCE


def test_under_ddp_a_frozen_head_stays_outside_and_only_batch_norm_buffers_are_broadcast(tmp_path, monkeypatch):
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(29400 + os.getpid() % 500))
    torch.distributed.init_process_group('gloo', rank=0, world_size=1)
    try:
        wrapped = {}
        for name in ('Swin_tiny', 'Resnet12'):
            backbone = models.create_backbone(name, 96, 8)
            head = models.CosFaceHead(4, backbone.feature_dim).requires_grad_(False)
            wrapped[name] = helpers.distributed_student(models.Classifier(backbone, head), torch.device('cpu'))
        trainable = models.create_backbone('Resnet12', 96, 8)
        whole = helpers.distributed_student(models.Classifier(trainable, models.CosFaceHead(4, trainable.feature_dim)),
                                            torch.device('cpu'))
    finally:
        torch.distributed.destroy_process_group()
    for name, student in wrapped.items():
        ddp = student.backbone
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and not isinstance(student.head, type(ddp))
        assert all(parameter is not student.head.weight for parameter in ddp.parameters())
        assert ddp.broadcast_buffers == (name == 'Resnet12') and ddp.gradient_as_bucket_view
    assert isinstance(whole, torch.nn.parallel.DistributedDataParallel)  # a trainable head is trained under DDP


def test_loader_workers_persist_across_epochs(tiny_data):
    samples, _ = datasets.read_train_samples([tiny_data['root']], [tiny_data['train']])
    dataset = datasets.ImageDataset(samples, 96, train=True, augment=False)
    loader = datasets.build_train_loader(dataset, 4, 2, seed=0, rank=0, world_size=1)
    assert loader.persistent_workers and loader.num_workers == 2


def test_the_teacher_runs_before_the_student(tiny_data, teacher_file, tmp_path, monkeypatch):
    order = []
    teacher_outputs, classifier_forward = models.DistillationModel.teacher_outputs, models.Classifier.forward

    def recording_teacher(self, *arguments):
        order.append('teacher')
        return teacher_outputs(self, *arguments)

    def recording_classifier(self, *arguments):
        order.append('classifier')
        return classifier_forward(self, *arguments)
    monkeypatch.setattr(models.DistillationModel, 'teacher_outputs', recording_teacher)
    monkeypatch.setattr(models.Classifier, 'forward', recording_classifier)
    run_main(SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Resnet12', '--is_distill', '--teacher_backbone_class', 'Resnet12',
        '--teacher_init_weights', teacher_file, '--head_fixed', '--max_epoch', '1', '--save_dir', str(tmp_path)])
    # each step: the teacher (its classifier inside teacher_outputs), then the student's classifier
    assert order[:6] == ['teacher', 'classifier', 'classifier'] * 2


# ------------------------------------------------------------------------------------------- bad images
@pytest.mark.parametrize('damage', ['missing', 'empty', 'cut_in_headers', 'garbage'])
def test_unreadable_training_image_is_logged_counted_and_replaced(tiny_data, tmp_path, damage):
    import shutil
    root = str(tmp_path / 'data')
    shutil.copytree(tiny_data['root'], root)
    path = os.path.join(root, 'train_0003.jpg')
    with open(path, 'rb') as handle:
        content = handle.read()
    os.remove(path)
    replacement = {'missing': None, 'empty': b'', 'cut_in_headers': content[:len(content) // 3],
                   'garbage': b'not a jpeg at all'}[damage]
    if replacement is not None:
        with open(path, 'wb') as handle:
            handle.write(replacement)
    argv = SMALL + ['--train_root', root, '--train_list', os.path.join(root, 'train.txt'), '--num_classes', '4',
                    '--backbone_class', 'Resnet12', '--max_epoch', '2', '--warmup_epoch', '0']
    run_main(argv + ['--save_dir', str(tmp_path / 'tolerant'), '--max_bad_images', '0.05'])
    record = record_of(only_run_dir(tmp_path / 'tolerant'))
    assert len(re.findall(r'^bad image \(replaced\): .*train_0003\.jpg: .+$', record, re.M)) == 1
    assert 'epoch 1: 1 bad images replaced' in record and 'epoch 2: 1 bad images replaced' in record
    with pytest.raises(SystemExit, match=r'epoch 1: 1 of 24 images were unreadable, more than --max_bad_images 0.0'):
        run_main(argv + ['--save_dir', str(tmp_path / 'strict'), '--max_bad_images', '0'])


def test_truncated_training_image_is_used_logged_once_and_not_counted(tiny_data, tmp_path):
    import shutil
    root = str(tmp_path / 'data')
    shutil.copytree(tiny_data['root'], root)
    path = os.path.join(root, 'train_0003.jpg')
    with open(path, 'rb') as handle:
        content = handle.read()
    with open(path, 'wb') as handle:
        handle.write(content[:len(content) * 2 // 3])
    run_main(SMALL + ['--train_root', root, '--train_list', os.path.join(root, 'train.txt'), '--num_classes', '4',
                      '--backbone_class', 'Resnet12', '--max_epoch', '2', '--warmup_epoch', '0',
                      '--max_bad_images', '0', '--save_dir', str(tmp_path / 'runs')])
    record = record_of(only_run_dir(tmp_path / 'runs'))
    assert len(re.findall(r'^truncated image \(decoded with its missing part filled in, as the original did\): '
                          r'.*train_0003\.jpg$', record, re.M)) == 1
    assert 'bad image' not in record and 'bad images replaced' not in record


# ------------------------------------------------------------------------------ precision and memory switches
def step_losses(argv: list[str]) -> list[float]:
    """The cross-entropy of every training step of a run of main.py with `argv`, dropout, DropBlock and drop-path
    off: their masks are drawn in memory order (channels_last) or by another generator (compile), which is the
    same distribution but other draws."""
    losses, original_step, original_create = [], trainer.training_step, models.create_backbone

    def recording(*arguments, **keywords):
        outputs = original_step(*arguments, **keywords)
        losses.append(float(outputs[1]))
        return outputs

    def without_regularisers(*arguments, **keywords):
        return regularisers_off(original_create(*arguments, **keywords))
    trainer.training_step, models.create_backbone = recording, without_regularisers
    try:
        run_main(argv)
    finally:
        trainer.training_step, models.create_backbone = original_step, original_create
    return losses


@pytest.fixture(scope='module')
def float32_losses(tiny_data, tmp_path_factory):
    """Per backbone, the step losses of the plain float32 run the switched runs are compared with."""
    cache = {}

    def losses(backbone):
        if backbone not in cache:
            cache[backbone] = step_losses(switch_argv(tiny_data, backbone, tmp_path_factory.mktemp('float32')))
        return cache[backbone]
    return losses


def switch_argv(tiny_data, backbone, save_dir, *switches):
    return SMALL + data_args(tiny_data)[:8] + list(switches) + [
        '--backbone_class', backbone, '--num_classes', '4', '--max_epoch', '1', '--warmup_epoch', '0',
        '--optim', 'SGD', '--lr', '0.002', '--save_dir', str(save_dir)]


# (backbone, switches, relative tolerance of the first step's loss, steps compared, their tolerance). The first step
# is the forward pass alone (same weights); later steps also carry the differences of the updates. bf16 keeps 8 bits
# of mantissa, fp16 11; the memory switches change the kernels' summation order only. ResNet12's BatchNorm over 4
# images amplifies a difference about 50 times a step here (channels_last: 7e-7 at step 2, 3.5e-5 at 3, 8e-3 at 4),
# so only its first steps are compared; on one thread (two test workers) channels_last's first step is 2.4e-6
# apart, its third 7.6e-4.
SWITCHES = [
    ('Swin_tiny', ['--grad_checkpointing'], 1e-6, 6, 1e-6),
    ('Swin_tiny', ['--amp', 'bf16'], 2e-3, 6, 3e-2),
    ('Resnet12', ['--amp', 'fp16'], 2e-3, 2, 3e-3),
    ('Resnet12', ['--channels_last'], 1e-5, 2, 1e-3),
    ('Resnet12', ['--compile'], 1e-6, 2, 1e-5),
]


@pytest.mark.parametrize('backbone, switches, first_tolerance, steps, tolerance', SWITCHES)
def test_precision_and_memory_switches_take_the_float32_runs_steps(tiny_data, tmp_path, float32_losses, backbone,
                                                                   switches, first_tolerance, steps, tolerance,
                                                                   monkeypatch):
    if '--amp' in switches:
        allow_fp16_on_the_cpu(monkeypatch)
    if '--compile' in switches:
        # the compiled blocks as dynamo and AOT autograd trace them; inductor's C++ code generation alone takes a
        # minute on 2 cores, and its kernels are torch's to test
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, 'compile', lambda module, *arguments, **keywords: compile_module(
            module, *arguments, **dict(keywords, backend='aot_eager')))
    reference = float32_losses(backbone)
    losses = step_losses(switch_argv(tiny_data, backbone, tmp_path, *switches))
    assert len(losses) == len(reference) == 6
    assert losses[0] == pytest.approx(reference[0], rel=first_tolerance)
    if '--amp' in switches:  # and in effect: its rounding is seen (a switch that does nothing would pass the above)
        assert max(abs(loss / expected - 1) for loss, expected in zip(losses[:steps], reference)) > 1e-6
    assert losses[:steps] == pytest.approx(reference[:steps], rel=tolerance)
    trained = torch.load(os.path.join(only_run_dir(tmp_path), 'max_acc.pth'), weights_only=True)['params']
    trainer.seed_epoch(0, 0, 0)
    initial = helpers.build_model(backbone, 96, 4, None, width_divisor=8).student.backbone.state_dict()
    assert trained.keys() - {'head.weight'} == initial.keys()
    assert sum(not torch.equal(trained[key], initial[key]) for key in initial) > 10


def test_channels_last_batches_hold_the_same_values():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    plain = datasets.BatchTransform(augment=False)(images, train=False)
    channels_last = datasets.BatchTransform(augment=False, memory_format=torch.channels_last)(images, train=False)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(plain, channels_last)


# ---------------------------------------------------------------------------- the published runs' behaviour
def test_defaults_are_the_published_runs():
    args = flags.get_parser().parse_args([])
    assert args.min_lr == 1e-6 and args.drop_block == 'published' and not args.teacher_eval
    assert not args.init_head_from_teacher
    # the README's stated defaults of this project's own flags
    assert (args.max_bad_images, args.checkpoint_minutes, args.teacher_cache_views, args.teacher_cache_dtype) == (
        0.01, 30.0, 8, 'float16')
    for value, expected in (('True', True), ('False', False), ('1', True)):
        assert flags.get_parser().parse_args(['--resume', value]).resume is expected
    assert flags.get_parser().parse_args(['--resume']).resume is True
    with pytest.raises(SystemExit):
        flags.get_parser().parse_args(['--resume', 'maybe'])


def test_ties_go_to_the_later_epoch_and_unvalidated_epochs_have_no_figures(tiny_data, tmp_path, monkeypatch):
    def constant_validation(*arguments):
        return {'loss': 1.0, 'accuracy': 0.5, 'interval': 0.1, 'truncated_images': []}
    monkeypatch.setattr(trainer, 'validate', constant_validation)
    run_main(SMALL + data_args(tiny_data)[:8] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                                 '--max_epoch', '3', '--eval_interval', '2', '--optim', 'SGD',
                                                 '--save_dir', str(tmp_path)])
    record = record_of(only_run_dir(tmp_path))
    epoch_lines = re.findall(r'^epoch (\d+)  lr .*$', record, re.M)
    assert epoch_lines == ['1', '2', '3']
    first = re.search(r'^epoch 1  lr .*$', record, re.M).group(0)
    assert 'eval_' not in first and 'avg_ce_loss=' in first
    assert re.search(r'^epoch 2  lr .*eval_loss=1.0000, eval_acc=0.5000\+0.1000, ', record, re.M)
    assert re.search(r'^best epoch 3: eval_acc=0.5000$', record, re.M)


def write_test_list(path, tiny_data, rows):
    """A test list over tiny_data's images: rows of (image index, coarse label, fine label)."""
    with open(path, 'w', encoding='utf-8') as handle:
        for index, coarse, fine in rows:
            handle.write(f'test_{index:04d}.jpg\tn\t{coarse}\t{fine}\n')
    return str(path)


@pytest.fixture(scope='module')
def resnet_student_file(tmp_path_factory):
    torch.manual_seed(5)
    path = str(tmp_path_factory.mktemp('student') / 'student.pth')
    torch.save({'params': models.create_backbone('Resnet12', 96, 8).state_dict()}, path)
    return path


@pytest.mark.parametrize('rows, undefined', [
    ([(index, index // 4, 100 + index) for index in range(12)],
     {'fine': 'no positive pair (no two test images share a label)'}),
    ([(0, 0, 0)], {'coarse': 'fewer than two test images: there is no pair to score',
                   'fine': 'fewer than two test images: there is no pair to score'}),
])
def test_figures_that_cannot_exist_are_nan_and_the_run_ends_well(tiny_data, resnet_student_file, tmp_path, rows,
                                                                 undefined):
    test_list = write_test_list(tmp_path / 'test.txt', tiny_data, rows)
    run_main(SMALL + ['--backbone_class', 'Resnet12', '--test_only', '--init_weights', resnet_student_file,
                      '--test_root', tiny_data['root'], '--test_list', test_list, '--save_dir', str(tmp_path)])
    run_dir = only_run_dir(tmp_path)
    record = record_of(run_dir)
    line = re.search(r'^test acc: coarsegrained:\[(.*)\]--finegrained:\[(.*)\]$', record, re.M)
    for grain, values in zip(('coarse', 'fine'), line.groups()):
        values = [float(value) for value in values.split(',')]
        if grain in undefined:
            assert f'student {grain} TARs are nan (undefined): {undefined[grain]}' in record
            announced = f'note: the test list gives no {grain} TARs: {undefined[grain]}; they will be reported as nan'
            assert record.index(announced) < record.index('test acc:')
            assert math.isnan(values[0])
        else:
            assert not any(math.isnan(value) for value in values) and values[0] > 0
    assert np.load(os.path.join(run_dir, 'opensetFeat.npy')).shape == (len(rows), 128)
    assert os.path.isfile(os.path.join(run_dir, 'roc.png'))


def test_missing_test_image_stops_the_run_before_training(tiny_data, tmp_path):
    test_list = write_test_list(tmp_path / 'test.txt', tiny_data, [(0, 0, 0), (99, 0, 0), (98, 1, 1)])
    argv = SMALL + data_args(tiny_data)[:8] + ['--test_root', tiny_data['root'], '--test_list', test_list,
                                               '--backbone_class', 'Resnet12', '--num_classes', '4',
                                               '--save_dir', str(tmp_path / 'runs')]
    with pytest.raises(SystemExit, match=re.escape(f'error: {test_list}:2: ') + '.*test_0099.jpg: no such image '
                       r'\(and 1 more\); fix the list or --test_root'):
        run_main(argv)
    assert not glob.glob(str(tmp_path / 'runs' / '*' / '*' / 'checkpoint.pth.tar'))


@pytest.mark.parametrize('listed', ['test', 'val'])
def test_an_unreadable_image_on_one_process_stops_every_process_with_one_message(tiny_data, resnet_student_file,
                                                                                 tmp_path, listed):
    import shutil
    root = str(tmp_path / 'data')
    shutil.copytree(tiny_data['root'], root)
    image, line = {'test': ('test_0011.jpg', 12), 'val': ('val_0007.jpg', 8)}[listed]
    with open(os.path.join(root, image), 'wb') as handle:
        handle.write(b'not a jpeg at all')  # in the second process's half of the list
    run = (['--test_only', '--init_weights', resnet_student_file, '--test_root', root, '--test_list',
            os.path.join(root, 'test.txt')] if listed == 'test' else
           ['--num_classes', '4', '--max_epoch', '1', '--batch_size', '8', '--train_root', root, '--train_list',
            os.path.join(root, 'train.txt'), '--val_root', root, '--val_list', os.path.join(root, 'val.txt')])
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         os.path.join(ROOT, 'main.py')] + SMALL + ['--backbone_class', 'Resnet12', '--save_dir',
                                                   str(tmp_path / 'runs')] + run,
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    messages = re.findall(r'^error: .*$', result.stderr, re.M)
    assert len(messages) == 1, result.stderr[-3000:]
    assert f'{image}: not a decodable image (' in messages[0] and f'{listed}.txt:{line})' in messages[0]


# ----------------------------------------------------------------------------------------- several processes
def test_two_processes_validate_and_save_one_and_the_same_model(tiny_data, tmp_path):
    argv = SMALL + data_args(tiny_data)[:8] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                               '--max_epoch', '1', '--warmup_epoch', '0', '--optim', 'SGD',
                                               '--lr', '0.05', '--batch_size', '8', '--augment']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(ROOT, 'main.py')] + argv + ['--save_dir', str(tmp_path)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    logged = re.search(r'eval_loss=([0-9.]+), eval_acc=([0-9.]+)\+', record_of(run_dir))
    saved = models.load_classifier('Resnet12', os.path.join(run_dir, 'max_acc.pth'), 96, 8)
    samples = datasets.read_eval_samples(tiny_data['root'], tiny_data['val'])
    loader = datasets.build_eval_loader(datasets.ImageDataset(samples, 96, train=False, augment=False), 4, 0, 0, 1)
    validation = trainer.validate(saved, loader, datasets.BatchTransform(augment=False), torch.device('cpu'), 'none')
    assert float(logged.group(1)) == pytest.approx(validation['loss'], abs=1e-4)
    assert float(logged.group(2)) == pytest.approx(validation['accuracy'], abs=1e-4)


def allow_fp16_on_the_cpu(monkeypatch):
    """main.py refuses fp16 on a CPU (no fp16 kernels: many times slower); its gradient scaler and skipped steps
    work there all the same, and are tested there."""
    monkeypatch.setattr(precision, 'choose_amp', lambda requested, device: (requested, f'precision: {requested}'))


def test_fp16_skips_non_finite_steps_and_stops_only_when_they_persist(tiny_data, tmp_path, monkeypatch):
    allow_fp16_on_the_cpu(monkeypatch)
    # steps 2-3 of epoch 1 overflow (skipped), then from the second step of epoch 2 every step does
    spoil_losses(monkeypatch, lambda step: step in (2, 3) or step >= 8, float('inf'))
    monkeypatch.setattr(trainer.NonFiniteWatch, 'FP16_SKIPS_ALLOWED', 3)
    argv = SMALL + data_args(tiny_data)[:8] + ['--backbone_class', 'Resnet12', '--num_classes', '4', '--amp', 'fp16',
                                               '--max_epoch', '3', '--save_dir', str(tmp_path)]
    with pytest.raises(SystemExit, match=r'epoch 2 iteration 3: the loss is not finite \(3 steps in a row, each '
                                         r'skipped by the fp16 gradient scaler\)'):
        run_main(argv)
    record = record_of(only_run_dir(tmp_path))
    first = re.search(r'^epoch 1  lr .*avg_ce_loss=([0-9.]+)', record, re.M)
    assert first and math.isfinite(float(first.group(1)))


def test_fp16_epoch_averages_leave_out_the_steps_the_scaler_skipped(tiny_data, tmp_path, monkeypatch):
    allow_fp16_on_the_cpu(monkeypatch)
    steps = []
    original_forward = losses.DistillationLoss.forward

    def forward_overflowing_steps_2_and_3(self, *arguments):
        loss, cross_entropy, distillation = original_forward(self, *arguments)
        steps.append((float(cross_entropy), arguments[-1].numel()))
        return (loss * float('inf') if len(steps) in (2, 3) else loss), cross_entropy, distillation
    monkeypatch.setattr(losses.DistillationLoss, 'forward', forward_overflowing_steps_2_and_3)
    argv = SMALL + data_args(tiny_data)[:4] + ['--backbone_class', 'Resnet12', '--num_classes', '4', '--amp', 'fp16',
                                               '--max_epoch', '1', '--save_dir', str(tmp_path)]
    run_main(argv)
    counted = [step for number, step in enumerate(steps, start=1) if number not in (2, 3)]
    assert len(steps) == 6 and len(counted) == 4
    expected_ce = sum(ce * size for ce, size in counted) / sum(size for _, size in counted)
    with open(os.path.join(only_run_dir(tmp_path), 'results.json'), encoding='utf-8') as handle:
        epoch = json.load(handle)['epochs'][0]
    assert epoch['ce'] == pytest.approx(expected_ce, rel=1e-6)


@pytest.fixture(scope='module')
def trained_run(tiny_data, tmp_path_factory):
    """(argv, run directory) of a one-epoch ResNet12 run, for reruns with other flags."""
    argv = SMALL + data_args(tiny_data)[:4] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                               '--max_epoch', '1', '--save_dir', str(tmp_path_factory.mktemp('run'))]
    run_main(argv)
    return argv, only_run_dir(argv[-1])


@pytest.mark.parametrize('flag, value, stored', [
    ('min_lr', '1e-05', '1e-06'), ('seed', '1', '0'), ('weight_decay', '0.001', '0.0005'), ('amp', 'bf16', 'none'),
    ('drop_block', 'annealed', 'published'), ('img_size', '32', '96'), ('momentum', '0.9', '0.0'),
])
def test_a_resume_with_another_trajectory_flag_stops_and_leaves_the_checkpoint(trained_run, flag, value, stored):
    argv, run_dir = trained_run
    checkpoint = os.path.join(run_dir, 'checkpoint.pth.tar')
    with open(checkpoint, 'rb') as handle:
        before = handle.read()
    with pytest.raises(SystemExit) as stopped:
        run_main(argv + [f'--{flag}', value])
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert message.startswith(f'error: {checkpoint} was written with other settings: --{flag} {value} (the '
                              f'checkpoint has {stored})'), message
    with open(checkpoint, 'rb') as handle:
        assert handle.read() == before


# ------------------------------------------------------------------------------ what the optimizer really got
def record_learning_rates(monkeypatch) -> list:
    rates, step = [], trainer.training_step

    def recording_step(parts, *arguments):
        rates.append(parts.optimizer.param_groups[0]['lr'])
        return step(parts, *arguments)
    monkeypatch.setattr(trainer, 'training_step', recording_step)
    return rates


@pytest.mark.parametrize('schedule, expected', [
    # 6 iterations an epoch; the position is epoch + iteration / 6, epochs numbered from 1 (hand formulas)
    (['--lr_scheduler', 'cosine', '--warmup_epoch', '2', '--min_lr', '0.001'],
     lambda position, epoch: 0.01 * position / 2 if position < 2 else
     0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * (position - 2) / 3))),
    (['--lr_scheduler', 'step', '--step_size', '1', '--gamma', '0.5', '--warmup_epoch', '0'],
     lambda position, epoch: 0.01 * 0.5 ** (epoch - 1)),
    (['--lr_scheduler', 'multistep', '--step_size', '2,3', '--gamma', '0.5', '--warmup_epoch', '0'],
     lambda position, epoch: 0.01 * (0.5 if epoch == 3 else 1.0)),
])
def test_the_optimizer_gets_the_scheduled_rate_at_every_iteration(tiny_data, tmp_path, monkeypatch, schedule,
                                                                  expected):
    rates = record_learning_rates(monkeypatch)
    run_main(SMALL + data_args(tiny_data)[:4] + ['--backbone_class', 'Resnet12', '--num_classes', '4', '--lr', '0.01',
                                                 '--max_epoch', '3', '--save_dir', str(tmp_path)] + schedule)
    wanted = [expected(epoch + iteration / 6, epoch) for epoch in (1, 2, 3) for iteration in range(6)]
    assert rates == pytest.approx(wanted, rel=1e-12)


def test_after_a_mid_epoch_resume_the_optimizer_gets_the_scheduled_rate(tiny_data, tmp_path, monkeypatch):
    rates = record_learning_rates(monkeypatch)
    recording_step = trainer.training_step

    def stopping_step(parts, *arguments):
        outputs = recording_step(parts, *arguments)
        if len(rates) == 8:  # epoch 2, after its second iteration: SIGTERM, as a preempted node gets it
            os.kill(os.getpid(), signal.SIGTERM)
        return outputs
    monkeypatch.setattr(trainer, 'training_step', stopping_step)
    argv = SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Resnet12', '--num_classes', '4', '--lr', '0.01', '--max_epoch', '3', '--warmup_epoch',
        '2', '--min_lr', '0.001', '--checkpoint_minutes', '0', '--save_dir', str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(trainer, 'training_step', recording_step)
    del rates[:]
    run_main(argv)

    def expected(position):  # the hand formula of the cosine case above: epochs from 1, position epoch + i / 6
        if position < 2:
            return 0.01 * position / 2
        return 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * (position - 2) / 3))
    wanted = [expected(2 + iteration / 6) for iteration in range(2, 6)] + [expected(3 + iteration / 6)
                                                                           for iteration in range(6)]
    assert rates == pytest.approx(wanted, rel=1e-12)


def test_one_step_is_cross_entropy_plus_kd_on_margin_logits(tiny_data, teacher_file, tmp_path, monkeypatch):
    seen = []
    forward = losses.DistillationLoss.forward

    def recording_forward(self, student_features, student_logits, teacher_features, teacher_logits, labels):
        seen.append([tensor.detach().clone() for tensor in (student_features, student_logits, teacher_features,
                                                            teacher_logits, labels)])
        result = forward(self, student_features, student_logits, teacher_features, teacher_logits, labels)
        seen[-1].append(result[0].item())
        return result
    monkeypatch.setattr(losses.DistillationLoss, 'forward', recording_forward)
    run_main(SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Resnet12', '--is_distill', '--teacher_backbone_class', 'Resnet12',
        '--teacher_init_weights', teacher_file, '--head_fixed', '--kd_weight', '0.5', '--max_epoch', '1',
        '--save_dir', str(tmp_path)])
    head = torch.load(teacher_file, weights_only=True)['params']['head.weight']
    for student_features, student_logits, teacher_features, teacher_logits, labels, loss in seen[:2]:
        for features, logits in ((student_features, student_logits), (teacher_features, teacher_logits)):
            cosine = F.normalize(features, dim=1) @ F.normalize(head, dim=1).T
            margin = torch.zeros_like(cosine)
            margin[torch.arange(len(labels)), labels] = 0.1
            torch.testing.assert_close(logits, 32 * (cosine - margin), atol=1e-4, rtol=1e-5)
        cross_entropy = sum(-math.log(math.exp(row[label]) / sum(math.exp(value) for value in row))
                            for row, label in zip(student_logits.tolist(), labels.tolist())) / len(labels)
        expected = cross_entropy + 0.5 * reference_kd(student_logits, teacher_logits, temperature=4.0)
        assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('kd_loss', ['global_KD', 'tempered_KD'])
def test_the_other_distillation_losses_train_through_main(tiny_data, teacher_file, tmp_path, kd_loss):
    run_main(SMALL + data_args(tiny_data)[:4] + [
        '--backbone_class', 'Resnet12', '--is_distill', '--teacher_backbone_class', 'Resnet12',
        '--teacher_init_weights', teacher_file, '--head_fixed', '--kd_loss', kd_loss, '--max_epoch', '1',
        '--save_dir', str(tmp_path)])
    with open(os.path.join(only_run_dir(tmp_path), 'results.json'), encoding='utf-8') as handle:
        epoch, = json.load(handle)['epochs']
    assert math.isfinite(epoch['kd']) and epoch['kd'] > 0 and epoch['loss'] == pytest.approx(epoch['ce'] + epoch['kd'])


def test_validation_figures_are_margin_free_cosine_cross_entropy_and_top1(tiny_data, tmp_path):
    run_main(SMALL + data_args(tiny_data)[:8] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                                 '--max_epoch', '1', '--save_dir', str(tmp_path)])
    run_dir = only_run_dir(tmp_path)
    best = torch.load(os.path.join(run_dir, 'max_acc.pth'), weights_only=True)['params']
    backbone = models.load_backbone('Resnet12', os.path.join(run_dir, 'max_acc.pth'), 96, 8)
    with torch.no_grad():
        features = backbone(evaluation_batch(tiny_data, 'val'))
    logits = 32 * F.normalize(features, dim=1) @ F.normalize(best['head.weight'], dim=1).T  # no margin
    labels = [label for label in range(4) for _ in range(2)]
    expected_loss = sum(-math.log(math.exp(row[label]) / sum(math.exp(value) for value in row))
                        for row, label in zip(logits.tolist(), labels)) / len(labels)
    expected_accuracy = sum(int(max(range(4), key=row.__getitem__) == label)
                            for row, label in zip(logits.tolist(), labels)) / len(labels)
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as handle:
        epoch, = json.load(handle)['epochs']
    assert epoch['val_loss'] == pytest.approx(expected_loss, rel=1e-4)
    assert epoch['val_accuracy'] == expected_accuracy


def test_fp16_stops_only_at_the_hundredth_skipped_step_in_a_row():
    watch = trainer.NonFiniteWatch(torch.device('cpu'), skips_allowed=True)
    assert watch.limit == 100
    for iteration in range(99):
        watch.update(torch.tensor(False), iteration)
    watch.update(torch.tensor(True), 99)  # a good step starts the count again
    for iteration in range(100, 199):
        watch.update(torch.tensor(False), iteration)
    watch.check(epoch=1)  # 99 in a row: still running
    watch.update(torch.tensor(False), 199)
    with pytest.raises(trainer.NonFiniteLossError, match=r'epoch 1 iteration 199: .*\(100 steps in a row'):
        watch.check(epoch=1)


def test_the_third_signal_interrupts_at_once():
    signals = trainer.StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.name == 'SIGTERM'  # asked to stop, not interrupted
        with pytest.raises(KeyboardInterrupt, match='received three times'):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signals.restore()


def test_label_map_two_lists_masks_and_init_weights_through_main(tiny_data, tmp_path):
    label_map = str(tmp_path / 'map.pkl')
    torch.save({4 + label: (label, 1.0) for label in range(4)}, label_map)  # the second list's labels onto the first
    student = str(tmp_path / 'student.pth')
    torch.manual_seed(4)
    torch.save({'params': models.create_backbone('Resnet12', 96, 8).state_dict()}, student)
    test_labels = np.array([10 + label for label in range(3) for _ in range(4)])
    fine_labels = np.array([20 + 2 * (index // 4) + index % 2 for index in range(12)])  # as conftest writes them
    masks = {}
    # each grain's mask built from the other grain's labels: the figures follow the masks, not the list's labels
    for grain, labels in (('coarse', fine_labels), ('fine', test_labels)):
        rows, columns = np.triu_indices(12, 1)
        masks[grain] = str(tmp_path / f'{grain}.npy')
        np.save(masks[grain], labels[rows] == labels[columns])
    run_main(SMALL + ['--train_root', tiny_data['root'], tiny_data['root'], '--train_list', tiny_data['train'],
                      tiny_data['train'], '--label_map', label_map, '--test_root', tiny_data['root'], '--test_list',
                      tiny_data['test'], '--test_mask_coarse', masks['coarse'], '--test_mask_fine', masks['fine'],
                      '--init_weights', student, '--backbone_class', 'Resnet12', '--num_classes', '4',
                      '--max_epoch', '1', '--save_dir', str(tmp_path / 'runs')])
    run_dir = only_run_dir(tmp_path / 'runs')
    assert run_dir.split(os.sep)[-2].endswith('-Pre-NoAug')
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as handle:
        results = json.load(handle)
    features = np.load(os.path.join(run_dir, 'opensetFeat.npy'))
    assert verification.tar_at_far(features, test_labels) != verification.tar_at_far(features, fine_labels)
    assert results['test']['student']['coarse'] == pytest.approx(verification.tar_at_far(features, fine_labels))
    assert results['test']['student']['fine'] == pytest.approx(verification.tar_at_far(features, test_labels))
    epoch, = results['epochs']
    assert math.isfinite(epoch['loss'])  # 48 samples (two lists) in 4 classes, through the map


def test_test_only_without_init_weights_scores_the_runs_max_acc(tiny_data, tmp_path):
    argv = SMALL + data_args(tiny_data)[:4] + ['--backbone_class', 'Resnet12', '--num_classes', '4',
                                               '--max_epoch', '1', '--save_dir', str(tmp_path)]
    run_main(argv)
    run_dir = only_run_dir(tmp_path)
    run_main(argv + ['--test_only', '--test_root', tiny_data['root'], '--test_list', tiny_data['test']])
    record = os.path.join(run_dir, 'test-max_acc-96px', 'record.txt')
    assert f'test only: {run_dir}/max_acc.pth' in open(record, encoding='utf-8').read()
