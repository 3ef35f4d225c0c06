"""What a newcomer meets first: weights files that say how to build their model, runs that say where their output is,
a class count taken from the lists, a finished run left alone when it is run again."""
import glob
import json
import os
import re
import shutil

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import ROOT, data_args, run_main

import datasets  # noqa: E402
import model  # noqa: E402

# a student as the CPU demo trains it: 32 px, every width divided by 4 (256-d features)
DEMO_SIZE = ['--img_size', '32', '--demo_width_divisor', '4']
LOADING = ['--num_workers', '0', '--batch_size', '8']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_data):
    """A Swin_tiny student trained one epoch at the demo's size, without --num_classes or a teacher: its run
    directory and its max_acc.pth."""
    save_dir = tmp_path_factory.mktemp('trained')
    argv = DEMO_SIZE + LOADING + data_args(tiny_data) + ['--backbone_class', 'Swin_tiny', '--max_epoch', '1',
                                                         '--warmup_epoch', '0', '--save_dir', str(save_dir)]
    run_main(argv)
    weights, = glob.glob(str(save_dir / '*' / '*' / 'max_acc.pth'))
    return {'argv': argv, 'run_dir': os.path.dirname(weights), 'weights': weights}


def test_the_weights_file_describes_its_model_and_the_classes_come_from_the_lists(trained):
    saved = torch.load(trained['weights'], weights_only=True)
    assert saved['architecture'] == {'backbone': 'Swin_tiny', 'img_size': 32, 'width_divisor': 4, 'feature_dim': 256,
                                     'num_classes': 4, 'head_scale': 32.0, 'head_margin': 0.1}
    assert saved['params']['head.weight'].shape == (4, 256)  # the lists' labels 0..3, not 252,903 classes
    record = open(os.path.join(trained['run_dir'], 'record.txt'), encoding='utf-8').read().splitlines()
    assert "classes: 4, the training lists' largest label + 1 (--num_classes gives another)" in record
    # the first line says where the run writes, the last where its results are
    assert record[0] == f"run directory: {trained['run_dir']}"
    assert record[-1] == f"results: {trained['run_dir']}/results.json (record.txt beside it)"


def test_a_student_is_tested_from_its_file_alone_with_the_figures_of_all_flags(trained, tiny_data, tmp_path):
    test = ['--test_only', '--init_weights', trained['weights'], '--test_root', tiny_data['root'], '--test_list',
            tiny_data['test']]
    run_main(DEMO_SIZE + LOADING + ['--backbone_class', 'Swin_tiny', '--save_dir', str(tmp_path)] + test)
    flagged, = glob.glob(str(tmp_path / 'test-max_acc-*-32px'))
    run_main(test + ['--num_workers', '0'])
    alone = os.path.join(trained['run_dir'], 'test-max_acc-32px')  # beside the weights, named after them
    features = {name: np.load(os.path.join(directory, 'opensetFeat.npy')) for name, directory in
                (('flagged', flagged), ('alone', alone))}
    assert features['alone'].shape == (12, 256)
    np.testing.assert_array_equal(features['alone'], features['flagged'])
    figures = [json.load(open(os.path.join(directory, 'results.json'), encoding='utf-8'))['test']['student']
               for directory in (flagged, alone)]
    assert figures[0]['coarse'] == figures[1]['coarse'] and figures[0]['fine'] == figures[1]['fine']
    record = open(os.path.join(alone, 'record.txt'), encoding='utf-8').read().splitlines()
    # each figure printed with its FAR, under the name results.json gives it
    fars = [f'TAR@1e-{exponent}' for exponent in range(1, 9)]
    for grain in ('coarse', 'fine'):
        assert figures[1]['tar_at_far'][grain] == dict(zip(fars, figures[1][grain]))
    shown = ['nan' if value is None else f'{value:.5f}' for grain in ('coarse', 'fine') for value in figures[1][grain]]
    assert (f'student TARs, coarse: {", ".join(f"{far}={value}" for far, value in zip(fars, shown[:8]))}; '
            f'fine: {", ".join(f"{far}={value}" for far, value in zip(fars, shown[8:]))}') in record
    assert record[0] == f'run directory: {alone}'
    assert record[-1] == f'results: {alone}/results.json (record.txt beside it)'


def test_another_image_size_at_test_time_is_said_and_a_disagreeing_flag_stops(trained, tiny_data, tmp_path):
    resnet = model.create_backbone('Resnet12', 32, 8)  # ResNet12 takes any size (Swin's windows do not)
    described = str(tmp_path / 'resnet.pth')
    torch.save(model.student_weights(model.Classifier(resnet, model.CosFaceHead(4, 128)), True,
                                     {'backbone': 'Resnet12', 'img_size': 32, 'width_divisor': 8}), described)
    test = LOADING + ['--test_only', '--test_root', tiny_data['root'], '--test_list', tiny_data['test'], '--save_dir',
                      str(tmp_path / 'tests')]
    run_main(test + ['--init_weights', described, '--img_size', '64'])
    record = open(glob.glob(str(tmp_path / 'tests' / 'test-resnet-*-64px' / 'record.txt'))[0], encoding='utf-8').read()
    assert f'{described} was trained at 32 px; tested at 64 px as --img_size asks' in record
    weights = trained['weights']
    for flag, value, described in (('backbone_class', 'Resnet12', 'Swin_tiny'), ('demo_width_divisor', '8', '4')):
        with pytest.raises(SystemExit) as stopped:
            run_main(test + ['--init_weights', weights, f'--{flag}', value])
        assert str(stopped.value.code) == (f'error: {weights} was built with {flag} {described}, this run asks '
                                           f'--{flag} {value}: drop the flag, the file says how to build its model')
    assert len(os.listdir(tmp_path / 'tests')) == 1  # the two refused runs wrote nothing


def test_an_export_needs_only_the_weights_and_writes_only_its_file(trained, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where default-named run directories would appear
    out = str(tmp_path / 'student.onnx')
    run_main(['--init_weights', trained['weights'], '--export_onnx', out])
    assert os.listdir(tmp_path) == ['student.onnx']
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"export: {trained['weights']} -> {out}"
    assert printed[-1].startswith(f"exported {trained['weights']} to {out}")
    session = onnxruntime.InferenceSession(out, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(values)[:, None, None] for values in (datasets.PIXEL_MEAN_BGR, datasets.PIXEL_STD_BGR))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.load_backbone('Swin_tiny', trained['weights'], 32, width_divisor=4)((images - mean) / std))
    np.testing.assert_allclose(session.run(None, {'images': images.numpy()})[0], expected.numpy(), atol=1e-4)
    # the export is tested from its own file too: its size and backbone come from the graph
    run_main(['--test_only', '--init_weights', out, '--test_root', tiny_data['root'], '--test_list', tiny_data['test'],
              '--num_workers', '0'])
    # the README's snippet scores one image as the test does
    shutil.copy(os.path.join(tiny_data['root'], 'test_0000.jpg'), tmp_path / 'photo.jpg')
    snippet = {}
    exec(re.search(r'One image:\n\n```python\n(.*?)```', open(os.path.join(ROOT, 'README.md')).read(), re.S).group(1),
         snippet)
    np.testing.assert_allclose(snippet['feature'], np.load(tmp_path / 'test-student-32px' / 'opensetFeat.npy')[0],
                               atol=1e-5)
    run_main(['--test_only', '--init_weights', trained['weights'], '--test_root', tiny_data['root'], '--test_list',
              tiny_data['test'], '--num_workers', '0', '--save_dir', str(tmp_path / 'pth')])
    np.testing.assert_allclose(np.load(tmp_path / 'test-student-32px' / 'opensetFeat.npy'),
                               np.load(glob.glob(str(tmp_path / 'pth' / 'test-max_acc-*-32px' / 'opensetFeat.npy'))[0]),
                               atol=1e-4)
    with pytest.raises(SystemExit) as stopped:  # an export is built as described: another size is another graph
        run_main(['--init_weights', trained['weights'], '--export_onnx', str(tmp_path / 'other.onnx'), '--img_size',
                  '96'])
    assert str(stopped.value.code) == (f"error: {trained['weights']} was built with img_size 32, this run asks "
                                       '--img_size 96: drop the flag, the file says how to build its model')


def test_a_finished_run_run_again_says_so_and_changes_nothing(trained, capsys):
    def listing():
        return {path: (os.path.getsize(path), os.path.getmtime(path))
                for path in glob.glob(os.path.join(trained['run_dir'], '**'), recursive=True) if os.path.isfile(path)}
    before = listing()
    capsys.readouterr()
    run_main(trained['argv'])
    assert listing() == before
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == (f"this run is finished (1 epochs, tested); nothing was changed: its results are in "
                           f"{trained['run_dir']}/results.json")
    assert not re.search('^test acc', '\n'.join(printed), re.M)
    with pytest.raises(SystemExit, match=r'was written with other settings: --seed 1 \(the checkpoint has 0\)'):
        run_main(trained['argv'] + ['--seed', '1'])  # finished with other settings: not this run
    assert listing() == before


def test_the_readme_is_in_the_order_a_user_needs_it():
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    assert len(text.splitlines()) <= 360  # read in one sitting; new features add their lines, nothing else
    assert re.findall('^## (.*)$', text, re.M) == [
        'Two commands', 'Quick start on your own images', 'Training', 'Test only', "The field's benchmarks",
        'Export and serving', 'Outputs and resume', 'The cluster', 'The method, and what differs from the original',
        'Layout and benchmarks']
    assert 'GPU status' in text[:text.index('## Two commands')]
    assert 'jizhi_client`, the job-submission command' in text


def test_a_described_teacher_keeps_the_head_scale_and_margin_it_was_trained_with(tmp_path):
    backbone = model.create_backbone('Resnet12', 32, 8)
    path = str(tmp_path / 'teacher.pth')
    torch.save(model.student_weights(model.Classifier(backbone, model.CosFaceHead(4, 128, scale=16.0, margin=0.25)),
                                     True, {'backbone': 'Resnet12', 'img_size': 32, 'width_divisor': 8}), path)
    for head in (model.load_classifier('Resnet12', path, 32, 8).head, model.load_head('Resnet12', path, 8)):
        assert (head.scale, head.margin) == (16.0, 0.25)
