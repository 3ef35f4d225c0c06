"""Training on Google Landmarks v2 as it ships: its CSV files, its images extracted or in tar shards read in place."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT, run_main
from PIL import Image
from test_reliability import assert_same_final_weights, environment, interrupt_mid_epoch, only_run_dir

import gldv2  # noqa: E402

LANDMARKS = (7, 15, 31, 64)  # GLDv2's own ids: not contiguous, mapped to classes 0..3 in their order
SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--backbone_class', 'Resnet12',
         '--max_epoch', '1', '--warmup_epoch', '0', '--gldv2_val_share', '0.25', '--train_format', 'gldv2']


def image_id(landmark: int, view: int) -> str:
    return hashlib.sha256(f'{landmark}-{view}'.encode()).hexdigest()[:16]


def gldv2_layout(root, shards: bool, views: int = 6) -> dict:
    """GLDv2's files for LANDMARKS x `views` images (colours by landmark): train_clean.csv, train.csv and train/,
    the images extracted (a/b/c/<id>.jpg) or in two tar shards; returns {image id: landmark}."""
    generator, landmark_of = np.random.default_rng(0), {}
    staging = os.path.join(root, 'staging' if shards else 'train')
    for landmark in LANDMARKS:
        for view in range(views):
            image = image_id(landmark, view)
            landmark_of[image] = landmark
            base = np.array([(landmark * 67) % 256, (landmark * 131) % 256, (landmark * 29) % 256], dtype=np.float32)
            pixels = np.clip(base + generator.normal(0, 25, size=(48, 56, 3)), 0, 255).astype(np.uint8)
            path = os.path.join(staging, image[0], image[1], image[2], f'{image}.jpg')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
    if shards:
        os.makedirs(os.path.join(root, 'train'))
        images = sorted(landmark_of)
        for number, part in enumerate((images[:10], images[10:])):
            with tarfile.open(os.path.join(root, 'train', f'images_{number:03d}.tar'), 'w') as shard:
                for image in part:
                    shard.add(os.path.join(staging, image[0], image[1], image[2], f'{image}.jpg'),
                              arcname=f'{image[0]}/{image[1]}/{image[2]}/{image}.jpg')
    with open(os.path.join(root, 'train_clean.csv'), 'w', encoding='utf-8') as handle:
        handle.write('landmark_id,images\n' + ''.join(
            f'{landmark},{" ".join(image for image, of in landmark_of.items() if of == landmark)}\n'
            for landmark in LANDMARKS))
    with open(os.path.join(root, 'train.csv'), 'w', encoding='utf-8') as handle:
        handle.write('id,url,landmark_id\n' + ''.join(f'{image},http://example.invalid/{image},{landmark}\n'
                                                      for image, landmark in landmark_of.items()))
    return landmark_of


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    roots = {name: str(tmp_path_factory.mktemp(name)) for name in ('extracted', 'shards')}
    return {name: (root, gldv2_layout(root, shards=name == 'shards')) for name, root in roots.items()}


class Lines:
    """A logger that keeps its lines."""

    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


def read(root, tmp_path, **options):
    arguments = dict(clean=True, excluded=set(), val_share=0.25, seed=0, run_dir=str(tmp_path / 'run'), resumed=False,
                     index_dir=str(tmp_path / 'index'), logger=Lines())
    arguments.update(options)
    return gldv2.read_training(root, **arguments)


def test_shards_and_extracted_images_train_to_the_same_weights(layouts, tmp_path):
    for name, workers in (('extracted', '0'), ('shards', '2')):
        run_main(SMALL + ['--train_root', layouts[name][0], '--num_workers', workers, '--save_dir',
                          str(tmp_path / name)])
    run_dir = only_run_dir(tmp_path / 'shards')
    assert_same_final_weights(only_run_dir(tmp_path / 'extracted'), run_dir)
    with open(os.path.join(run_dir, 'landmark_classes.json'), encoding='utf-8') as handle:
        assert json.load(handle) == {'7': 0, '15': 1, '31': 2, '64': 3}
    record = open(os.path.join(run_dir, 'record.txt'), encoding='utf-8').read()
    assert 'indexed 2 of 2 shards in ' in record and "classes: 4, one per landmark of train_clean.csv (--num_classes gives another)" in record
    # 4 landmarks x 6 images: 2 of each held out for validation, 16 images in 4 batches of 4
    assert torch.load(os.path.join(run_dir, 'max_acc.pth'), weights_only=True)['architecture']['num_classes'] == 4
    assert re.search(r'^epoch 1 .*eval_acc=', record, re.M)


def test_a_run_stopped_mid_epoch_reading_shards_resumes_to_an_uninterrupted_runs_weights(layouts, tmp_path):
    command = [sys.executable, os.path.join(ROOT, 'main.py')] + SMALL + [
        '--train_root', layouts['shards'][0], '--num_workers', '1', '--max_epoch', '4', '--augment', '--seed', '3',
        '--log_interval', '1']
    straight = subprocess.run(command + ['--save_dir', str(tmp_path / 'straight')], env=environment(),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = interrupt_mid_epoch(command + ['--checkpoint_minutes', '1e-9', '--save_dir', str(tmp_path / 'stopped')],
                                  tmp_path / 'stopped', signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-2000:]
    rerun = subprocess.run(command + ['--checkpoint_minutes', '1e-9', '--save_dir', str(tmp_path / 'stopped')],
                           env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_final_weights(only_run_dir(tmp_path / 'straight'), only_run_dir(tmp_path / 'stopped'))


def test_the_csv_files_give_each_image_its_landmark_and_a_split_fixed_by_the_seed(layouts, tmp_path):
    root, landmark_of = layouts['shards']
    train, val, classes = read(root, tmp_path)
    assert classes == {7: 0, 15: 1, 31: 2, 64: 3} and len(train) == 16 and len(val) == 8
    image_of_bytes = {}
    for number in range(2):
        with tarfile.open(os.path.join(root, 'train', f'images_00{number}.tar')) as shard:
            for member in shard:
                image_of_bytes[shard.extractfile(member).read()] = os.path.basename(member.name)[:-len('.jpg')]
    for sample in train + val:  # each sample reads its own image's bytes in place, with its landmark's class
        shard_path, span = sample.path.split('::')
        offset, size = map(int, span.split(':'))
        with open(shard_path, 'rb') as handle:
            handle.seek(offset)
            assert sample.label == classes[landmark_of[image_of_bytes[handle.read(size)]]]
    # 2 of each landmark's 6 held out; the full CSV names the same images; another seed holds out others
    assert sorted(np.bincount([sample.label for sample in val]).tolist()) == [2, 2, 2, 2]
    full_train, _, _ = read(root, tmp_path, clean=False)
    assert sorted(sample.path for sample in full_train) == sorted(sample.path for sample in train)
    other_train, _, _ = read(root, tmp_path, seed=1)
    assert sorted(sample.path for sample in other_train) != sorted(sample.path for sample in train)
    # the same seed holds out the same images whatever the order of the CSV's rows and of the ids in a row
    copy = tmp_path / 'reordered'
    os.makedirs(copy)
    os.symlink(os.path.join(root, 'train'), copy / 'train')
    header, *rows = open(os.path.join(root, 'train_clean.csv'), encoding='utf-8').read().splitlines()
    rows = [f"{row.split(',')[0]},{' '.join(row.split(',')[1].split()[::-1])}" for row in rows[::-1]]
    (copy / 'train_clean.csv').write_text('\n'.join([header] + rows) + '\n', encoding='utf-8')
    def members(samples):
        return sorted(sample.path[sample.path.index('/train/'):] for sample in samples)
    assert members(read(str(copy), tmp_path)[1]) == members(val)


@pytest.mark.parametrize('fault', ['missing column', 'repeated id', 'not a landmark id', 'id in no shard',
                                   'truncated shard', 'truncated last member'])
def test_a_fault_in_the_files_stops_in_one_line_naming_file_and_line_or_member(layouts, tmp_path, fault):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=True)
    csv_path = os.path.join(root, 'train_clean.csv')
    lines = open(csv_path, encoding='utf-8').read().splitlines()
    if fault == 'missing column':
        lines[0] = 'landmark,images'
        expected = f"{csv_path}: no column 'landmark_id' in its header ['landmark', 'images']"
    elif fault == 'repeated id':
        lines[3] = lines[3] + ' ' + lines[1].split(',')[1].split()[0]
        expected = f'{csv_path}:4: image {lines[1].split(",")[1].split()[0]} again (first at line 2)'
    elif fault == 'not a landmark id':
        lines[2] = 'fifteen,' + lines[2].split(',')[1]
        expected = f"{csv_path}:3: landmark_id 'fifteen' is not an integer"
    elif fault == 'id in no shard':
        lines[4] = lines[4] + ' 0123456789abcdef'
        expected = f'{csv_path}:5: image 0123456789abcdef is in no shard of {root}/train (2 shards indexed)'
    elif fault == 'truncated shard':
        shard = os.path.join(root, 'train', 'images_001.tar')
        os.truncate(shard, os.path.getsize(shard) // 2)
        expected = f'{shard}: a damaged or truncated shard ('
    else:  # cut inside the last member's bytes: the archive's headers all read, its data does not
        shard = os.path.join(root, 'train', 'images_001.tar')
        with tarfile.open(shard) as archive:
            last = archive.getmembers()[-1]
        os.truncate(shard, last.offset_data + last.size // 2)
        expected = f'{shard}: a damaged or truncated shard (EOFError: {last.name} ends past the end of the file'
    with open(csv_path, 'w', encoding='utf-8') as handle:
        handle.write('\n'.join(lines) + '\n')
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL + ['--train_root', root, '--num_workers', '0', '--save_dir', str(tmp_path / 'runs')])
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith(f'error: {expected}'), message


def test_a_byte_order_mark_and_crlf_line_ends_read_as_the_plain_file(layouts, tmp_path):
    root, _ = layouts['extracted']
    copy = str(tmp_path / 'windows')
    os.makedirs(copy)
    os.symlink(os.path.join(root, 'train'), os.path.join(copy, 'train'))
    text = open(os.path.join(root, 'train_clean.csv'), encoding='utf-8').read()
    with open(os.path.join(copy, 'train_clean.csv'), 'wb') as handle:
        handle.write(b'\xef\xbb\xbf' + text.replace('\n', '\r\n').encode())
    for plain, windows in zip(read(root, tmp_path)[:2], read(copy, tmp_path)[:2]):
        assert [(os.path.relpath(sample.path, copy), sample.label) for sample in windows] == \
            [(os.path.relpath(sample.path, root), sample.label) for sample in plain]


def test_excluded_landmarks_leave_training_said_with_the_count(layouts, tmp_path):
    root, _ = layouts['extracted']
    excluded = tmp_path / 'excluded.txt'
    excluded.write_text('# landmarks revisited Oxford shares\n15\n64, 1000\n', encoding='utf-8')
    logger = Lines()
    train, val, classes = read(root, tmp_path, excluded=gldv2.read_landmark_list(str(excluded)), logger=logger)
    # the classes keep their numbers: a teacher trained with or without the exclusion numbers them the same
    assert classes == {7: 0, 15: 1, 31: 2, 64: 3} and len(train) + len(val) == 12
    assert {sample.label for sample in train + val} == {0, 2}
    assert '--exclude_landmarks: 2 landmarks, 12 images left out of training' in logger.lines
    excluded.write_text('15\nseven\n', encoding='utf-8')
    with pytest.raises(Exception, match=re.escape(f"{excluded}:2: 'seven' is not a landmark id (an integer)")):
        gldv2.read_landmark_list(str(excluded))


def test_excluded_labels_leave_the_original_lists_too(tiny_data, tmp_path):
    excluded = tmp_path / 'excluded.txt'
    excluded.write_text('0\n', encoding='utf-8')
    run_main(['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--backbone_class', 'Resnet12',
              '--max_epoch', '1', '--warmup_epoch', '0', '--num_workers', '0', '--num_classes', '4',
              '--train_root', tiny_data['root'],
              '--train_list', tiny_data['train'], '--exclude_landmarks', str(excluded), '--save_dir', str(tmp_path)])
    record = open(os.path.join(only_run_dir(tmp_path), 'record.txt'), encoding='utf-8').read()
    assert '--exclude_landmarks: 1 labels, 6 images left out of training' in record
    assert re.search(r'^epoch 1 ', record, re.M)


def test_the_shard_index_is_made_once_and_again_for_a_changed_shard(layouts, tmp_path):
    root, _ = layouts['shards']
    shards = [os.path.join(root, 'train', f'images_00{number}.tar') for number in range(2)]
    damaged = str(tmp_path / 'index' / 'images_000.tar.npz')
    for expected, touch in (('indexed 2 of 2 shards', None), (None, None), ('indexed 1 of 2 shards', shards[1]),
                            ('indexed 1 of 2 shards', damaged)):
        if touch == damaged:  # a damaged index part is made again
            open(damaged, 'wb').close()
        elif touch:
            stamp = os.stat(touch).st_mtime_ns + 10 ** 9
            os.utime(touch, ns=(stamp, stamp))
        logger = Lines()
        index = gldv2.shard_index(shards, str(tmp_path / 'index'), logger)
        assert len(index['ids']) == 24 and list(index['ids']) == sorted(index['ids'])
        assert (logger.lines[0].startswith(expected) if expected else logger.lines == [])


def test_a_resumed_run_keeps_its_landmark_classes_and_names_a_landmark_added_since(layouts, tmp_path):
    root, _ = layouts['extracted']
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    gldv2.write_class_map({7: 3, 15: 2, 31: 1, 64: 0}, str(run_dir))  # as a run that began earlier wrote it
    assert read(root, tmp_path)[2] == {7: 0, 15: 1, 31: 2, 64: 3}  # not a resume: a map left there is not this run's
    train, _, classes = read(root, tmp_path, resumed=True)
    assert classes == {7: 3, 15: 2, 31: 1, 64: 0} and {sample.label for sample in train} == {0, 1, 2, 3}
    assert all(sample.label_note == f'landmark {landmark}' for sample in train for landmark, label in classes.items()
               if sample.label == label)
    copy = tmp_path / 'grown'
    os.makedirs(copy)
    os.symlink(os.path.join(root, 'train'), copy / 'train')
    text = open(os.path.join(root, 'train_clean.csv'), encoding='utf-8').read()
    (copy / 'train_clean.csv').write_text(text + f'3,{image_id(7, 0)[::-1]}\n', encoding='utf-8')
    with pytest.raises(Exception, match=re.escape(f"{copy / 'train_clean.csv'}:6: landmark 3 is not in this run's "
                                                  'landmark_classes.json')):
        read(str(copy), tmp_path, resumed=True)


def test_an_undecodable_image_in_a_shard_is_named_and_replaced(tmp_path):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=True)
    shard = os.path.join(root, 'train', 'images_000.tar')
    with tarfile.open(shard) as archive:
        broken = archive.getmembers()[3]
    with open(shard, 'r+b') as handle:  # the member's bytes, no longer a JPEG; the archive itself is whole
        handle.seek(broken.offset_data)
        handle.write(b'\0' * broken.size)
    run_main(SMALL + ['--train_root', root, '--num_workers', '0', '--gldv2_val_share', '0', '--max_bad_images', '0.1',
                      '--save_dir', str(tmp_path / 'runs')])
    record = open(os.path.join(only_run_dir(tmp_path / 'runs'), 'record.txt'), encoding='utf-8').read()
    member = f'{shard}::{broken.offset_data}:{broken.size}'
    line = rf'^bad image \(replaced\): {re.escape(member)}: not a decodable image \(.*train_clean\.csv:\d+\)$'
    assert re.search(line, record, re.M), record
    assert 'epoch 1: 1 bad images replaced' in record


def test_an_exclusion_of_every_landmark_stops_in_one_line(layouts, tmp_path):
    excluded = tmp_path / 'all.txt'
    excluded.write_text(' '.join(map(str, LANDMARKS)) + '\n', encoding='utf-8')
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL + ['--train_root', layouts['extracted'][0], '--num_workers', '0', '--exclude_landmarks',
                          str(excluded), '--save_dir', str(tmp_path / 'runs')])
    assert str(stopped.value.code) == f'error: --exclude_landmarks {excluded} left no training image'
