"""Google Landmarks v2 as it ships: its CSV files, and the training images under `train/` either extracted
(`a/b/c/<id>.jpg`) or in its tar shards (`images_000.tar` ...), read in place through an index of their members."""
import csv
import glob
import json
import os
import tarfile
import time
import zipfile

import numpy as np

import datasets
import utils

CLASS_MAP_NAME = 'landmark_classes.json'  # in the run directory: landmark id -> class, read back on resume
SHARDS = 'images_*.tar'


def csv_rows(path: str, columns: tuple[str, ...], hint: str):
    """(line number, the row's values of `columns`) of a CSV file whose header names them (a byte-order mark and CRLF
    line ends are read as any CSV reader reads them); a missing file, a missing column, a short row or bytes that are
    not UTF-8 stop in one line naming the file (and line), `hint` saying what to do."""
    if not os.path.isfile(path):
        raise utils.RunError(f'{path}: no such file; {hint}')
    line = 1
    try:
        with open(path, encoding='utf-8-sig', newline='') as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            missing = [column for column in columns if column not in header]
            if missing:
                raise utils.RunError(f'{path}: no column {missing[0]!r} in its header {header}; {hint}')
            positions, width = [header.index(column) for column in columns], max(header.index(c) for c in columns)
            for row in reader:
                line = reader.line_num
                if len(row) <= width:
                    raise utils.RunError(f'{path}:{line}: {len(row)} fields, fewer than its header names '
                                         f'({len(header)}); {hint}')
                yield line, [row[position] for position in positions]
    except UnicodeDecodeError as error:
        raise utils.RunError(f'{path}: near line {line + 1}: not UTF-8 text (byte {error.object[error.start]:#x}); '
                             f'{hint}') from None


def first_repeat(ids: np.ndarray) -> tuple[int, int] | None:
    """(row of the first id that repeats an earlier one, row of that earlier one), or None when all differ."""
    order = np.argsort(ids, kind='stable')
    repeats = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(repeats):
        return None
    later = order[repeats + 1]
    row = int(later.min())
    return row, int(order[repeats[np.argmin(later)]])


def unique_ids(path: str, hint: str) -> list[str]:
    """The `id` column of a GLDv2 CSV file, refused where an id repeats."""
    lines, ids = [], []
    for line, (image,) in csv_rows(path, ('id',), hint):
        lines.append(line)
        ids.append(image)
    repeat = first_repeat(np.asarray(ids, dtype=object)) if ids else None
    if repeat:
        raise utils.RunError(f'{path}:{lines[repeat[0]]}: id {ids[repeat[0]]} again (first at line '
                             f'{lines[repeat[1]]}); {hint}')
    return ids


def landmark_images(root: str, clean: bool) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(the CSV's path, image ids (bytes), their landmark ids, the line of each) of `root/train_clean.csv`
    (landmark_id, images) or of `root/train.csv` (id, url, landmark_id); a repeated image id or a landmark id that
    is not an integer stops, with its line."""
    path = os.path.join(root, 'train_clean.csv' if clean else 'train.csv')
    hint = 'give --train_root the directory of the GLDv2 files as they are downloaded'
    ids, landmarks, lines = [], [], []
    for line, (landmark, images) in csv_rows(path, ('landmark_id', 'images' if clean else 'id'), hint):
        try:
            landmark = int(landmark)
        except ValueError:
            raise utils.RunError(f'{path}:{line}: landmark_id {landmark!r} is not an integer') from None
        row_ids = images.split() if clean else [images]
        ids.extend(row_ids)
        landmarks.extend([landmark] * len(row_ids))
        lines.extend([line] * len(row_ids))
    lines = np.asarray(lines, dtype=np.int64)
    try:
        ids = np.asarray(ids, dtype='S')  # bytes: a quarter of the memory of text, sorted in C
    except UnicodeEncodeError:
        row = next(row for row, image in enumerate(ids) if not image.isascii())
        raise utils.RunError(f'{path}:{lines[row]}: image id {ids[row]!r} is not ASCII (GLDv2 ids are hexadecimal); '
                             f'{hint}') from None
    repeat = first_repeat(ids) if len(ids) else None
    if repeat:
        raise utils.RunError(f'{path}:{lines[repeat[0]]}: image {ids[repeat[0]].decode()} again (first at line '
                             f'{lines[repeat[1]]}); {hint}')
    return path, ids, np.asarray(landmarks, dtype=np.int64), lines


def read_landmark_list(path: str) -> set[int]:
    """Landmark ids, one a line (or separated by commas or spaces; '#' starts a comment)."""
    landmarks = set()
    with open(path, encoding='utf-8-sig') as handle:
        for line, text in enumerate(handle, start=1):
            for word in text.split('#', 1)[0].replace(',', ' ').split():
                try:
                    landmarks.add(int(word))
                except ValueError:
                    raise utils.RunError(f'{path}:{line}: {word!r} is not a landmark id (an integer)') from None
    return landmarks


def _scan_shard(path: str) -> dict:
    """{'ids', 'offsets', 'sizes'} of a shard's JPEG members; a damaged or truncated shard stops, naming the member."""
    ids, offsets, sizes, member = [], [], [], None
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, 'r:') as shard:
            for member in shard:
                if member.isfile() and member.name.endswith('.jpg'):
                    if member.offset_data + member.size > file_size:
                        raise EOFError(f'{member.name} ends past the end of the file')
                    ids.append(os.path.basename(member.name)[:-len('.jpg')])
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
    except (tarfile.TarError, EOFError, OSError) as error:
        after = f' after member {member.name}' if member is not None else ''
        raise utils.RunError(f'{path}: a damaged or truncated shard ({utils.first_line(error)}{after}); download it '
                             'again') from None
    return {'ids': np.asarray(ids, dtype='S'), 'offsets': np.asarray(offsets, dtype=np.int64),
            'sizes': np.asarray(sizes, dtype=np.int64)}


def shard_index(shards: list[str], index_dir: str, logger) -> dict:
    """{'ids' (sorted), 'shard', 'offsets', 'sizes'} of every member of `shards`: each shard's part read from
    `index_dir` when the shard's size and time are those it was made from, else scanned and written there."""
    os.makedirs(index_dir, exist_ok=True)
    parts, scanned, begun = [], 0, time.perf_counter()
    for number, shard in enumerate(shards):
        stamp = [os.path.getsize(shard), os.stat(shard).st_mtime_ns]
        path = os.path.join(index_dir, os.path.basename(shard) + '.npz')
        part = None
        try:  # an index part made from this very shard; one missing or damaged is made again
            with np.load(path) as saved:
                part = {key: saved[key] for key in saved.files} if saved['stamp'].tolist() == stamp else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            part = None
        if part is None:
            part, scanned = dict(_scan_shard(shard), stamp=np.asarray(stamp)), scanned + 1
            utils.write_atomically(path, lambda file, part=part: np.savez(file, **part))
        parts.append(dict(part, shard=np.full(len(part['ids']), number, dtype=np.int32)))
    if scanned:
        logger.info(f'indexed {scanned} of {len(shards)} shards in {time.perf_counter() - begun:.1f} s ({index_dir})')
    index = {key: np.concatenate([part[key] for part in parts]) for key in ('ids', 'shard', 'offsets', 'sizes')}
    order = np.argsort(index['ids'], kind='stable')
    return {key: value[order] for key, value in index.items()}


def index_shards_of(root: str, index_dir: str, logger):
    """Make (or bring up to date) the index of `root/train`'s shards, if it has any: rank 0 does, before the others
    read it."""
    shards = sorted(glob.glob(os.path.join(root, 'train', SHARDS)))
    if shards:
        shard_index(shards, index_dir, logger)


def image_paths(root: str, ids: np.ndarray, where, index_dir: str, logger) -> list[str]:
    """Where each image (id bytes) is: `root/train/a/b/c/<id>.jpg`, or with shards in `root/train/` their member in
    place; an id in no shard stops, `where(row)` naming its line."""
    shards = sorted(glob.glob(os.path.join(root, 'train', SHARDS)))
    if not shards:
        return [os.path.join(root, 'train', image[0], image[1], image[2], f'{image}.jpg')
                for image in (image.decode() for image in ids.tolist())]
    index = shard_index(shards, index_dir, logger)
    if not len(index['ids']):
        raise utils.RunError(f'{root}/train: its {len(shards)} shards hold no .jpg member; download them again')
    found = np.minimum(np.searchsorted(index['ids'], ids), len(index['ids']) - 1)
    missing = np.flatnonzero(index['ids'][found] != ids)
    if len(missing):
        row, more = int(missing[0]), f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise utils.RunError(f'{where(row)}: image {ids[row].decode()} is in no shard of {root}/train ({len(shards)} '
                             f'shards indexed){more}; download the missing shards, or remove the rows')
    return [f'{shards[shard]}{datasets.SHARD_MEMBER}{offset}:{size}' for shard, offset, size in
            zip(index['shard'][found].tolist(), index['offsets'][found].tolist(), index['sizes'][found].tolist())]


def class_map(landmarks: np.ndarray, saved_path: str | None) -> dict[int, int]:
    """landmark id -> class: the run's saved map (`saved_path`, a resume), else the landmarks in increasing order."""
    if saved_path and os.path.isfile(saved_path):
        with open(saved_path, encoding='utf-8') as handle:
            return {int(landmark): int(label) for landmark, label in json.load(handle).items()}
    return {int(landmark): label for label, landmark in enumerate(np.unique(landmarks).tolist())}


def held_out(landmarks: np.ndarray, ids: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Whether each image is in the validation split: of each landmark with two images or more, round(share x its
    images) (at least one) drawn by (seed, landmark) among its images in id order, whatever the order of the rows."""
    chosen = np.zeros(len(landmarks), dtype=bool)
    if share <= 0:
        return chosen
    order = np.argsort(landmarks, kind='stable')
    starts = np.flatnonzero(np.r_[True, landmarks[order][1:] != landmarks[order][:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(order)]):
        if end - start >= 2:
            rows = order[start:end][np.argsort(ids[order[start:end]], kind='stable')]
            count = max(1, round(share * len(rows)))
            generator = np.random.default_rng([seed, int(landmarks[rows[0]])])
            chosen[generator.choice(rows, size=min(count, len(rows) - 1), replace=False)] = True
    return chosen


def read_training(root: str, *, clean: bool, excluded: set[int], val_share: float, seed: int, run_dir: str,
                  resumed: bool, index_dir: str, logger) -> tuple[list, list, dict]:
    """(training samples, validation samples, landmark id -> class) of GLDv2 at `root`, the `excluded` landmarks'
    images left out (their classes kept: a teacher trained with or without them numbers the same); a `resumed` run
    keeps the map it began with."""
    path, ids, landmarks, lines = landmark_images(root, clean)
    classes = class_map(landmarks, os.path.join(run_dir, CLASS_MAP_NAME) if resumed else None)
    if excluded:
        kept = ~np.isin(landmarks, np.asarray(sorted(excluded), dtype=np.int64))
        logger.info(f'--exclude_landmarks: {len(np.unique(landmarks[~kept]))} landmarks, {int((~kept).sum())} images '
                    'left out of training')
        ids, landmarks, lines = ids[kept], landmarks[kept], lines[kept]
    unknown = [row for row, landmark in enumerate(landmarks.tolist()) if landmark not in classes]
    if unknown:
        raise utils.RunError(f'{path}:{lines[unknown[0]]}: landmark {landmarks[unknown[0]]} is not in this run\'s '
                             f'{CLASS_MAP_NAME}: the CSV changed since the run began; give another --suffix')
    paths = image_paths(root, ids, lambda row: f'{path}:{lines[row]}', index_dir, logger)
    validation = held_out(landmarks, ids, val_share, seed)
    samples = [[], []]
    for image, landmark, line, in_validation in zip(paths, landmarks.tolist(), lines.tolist(), validation.tolist()):
        samples[in_validation].append(datasets.Sample(image, classes[landmark], classes[landmark], f'{path}:{line}',
                                                      f'landmark {landmark}'))
    return samples[0], samples[1], classes


def write_class_map(classes: dict[int, int], run_dir: str):
    """The run's landmark id -> class map, beside its checkpoints."""
    utils.write_json({str(landmark): label for landmark, label in classes.items()},
                     os.path.join(run_dir, CLASS_MAP_NAME))
