"""The first hour's traps at the command line: a mistyped flag answered in one line, each default shown once in
--help, a short run with the default warmup, and nothing left behind by a run refused before it starts."""
import json
import os
import re

import pytest

import flags
from conftest import data_args, run_main
from test_bad_inputs import SMALL, read, run_dirs, stops_with, train_argv


def parse_error(capsys, *argv) -> str:
    """What main.py's parser prints when it refuses `argv` (it exits with status 2)."""
    with pytest.raises(SystemExit) as stopped:
        flags.parse_args(list(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_mistyped_flag_is_answered_in_one_line_with_the_nearest_flag(capsys):
    assert parse_error(capsys, '--max_epochs', '3', '--lr', '0.1') == (
        'main.py: error: unrecognized arguments: --max_epochs 3 (--max_epochs: did you mean --max_epoch?)\n')
    assert parse_error(capsys, '--colour', 'red').splitlines() == [
        'main.py: error: unrecognized arguments: --colour red (python main.py --help lists every flag)']
    bad_value = parse_error(capsys, '--amp', 'fp32')
    assert len(bad_value.splitlines()) == 1 and "invalid choice: 'fp32'" in bad_value


def test_help_shows_each_default_once():
    shown = flags.get_parser().format_help()
    # one entry per flag: from its name to the next flag's at the start of a line
    entries = re.split(r'\n  (?=--)', shown.split('model and schedule:', 1)[1])
    assert len(entries) > 60
    for entry in entries:
        assert entry.count('default') <= 1, entry
    num_classes = next(entry for entry in entries if entry.startswith('--num_classes'))
    assert 'None' not in num_classes and "the teacher's classifier's" in ' '.join(num_classes.split())
    assert "default: 384" in next(entry for entry in entries if entry.startswith('--img_size'))
    assert '(default: 1e-06)' in ' '.join(next(entry for entry in entries if entry.startswith('--min_lr')).split())


def test_a_short_run_clips_the_default_warmup_and_names_the_fars_its_test_list_cannot_resolve(tiny_data, tmp_path):
    argv = [argument for argument in train_argv(tiny_data, tmp_path) if argument != '--warmup_epoch']
    assert '--warmup_epoch' not in argv and argv[argv.index('--max_epoch') + 1] == '1'
    # SMALL sets a warmup: take it out, so the default (10 epochs) meets --max_epoch 1
    small = SMALL.index('--warmup_epoch') if '--warmup_epoch' in SMALL else None
    if small is not None:
        argv = SMALL[:small] + SMALL[small + 2:] + argv[len(SMALL) - 1:]
    run_main(argv)
    run_dir, = run_dirs(tmp_path)
    assert '_warmup1_' in run_dir  # the run is named by the warmup it ran
    assert ('note: --warmup_epoch 1: the default warmup (10 epochs) is longer than --max_epoch 1, so the rate reaches '
            '--lr at the last epoch; give --warmup_epoch to choose another') in read(os.path.join(run_dir, 'record.txt'))
    # the tiny test list: 12 images, 3 coarse labels of 4: 66 pairs, 3 x 6 genuine, 48 impostor; FAR 1e-2 < 1/48
    assert ('note: student coarse: 48 impostor pairs resolve FARs down to 1/48 = 2.1e-02; for TAR@1e-2..TAR@1e-8 the '
            'FAR is below that') in read(os.path.join(run_dir, 'record.txt'))
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as handle:
        student = json.load(handle)['test']['student']
    assert student['impostor_pairs']['coarse'] == 48
    assert student['below_resolution']['coarse'] == [f'TAR@1e-{power}' for power in range(2, 9)]
    assert student['tar_at_far']['coarse']['TAR@1e-3'] is not None  # the published rule's value is still reported


def test_a_warmup_given_longer_than_the_run_is_still_refused(tiny_data, tmp_path):
    stops_with(train_argv(tiny_data, tmp_path, '--warmup_epoch', '3'), re.escape('--warmup_epoch 3 is longer than'))


def test_a_run_refused_at_start_up_leaves_nothing_behind(tiny_data, tmp_path):
    broken = tmp_path / 'broken.txt'
    broken.write_text('a.jpg\tname\tseven\n')
    save_dir = tmp_path / 'runs'
    argv = SMALL + ['--train_root', tiny_data['root'], '--train_list', str(broken), '--num_classes', '4',
                    '--max_epoch', '1', '--save_dir', str(save_dir)]
    stops_with(argv, re.escape(f"{broken}:1: label 'seven'"))
    assert not save_dir.exists()
    # a refused rerun of a run that has started keeps what that run wrote
    run_main(train_argv(tiny_data, save_dir))
    run_dir, = run_dirs(save_dir)
    before = sorted(os.listdir(run_dir))
    stops_with(train_argv(tiny_data, save_dir, '--seed', '1'), 'seed')
    assert sorted(os.listdir(run_dir)) == before


@pytest.mark.parametrize('refusal', [['--amp', 'fp16'], ['--img_size', '100']])
def test_a_refused_test_only_leaves_no_output_directory(tiny_data, tmp_path, refusal):
    stops_with(SMALL + data_args(tiny_data)[4:] + ['--test_only', '--save_dir', str(tmp_path / 'out'),
                                                   '--backbone_class', 'Swin_tiny', *refusal], '.')
    assert not (tmp_path / 'out').exists()
