"""Google Landmarks v2 as it ships, read through main.py: no input gives a silent wrong result or a traceback: a changed
shard is indexed again, an id or landmark out of GLDv2's form, a damaged class map and an unusable index directory stop
in one line."""
import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
from conftest import run_main
from test_bad_inputs import stops_with
from test_gldv2 import SMALL, gldv2_layout, image_id
from test_reliability import only_run_dir

PADDED_SIZE = 8192  # every JPEG padded to this many bytes: shards of as many members have the same size
FILLERS = 200  # .jpg members no CSV row names, as GLDv2's shards hold images train_clean.csv leaves out


def train_argv(root, save_dir, *extra) -> list[str]:
    return SMALL + ['--train_root', root, '--num_workers', '0', '--save_dir', str(save_dir), *extra]


def record_of(save_dir) -> str:
    with open(os.path.join(only_run_dir(save_dir), 'record.txt'), encoding='utf-8') as handle:
        return handle.read()


def edit_lines(path, edit):
    """Rewrite the text file `path` as edit(its lines)."""
    with open(path, encoding='utf-8') as handle:
        lines = handle.read().splitlines()
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write('\n'.join(edit(lines)) + '\n')


def staged(root, image) -> str:
    return os.path.join(root, 'staging', image[0], image[1], image[2], f'{image}.jpg')


def add_member(archive, image, data):
    info = tarfile.TarInfo(f'{image[0]}/{image[1]}/{image[2]}/{image}.jpg')
    info.size, info.mtime = len(data), 1_600_000_000
    archive.addfile(info, io.BytesIO(data))


def padded(path) -> bytes:
    """A JPEG's bytes followed by zeros up to PADDED_SIZE (a decoder stops at the image's end marker)."""
    with open(path, 'rb') as handle:
        data = handle.read()
    assert len(data) <= PADDED_SIZE
    return data + bytes(PADDED_SIZE - len(data))


def write_padded_shard(path, root, images, fillers=0):
    """A shard of `images` (padded JPEGs), then `fillers` junk .jpg members."""
    with tarfile.open(path, 'w') as archive:
        for image in images:
            add_member(archive, image, padded(staged(root, image)))
        for filler in range(fillers):
            add_member(archive, hashlib.sha256(f'{path}-{filler}'.encode()).hexdigest()[:16], b'\0' * 100)


def write_padded_shards(root, groups, fillers=0) -> list[str]:
    """train/images_00k.tar of each group of image ids; their paths."""
    shards = [os.path.join(root, 'train', f'images_{number:03d}.tar') for number in range(len(groups))]
    for shard, group in zip(shards, groups):
        write_padded_shard(shard, root, group, fillers)
    return shards


def keep_times(shard, rewrite):
    """rewrite(shard), then the shard's access and modification times put back as they were."""
    before = os.stat(shard)
    rewrite(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))


def members_of(shard) -> dict:
    """{image id: (offset of its bytes, size)} of a shard's members."""
    with tarfile.open(shard) as archive:
        return {os.path.basename(member.name)[:-len('.jpg')]: (member.offset_data, member.size) for member in archive}


def index_part(index_dir, shard) -> dict:
    """{image id: (offset, size)} of the index part kept for `shard`."""
    with np.load(os.path.join(index_dir, os.path.basename(shard) + '.npz')) as part:
        return {image.decode(): (offset, size) for image, offset, size in
                zip(part['ids'].tolist(), part['offsets'].tolist(), part['sizes'].tolist())}


# ------------------------------------------------------------------------------------------------ 1: shard contents
def test_a_shard_repacked_in_another_order_with_its_times_kept_is_indexed_again(tmp_path):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=True)
    shard, index_dir = os.path.join(root, 'train', 'images_001.tar'), str(tmp_path / 'index')
    run_main(train_argv(root, tmp_path / 'first', '--shard_index', index_dir))

    def reversed_members(path):
        with tarfile.open(path) as archive:
            members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
        with tarfile.open(path, 'w') as archive:
            for member, data in reversed(members):
                archive.addfile(member, io.BytesIO(data))
    size = os.path.getsize(shard)
    keep_times(shard, reversed_members)
    assert os.path.getsize(shard) == size
    run_main(train_argv(root, tmp_path / 'second', '--shard_index', index_dir))
    record = record_of(tmp_path / 'second')
    assert 'indexed 1 of 2 shards' in record and 'bad image' not in record
    assert index_part(index_dir, shard) == members_of(shard)  # each image read from its own bytes


# ------------------------------------------------------------------------------------------ 2: an id in two shards
def test_an_image_in_two_shards_stops_naming_both(tmp_path):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=True)
    first, extra = (os.path.join(root, 'train', f'images_00{number}.tar') for number in (0, 2))
    with tarfile.open(first) as archive:
        member = archive.getmembers()[3]
        data = archive.extractfile(member).read()
    with tarfile.open(extra, 'w') as archive:
        archive.addfile(member, io.BytesIO(data))
    image = os.path.basename(member.name)[:-len('.jpg')]
    stops_with(train_argv(root, tmp_path / 'runs'), re.escape(f'image {image} is in two shards, {first} and {extra}'))


# ------------------------------------------------------------------------------------- 3: ids of 16 hex digits only
@pytest.mark.parametrize('csv_name, shards', [('train_clean.csv', False), ('train.csv', False),
                                              ('train_clean.csv', True)])
def test_an_image_id_that_is_not_sixteen_hex_digits_stops_naming_file_and_line(tmp_path, csv_name, shards):
    root = str(tmp_path / 'gldv2')
    landmark_of = gldv2_layout(root, shards=shards)
    outside = tmp_path / 'outside' / 'secret'  # an absolute id: os.path.join would read it wherever --train_root is
    os.makedirs(outside.parent)
    image = next(iter(landmark_of))
    shutil.copyfile(staged(root, image) if shards else os.path.join(root, 'train', *image[:3], f'{image}.jpg'),
                    f'{outside}.jpg')
    csv_path = os.path.join(root, csv_name)
    if csv_name == 'train_clean.csv':
        edit_lines(csv_path, lambda lines: lines[:2] + [lines[2] + f' {outside}'] + lines[3:])
        line = 3
    else:
        edit_lines(csv_path, lambda lines: lines + [f'{outside},http://example.invalid/x,15'])
        line = len(landmark_of) + 2
    argv = train_argv(root, tmp_path / 'runs', '--gldv2_csv', 'clean' if csv_name == 'train_clean.csv' else 'full')
    stops_with(argv, re.escape(f"{csv_path}:{line}: image id '{outside}' is not a GLDv2 id (16 lowercase "
                               'hexadecimal digits)'))


# ---------------------------------------------------------------------------- 4: landmark ids within int64, UTF-8 lists
@pytest.mark.parametrize('fault', ['negative landmark', 'landmark beyond int64', 'excluded beyond int64',
                                   'excluded negative', 'excluded in UTF-16', 'excluded in Latin-1'])
def test_a_landmark_id_out_of_range_or_a_list_not_in_utf8_stops_in_one_line(tmp_path, fault):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=False)
    csv_path, excluded = os.path.join(root, 'train_clean.csv'), tmp_path / 'excluded.txt'
    argv = train_argv(root, tmp_path / 'runs')
    if fault in ('negative landmark', 'landmark beyond int64'):
        value = '-7' if fault == 'negative landmark' else str(2 ** 63)
        edit_lines(csv_path, lambda lines: [lines[0], value + lines[1][lines[1].index(','):]] + lines[2:])
        rule = 'is negative' if fault == 'negative landmark' else 'is beyond 2^63-1'
        pattern = re.escape(f'{csv_path}:2: landmark_id {value} {rule}') + '.*; '
    else:
        argv += ['--exclude_landmarks', str(excluded)]
        if fault in ('excluded beyond int64', 'excluded negative'):
            value = str(2 ** 63) if fault == 'excluded beyond int64' else '-15'
            excluded.write_text(f'15\n64, {value}\n', encoding='utf-8')
            rule = 'is beyond 2^63-1' if fault == 'excluded beyond int64' else 'is negative'
            pattern = re.escape(f'{excluded}:2: {value} {rule}') + '.*; '
        else:
            text = '# Zürich, Köln\n15\n'
            excluded.write_bytes(text.encode('utf-16' if fault == 'excluded in UTF-16' else 'latin-1'))
            pattern = re.escape(f'{excluded}:1: not UTF-8 text (byte ') + '.*; save it as UTF-8'
    stops_with(argv, pattern)


# ------------------------------------------------------------------------------------- 5: the CSV's field-size limit
def test_a_landmark_with_more_images_than_the_csv_modules_default_field_reads(tmp_path):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=False)
    many = ' '.join(f'{number:016x}' for number in range(8000))  # 136,000 characters in one field
    assert len(many) > 131072
    edit_lines(os.path.join(root, 'train_clean.csv'), lambda lines: lines + [f'99,{many}'])
    excluded = tmp_path / 'excluded.txt'  # its images left out: the test trains on the four small landmarks
    excluded.write_text('99\n', encoding='utf-8')
    run_main(train_argv(root, tmp_path / 'runs', '--exclude_landmarks', str(excluded)))
    with open(os.path.join(only_run_dir(tmp_path / 'runs'), 'landmark_classes.json'), encoding='utf-8') as handle:
        assert json.load(handle) == {'7': 0, '15': 1, '31': 2, '64': 3, '99': 4}
    assert '--exclude_landmarks: 1 landmarks, 8000 images left out of training' in record_of(tmp_path / 'runs')


# ------------------------------------------------------------------------------------ 6: the class map on resume
def test_a_damaged_or_edited_class_map_stops_a_resume_in_one_line(tmp_path, tiny_data):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=False)
    run_main(train_argv(root, tmp_path / 'runs'))
    path = os.path.join(only_run_dir(tmp_path / 'runs'), 'landmark_classes.json')
    with open(path, encoding='utf-8') as handle:
        original = handle.read()
    assert json.loads(original) == {'7': 0, '15': 1, '31': 2, '64': 3}
    # the finished run, given a test list, resumes to test: it reads its map back
    resume = train_argv(root, tmp_path / 'runs', '--test_root', tiny_data['root'], '--test_list', tiny_data['test'])
    faults = {original[:len(original) // 2]: 'not JSON',
              '': 'not JSON',
              '[0, 1, 2, 3]': 'not a JSON object',
              '{"7": 0, "15": 0, "31": 2, "64": 3}': 'landmarks 7 and 15 both have class 0',
              '{"7": -1, "15": 1, "31": 2, "64": 3}': 'landmark 7 has class -1, outside 0..3',
              '{"7": 0, "15": 1, "31": 2, "64": 4}': 'landmark 64 has class 4, outside 0..3',
              '{"7": 0, "15": 1, "31": 2, "sixty-four": 3}': "key 'sixty-four' is not a landmark id",
              '{"7": 0, "15": 1, "31": 2, "64": 3.0}': 'landmark 64 has class 3.0, not an integer',
              '{"7": 0, "15": 1, "31": 2, "64": 3, "7": 3}': 'landmark 7 appears twice'}
    for text, what in faults.items():
        with open(path, 'w', encoding='utf-8') as handle:
            handle.write(text)
        stops_with(resume, '^' + re.escape(f'error: {path}: ') + '.*' + re.escape(what))
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write('{"7": 0, "15": 1, "31": 2}')
    csv_path = os.path.join(root, 'train_clean.csv')
    stops_with(resume, re.escape(f"{csv_path}:5: landmark 64 is not in this run's landmark_classes.json ({path})"))
    with open(path, 'w', encoding='utf-8') as handle:  # the run's own map resumes
        handle.write(original)
    run_main(resume)
    record = record_of(tmp_path / 'runs')
    assert 'resumed from ' in record and re.search(r'^test acc: ', record, re.M)


# ------------------------------------------------------------------------------------ 7: a CSV of its header only
@pytest.mark.parametrize('csv_name', ['train_clean.csv', 'train.csv'])
def test_a_csv_of_its_header_only_is_named_not_the_exclusions(tmp_path, csv_name):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=False)
    csv_path = os.path.join(root, csv_name)
    edit_lines(csv_path, lambda lines: lines[:1])
    message = stops_with(train_argv(root, tmp_path / 'runs', '--gldv2_csv', 'clean' if 'clean' in csv_name else 'full'),
                         '^' + re.escape(f'error: {csv_path}: no rows after its header'))
    assert 'exclude_landmarks' not in message


# ------------------------------------------------------------------------------------------- 8: a stale index part
def test_an_index_part_of_another_shard_of_the_same_size_and_time_is_made_again(tmp_path):
    root = str(tmp_path / 'gldv2')
    images = sorted(gldv2_layout(root, shards=True))
    shards, index_dir = write_padded_shards(root, [images[:12], images[12:]]), tmp_path / 'index'
    stamp = os.stat(shards[0]).st_mtime_ns
    os.utime(shards[1], ns=(stamp, stamp))
    assert os.path.getsize(shards[0]) == os.path.getsize(shards[1])
    run_main(train_argv(root, tmp_path / 'first', '--shard_index', str(index_dir)))
    shutil.copyfile(index_dir / 'images_000.tar.npz', index_dir / 'images_001.tar.npz')
    run_main(train_argv(root, tmp_path / 'second', '--shard_index', str(index_dir)))
    assert 'indexed 1 of 2 shards' in record_of(tmp_path / 'second')
    assert index_part(index_dir, shards[1]) == members_of(shards[1])


def test_an_image_missing_from_a_stale_index_is_indexed_again_not_called_missing(tmp_path):
    root = str(tmp_path / 'gldv2')
    landmark_of = gldv2_layout(root, shards=True)
    images = sorted(landmark_of)
    shard = write_padded_shards(root, [images[:12], images[12:]], fillers=FILLERS)[1]
    index_dir = str(tmp_path / 'index')
    run_main(train_argv(root, tmp_path / 'first', '--shard_index', index_dir))
    # the shard's second member swapped for another image of the same size: the shard's size and times are kept, and
    # its first, last and evenly spread members' headers are those the index was made from
    replaced, newcomer = images[13], image_id(landmark_of[images[13]], 99)
    os.makedirs(os.path.dirname(staged(root, newcomer)), exist_ok=True)
    shutil.copyfile(staged(root, replaced), staged(root, newcomer))
    order = images[12:]
    order[1] = newcomer
    keep_times(shard, lambda path: write_padded_shard(path, root, order, fillers=FILLERS))
    edit_lines(os.path.join(root, 'train_clean.csv'), lambda lines: [line.replace(replaced, newcomer)
                                                                       for line in lines])
    run_main(train_argv(root, tmp_path / 'second', '--shard_index', index_dir))
    record = record_of(tmp_path / 'second')
    assert f'1 images in no shard the index in {index_dir} holds: indexing the shards again' in record
    assert 'indexed 2 of 2 shards' in record and 'is in no shard' not in record
    assert index_part(index_dir, shard) == members_of(shard)


# ------------------------------------------------------------------------------ 9: a dangling shard, an index place
@pytest.mark.parametrize('fault', ['dangling shard', 'index is a file', 'index read-only', 'index under a file'])
def test_a_dangling_shard_or_an_unusable_index_directory_stops_in_one_line(tmp_path, monkeypatch, fault):
    root = str(tmp_path / 'gldv2')
    gldv2_layout(root, shards=True)
    index_dir = str(tmp_path / 'index')
    if fault == 'dangling shard':
        link = os.path.join(root, 'train', 'images_002.tar')
        os.symlink(str(tmp_path / 'elsewhere' / 'images_002.tar'), link)
        pattern = re.escape(f'{link}: a link to {tmp_path}/elsewhere/images_002.tar, which does not exist; ')
    elif fault in ('index is a file', 'index under a file'):
        with open(tmp_path / 'index', 'w', encoding='utf-8') as handle:
            handle.write('not a directory\n')
        index_dir = index_dir if fault == 'index is a file' else os.path.join(index_dir, 'shards')
        pattern = re.escape(f'{index_dir}: ') + '.*; give --shard_index a directory you can write$'
    else:
        os.makedirs(index_dir)
        os.chmod(index_dir, 0o555)
        if os.geteuid() == 0:  # root writes in any directory: a user's refused write is emulated
            access = os.access
            monkeypatch.setattr(os, 'access', lambda path, mode, **options: False if (
                os.path.abspath(path) == index_dir and mode & os.W_OK) else access(path, mode, **options))
        pattern = re.escape(f'{index_dir}: cannot write the shard index there') + \
            '.*; give --shard_index a directory you can write$'
    stops_with(train_argv(root, tmp_path / 'runs', '--shard_index', index_dir), pattern)
