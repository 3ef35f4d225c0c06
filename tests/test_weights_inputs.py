"""Inputs that lie: a weights file's record, an export's metadata, a test list changed under a finished run, a label or
size no model can take. Each ends in one line naming the value and the fix, or is handled, never in a traceback or in
figures of something else."""
import glob
import hashlib
import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import data_args, run_main
from test_bad_inputs import stops_with

import model

RESNET = ['--backbone_class', 'Resnet12', '--img_size', '96', '--demo_width_divisor', '8']
LOADING = ['--num_workers', '0', '--batch_size', '4']


def described_file(path, name='Resnet12', size=96, divisor=8, changes: dict | None = None) -> str:
    """A student saved by this suite (its record describes it), the record's fields in `changes` changed."""
    torch.manual_seed(0)
    network = model.create_backbone(name, size, divisor)
    saved = model.student_weights(model.Classifier(network, model.CosFaceHead(4, network.feature_dim)), True,
                                  {'backbone': name, 'img_size': size, 'width_divisor': divisor})
    saved[model.ARCHITECTURE_KEY].update(changes or {})
    torch.save(saved, str(path))
    return str(path)


def scoring_argv(tiny_data, weights, *extra) -> list[str]:
    return LOADING + ['--test_only', '--init_weights', weights, '--test_root', tiny_data['root'], '--test_list',
                      tiny_data['test'], *extra]


# ------------------------------------------------------------------------------ 1. a finished run, another test list
def test_a_finished_run_given_another_test_list_tests_that_list_without_training_again(tiny_data, tmp_path, capsys):
    train = RESNET + LOADING + data_args(tiny_data) + ['--max_epoch', '1', '--warmup_epoch', '0', '--save_dir',
                                                       str(tmp_path / 'runs')]
    run_main(train)
    run_dir = os.path.dirname(glob.glob(str(tmp_path / 'runs' / '**' / 'checkpoint.pth.tar'), recursive=True)[0])
    checkpoint = os.path.join(run_dir, 'checkpoint.pth.tar')
    trained = (os.path.getsize(checkpoint), os.path.getmtime(checkpoint))
    fewer = tmp_path / 'fewer.txt'  # two of the three test landmarks
    fewer.write_text(''.join(open(tiny_data['test'], encoding='utf-8').readlines()[:8]), encoding='utf-8')
    other = [value if value != tiny_data['test'] else str(fewer) for value in train]
    capsys.readouterr()
    run_main(other)
    printed = capsys.readouterr().out
    assert (f'this run is finished (1 epochs) and its test figures are of another test list (or of one not recorded): '
            f'testing {run_dir}/max_acc.pth on --test_list {fewer} again, the training not redone') in printed
    assert not re.search(r'^epoch ', printed, re.M) and 'nothing was changed' not in printed
    assert np.load(os.path.join(run_dir, 'opensetFeat.npy')).shape[0] == 8  # the figures are of the new list
    results = json.load(open(os.path.join(run_dir, 'results.json'), encoding='utf-8'))
    assert results['test_list']['test_list_sha256'] == hashlib.sha256(fewer.read_bytes()).hexdigest()
    assert (os.path.getsize(checkpoint), os.path.getmtime(checkpoint)) == trained
    run_main(other)  # the same list again: the figures are of it
    assert capsys.readouterr().out.splitlines()[-1] == (f'this run is finished (1 epochs, tested); nothing was '
                                                        f'changed: its results are in {run_dir}/results.json')
    run_main(train)  # the first list is tested again too
    assert np.load(os.path.join(run_dir, 'opensetFeat.npy')).shape[0] == 12


# ------------------------------------------------------------------------------ 2. an export whose metadata lies
def test_an_export_is_described_by_its_graph_and_metadata_that_disagrees_stops(tiny_data, tmp_path):
    export = str(tmp_path / 'student.onnx')
    run_main(['--init_weights', described_file(tmp_path / 'student.pth'), '--export_onnx', export])
    exported = onnx.load(export)
    truthful = {entry.key: entry.value for entry in exported.metadata_props}
    for key, lie, message in (('backbone', 'Swin_tiny', 'backbone Swin_tiny, its graph holds backbone Resnet12'),
                              ('output', 'features: float32 (batch, 256), L2-normalised',
                               'feature_dim 256, its graph holds feature_dim 128')):
        lying = str(tmp_path / f'lying-{key}.onnx')
        onnx.helper.set_model_props(exported, dict(truthful, **{key: lie}))
        onnx.save(exported, lying)
        stops_with(scoring_argv(tiny_data, lying), re.escape(f'{lying}: its metadata says {message}: the metadata '
                                                             'does not describe this graph; export the weights again'))
    silent = str(tmp_path / 'silent.onnx')  # metadata that names no backbone: the graph's is named
    onnx.helper.set_model_props(exported, {})
    onnx.save(exported, silent)
    run_main(scoring_argv(tiny_data, silent))
    record = open(tmp_path / 'test-silent-96px' / 'record.txt', encoding='utf-8').read()
    assert ' backbone_class=Resnet12 ' in re.search('^args: .*$', record, re.M).group(0)


# ------------------------------------------------------------------------------ 3. a weights file's record lies
@pytest.mark.parametrize('backbone, field, value, why', [
    ('Resnet12', 'width_divisor', 3, 'not a divisor of the Resnet12 widths (one of 1, 2, 4, 8, 16, 32, 64, 128)'),
    ('Resnet12', 'width_divisor', True, 'not a divisor of the Resnet12 widths'),
    ('Resnet12', 'img_size', True, 'not a whole number; Resnet12 takes --img_size 31 to 4096'),
    ('Resnet12', 'img_size', 16, 'too small: the stride-2 stem and four 2x2 max-pools of Resnet12 leave no pixel of '
                                 'an image under 31 px; Resnet12 takes --img_size 31 to 4096'),
    ('Swin_tiny', 'img_size', 100000, 'over 4096 px, the largest image this suite builds; Swin_tiny takes --img_size '
                                      '32, 96, 192, 384, 768, 1152'),
    ('Resnet12', 'backbone', 'Resnet50', 'not one of Swin_base, Swin_tiny, Resnet12'),
    ('Resnet12', 'feature_dim', 64, 'but a Resnet12 of width_divisor 8 gives 128-d features'),
    ('Resnet12', 'num_classes', 0, 'not a positive whole number'),
    ('Resnet12', 'head_scale', float('nan'), 'not a finite number above 0'),
    ('Resnet12', 'head_margin', 'wide', 'not a finite number'),
])
def test_a_weights_file_whose_record_is_out_of_range_stops_naming_the_field(tiny_data, tmp_path, backbone, field, value,
                                                                             why):
    size, divisor = (96, 8) if backbone == 'Resnet12' else (32, 4)
    weights = described_file(tmp_path / 'lying.pth', backbone, size, divisor, {field: value})
    stops_with(scoring_argv(tiny_data, weights), '^' + re.escape(
        f"error: {weights}: its 'architecture' record gives {field} {value!r}, {why}") + '.*: the record does not '
        'describe a model this suite builds; save the file again with this suite, or remove the record to build the '
        'model from the flags$')
    assert not os.path.exists(tmp_path / 'test-lying-96px') and not os.path.exists(tmp_path / 'test-lying-32px')


# ------------------------------------------------------------------------------ 4. a width divisor of no model
@pytest.mark.parametrize('backbone', ['Resnet12', 'Swin_tiny'])
def test_a_width_divisor_that_divides_no_width_is_refused_naming_those_that_do(tiny_data, tmp_path, backbone):
    argv = ['--backbone_class', backbone, '--img_size', '96', '--demo_width_divisor', '3', '--max_epoch', '1',
            '--save_dir', str(tmp_path)] + LOADING + data_args(tiny_data)
    stops_with(argv, re.escape(f'error: --demo_width_divisor 3 does not divide the channel widths of {backbone}: give '
                               'one of 1, 2, 4, 8, 16, 32, 64, 128'))
    assert not os.listdir(tmp_path)
    for divisor in model.width_divisors(backbone):  # each divisor named builds, and gives 1024 / divisor features
        with torch.device('meta'):
            assert model.create_backbone(backbone, 32, divisor).feature_dim == model.FEATURE_DIM // divisor


# ------------------------------------------------------------------------------ 5. a label no memory holds the head of
def test_a_head_larger_than_the_memory_is_refused_naming_the_label_before_it_is_allocated(tiny_data, tmp_path):
    lines = open(tiny_data['train'], encoding='utf-8').read().splitlines()
    fields = lines[5].split('\t')
    lines[5] = '\t'.join(fields[:2] + [str(10 ** 9)])
    huge = tmp_path / 'huge.txt'
    huge.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    train = (['--backbone_class', 'Resnet12', '--img_size', '96', '--max_epoch', '1', '--save_dir', str(tmp_path)] +
             LOADING + [value if value != tiny_data['train'] else str(huge) for value in data_args(tiny_data)])
    # 10^9 + 1 classes of 1024-d float32 features: 4 TB, more than any machine this suite runs on
    stops_with(train, re.escape(f'error: {huge}:6: label 1000000000 makes a classifier head of 1,000,000,001 classes '
                                'x 1024-d features, 3.7 TB of float32, more than the ') + r'[\d.]+ [KMGT]B' +
               re.escape(" of this machine's memory: labels number the landmarks 0..N-1 (one class each); renumber the "
                         'list, or map its labels with --label_map'))
    stops_with(train[:-len(data_args(tiny_data))] + data_args(tiny_data) + ['--num_classes', str(10 ** 9)],
               re.escape('error: --num_classes 1000000000 makes a classifier head of 1,000,000,000 classes x 1024-d '
                         'features, 3.7 TB of float32') + '.*give the number of landmarks the training labels count$')
    assert not glob.glob(str(tmp_path / '**' / 'record.txt'), recursive=True)


# ------------------------------------------------------------------------------ 6. an image size no backbone takes
def test_an_image_size_the_backbone_cannot_take_at_test_time_is_one_line(tiny_data, tmp_path):
    resnet = described_file(tmp_path / 'resnet.pth')
    for size, why in (('2', 'too small: the stride-2 stem and four 2x2 max-pools of Resnet12 leave no pixel of an '
                            'image under 31 px; Resnet12 takes --img_size 31 to 4096'),
                      ('30', 'too small'),
                      ('5000', 'over 4096 px, the largest image this suite builds; Resnet12 takes --img_size 31 to '
                               '4096')):
        stops_with(scoring_argv(tiny_data, resnet, '--img_size', size),
                   '^' + re.escape(f'error: --img_size {size}: {why}'))
    swin = described_file(tmp_path / 'swin.pth', 'Swin_tiny', 32, 4)
    stops_with(scoring_argv(tiny_data, swin, '--img_size', '2'),
               re.escape('Swin takes --img_size 32, 96, 192, 384, 768'))
    assert not glob.glob(str(tmp_path / 'test-*'))
    run_main(scoring_argv(tiny_data, resnet, '--img_size', '31'))  # the smallest size named is tested
    assert np.load(tmp_path / 'test-resnet-31px' / 'opensetFeat.npy').shape == (12, 128)
