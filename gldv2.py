"""Google Landmarks v2 as it ships: its CSV files, and the training images under `train/` either extracted
(`a/b/c/<id>.jpg`) or in its tar shards (`images_000.tar` ...), read in place through an index of their members."""
import csv
import glob
import hashlib
import json
import os
import stat
import tarfile
import time
import zipfile

import numpy as np

import datasets
import utils

CLASS_MAP_NAME = 'landmark_classes.json'  # in the run directory: landmark id -> class, read back on resume
SHARDS = 'images_*.tar'
ID_DIGITS = 16  # a GLDv2 image id: 16 lowercase hexadecimal digits, its first three naming its folders
HEX_DIGIT = np.zeros(256, dtype=bool)
HEX_DIGIT[np.frombuffer(b'0123456789abcdef', dtype=np.uint8)] = True
LARGEST_LANDMARK = 2 ** 63 - 1  # landmark ids are held as int64
FIELD_LIMIT = 1 << 26  # characters in one CSV field: all of train_clean.csv's 1.6M ids in one row would fit
HEADERS_CHECKED = 33  # members whose tar headers tie an index part to its shard's contents: first, last, spread


def csv_rows(path: str, columns: tuple[str, ...], hint: str):
    """(line number, the row's values of `columns`) of a CSV file whose header names them (a byte-order mark and CRLF
    line ends are read as any CSV reader reads them); a missing file, a missing column, a short row or bytes that are
    not UTF-8 stop in one line naming the file (and line), `hint` saying what to do."""
    if not os.path.isfile(path):
        raise utils.RunError(f'{path}: no such file; {hint}')
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))  # a landmark's ids exceed the default 131,072
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
    except csv.Error as error:
        raise utils.RunError(f'{path}: near line {line + 1}: {error}; {hint}') from None


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


def range_problem(landmark: int) -> str | None:
    """What is wrong with a landmark id outside 0..2^63-1 (GLDv2's are never negative; they are held as int64)."""
    if landmark < 0:
        return 'is negative'
    return 'is beyond 2^63-1' if landmark > LARGEST_LANDMARK else None


def first_bad_id(ids: np.ndarray) -> int | None:
    """The row of the first id (bytes) that is not 16 lowercase hexadecimal digits, or None."""
    if not len(ids):
        return None
    if ids.dtype.itemsize < ID_DIGITS:
        return 0
    digits = ids.view(np.uint8).reshape(len(ids), ids.dtype.itemsize)  # shorter ids end in zero bytes: no digit
    good = HEX_DIGIT[digits[:, :ID_DIGITS]].all(axis=1) & ~digits[:, ID_DIGITS:].any(axis=1)
    return None if good.all() else int(np.argmin(good))


def not_an_id(where: str, image: str, hint: str) -> utils.RunError:
    """The error for an image id that is not GLDv2's: joined to train/, it could name any file."""
    return utils.RunError(f'{where}: image id {image!r} is not a GLDv2 id (16 lowercase hexadecimal digits); fix the '
                          f'row, or {hint}')


def landmark_images(root: str, clean: bool) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(the CSV's path, image ids (bytes), their landmark ids, the line of each) of `root/train_clean.csv`
    (landmark_id, images) or of `root/train.csv` (id, url, landmark_id); a CSV without rows, a repeated image id, an
    id not of 16 hexadecimal digits (it names a file under train/) or a landmark id that is not an integer in
    0..2^63-1 stops, with its line."""
    path = os.path.join(root, 'train_clean.csv' if clean else 'train.csv')
    hint = 'give --train_root the directory of the GLDv2 files as they are downloaded'
    ids, landmarks, lines, rows = [], [], [], 0
    for line, (landmark, images) in csv_rows(path, ('landmark_id', 'images' if clean else 'id'), hint):
        try:
            landmark = int(landmark)
        except ValueError:
            raise utils.RunError(f'{path}:{line}: landmark_id {landmark!r} is not an integer') from None
        if problem := range_problem(landmark):
            raise utils.RunError(f"{path}:{line}: landmark_id {landmark} {problem} (GLDv2's are 0 or more, held as "
                                 'int64); fix the row, or download the file again')
        row_ids = images.split() if clean else [images]
        ids.extend(row_ids)
        landmarks.extend([landmark] * len(row_ids))
        lines.extend([line] * len(row_ids))
        rows += 1
    if not ids:
        raise utils.RunError(f'{path}: {"no rows after its header" if not rows else "its rows name no image"}; {hint}')
    lines = np.asarray(lines, dtype=np.int64)
    try:
        ids = np.asarray(ids, dtype='S')  # bytes: a quarter of the memory of text, sorted in C
    except UnicodeEncodeError:
        row = next(row for row, image in enumerate(ids) if not image.isascii())
        raise not_an_id(f'{path}:{lines[row]}', ids[row], hint) from None
    row = first_bad_id(ids)
    if row is not None:
        raise not_an_id(f'{path}:{lines[row]}', ids[row].decode(), hint)
    repeat = first_repeat(ids)
    if repeat:
        raise utils.RunError(f'{path}:{lines[repeat[0]]}: image {ids[repeat[0]].decode()} again (first at line '
                             f'{lines[repeat[1]]}); {hint}')
    return path, ids, np.asarray(landmarks, dtype=np.int64), lines


def read_landmark_list(path: str) -> set[int]:
    """Landmark ids, one a line (or separated by commas or spaces; '#' starts a comment), each in 0..2^63-1; a file
    that is not UTF-8 text stops, naming its line."""
    with open(path, 'rb') as handle:
        data = handle.read()
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as error:
        line = data.count(b'\n', 0, error.start) + 1
        raise utils.RunError(f'{path}:{line}: not UTF-8 text (byte {data[error.start]:#x}); save it as UTF-8') from None
    landmarks = set()
    for line, words in enumerate(text.split('\n'), start=1):
        for word in words.split('#', 1)[0].replace(',', ' ').split():
            try:
                landmark = int(word)
            except ValueError:
                raise utils.RunError(f'{path}:{line}: {word!r} is not a landmark id (an integer)') from None
            if problem := range_problem(landmark):
                raise utils.RunError(f'{path}:{line}: {word} {problem}; landmark ids (and labels) are 0..2^63-1: fix '
                                     'the line')
            landmarks.add(landmark)
    return landmarks


def _shard_stamp(shard: str) -> list[int]:
    """[size, modification time in ns] of a shard; a dangling link, or a shard that is no file, stops in one line."""
    try:
        status = os.stat(shard)
    except OSError as error:
        if os.path.islink(shard):
            raise utils.RunError(f'{shard}: a link to {os.readlink(shard)}, which does not exist; put the shard '
                                 'there, or remove the link') from None
        raise utils.RunError(f'{shard}: cannot be read ({error.strerror}); download it again') from None
    if not stat.S_ISREG(status.st_mode):
        raise utils.RunError(f'{shard}: not a file; remove it (the shards are the images_NNN.tar files)')
    return [status.st_size, status.st_mtime_ns]


def _headers_digest(shard: str, offsets: np.ndarray) -> np.ndarray:
    """SHA-256 of the tar header blocks just before the bytes of a spread of members (first, last, HEADERS_CHECKED
    in all, in the shard's order): read back in a few reads, they tie an index part to the shard's contents."""
    rows = np.unique(np.linspace(0, len(offsets) - 1, min(len(offsets), HEADERS_CHECKED)).round().astype(np.int64))
    digest = hashlib.sha256()
    with open(shard, 'rb') as handle:
        for offset in offsets[rows].tolist():
            handle.seek(max(0, offset - tarfile.BLOCKSIZE))
            digest.update(handle.read(tarfile.BLOCKSIZE))
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _same_headers(part: dict | None, shard: str) -> bool:
    """Whether an index part read back holds the header digest of `shard` as it is now (a part of another shard, or
    of this one before it was packed again, does not)."""
    try:
        return part is not None and np.array_equal(part['headers'], _headers_digest(shard, part['offsets']))
    except (KeyError, OSError, ValueError, IndexError):  # a part of an earlier version, or damaged: made again
        return False


def _ready_to_write(index_dir: str):
    """Make the index directory; a file there, or a directory that cannot be made or written, stops in one line."""
    fix = 'give --shard_index a directory you can write'
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise utils.RunError(f'{index_dir}: a file, where the shard index directory should be; {fix}')
    try:
        os.makedirs(index_dir, exist_ok=True)
    except OSError as error:
        raise utils.RunError(f'{index_dir}: cannot make the shard index directory ({error.strerror}); {fix}') from None
    if not os.access(index_dir, os.W_OK):
        raise utils.RunError(f'{index_dir}: cannot write the shard index there (a read-only directory); {fix}')


def _scan_shard(path: str, stamp: list[int]) -> dict:
    """{'ids', 'offsets', 'sizes', 'stamp', 'headers'} of a shard's JPEG members; a damaged or truncated shard stops,
    naming the member."""
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
    offsets = np.asarray(offsets, dtype=np.int64)
    return {'ids': np.asarray(ids, dtype='S'), 'offsets': offsets, 'sizes': np.asarray(sizes, dtype=np.int64),
            'stamp': np.asarray(stamp), 'headers': _headers_digest(path, offsets)}


def shard_index(shards: list[str], index_dir: str, logger, rescan: bool = False) -> dict:
    """{'ids' (sorted), 'shard', 'offsets', 'sizes', 'read_back': how many parts were not scanned} of every member of
    `shards`: each shard's part read from `index_dir` when the shard's size, time and a spread of its members' headers
    are those it was made from (and not `rescan`), else scanned and written there; an image in two shards stops."""
    parts, scanned, begun = [], 0, time.perf_counter()
    for number, shard in enumerate(shards):
        stamp = _shard_stamp(shard)
        path = os.path.join(index_dir, os.path.basename(shard) + '.npz')
        part = None
        try:  # an index part made from this very shard; one missing or damaged is made again
            with np.load(path) as saved:
                part = {key: saved[key] for key in saved.files} if saved['stamp'].tolist() == stamp else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            part = None
        if rescan or not _same_headers(part, shard):
            if not scanned:
                _ready_to_write(index_dir)
            part, scanned = _scan_shard(shard, stamp), scanned + 1
            utils.write_atomically(path, lambda file, part=part: np.savez(file, **part))
        parts.append(dict(part, shard=np.full(len(part['ids']), number, dtype=np.int32)))
    if scanned:
        logger.info(f'indexed {scanned} of {len(shards)} shards in {time.perf_counter() - begun:.1f} s ({index_dir})')
    index = {key: np.concatenate([part[key] for part in parts]) for key in ('ids', 'shard', 'offsets', 'sizes')}
    order = np.argsort(index['ids'], kind='stable')
    index = {key: value[order] for key, value in index.items()}
    repeats = np.flatnonzero(index['ids'][1:] == index['ids'][:-1])
    if len(repeats) and scanned < len(shards):  # a part read back may be stale: the shards themselves decide
        return shard_index(shards, index_dir, logger, rescan=True)
    if len(repeats):
        image, first, second = index['ids'][repeats[0]].decode(), *index['shard'][[repeats[0], repeats[0] + 1]]
        raise utils.RunError(f'image {image} is in two shards, {shards[first]} and {shards[second]}: one copy would be '
                             'read, the other never; remove the shard (or member) that does not belong there')
    return dict(index, read_back=len(shards) - scanned)


def index_shards_of(root: str, index_dir: str, logger):
    """Make (or bring up to date) the index of `root/train`'s shards, if it has any: rank 0 does, before the others
    read it."""
    shards = sorted(glob.glob(os.path.join(root, 'train', SHARDS)))
    if shards:
        shard_index(shards, index_dir, logger)


def _positions(index: dict, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each id's row in the index, the rows of the ids it does not hold)."""
    if not len(index['ids']):
        return np.zeros(len(ids), dtype=np.int64), np.arange(len(ids))
    found = np.minimum(np.searchsorted(index['ids'], ids), len(index['ids']) - 1)
    return found, np.flatnonzero(index['ids'][found] != ids)


def image_paths(root: str, ids: np.ndarray, where, index_dir: str, logger) -> list[str]:
    """Where each image (id bytes) is: `root/train/a/b/c/<id>.jpg`, or with shards in `root/train/` their member in
    place; an id in no shard stops, `where(row)` naming its line."""
    shards = sorted(glob.glob(os.path.join(root, 'train', SHARDS)))
    if not shards:
        return [os.path.join(root, 'train', image[0], image[1], image[2], f'{image}.jpg')
                for image in (image.decode() for image in ids.tolist())]
    index = shard_index(shards, index_dir, logger)
    found, missing = _positions(index, ids)
    if len(missing) and index['read_back']:  # never call shards missing from a stale index: they are read again
        logger.info(f'{len(missing)} images in no shard the index in {index_dir} holds: indexing the shards again')
        index = shard_index(shards, index_dir, logger, rescan=True)
        found, missing = _positions(index, ids)
    if not len(index['ids']):
        raise utils.RunError(f'{root}/train: its {len(shards)} shards hold no .jpg member; download them again')
    if len(missing):
        row, more = int(missing[0]), f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise utils.RunError(f'{where(row)}: image {ids[row].decode()} is in no shard of {root}/train ({len(shards)} '
                             f'shards indexed){more}; download the missing shards, or remove the rows')
    return [f'{shards[shard]}{datasets.SHARD_MEMBER}{offset}:{size}' for shard, offset, size in
            zip(index['shard'][found].tolist(), index['offsets'][found].tolist(), index['sizes'][found].tolist())]


def class_map(landmarks: np.ndarray, saved_path: str | None) -> dict[int, int]:
    """landmark id -> class: the run's saved map (`saved_path`, a resume), else the landmarks in increasing order."""
    if saved_path and os.path.isfile(saved_path):
        return saved_class_map(saved_path)
    return {int(landmark): label for label, landmark in enumerate(np.unique(landmarks).tolist())}


def saved_class_map(path: str) -> dict[int, int]:
    """The map write_class_map wrote: a JSON object of landmark ids to classes 0..N-1, one class each; anything else
    (truncated, a key given twice, two landmarks on a class) stops naming the file, never merged into another map."""
    fix = "put back the run's own file, or give another --suffix to start a new run"

    def object_without_repeats(pairs):  # json would keep the last of a repeated key, silently
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            raise utils.RunError(f'{path}: landmark {next(key for key in keys if keys.count(key) > 1)} appears twice; '
                                 f'{fix}')
        return dict(pairs)
    try:
        with open(path, encoding='utf-8') as handle:
            saved = json.load(handle, object_pairs_hook=object_without_repeats)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise utils.RunError(f'{path}: not JSON ({utils.first_line(error)}); {fix}') from None
    if not isinstance(saved, dict):
        raise utils.RunError(f'{path}: not a JSON object of landmark ids to classes (a {type(saved).__name__}); {fix}')
    owners = {}
    for key, label in saved.items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key and not range_problem(int(key))):
            raise utils.RunError(f'{path}: key {key!r} is not a landmark id (0..2^63-1 in decimal); {fix}')
        if type(label) is not int:  # a bool or a float is no class
            raise utils.RunError(f'{path}: landmark {key} has class {label!r}, not an integer; {fix}')
        if not 0 <= label < len(saved):
            raise utils.RunError(f'{path}: landmark {key} has class {label}, outside 0..{len(saved) - 1} (one class '
                                 f'each); {fix}')
        if label in owners:
            raise utils.RunError(f'{path}: landmarks {owners[label]} and {key} both have class {label}; {fix}')
        owners[label] = key
    return {int(landmark): label for landmark, label in saved.items()}


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
    keeps the map it began with, which must name every landmark of the CSV."""
    path, ids, landmarks, lines = landmark_images(root, clean)
    map_path = os.path.join(run_dir, CLASS_MAP_NAME)
    classes = class_map(landmarks, map_path if resumed else None)
    unknown = np.flatnonzero(~np.isin(landmarks, np.fromiter(classes, dtype=np.int64, count=len(classes))))
    if len(unknown):  # every landmark of the CSV, excluded or not: the map is the run's whole
        raise utils.RunError(f'{path}:{lines[unknown[0]]}: landmark {landmarks[unknown[0]]} is not in this run\'s '
                             f'{CLASS_MAP_NAME} ({map_path}): the CSV changed since the run began, or the map was '
                             "edited; put back the run's own map, or give another --suffix to start a new run")
    if excluded:
        kept = ~np.isin(landmarks, np.asarray(sorted(excluded), dtype=np.int64))
        logger.info(f'--exclude_landmarks: {len(np.unique(landmarks[~kept]))} landmarks, {int((~kept).sum())} images '
                    'left out of training')
        ids, landmarks, lines = ids[kept], landmarks[kept], lines[kept]
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
