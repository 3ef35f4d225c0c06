"""Tests of the data section of helpers.py: lists, labels, bad input, transforms, loaders, sharding."""
import math
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import utils  # noqa: E402

IMG_SIZE = 96
MEAN = torch.tensor(datasets.PIXEL_MEAN_BGR)
STD = torch.tensor(datasets.PIXEL_STD_BGR)


def write_list(path, lines):
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write(''.join(line + '\n' for line in lines))
    return str(path)


def smooth_image(width, height, seed):
    """Smooth random RGB image (upsampled noise), so reduced-scale decoding changes little."""
    generator = np.random.default_rng(seed)
    coarse = generator.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def noisy_image(width, height, seed):
    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def reference_eval(path, img_size):
    """The original's evaluation transform, written independently: PIL RGB, reversed to BGR, bilinear resize,
    /255, normalise."""
    rgb = np.asarray(Image.open(path).convert('RGB'))
    bgr = Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1]))
    resized = np.asarray(bgr.resize((img_size, img_size), Image.Resampling.BILINEAR))
    unit = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255
    return (unit - MEAN[:, None, None]) / STD[:, None, None]


# ------------------------------------------------------------------------------------- lists and labels

def test_train_lists_offsets_by_distinct_labels(tmp_path):
    first = write_list(tmp_path / 'first.txt', ['a/1.jpg\tx\t0', 'a/2.jpg\tx\t5', 'a/3.jpg\tx\t5', 'a/4.jpg\tx\t2'])
    second = write_list(tmp_path / 'second.txt', ['b/1.jpg\tname with spaces\t0', 'b/2.jpg\tx\t1\t9'])
    samples, num_classes = datasets.read_train_samples(['/root1', '/root2'], [first, second])
    # first list has 3 distinct labels (0, 2, 5), so the second is shifted by 3
    assert [sample.label for sample in samples] == [0, 5, 5, 2, 3, 4]
    assert [sample.fine_label for sample in samples] == [0, 5, 5, 2, 3, 4]
    assert samples[0].path == '/root1/a/1.jpg' and samples[5].path == '/root2/b/2.jpg'
    assert samples[5].origin == f'{second}:2'
    assert num_classes == 6
    with pytest.raises(ValueError, match='one --train_root per --train_list'):
        datasets.read_train_samples(['/root1'], [first, second])


def saved_label_map_files(tmp_path, mapping):
    torch_file = tmp_path / 'map.pth'
    torch.save(mapping, torch_file)
    pickle_file = tmp_path / 'map.pkl'
    with open(pickle_file, 'wb') as handle:
        pickle.dump(mapping, handle)
    numpy_file = tmp_path / 'map.npy'
    np.save(numpy_file, {np.int64(key): (np.int64(value[0]), np.float32(value[1]))
                         for key, value in mapping.items()}, allow_pickle=True)
    return [str(torch_file), str(pickle_file), str(numpy_file)]


def test_label_map_maps_combined_labels_in_every_saved_format(tmp_path):
    first = write_list(tmp_path / 'first.txt', ['1.jpg\tx\t0', '2.jpg\tx\t1'])
    second = write_list(tmp_path / 'second.txt', ['3.jpg\tx\t0', '4.jpg\tx\t1'])
    mapping = {2: (0, 0.93), 3: (7, 0.5)}   # combined label 2 -> 0, 3 -> 7; 0 and 1 stay
    for path in saved_label_map_files(tmp_path, mapping):
        assert datasets.load_label_map(path) == {2: 0, 3: 7}
        samples, num_classes = datasets.read_train_samples(['r', 'r'], [first, second], label_map=path)
        assert [sample.label for sample in samples] == [0, 1, 0, 7]
        assert num_classes == 8


class Exploit:
    def __reduce__(self):
        return (os.system, ('echo should-never-run',))


def test_label_map_refuses_code_and_wrong_shapes(tmp_path):
    malicious = tmp_path / 'evil.pkl'
    with open(malicious, 'wb') as handle:
        pickle.dump({0: Exploit()}, handle)
    with pytest.raises(ValueError, match='refusing to load'):
        datasets.load_label_map(str(malicious))
    not_a_dict = tmp_path / 'list.pth'
    torch.save([1, 2], not_a_dict)
    with pytest.raises(ValueError, match='must be a dict'):
        datasets.load_label_map(str(not_a_dict))
    bad_value = tmp_path / 'bad.pth'
    torch.save({1: ('x', 0.5)}, bad_value)
    with pytest.raises(ValueError, match='bad.pth: entry 1'):
        datasets.load_label_map(str(bad_value))


def test_eval_list_coarse_and_fine_labels(tmp_path):
    path = write_list(tmp_path / 'test.txt', ['q/1.jpg\tn\t4\t40', 'q/2.jpg\tn\t4\t4', '', 'q/3.jpg\tn\t6\t41'])
    samples = datasets.read_eval_samples('/data', path)
    assert [(s.path, s.label, s.fine_label) for s in samples] == [
        ('/data/q/1.jpg', 4, 40), ('/data/q/2.jpg', 4, 4), ('/data/q/3.jpg', 6, 41)]
    assert samples[2].origin == f'{path}:4'
    coarse_only = write_list(tmp_path / 'coarse.txt', ['q/1.jpg\tn\t4', 'q/2.jpg\tn\t6'])
    assert [(s.label, s.fine_label) for s in datasets.read_eval_samples('/data', coarse_only)] == [(4, 4), (6, 6)]
    mixed = write_list(tmp_path / 'mixed.txt', ['q/1.jpg\tn\t4\t40', 'q/2.jpg\tn\t4'])
    with pytest.raises(ValueError, match=re.escape(f'{mixed}:2: 3 fields, where {mixed}:1 has 4')):
        datasets.read_eval_samples('/data', mixed)


@pytest.mark.parametrize('bad_line, reason', [
    ('only\ttwo', 'expected 3 or 4 tab-separated fields .* found 2'),
    ('one\ttwo\t3\t4\t5', 'expected 3 or 4 .* found 5'),
    ('no tabs at all 3', 'expected 3 or 4 .* found 1'),
    ('x.jpg\tname\tseven', "label 'seven' is not an integer"),
    ('x.jpg\tname\t2.5', "label '2.5' is not an integer"),
    ('x.jpg\tname\t', "label '' is not an integer"),
    ('x.jpg\tname\t3\tfine', "fine label 'fine' is not an integer"),
    ('\tname\t3', 'empty image path'),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    path = write_list(tmp_path / 'list.txt', ['ok.jpg\tn\t0', 'ok2.jpg\tn\t1', bad_line])
    with pytest.raises(ValueError, match=f'list.txt:3: {reason}'):
        datasets.read_eval_samples('r', path)
    with pytest.raises(ValueError, match=f'list.txt:3: {reason}'):
        datasets.read_train_samples(['r'], [path])


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / 'list.txt'
    path.write_bytes('ok.jpg\tn\t0\n'.encode() + b'caf\xe9.jpg\tn\t1\n')
    with pytest.raises(ValueError, match='list.txt:2: line is not valid UTF-8'):
        datasets.read_eval_samples('r', str(path))


def test_out_of_range_labels_name_file_and_line(tmp_path):
    path = write_list(tmp_path / 'train.txt', ['a.jpg\tn\t0', 'b.jpg\tn\t2', 'c.jpg\tn\t1'])
    samples, num_classes = datasets.read_train_samples(['r'], [path])
    datasets.check_labels(samples, num_classes, 'train')
    with pytest.raises(ValueError, match=r'train.txt:2: label 2 outside \[0, 2\)'):
        datasets.check_labels(samples, 2, 'train')
    negative = write_list(tmp_path / 'val.txt', ['a.jpg\tn\t0', 'b.jpg\tn\t-1'])
    with pytest.raises(ValueError, match=r'val.txt:2: label -1 outside \[0, 5\)'):
        datasets.check_labels(datasets.read_eval_samples('r', negative), 5, 'val')
    bare = [datasets.Sample('p', 0, 0), datasets.Sample('q', 9, 9)]
    with pytest.raises(ValueError, match=r'mine:2: label 9 outside \[0, 5\)'):
        datasets.check_labels(bare, 5, 'mine')


def test_dataset_packs_samples_and_gives_them_back():
    samples = [datasets.Sample('/r/café/1.jpg', 3, 30, 'l.txt:1'), datasets.Sample('', 0, 0, ''),
               datasets.Sample('/r/日本/2.jpg', 1, 1, 'l.txt:3')]
    dataset = datasets.ImageDataset(samples, IMG_SIZE, train=True, augment=True)
    assert len(dataset) == 3
    assert [dataset.paths[index] for index in range(3)] == [sample.path for sample in samples]
    assert [dataset.origins[index] for index in range(3)] == [sample.origin for sample in samples]
    assert dataset.labels.tolist() == [3, 0, 1] and dataset.fine_labels.tolist() == [30, 0, 1]


# ------------------------------------------------------------------------------------------ bad images

def make_bad_image_set(tmp_path):
    """9 samples: good ones (label = index), one of each unreadable kind and two truncated JPEGs; returns
    (root, list path, {index of an unreadable file: reason}, indices of the truncated files)."""
    root = tmp_path / 'images'
    root.mkdir()
    names = []
    for index in range(8):
        names.append(f'{index}.jpg')
        noisy_image(40, 30, index).save(root / names[-1], quality=90)
    (root / '1.jpg').unlink()                                          # missing
    (root / '3.jpg').write_bytes(b'')                                  # empty
    whole = (root / '5.jpg').read_bytes()
    (root / '5.jpg').write_bytes(whole[:len(whole) // 2])             # truncated
    (root / '6.jpg').write_bytes(np.random.default_rng(0).bytes(3000))  # undecodable garbage
    big = smooth_image(1600, 1200, 8)                                  # truncated, large (draft path)
    big.save(root / 'big.jpg', quality=90)
    whole = (root / 'big.jpg').read_bytes()
    (root / 'big.jpg').write_bytes(whole[:len(whole) * 2 // 3])
    names.append('big.jpg')
    list_path = write_list(tmp_path / 'list.txt', [f'{name}\tn\t{index}' for index, name in enumerate(names)])
    expected = {1: 'missing file', 3: 'empty file', 6: 'not a decodable image'}
    return str(root), list_path, expected, (5, 8)


@pytest.mark.parametrize('augment', [True, False])
def test_bad_images_replaced_and_reported_in_a_training_epoch(tmp_path, augment):
    root, list_path, expected, truncated = make_bad_image_set(tmp_path)
    samples, _ = datasets.read_train_samples([root], [list_path])
    dataset = datasets.ImageDataset(samples, IMG_SIZE, train=True, augment=augment)
    loader = datasets.build_train_loader(dataset, batch_size=3, num_workers=2, seed=0, rank=0, world_size=1)
    batch_transform = datasets.BatchTransform(augment=augment)
    reports, truncated_reports = {}, set()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            images = batch_transform(batch['image'], train=True)
            assert images.shape == (3, 3, IMG_SIZE, IMG_SIZE) and images.dtype == torch.float32
            assert torch.isfinite(images).all()
            # replacements are readable samples whose label belongs to the returned image
            assert torch.equal(batch['label'], batch['index'])
            assert not set(batch['index'].tolist()) & set(expected)
            for bad in batch['bad']:
                for report in filter(None, bad.split('; ')):
                    path, reason = report.split(': ', 1)
                    reports[path] = reason
            truncated_reports.update(filter(None, batch['truncated']))
    # 9 samples, batch 3: every sample is drawn each epoch, so every bad file is reported
    assert set(reports) == {samples[index].path for index in expected}
    for index, reason in expected.items():
        assert reports[samples[index].path].startswith(reason)
    # truncated files are used, as the original used them, and reported apart
    assert truncated_reports == {samples[index].path for index in truncated}
    # the replacement is the next readable sample in list order, deterministically
    assert dataset[1]['index'] == 2 and dataset[3]['index'] == 4 and dataset[6]['index'] == 7
    assert dataset[8]['index'] == 8 and dataset[8]['bad'] == '' and dataset[8]['truncated'] == samples[8].path
    assert dataset[0]['bad'] == '' and dataset[6]['bad'] == f"{samples[6].path}: {reports[samples[6].path]}"


def test_bad_images_are_named_in_evaluation_and_truncated_ones_decoded_as_pil_does(tmp_path):
    root, list_path, expected, truncated = make_bad_image_set(tmp_path)
    samples = datasets.read_eval_samples(root, list_path)
    for augment in (True, False):
        dataset = datasets.ImageDataset(samples, IMG_SIZE, train=False, augment=augment)
        for index, reason in expected.items():
            assert dataset[index]['bad'].startswith(f'{samples[index].path}: {reason} (')
            assert 'list.txt:' in dataset[index]['bad']
    loader = datasets.build_eval_loader(dataset, batch_size=2, num_workers=1, rank=0, world_size=1)
    reported = [bad for batch in loader for bad in batch['bad'] if bad]
    assert [message.split(':')[0] for message in reported] == [samples[index].path for index in sorted(expected)]
    # PIL's own decoding of a truncated file, with the missing part filled in
    from PIL import ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        references = {index: reference_eval(samples[index].path, IMG_SIZE) for index in truncated}
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    for index in truncated:
        item = dataset[index]
        assert item['truncated'] == samples[index].path and item['bad'] == ''
        assert torch.equal(datasets.BatchTransform(augment=False)(item['image'][None], train=False)[0],
                           references[index])
    with pytest.raises(OSError, match='truncated'):
        Image.open(samples[5].path).load()  # the flag is not left on


def test_all_images_unreadable_stops_with_a_clear_error(tmp_path):
    list_path = write_list(tmp_path / 'list.txt', ['gone1.jpg\tn\t0', 'gone2.jpg\tn\t1'])
    samples, _ = datasets.read_train_samples([str(tmp_path)], [list_path])
    with pytest.raises(RuntimeError, match='2 consecutive training images are unreadable.*list.txt:2'):
        datasets.ImageDataset(samples, IMG_SIZE, train=True, augment=True)[1]


# ------------------------------------------------------------------------------------------ transforms

def test_eval_transform_is_pixel_identical_to_reference(tmp_path):
    paths = []
    for number, (width, height) in enumerate([(130, 70), (64, 200), (96, 96), (40, 30)]):
        paths.append(str(tmp_path / f'{number}.jpg'))
        noisy_image(width, height, number).save(paths[-1], quality=85)
    paths.append(str(tmp_path / 'gray.png'))
    noisy_image(50, 60, 9).convert('L').save(paths[-1])
    paths.append(str(tmp_path / 'alpha.png'))
    noisy_image(70, 50, 10).convert('RGBA').save(paths[-1])
    samples = [datasets.Sample(path, 0, 0) for path in paths]
    reference = torch.stack([reference_eval(path, IMG_SIZE) for path in paths])
    for train, augment in ((False, False), (False, True), (True, False)):
        dataset = datasets.ImageDataset(samples, IMG_SIZE, train=train, augment=augment)
        uint8_batch = torch.stack([dataset[index]['image'] for index in range(len(paths))])
        assert uint8_batch.dtype == torch.uint8
        # lighting only applies when augmenting a training batch; evaluation batches are exact
        output = datasets.BatchTransform(augment=augment)(uint8_batch, train=False)
        assert torch.equal(output, reference)
    # float64 numpy check of the same definition, independent of torch's arithmetic
    bgr = np.asarray(Image.open(paths[0]).convert('RGB'))[:, :, ::-1]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(bgr)).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR))
    expected = (resized / 255.0 - np.array(datasets.PIXEL_MEAN_BGR)) / np.array(datasets.PIXEL_STD_BGR)
    np.testing.assert_allclose(reference[0].permute(1, 2, 0).numpy(), expected, atol=2e-6)


def test_train_crop_matches_torchvision_exactly_without_draft(tmp_path):
    path = str(tmp_path / 'small.jpg')
    noisy_image(150, 120, 1).save(path, quality=90)   # crops < 2 * IMG_SIZE: decoded at full scale
    torchvision_crop = transforms.Compose([transforms.RandomResizedCrop(IMG_SIZE), transforms.RandomHorizontalFlip()])
    for seed in range(12):
        torch.manual_seed(seed)
        ours = datasets.decode_train_crop(path, IMG_SIZE)
        torch.manual_seed(seed)
        rgb = np.asarray(torchvision_crop(Image.open(path).convert('RGB')))
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)[::-1])))


def test_train_crop_with_draft_decoding_stays_close_to_full_decoding(tmp_path):
    path = str(tmp_path / 'large.jpg')
    smooth_image(1600, 1200, 2).save(path, quality=95)
    torchvision_crop = transforms.Compose([transforms.RandomResizedCrop(IMG_SIZE), transforms.RandomHorizontalFlip()])
    differences = []
    for seed in range(10):
        torch.manual_seed(seed)
        ours = datasets.decode_train_crop(path, IMG_SIZE).float()
        torch.manual_seed(seed)
        rgb = np.asarray(torchvision_crop(Image.open(path).convert('RGB')))
        full = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)[::-1])).float()
        differences.append((ours - full).abs().mean().item())
    # a misplaced crop box gives tens of levels of difference on this image; DCT scaling about one
    assert max(differences) < 2.5, differences


def capture_crop_boxes(monkeypatch, path, img_size, draws):
    """Run decode_train_crop `draws` times, recording each crop box in ORIGINAL image coordinates."""
    boxes = []
    original_width = Image.open(path).width
    real_resize = Image.Image.resize

    def recording_resize(image, size, resample=None, box=None, reducing_gap=None):
        reduction = original_width / image.width
        boxes.append([coordinate * reduction for coordinate in box])
        assert 0 <= box[0] < box[2] <= image.width + 1e-6 and 0 <= box[1] < box[3] <= image.height + 1e-6
        return real_resize(image, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, 'resize', recording_resize)
    for _ in range(draws):
        datasets.decode_train_crop(path, img_size)
    return np.array(boxes)


def ks_statistic(first, second):
    values = np.sort(np.concatenate([first, second]))
    first_cdf = np.searchsorted(np.sort(first), values, side='right') / len(first)
    second_cdf = np.searchsorted(np.sort(second), values, side='right') / len(second)
    return np.abs(first_cdf - second_cdf).max()


def test_crop_geometry_distribution_matches_random_resized_crop(tmp_path, monkeypatch):
    width, height = 1600, 1200
    path = str(tmp_path / 'large.jpg')
    smooth_image(width, height, 3).save(path, quality=80)
    torch.manual_seed(0)
    draws = 600
    boxes = capture_crop_boxes(monkeypatch, path, IMG_SIZE // 2, draws)
    crop_widths, crop_heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area_fraction = crop_widths * crop_heights / (width * height)
    log_ratio = np.log(crop_widths / crop_heights)
    generator = torch.Generator().manual_seed(12345)
    reference = []
    for _ in range(4000):
        area = width * height * torch.empty(1).uniform_(0.08, 1.0, generator=generator).item()
        ratio = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).item())
        crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if crop_width <= width and crop_height <= height:   # torchvision retries until the crop fits
            reference.append((crop_width * crop_height / (width * height), math.log(crop_width / crop_height)))
    reference = np.array(reference)
    assert area_fraction.min() >= 0.079 and area_fraction.max() <= 1.0
    assert log_ratio.min() >= math.log(3 / 4) - 0.01 and log_ratio.max() <= math.log(4 / 3) + 0.01
    # two-sample Kolmogorov-Smirnov, critical value at 0.1% for these sizes is about 0.083
    assert ks_statistic(area_fraction, reference[:, 0]) < 0.083
    assert ks_statistic(log_ratio, reference[:, 1]) < 0.083
    # crop positions are uniform over the valid range: mean centre near the image centre
    assert abs((boxes[:, 0] + boxes[:, 2]).mean() / 2 - width / 2) < 0.05 * width
    assert abs((boxes[:, 1] + boxes[:, 3]).mean() / 2 - height / 2) < 0.05 * height


def test_large_crops_use_reduced_dct_scale(tmp_path, monkeypatch):
    path = str(tmp_path / 'large.jpg')
    smooth_image(1600, 1200, 4).save(path, quality=80)
    assert datasets.draft_scale(800, 900, 96) == 8 and datasets.draft_scale(767, 900, 96) == 4
    assert datasets.draft_scale(200, 900, 96) == 2 and datasets.draft_scale(191, 900, 96) == 1
    decoded_widths = []
    real_resize = Image.Image.resize

    def recording_resize(image, *arguments, **keywords):
        decoded_widths.append(image.width)
        return real_resize(image, *arguments, **keywords)

    monkeypatch.setattr(Image.Image, 'resize', recording_resize)
    torch.manual_seed(0)
    for _ in range(20):
        datasets.decode_train_crop(path, IMG_SIZE)
    # every crop of a 1600x1200 image is at least ~340 px a side, >= 2 * 96: never a full decode
    assert max(decoded_widths) <= 800 and min(decoded_widths) >= 200


def test_lighting_noise_statistics():
    count = 200_000
    batch_transform = datasets.BatchTransform(augment=True)
    torch.manual_seed(0)
    zeros = torch.zeros(count, 3, 1, 1, dtype=torch.uint8)
    output = batch_transform(zeros, train=True)
    noise = (output[:, :, 0, 0] * STD + MEAN).double().numpy()
    eigenvectors = np.array(datasets.LIGHTING_EIGENVECTORS)
    eigenvalues = np.array(datasets.LIGHTING_EIGENVALUES)
    expected_covariance = eigenvectors @ np.diag((0.1 * eigenvalues) ** 2) @ eigenvectors.T
    standard_errors = np.sqrt(np.diag(expected_covariance) / count)
    assert np.all(np.abs(noise.mean(axis=0)) < 4 * standard_errors)
    np.testing.assert_allclose(np.cov(noise.T), expected_covariance, rtol=0.03, atol=2e-7)
    # the noise is one colour shift per image, the same on every pixel
    images = torch.randint(0, 256, (8, 3, 5, 7), dtype=torch.uint8)
    shifted = batch_transform(images, train=True) * STD[:, None, None] + MEAN[:, None, None] - images / 255
    assert torch.allclose(shifted, shifted[:, :, :1, :1].expand_as(shifted), atol=1e-5)
    assert shifted[:, :, 0, 0].abs().max() > 1e-3
    # no noise when evaluating or without augment
    plain = (images / 255 - MEAN[:, None, None]) / STD[:, None, None]
    assert torch.allclose(batch_transform(images, train=False), plain, atol=1e-6)
    assert torch.allclose(datasets.BatchTransform(augment=False)(images, train=True), plain, atol=1e-6)


# ------------------------------------------------------------------------------------------ loaders

def test_train_loader_uses_seeded_distributed_sampler_and_full_batches(tmp_path):
    samples = [datasets.Sample(str(tmp_path / f'{index}.jpg'), index, index) for index in range(11)]
    dataset = datasets.ImageDataset(samples, IMG_SIZE, train=True, augment=False)
    loaders = [datasets.build_train_loader(dataset, 2, 0, seed=3, rank=rank, world_size=2) for rank in range(2)]
    for loader in loaders:
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert loader.drop_last and len(loader) == 2   # 11 -> 5 per rank (drop_last) -> 2 full batches
    orders = []
    for epoch in range(2):
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        first, second = (list(loader.sampler) for loader in loaders)
        assert len(first) == len(second) == 5 and not set(first) & set(second)
        orders.append(first)
    assert orders[0] != orders[1]
    again = datasets.build_train_loader(dataset, 2, 0, seed=3, rank=0, world_size=2)
    again.sampler.set_epoch(1)
    assert list(again.sampler) == orders[1]


def test_gather_in_order_single_process_and_checks():
    values = torch.arange(10.0).view(5, 2)
    indices = torch.tensor([3, 0, 4, 1, 2])
    ordered = utils.gather_in_order(values, indices, 5)
    assert torch.equal(ordered[indices], values)
    with pytest.raises(RuntimeError, match='missing or repeated'):
        utils.gather_in_order(values, torch.tensor([0, 0, 1, 2, 3]), 5)
    with pytest.raises(RuntimeError, match='missing or repeated'):
        utils.gather_in_order(values, indices, 6)


def image_features(batch):
    """A per-image value that identifies the image: mean of each channel of its uint8 pixels."""
    return batch['image'].float().mean(dim=(2, 3))


def sharded_evaluation(rank, world_size, rendezvous, root, list_path, output_path):
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world_size)
    try:
        samples = datasets.read_eval_samples(root, list_path)
        dataset = datasets.ImageDataset(samples, IMG_SIZE, train=False, augment=False)
        loader = datasets.build_eval_loader(dataset, batch_size=2, num_workers=0, rank=rank, world_size=world_size)
        features, indices = [], []
        for batch in loader:
            features.append(image_features(batch))
            indices.append(batch['index'])
        local_indices = torch.cat(indices)
        gathered = utils.gather_in_order(torch.cat(features), local_indices, len(dataset))
        torch.save({'gathered': gathered, 'local_indices': local_indices}, f'{output_path}.{rank}')
    finally:
        dist.destroy_process_group()


def test_two_process_evaluation_sees_every_image_once(tmp_path):
    root = tmp_path / 'images'
    root.mkdir()
    count = 7   # not divisible by 2
    for index in range(count):
        noisy_image(20 + index, 16, index).save(root / f'{index}.png')
    list_path = write_list(tmp_path / 'test.txt', [f'{index}.png\tn\t{index // 2}' for index in range(count)])
    output_path = str(tmp_path / 'result')
    multiprocessing.spawn(sharded_evaluation, nprocs=2, join=True,
                          args=(2, str(tmp_path / 'rendezvous'), str(root), list_path, output_path))
    results = [torch.load(f'{output_path}.{rank}') for rank in range(2)]
    first, second = (result['local_indices'].tolist() for result in results)
    assert first == [0, 1, 2] and second == [3, 4, 5, 6]
    dataset = datasets.ImageDataset(datasets.read_eval_samples(str(root), list_path), IMG_SIZE, False, False)
    expected = torch.stack([image_features({'image': dataset[index]['image'][None]})[0] for index in range(count)])
    for result in results:
        assert torch.equal(result['gathered'], expected)


def test_augmented_batches_are_the_same_whatever_the_number_of_loader_workers(tmp_path):
    root = tmp_path / 'images'
    root.mkdir()
    lines = []
    for index in range(10):
        smooth_image(160, 120, seed=index).save(root / f'{index}.jpg', quality=90)
        lines.append(f'{index}.jpg\tname\t{index % 3}')
    samples, _ = datasets.read_train_samples([str(root)], [write_list(tmp_path / 'train.txt', lines)])
    epochs = {}
    for workers in (0, 1, 2):
        dataset = datasets.ImageDataset(samples, 48, train=True, augment=True, seed=5)
        loader = datasets.build_train_loader(dataset, batch_size=4, num_workers=workers, seed=5, rank=0, world_size=1)
        batches = []
        for epoch in (1, 2):
            loader.sampler.set_epoch(epoch)
            batches += [(batch['index'], batch['image']) for batch in loader]
        epochs[workers] = batches
    for workers in (1, 2):
        assert len(epochs[workers]) == len(epochs[0]) == 4
        for (indices, images), (expected_indices, expected_images) in zip(epochs[workers], epochs[0]):
            assert torch.equal(indices, expected_indices) and torch.equal(images, expected_images)
    # the augmentation does draw: the same sample is cropped differently in the two epochs
    first = {int(index): image for index, image in zip(*epochs[0][0])}
    second = {int(index): image for indices, images in epochs[0][2:] for index, image in zip(indices, images)}
    shared = set(first) & set(second)
    assert shared and any(not torch.equal(first[index], second[index]) for index in shared)
