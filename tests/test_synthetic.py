"""The synthetic landmark generator: determinism, the real list format, decodable images."""
import collections
import glob
import os

import numpy as np
import pytest
from PIL import Image

from demo import make_synthetic_landmarks, synthetic_landmarks_once

SIZES = dict(num_train_landmarks=6, train_views=3, val_views=2, num_test_landmarks=10, test_views=10,
             image_size=48)


def read_rows(list_path):
    with open(list_path, encoding='utf-8') as list_file:
        return [line.rstrip('\n').split('\t') for line in list_file]


def tree_bytes(root):
    """{relative path: file bytes} for every file under root."""
    contents = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, 'rb') as data_file:
                contents[os.path.relpath(path, root)] = data_file.read()
    return contents


@pytest.fixture(scope='module')
def data_set(tmp_path_factory):
    return make_synthetic_landmarks(str(tmp_path_factory.mktemp('synthetic')), seed=3, **SIZES)


def test_same_seed_gives_identical_bytes(data_set, tmp_path):
    again = make_synthetic_landmarks(str(tmp_path / 'again'), seed=3, **SIZES)
    first, second = tree_bytes(data_set['root']), tree_bytes(again['root'])
    assert sorted(first) == sorted(second)
    assert {'train.txt', 'val.txt', 'test.txt'} <= set(first)
    assert all(first[path] == second[path] for path in first)
    other_seed = tree_bytes(make_synthetic_landmarks(str(tmp_path / 'other'), seed=4, **SIZES)['root'])
    assert sorted(other_seed) == sorted(first)
    assert other_seed['train.txt'] == first['train.txt']  # same names and labels, other pictures
    assert sum(other_seed[path] != first[path] for path in first if path.endswith('.jpg')) == len(
        [path for path in first if path.endswith('.jpg')])


def test_rendering_processes_do_not_change_a_byte(data_set, tmp_path):
    parallel = make_synthetic_landmarks(str(tmp_path / 'parallel'), seed=3, processes=2, **SIZES)
    first, second = tree_bytes(data_set['root']), tree_bytes(parallel['root'])
    assert sorted(first) == sorted(second)
    assert all(first[path] == second[path] for path in first)


def test_returned_paths(data_set):
    assert data_set['num_classes'] == SIZES['num_train_landmarks']
    for key, name in (('train_list', 'train.txt'), ('val_list', 'val.txt'), ('test_list', 'test.txt')):
        assert data_set[key] == os.path.join(data_set['root'], name)
        assert os.path.isabs(data_set[key])


def test_train_and_val_lists(data_set):
    train_rows = read_rows(data_set['train_list'])
    val_rows = read_rows(data_set['val_list'])
    assert all(len(row) == 3 for row in train_rows + val_rows)
    num_classes = SIZES['num_train_landmarks']
    train_counts = collections.Counter(int(row[2]) for row in train_rows)
    assert train_counts == {label: SIZES['train_views'] for label in range(num_classes)}
    val_counts = collections.Counter(int(row[2]) for row in val_rows)
    assert val_counts == {label: SIZES['val_views'] for label in range(num_classes)}
    # a landmark has one name and one label in both lists; val views are other images
    train_label_of_name = {row[1]: int(row[2]) for row in train_rows}
    assert len(train_label_of_name) == num_classes
    assert all(train_label_of_name[row[1]] == int(row[2]) for row in val_rows)
    assert not {row[0] for row in train_rows} & {row[0] for row in val_rows}
    assert len({row[0] for row in train_rows}) == len(train_rows)


def test_open_set_test_list(data_set):
    test_rows = read_rows(data_set['test_list'])
    assert len(test_rows) == SIZES['num_test_landmarks'] * SIZES['test_views']
    assert all(len(row) == 4 for row in test_rows)
    coarse = [int(row[2]) for row in test_rows]
    fine = [int(row[3]) for row in test_rows]
    assert collections.Counter(fine) == {label: 10 for label in range(SIZES['num_test_landmarks'])}
    assert sorted(set(coarse)) == list(range(len(set(coarse))))
    fine_labels_of_coarse = collections.defaultdict(set)
    coarse_labels_of_fine = collections.defaultdict(set)
    for coarse_label, fine_label in zip(coarse, fine):
        fine_labels_of_coarse[coarse_label].add(fine_label)
        coarse_labels_of_fine[fine_label].add(coarse_label)
    # each landmark belongs to one site; some sites hold a twin pair, so coarse and fine disagree on some pairs
    assert all(len(sites) == 1 for sites in coarse_labels_of_fine.values())
    assert all(len(landmarks) in (1, 2) for landmarks in fine_labels_of_coarse.values())
    twin_sites = [site for site, landmarks in fine_labels_of_coarse.items() if len(landmarks) == 2]
    assert len(twin_sites) == SIZES['num_test_landmarks'] // 5
    assert any(coarse[i] == coarse[j] and fine[i] != fine[j]
               for i in range(len(test_rows)) for j in range(i + 1, len(test_rows)))
    # unseen landmarks: no name or image shared with training
    train_rows = read_rows(data_set['train_list']) + read_rows(data_set['val_list'])
    assert not {row[1] for row in test_rows} & {row[1] for row in train_rows}
    assert not {row[0] for row in test_rows} & {row[0] for row in train_rows}
    assert len({row[1] for row in test_rows}) == SIZES['num_test_landmarks']


def test_images_are_rgb_jpegs_of_the_requested_size(data_set):
    rows = sum((read_rows(data_set[key]) for key in ('train_list', 'val_list', 'test_list')), [])
    pixel_sums = collections.defaultdict(set)
    for row in rows:
        with Image.open(os.path.join(data_set['root'], row[0])) as image:
            assert image.format == 'JPEG'
            assert image.mode == 'RGB'
            assert image.size == (SIZES['image_size'], SIZES['image_size'])
            pixel_sums[row[1]].add(int(np.asarray(image).sum()))
    # the views of one landmark are different photographs
    assert all(len(sums) > 1 for sums in pixel_sums.values())


def test_rejects_empty_sizes(tmp_path):
    with pytest.raises(ValueError, match='must be positive'):
        make_synthetic_landmarks(str(tmp_path), num_train_landmarks=0)
    with pytest.raises(ValueError, match='image_size'):
        make_synthetic_landmarks(str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match='seed'):
        make_synthetic_landmarks(str(tmp_path), seed=-1)


SMALL_SET = dict(seed=0, num_train_landmarks=3, train_views=2, num_test_landmarks=2, test_views=2, image_size=32,
                 val_views=1)


def image_times(root) -> dict:
    return {path: os.stat(path).st_mtime_ns for path in glob.glob(os.path.join(root, '*', '*', '*.jpg'))}


def test_a_data_set_is_made_once_and_reused_while_whole(tmp_path):
    root = str(tmp_path / 'data')
    lists, reused = synthetic_landmarks_once(root, **SMALL_SET)
    assert not reused and len(image_times(root)) == 3 * 3 + 2 * 2
    made = image_times(root)
    again, reused = synthetic_landmarks_once(root, **SMALL_SET)
    assert reused and again == lists and image_times(root) == made


def test_a_damaged_partial_or_other_data_set_is_made_again(tmp_path):
    root = str(tmp_path / 'data')
    synthetic_landmarks_once(root, **SMALL_SET)
    first = sorted(image_times(root))[0]
    with open(first, 'rb') as handle:
        original = handle.read()
    with open(first, 'r+b') as handle:  # the same size, one byte changed
        handle.seek(len(original) // 2)
        handle.write(bytes([original[len(original) // 2] ^ 0xFF]))
    assert not synthetic_landmarks_once(root, **SMALL_SET)[1]
    with open(first, 'rb') as handle:
        assert handle.read() == original  # made again, to the byte
    os.remove(os.path.join(root, 'manifest.json'))  # a set cut short before its manifest was written
    assert not synthetic_landmarks_once(root, **SMALL_SET)[1]
    assert not synthetic_landmarks_once(root, **dict(SMALL_SET, seed=1))[1]  # another seed: another data set
    assert synthetic_landmarks_once(root, **dict(SMALL_SET, seed=1))[1]
