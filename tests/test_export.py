"""ONNX export of a student: ONNX Runtime's features equal PyTorch's, --test_only scores an exported file; int8."""
import errno
import glob
import os
import re

import numpy as np

# requirements.txt installs onnx, onnxruntime and onnxscript (the exporter): a missing one fails, never skips
import onnx
import onnxruntime
import onnxscript  # noqa: F401
import pytest
import torch
from conftest import run_main, write_image_list

import datasets  # noqa: E402
import model
import serving  # noqa: E402
import utils
import verification  # noqa: E402

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4']


def student_file(tmp_path, backbone, seed=0):
    torch.manual_seed(seed)
    network = model.create_backbone(backbone, 96, width_divisor=8)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape) * 0.02)  # beyond the constant initial norms and biases
    path = str(tmp_path / f'{backbone}.pth')
    torch.save({'params': network.state_dict()}, path)
    return path


def export(tmp_path, backbone, weights, img_size='96'):
    out = str(tmp_path / f'{backbone}.onnx')
    run_main(SMALL[:4] + ['--img_size', img_size] + ['--backbone_class', backbone, '--init_weights', weights,
                                                     '--export_onnx', out, '--save_dir', str(tmp_path / 'runs')])
    return out


@pytest.mark.parametrize('backbone', ['Swin_base', 'Swin_tiny', 'Resnet12'])
def test_onnx_runtime_features_equal_pytorch_features(tmp_path, backbone, capsys):
    weights = student_file(tmp_path, backbone)
    path = export(tmp_path, backbone, weights)
    metadata = {entry.key: entry.value for entry in onnx.load(path).metadata_props}
    assert metadata['input'].startswith('images: float32 (batch, 3, 96, 96), BGR channel order, values in [0, 1]')
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f'export: {weights} -> {path}'
    assert printed[-1].startswith(f"exported {weights} to {path}: input: {metadata['input']}")
    assert not (tmp_path / 'runs').exists()  # an export writes its .onnx file and nothing else
    assert metadata['output'] == 'features: float32 (batch, 128), L2-normalised' and metadata['backbone'] == backbone
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    pytorch = model.load_backbone(backbone, weights, 96, width_divisor=8)
    mean, std = torch.tensor(datasets.PIXEL_MEAN_BGR), torch.tensor(datasets.PIXEL_STD_BGR)
    for batch in (1, 3):
        images = torch.rand(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = torch.nn.functional.normalize(pytorch((images - mean[:, None, None]) / std[:, None, None]))
        features = session.run(None, {'images': images.numpy()})[0]
        assert features.dtype == np.float32 and features.shape == (batch, 128)
        np.testing.assert_allclose(features, expected.numpy(), atol=1e-4, rtol=0)


def test_test_only_scores_an_exported_file_as_its_weights(tiny_data, tmp_path):
    weights = student_file(tmp_path, 'Resnet12', seed=3)
    path = export(tmp_path, 'Resnet12', weights)
    lines = {}
    for name, file in (('pytorch', weights), ('onnx', path)):
        save_dir = tmp_path / name
        run_main(SMALL + ['--backbone_class', 'Resnet12', '--test_only', '--init_weights', file,
                          '--test_root', tiny_data['root'], '--test_list', tiny_data['test'],
                          '--save_dir', str(save_dir)])
        record_path = next(save_dir.glob('test-*/record.txt'))
        lines[name] = re.search(r'^test acc: .*$', record_path.read_text(), re.M).group(0)
        features = np.load(record_path.parent / 'opensetFeat.npy')
        lines[name + '_features'] = features
    assert lines['onnx'] == lines['pytorch']
    np.testing.assert_allclose(lines['onnx_features'], lines['pytorch_features'], atol=1e-4)
    labels = np.array([10 + label for label in range(3) for _ in range(4)])
    onnx_tars = verification.tar_at_far(lines['onnx_features'], labels)
    assert onnx_tars == verification.tar_at_far(lines['pytorch_features'], labels)


def test_an_onnx_file_of_another_image_size_is_refused(tiny_data, tmp_path):
    path = export(tmp_path, 'Resnet12', student_file(tmp_path, 'Resnet12'), img_size='64')
    with pytest.raises(SystemExit, match=re.escape(f'error: {path} takes images of shape [3, 64, 64], not (3, 96, 96): '
                                                   'run with --img_size 64, or export again at --img_size 96')):
        run_main(SMALL + ['--backbone_class', 'Resnet12', '--test_only', '--init_weights', path,
                          '--test_root', tiny_data['root'], '--test_list', tiny_data['test'],
                          '--save_dir', str(tmp_path / 'runs')])


def test_exporting_a_file_of_another_backbone_says_what_it_fits(tmp_path):
    weights = student_file(tmp_path, 'Resnet12')
    with pytest.raises(SystemExit, match=r'does not fit backbone Swin_tiny'):
        export(tmp_path, 'Swin_tiny', weights)
    assert not os.path.exists(tmp_path / 'Swin_tiny.onnx')


def real_images(tiny_data) -> np.ndarray:
    """The test list's images in the serving contract (BGR in [0, 1], 96 px), decoded independently."""
    from PIL import Image
    images = []
    with open(tiny_data['test'], encoding='utf-8') as handle:
        for line in handle:
            rgb = Image.open(os.path.join(tiny_data['root'], line.split('\t')[0])).convert('RGB')
            pixels = np.asarray(rgb.resize((96, 96), Image.BILINEAR))[:, :, ::-1]
            images.append(pixels.transpose(2, 0, 1).astype(np.float32) / 255)
    return np.stack(images)


@pytest.mark.parametrize('backbone', ['Swin_tiny', 'Resnet12'])
def test_an_int8_export_keeps_the_features_and_is_scored_like_any_other(tiny_data, tmp_path, backbone):
    weights = student_file(tmp_path, backbone, seed=3)
    int8_path = str(tmp_path / f'{backbone}-int8.onnx')
    run_main(SMALL + ['--backbone_class', backbone, '--init_weights', weights, '--export_onnx', int8_path,
                      '--quantize', 'int8', '--calibration_root', tiny_data['root'], '--calibration_list',
                      tiny_data['train'], '--save_dir', str(tmp_path / 'runs')])
    metadata = {entry.key: entry.value for entry in onnx.load(int8_path).metadata_props}
    assert metadata['precision'] == 'int8' and metadata['quantization'] == 'static'
    assert metadata['input'].startswith('images: float32 (batch, 3, 96, 96)') and metadata['backbone'] == backbone
    assert metadata['calibration'] == f"24 images of {tiny_data['train']}"
    images = real_images(tiny_data)
    int8_features = onnxruntime.InferenceSession(int8_path, providers=['CPUExecutionProvider']).run(
        None, {'images': images})[0]
    pytorch = model.load_backbone(backbone, weights, 96, width_divisor=8)
    int8_weights = sum(int(np.prod(weight.dims)) for weight in onnx.load(int8_path).graph.initializer
                       if weight.data_type == onnx.TensorProto.INT8)
    assert int8_weights >= 0.9 * sum(parameter.numel() for parameter in pytorch.parameters())  # the weights are int8
    mean, std = torch.tensor(datasets.PIXEL_MEAN_BGR), torch.tensor(datasets.PIXEL_STD_BGR)
    with torch.no_grad():
        float_features = torch.nn.functional.normalize(pytorch((torch.from_numpy(images) - mean[:, None, None]) /
                                                               std[:, None, None])).numpy()
    cosines = (float_features * int8_features).sum(axis=1)
    assert cosines.mean() >= 0.99, cosines
    run_main(SMALL + ['--backbone_class', backbone, '--test_only', '--init_weights', int8_path, '--test_root',
                      tiny_data['root'], '--test_list', tiny_data['test'], '--save_dir', str(tmp_path / 'runs')])
    opened = next((tmp_path / 'runs').glob(f'test-{backbone}-int8-*/opensetFeat.npy'))
    np.testing.assert_allclose(np.load(opened), int8_features, atol=1e-4)


def test_an_int8_export_of_the_wrong_file_or_without_calibration_is_one_line(tiny_data, tmp_path):
    weights = student_file(tmp_path, 'Resnet12')
    with pytest.raises(SystemExit, match=r'^error: .*does not fit backbone Swin_tiny'):
        run_main(SMALL + ['--backbone_class', 'Swin_tiny', '--init_weights', weights, '--export_onnx',
                          str(tmp_path / 'out.onnx'), '--quantize', 'int8', '--calibration_root', tiny_data['root'],
                          '--calibration_list', tiny_data['train'], '--save_dir', str(tmp_path / 'runs')])
    with pytest.raises(SystemExit, match=r'^error: --quantize int8 of a Resnet12 calibrates its activations on real '
                                         r'images: give --calibration_root and --calibration_list'):
        run_main(SMALL + ['--backbone_class', 'Resnet12', '--init_weights', weights, '--export_onnx',
                          str(tmp_path / 'out.onnx'), '--quantize', 'int8', '--save_dir', str(tmp_path / 'runs')])
    assert not os.path.exists(tmp_path / 'out.onnx') and not glob.glob(str(tmp_path / '*.tmp'))


def test_calibration_takes_at_most_256_images_one_a_batch(tmp_path):
    list_path = write_image_list(str(tmp_path), 'calibration.txt', [0] * 260, size=8)
    batches = serving.calibration_images(str(tmp_path), list_path, 32)
    assert len(batches) == 256 and {batch.shape for batch in batches} == {(1, 3, 32, 32)}
    assert all(0.0 <= batch.min() and batch.max() <= 1.0 for batch in batches)


def full_disk_after_half(write):
    """`write(self_or_model, path, ...)` that writes half its output to `path`, then fails as a full disk does."""
    def failing(first, path, *arguments, **keywords):
        write(first, path, *arguments, **keywords)
        with open(path, 'r+b') as handle:
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return failing


@pytest.mark.parametrize('precision', ['float32', 'int8'])
def test_an_export_on_a_full_disk_leaves_the_previous_file_whole_and_no_temporary(tiny_data, tmp_path, monkeypatch,
                                                                                  precision):
    weights = student_file(tmp_path, 'Resnet12')
    out = str(tmp_path / 'out' / 'student.onnx')
    os.makedirs(os.path.dirname(out))
    int8 = ['--quantize', 'int8', '--calibration_root', tiny_data['root'], '--calibration_list', tiny_data['train']]
    argv = SMALL + ['--backbone_class', 'Resnet12', '--init_weights', weights, '--export_onnx', out, '--save_dir',
                    str(tmp_path / 'runs')] + (int8 if precision == 'int8' else [])
    run_main(argv)
    with open(out, 'rb') as handle:
        previous = handle.read()
    # the last write of each path: the float graph's save, or the int8 graph's once its metadata is set
    if precision == 'int8':
        monkeypatch.setattr(onnx, 'save', full_disk_after_half(onnx.save))
    else:
        monkeypatch.setattr(torch.onnx.ONNXProgram, 'save', full_disk_after_half(torch.onnx.ONNXProgram.save))
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    message = str(stopped.value.code)
    assert message == (f'error: could not write {out} (No space left on device); nothing was written and the file '
                       'that was there is as it was: free space or fix the storage, then rerun')
    with open(out, 'rb') as handle:
        assert handle.read() == previous
    assert os.listdir(os.path.dirname(out)) == ['student.onnx']


def test_calibration_on_too_few_images_is_refused_in_one_line(tmp_path):
    list_path = write_image_list(str(tmp_path), 'calibration.txt', [0] * 15, size=8)
    with pytest.raises(utils.RunError, match=re.escape(
            f'{list_path} holds 15 images: calibrating int8 activation ranges takes at least 16 (256 are read); '
            'give a longer --calibration_list')):
        serving.calibration_images(str(tmp_path), list_path, 32)
    assert len(serving.calibration_images(str(tmp_path), write_image_list(str(tmp_path), 'enough.txt', [0] * 16,
                                                                          size=8), 32)) == 16


def test_an_export_tested_as_another_backbone_or_beside_a_teacher_of_another_width_is_one_line(tiny_data, tmp_path):
    path = export(tmp_path, 'Swin_tiny', student_file(tmp_path, 'Swin_tiny'))
    test = ['--test_only', '--init_weights', path, '--test_root', tiny_data['root'], '--test_list',
            tiny_data['test'], '--save_dir', str(tmp_path / 'tests')]
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL + ['--backbone_class', 'Resnet12'] + test)
    assert str(stopped.value.code) == (f'error: {path} was built with backbone_class Swin_tiny, this run asks '
                                       '--backbone_class Resnet12: drop the flag, the file says how to build its model')
    assert not (tmp_path / 'tests').exists()
    # a 128-d export (width divisor 8) against a 256-d teacher (divisor 4): no cross figure can compare them
    teacher = str(tmp_path / 'teacher.pth')
    torch.save({'params': model.create_backbone('Resnet12', 96, width_divisor=4).state_dict()}, teacher)
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL[:4] + ['--demo_width_divisor', '4', '--backbone_class', 'Swin_tiny', '--teacher_backbone_class',
                              'Resnet12', '--teacher_init_weights', teacher] + test)
    assert str(stopped.value.code) == (f'error: {path} gives 128-d features, the teacher {teacher} 256-d: the cross '
                                       "figures compare the two; test a student of the teacher's width, or leave "
                                       'the teacher out')


def test_a_calibration_list_naming_a_missing_image_stops_before_anything_is_exported(tiny_data, tmp_path):
    weights = student_file(tmp_path, 'Resnet12')
    calibration = tmp_path / 'calibration.txt'
    lines = open(tiny_data['train'], encoding='utf-8').read().splitlines()
    calibration.write_text('\n'.join(lines + ['nowhere.jpg\tnowhere\t0']) + '\n', encoding='utf-8')
    out = tmp_path / 'out' / 'student.onnx'
    os.makedirs(out.parent)
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL + ['--backbone_class', 'Resnet12', '--init_weights', weights, '--export_onnx', str(out),
                          '--quantize', 'int8', '--calibration_root', tiny_data['root'], '--calibration_list',
                          str(calibration), '--save_dir', str(tmp_path / 'runs')])
    assert str(stopped.value.code).startswith(f"error: {calibration}:25: {tiny_data['root']}/nowhere.jpg: no such "
                                              'image')
    assert os.listdir(out.parent) == []
