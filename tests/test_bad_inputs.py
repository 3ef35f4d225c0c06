"""What a user gets wrong: each case ends in one line naming the problem (or is handled), never in a silent wrong
result, a traceback or lost files."""
import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, classifier_file, data_args, run_main
from PIL import Image

import datasets  # noqa: E402
import model

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4',
         '--log_interval', '1', '--warmup_epoch', '1', '--backbone_class', 'Resnet12']


def train_argv(tiny_data, save_dir, *extra):
    return SMALL + data_args(tiny_data) + ['--num_classes', '4', '--max_epoch', '1', '--save_dir', str(save_dir),
                                           *extra]


def run_dirs(save_dir) -> list[str]:
    return sorted(os.path.dirname(path) for path in glob.glob(os.path.join(str(save_dir), '**', 'record.txt'),
                                                              recursive=True))


def read(path, mode='r'):
    with open(path, mode) as handle:
        return handle.read()


def stops_with(argv, pattern) -> str:
    """Run main.py in this process; it must stop with exactly one line matching `pattern` (a regular expression)."""
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith('error: '), message
    assert re.search(pattern, message), message
    return message


@pytest.fixture
def student_file(tmp_path):
    torch.manual_seed(5)
    path = str(tmp_path / 'student.pth')
    torch.save({'params': model.create_backbone('Resnet12', 96, 8).state_dict()}, path)
    return path


# ------------------------------------------------------------------------------------------- silent wrong results
def test_a_missing_max_acc_is_said_and_the_earlier_results_are_kept(tiny_data, tmp_path):
    run_main(train_argv(tiny_data, tmp_path))
    run_dir, = run_dirs(tmp_path)
    results_before = read(os.path.join(run_dir, 'results.json'))
    os.remove(os.path.join(run_dir, 'max_acc.pth'))
    stops_with(train_argv(tiny_data, tmp_path), re.escape(f'{run_dir}/max_acc.pth, the weights of the best epoch 1, '
                                                          'is missing'))
    assert read(os.path.join(run_dir, 'results.json')) == results_before


def test_a_test_only_run_never_writes_over_a_trained_runs_results(tiny_data, tmp_path, student_file):
    run_main(train_argv(tiny_data, tmp_path, '--init_weights', student_file))
    trained, = run_dirs(tmp_path)
    outputs = {name: read(os.path.join(trained, name), 'rb') for name in ('results.json', 'opensetFeat.npy', 'roc.png')}
    other = str(tmp_path / 'other.pth')
    torch.manual_seed(6)
    torch.save({'params': model.create_backbone('Resnet12', 96, 8).state_dict()}, other)
    for weights, img_size in ((other, '96'), (student_file, '64')):
        run_main(train_argv(tiny_data, tmp_path, '--init_weights', weights, '--test_only', '--img_size', img_size))
    assert {name: read(os.path.join(trained, name), 'rb') for name in outputs} == outputs
    tests = [directory for directory in run_dirs(tmp_path) if directory != trained]
    assert [os.path.basename(directory).split('-')[1::2] for directory in tests] in (
        [['other', '96px'], ['student', '64px']], [['student', '64px'], ['other', '96px']])
    for directory in tests:
        # in --save_dir, given with the weights (without it: beside them)
        assert os.path.dirname(directory) == str(tmp_path)
        assert os.path.isfile(os.path.join(directory, 'opensetFeat.npy'))


def test_a_test_list_mixing_three_and_four_fields_stops_at_start(tiny_data, tmp_path):
    lines = read(tiny_data['test']).splitlines()
    lines[1] = '\t'.join(lines[1].split('\t')[:3])
    mixed = tmp_path / 'mixed.txt'
    mixed.write_text('\n'.join(lines) + '\n')
    argv = train_argv(tiny_data, tmp_path / 'runs')
    argv[argv.index(tiny_data['test'])] = str(mixed)
    stops_with(argv, re.escape(f'{mixed}:2: 3 fields, where {mixed}:1 has 4: give every line a fine label'))
    assert not glob.glob(str(tmp_path / 'runs' / '**' / 'checkpoint.pth.tar'), recursive=True)


def test_a_warmup_longer_than_the_run_is_refused(tiny_data, tmp_path):
    stops_with(train_argv(tiny_data, tmp_path, '--warmup_epoch', '3'),
               re.escape('--warmup_epoch 3 is longer than --max_epoch 1: the rate would never reach --lr'))


def test_sixteen_bit_images_keep_their_range_and_float_images_are_named(tmp_path):
    levels = np.full((8, 8), 40000, dtype=np.uint16)
    path = str(tmp_path / 'deep.png')
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith('I')
    decoded = datasets.decode_eval_image(path, 8)
    assert decoded.dtype == torch.uint8 and torch.all(decoded == 40000 // 256)  # 156, not clipped to 255
    float_path = str(tmp_path / 'float.tif')
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(float_path)
    dataset = datasets.ImageDataset([datasets.Sample(float_path, 0, 0, 'list.txt:1')], 8, train=False, augment=False)
    assert 'a floating-point image (32-bit float pixels)' in dataset[0]['bad']


# ------------------------------------------------------------------------------------------------- data lost
def test_a_full_disk_during_the_test_keeps_the_previous_features(tiny_data, tmp_path, student_file, monkeypatch):
    argv = SMALL + ['--test_only', '--init_weights', student_file, '--test_root', tiny_data['root'], '--test_list',
                    tiny_data['test'], '--save_dir', str(tmp_path)]
    run_main(argv)
    test_dir, = run_dirs(tmp_path)
    features_path = os.path.join(test_dir, 'opensetFeat.npy')
    before = read(features_path, 'rb')

    def save_half_then_fill_the_disk(file, array, *arguments, **keywords):
        file.write(b'\x93NUMPY half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(np, 'save', save_half_then_fill_the_disk)
    stops_with(argv, re.escape(f'could not write {features_path} (No space left on device); the file that was there '
                               'is whole'))
    assert read(features_path, 'rb') == before
    assert not glob.glob(os.path.join(test_dir, '.*.tmp'))


SIGNAL_IN_TEST_RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import evaluation, flags, main
extract = evaluation.extract_features
def extract_then_signal(*arguments, **keywords):
    os.kill(os.getpid(), signal.SIGTERM)  # the final test is under way
    return extract(*arguments, **keywords)
evaluation.extract_features = extract_then_signal
main.main(flags.parse_args(sys.argv[1:]))
"""


def test_sigterm_during_the_final_test_ends_with_one_line_and_a_clean_directory(tiny_data, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(SIGNAL_IN_TEST_RUNNER.format(root=ROOT))
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    finished = subprocess.run([sys.executable, str(runner)] + train_argv(tiny_data, tmp_path / 'runs'),
                              env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 128 + signal.SIGTERM, finished.stderr[-2000:]
    assert 'Traceback' not in finished.stderr
    run_dir, = run_dirs(tmp_path / 'runs')
    assert re.search(r"^stopped by SIGTERM during the final test: the run's checkpoints and max_acc.pth are whole",
                     read(os.path.join(run_dir, 'record.txt')), re.M)
    assert not os.path.exists(os.path.join(run_dir, 'run.lock'))
    events, = glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))
    assert os.path.getsize(events) > 0


SIGNAL_IN_EXPORT_RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import flags, main, serving
export = serving.export_onnx
def signal_then_export(*arguments, **keywords):
    os.kill(os.getpid(), signal.SIGTERM)  # the export is under way
    return export(*arguments, **keywords)
serving.export_onnx = signal_then_export
main.main(flags.parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize('task', ['test_only', 'export'])
def test_sigterm_during_a_test_only_run_or_an_export_ends_at_once_with_one_line(tiny_data, tmp_path, student_file,
                                                                                task):
    runner = tmp_path / 'runner.py'
    code = SIGNAL_IN_TEST_RUNNER if task == 'test_only' else SIGNAL_IN_EXPORT_RUNNER
    runner.write_text(code.format(root=ROOT))
    target = tmp_path / 'student.onnx'
    argv = SMALL + ['--init_weights', student_file, '--save_dir', str(tmp_path / 'runs')] + (
        ['--test_only', '--test_root', tiny_data['root'], '--test_list', tiny_data['test']] if task == 'test_only'
        else ['--export_onnx', str(target)])
    finished = subprocess.run([sys.executable, str(runner)] + argv, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 128 + signal.SIGTERM, finished.stderr[-2000:]
    assert 'Traceback' not in finished.stderr
    expected = ('stopped by SIGTERM during the test: the files of the earlier tests are whole; the same command tests '
                'again' if task == 'test_only' else
                'stopped by SIGTERM during the export: nothing was written; the same command exports again')
    assert finished.stdout.splitlines()[-1] == expected
    assert not glob.glob(str(tmp_path / 'runs' / '**' / 'run.lock'), recursive=True)
    assert not target.exists() and not glob.glob(str(tmp_path / '*.tmp'))


# ------------------------------------------------------------------------------------ one line, not a traceback
def test_a_save_dir_that_cannot_hold_a_run_is_one_line(tiny_data, tmp_path):
    not_a_directory = tmp_path / 'file'
    not_a_directory.write_text('')
    stops_with(train_argv(tiny_data, not_a_directory), r'cannot create the run directory .*; give a --save_dir')
    stops_with(train_argv(tiny_data, tmp_path / ('x' * 300)), r'cannot create the run directory .*File name too long')


def test_an_export_path_that_cannot_be_written_is_one_line(tmp_path, student_file):
    for target in (tmp_path, tmp_path / 'absent' / 'student.onnx'):
        stops_with(SMALL + ['--init_weights', student_file, '--export_onnx', str(target), '--save_dir',
                            str(tmp_path / 'runs')], re.escape(f'--export_onnx {target}: cannot write a file there'))


def test_a_train_root_without_the_images_stops_before_the_model_is_built(tiny_data, tmp_path):
    argv = train_argv(tiny_data, tmp_path)
    argv[argv.index('--train_root') + 1] = str(tmp_path)
    stops_with(argv, re.escape(f"{tiny_data['train']}: none of its first 16 images exists") +
               r'.*check its --train_root')


def test_a_rerun_with_another_head_or_width_is_one_line(tiny_data, tmp_path):
    run_main(train_argv(tiny_data, tmp_path, '--max_epoch', '2', '--checkpoint_minutes', '0'))
    for flag, value, stored in (('--num_classes', '5', '4'), ('--demo_width_divisor', '4', '8')):
        stops_with(train_argv(tiny_data, tmp_path, '--max_epoch', '2', flag, value),
                   re.escape(f'{flag} {value} (the checkpoint has {stored})'))


@pytest.mark.parametrize('content', ['{"epochs": [', '', '[1, 2]'])
def test_a_damaged_results_json_is_set_aside(tiny_data, tmp_path, content):
    run_main(train_argv(tiny_data, tmp_path))
    run_dir, = run_dirs(tmp_path)
    results = os.path.join(run_dir, 'results.json')
    with open(results, 'w', encoding='utf-8') as handle:
        handle.write(content)
    run_main(train_argv(tiny_data, tmp_path))
    assert re.search(re.escape(results) + r' (is not JSON|holds a JSON list).*: set aside as .*results\.json\.damaged-',
                     read(os.path.join(run_dir, 'record.txt')))
    assert read(glob.glob(results + '.damaged-*')[0]) == content
    assert 'test' in json.loads(read(results))


# ----------------------------------------------------------------------------------------- misleading messages
@pytest.mark.parametrize('flag', ['--min_lr', '--kd_weight', '--lr', '--gamma'])
def test_a_float_flag_that_is_not_finite_is_refused(tiny_data, tmp_path, flag):
    stops_with(train_argv(tiny_data, tmp_path, flag, 'nan'), re.escape(f'{flag} must be a finite number, not nan'))


def test_a_byte_order_mark_is_not_part_of_the_first_path(tiny_data, tmp_path):
    with_mark = tmp_path / 'test.txt'
    with_mark.write_bytes(b'\xef\xbb\xbf' + read(tiny_data['test'], 'rb'))
    samples = datasets.read_eval_samples(tiny_data['root'], str(with_mark))
    assert samples[0].path == os.path.join(tiny_data['root'], 'test_0000.jpg')


def test_a_label_outside_the_head_names_the_offset_and_the_map(tiny_data, tmp_path):
    argv = train_argv(tiny_data, tmp_path)
    at = argv.index('--train_list')
    argv[at - 1:at + 2] = [tiny_data['root'], tiny_data['root'], '--train_list', tiny_data['train'], tiny_data['train']]
    stops_with(argv, re.escape(f"{tiny_data['train']}:1: label 4 (the list's label 0 + 4 for the labels of the lists "
                               'before it) outside [0, 4)'))
    label_map = str(tmp_path / 'map.pkl')
    torch.save({1: (9, 1.0)}, label_map)
    stops_with(train_argv(tiny_data, tmp_path, '--label_map', label_map),
               re.escape(f"{tiny_data['train']}:7: label 9 (the list's label 1 mapped to 9 by --label_map {label_map}) "
                         'outside [0, 4)'))


def test_weights_that_training_cannot_start_from_are_named(tiny_data, tmp_path):
    onnx = tmp_path / 'student.onnx'
    onnx.write_bytes(b'')
    stops_with(train_argv(tiny_data, tmp_path, '--init_weights', str(onnx)),
               re.escape(f'--init_weights {onnx} is an exported ONNX serving graph, which only --test_only scores'))
    stops_with(train_argv(tiny_data, tmp_path, '--init_weights', str(tmp_path)),
               re.escape(f'--init_weights {tmp_path} is a directory; give the file itself'))


def test_a_pair_mask_of_the_wrong_size_stops_before_training(tiny_data, tmp_path):
    mask = str(tmp_path / 'mask.npy')
    np.save(mask, np.zeros(10, dtype=bool))  # 12 test images have 66 pairs
    stops_with(train_argv(tiny_data, tmp_path / 'runs', '--test_mask_coarse', mask),
               re.escape(f'{mask}: mask has 10 entries but 12 features have 66 pairs'))
    assert not glob.glob(str(tmp_path / 'runs' / '**' / 'checkpoint.pth.tar'), recursive=True)


def test_the_original_ignored_flags_are_accepted_but_not_shown():
    import flags
    shown = flags.get_parser().format_help()
    assert '--resume' not in shown and '--multi_gpu' not in shown
    args = flags.get_parser().parse_args(['--resume', 'True', '--multi_gpu'])
    assert args.resume is True and args.multi_gpu


# ------------------------------------------------------------------------- a run that cannot start leaves nothing
def files_under(directory) -> list[str]:
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(str(directory)) for name in names)


def without_an_image(tiny_data, tmp_path, list_name: str, line: int) -> dict:
    """A copy of the tiny data set whose `list_name` names one image that is not there."""
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(tiny_data['root'], root)
    name = read(root / list_name).splitlines()[line - 1].split('\t')[0]
    os.remove(root / name)
    return dict(tiny_data, root=str(root), train=str(root / 'train.txt'), val=str(root / 'val.txt'),
                test=str(root / 'test.txt'))


@pytest.mark.parametrize('case', ['num_classes', 'validation_image', 'mask', 'label_map', 'teacher_file'])
def test_a_run_stopped_by_a_start_up_check_writes_nothing_in_its_run_directory(tiny_data, tmp_path, case):
    data = without_an_image(tiny_data, tmp_path, 'val.txt', 3) if case == 'validation_image' else tiny_data
    save_dir = tmp_path / 'runs'
    mask = tmp_path / 'mask.npy'
    np.save(mask, np.zeros(10, dtype=bool))
    extra, pattern = {
        'num_classes': (['--is_distill', '--teacher_backbone_class', 'Resnet12', '--teacher_init_weights',
                         classifier_file(tmp_path / 'teacher.pth', num_classes=40)],
                        r'--num_classes 4 but the teacher .*teacher\.pth classifies 40 classes; drop --num_classes'),
        'validation_image': ([], r'val\.txt:3: .*: no such image; fix the list or --val_root'),
        'mask': (['--test_mask_coarse', str(mask)], r'mask has 10 entries but 12 features have 66 pairs'),
        'label_map': (['--label_map', str(tmp_path / 'no_map.pkl')], r'--label_map .*no_map\.pkl: no such file'),
        'teacher_file': (['--is_distill', '--teacher_backbone_class', 'Resnet12', '--teacher_init_weights',
                          str(tmp_path / 'no_teacher.pth')], r'--teacher_init_weights .*no_teacher\.pth: no such file'),
    }[case]
    stops_with(train_argv(data, save_dir, *extra), pattern)
    assert files_under(save_dir) == []


def test_help_shows_every_default():
    shown = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--help'], capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS='200'), check=True).stdout
    for flag, default in (('--img_size IMG_SIZE', '384'), ('--max_epoch MAX_EPOCH', '200'),
                          ('--batch_size BATCH_SIZE', '256'), ('--num_workers NUM_WORKERS', '8'),
                          ('--lr LR', '0.001'), ('--teacher_cache_mode {eval,draws}', 'eval')):
        entry = ' '.join(shown[shown.index(f'\n  {flag}'):].split('\n  -')[1].split())  # the flag's entry, wrapped
        assert re.search(rf'\(?default: {re.escape(default)}\)?$', entry), entry


def test_more_loader_workers_than_cores_are_reduced_to_the_cores_in_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
    run_main(train_argv(tiny_data, tmp_path / 'runs', '--num_workers', '8'))
    record = read(os.path.join(run_dirs(tmp_path / 'runs')[0], 'record.txt'))
    assert ('--num_workers 8 is more than the 2 cores each of the 1 processes of this host has: using 2\n'
            in record)
    assert record.count('is more than the') == 1
