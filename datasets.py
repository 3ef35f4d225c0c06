"""The data: file lists and label maps, image decoding, the data set, its samplers and loaders, and the batch
transform that turns uint8 BGR batches into the network's input."""
import io
import itertools
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import RandomResizedCrop

import utils

# The original's normalisation and AlexNet-style PCA lighting, in BGR channel order (images are reversed to BGR
# before any float work, and the lighting noise is added after that reversal, as the original did).
PIXEL_MEAN_BGR = (0.406, 0.456, 0.485)
PIXEL_STD_BGR = (0.225, 0.224, 0.229)
LIGHTING_STD = 0.1
LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DCT_SCALES = (8, 4, 2)
# At start-up, a training list none of whose first images exists stops the run (see check_training_roots).
FIRST_IMAGES_CHECKED = 16
# A train sample whose image (and this many following ones) cannot be read stops the epoch.
MAX_REPLACEMENT_ATTEMPTS = 32
# Exceptions that mean "this file is not a readable image" rather than a bug in our code.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(slots=True)
class Sample:
    """One image of a file list; `origin` ('list_file:line') and `label_note` (how a training label was shifted or
    mapped) are for error messages."""
    path: str
    label: int
    fine_label: int
    origin: str = ''
    label_note: str = ''
    box: tuple[float, float, float, float] | None = None  # a benchmark query's region (left, top, right, bottom)


def _parse_integer(text: str, origin: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise utils.RunError(f"{origin}: {what} {text!r} is not an integer") from None


def read_list_file(list_path: str) -> list[tuple[str, int, int | None, str]]:
    """(relative_path, label, fine_label or None, 'file:line') per non-blank line of a tab-separated list
    `relative_path<TAB>name<TAB>label[<TAB>fine_label]`; a malformed line raises RunError 'file:line: reason'."""
    with open(list_path, 'rb') as handle:
        raw_lines = handle.read().removeprefix(b'\xef\xbb\xbf').split(b'\n')  # a byte-order mark is not in the path
    entries = []
    for line_number, raw_line in enumerate(raw_lines, start=1):
        origin = f"{list_path}:{line_number}"
        try:
            line = raw_line.decode('utf-8').rstrip('\r')
        except UnicodeDecodeError:
            raise utils.RunError(f"{origin}: line is not valid UTF-8; save the list as UTF-8") from None
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) not in (3, 4):
            raise utils.RunError(f"{origin}: expected 3 or 4 tab-separated fields "
                                 f"(relative_path, name, label[, fine_label]), found {len(fields)}")
        if not fields[0].strip():
            raise utils.RunError(f"{origin}: empty image path")
        label = _parse_integer(fields[2], origin, 'label')
        fine_label = _parse_integer(fields[3], origin, 'fine label') if len(fields) == 4 else None
        entries.append((fields[0], label, fine_label, origin))
    return entries


def load_label_map(path: str) -> dict[int, int]:
    """`label -> final_label` from a saved dict `label -> (final_label, score)` (or bare `label -> final_label`),
    written by torch.save, pickle.dump or numpy.save and read without running code (utils.load_plain_data)."""
    try:
        loaded = utils.load_plain_data(path)
    except Exception as error:  # any unreadable file becomes one clear message
        raise utils.RunError(f"{path}: cannot read the label map ({utils.first_line(error)}); save it as a dict "
                             f"label -> (final_label, score) of plain numbers with torch.save or pickle") from None
    if not isinstance(loaded, dict):
        raise utils.RunError(f"{path}: label map must be a dict label -> (final_label, score), "
                             f"found {type(loaded).__name__}")
    label_map = {}
    for key, value in loaded.items():
        final = value[0] if isinstance(value, (tuple, list)) and len(value) >= 1 else value
        if isinstance(final, torch.Tensor) and final.numel() == 1:
            final = final.item()
        if not isinstance(key, (int, np.integer)) or not isinstance(final, (int, np.integer)):
            raise utils.RunError(f"{path}: entry {key!r}: {value!r} is not integer label -> (final_label, score)")
        label_map[int(key)] = int(final)
    return label_map


def read_train_samples(roots: list[str], lists: list[str], label_map: str | None = None) -> tuple[list[Sample], int]:
    """(samples, largest final label + 1) of the training lists, each under its root. The labels of list k are
    shifted by the number of distinct labels in lists 0..k-1, then `label_map` maps those it holds; a fourth column
    is ignored (fine_label = label)."""
    if len(roots) != len(lists):
        raise utils.RunError(f"got {len(roots)} train roots but {len(lists)} train lists; "
                             f"give one --train_root per --train_list, in the same order")
    final_label_of = load_label_map(label_map) if label_map else {}
    samples, offset = [], 0
    for root, list_path in zip(roots, lists):
        entries, notes = read_list_file(list_path), {}  # one note a label, shared by its images: few labels
        for relative_path, label, _, origin in entries:
            final_label = final_label_of.get(label + offset, label + offset)
            if label not in notes:  # how the label became final_label, for messages ('' when it did not change)
                steps = ([f'+ {offset} for the labels of the lists before it'] if offset else []) + (
                    [f'mapped to {final_label} by --label_map {label_map}'] if label + offset in final_label_of else [])
                notes[label] = f"the list's label {label} " + ', '.join(steps) if steps else ''
            samples.append(Sample(os.path.join(root, relative_path), final_label, final_label, origin, notes[label]))
        offset += len({label for _, label, _, _ in entries})
    if not samples:
        raise utils.RunError(f"no training images in {', '.join(lists)}")
    num_classes = max(sample.label for sample in samples) + 1
    return samples, num_classes


def read_eval_samples(root: str, list_path: str) -> list[Sample]:
    """Read a val/test list; column 3 is the (coarse) label, optional column 4 the fine label, on every line or on
    none (a line without it would silently make its coarse label a fine one)."""
    entries = read_list_file(list_path)
    if not entries:
        raise utils.RunError(f"{list_path}: the list has no images")
    with_fine = entries[0][2] is not None
    for _, _, fine_label, origin in entries:
        if (fine_label is not None) != with_fine:
            raise utils.RunError(f"{origin}: {4 if fine_label is not None else 3} fields, where {entries[0][3]} has "
                                 f"{4 if with_fine else 3}: give every line a fine label (4th field) or none")
    return [Sample(os.path.join(root, relative_path), label, label if fine_label is None else fine_label, origin)
            for relative_path, label, fine_label, origin in entries]


def check_labels(samples, num_classes: int, source: str):
    """Raise RunError 'file:line: label 7 (how a training label got there) outside [0, 5)' at the first bad label."""
    for position, sample in enumerate(samples):
        if not 0 <= sample.label < num_classes:
            origin = sample.origin or f"{source}:{position + 1}"
            how = f' ({sample.label_note})' if sample.label_note else ''
            raise utils.RunError(f"{origin}: label {sample.label}{how} outside [0, {num_classes}); {source} must "
                                 f"use labels 0..{num_classes - 1} (check --num_classes, the list and any label map)")


def check_training_roots(samples):
    """Raise RunError when none of the first images of a training list exists: its --train_root is wrong (a few
    missing images are replaced during training, as unreadable ones are)."""
    by_list = {}
    for sample in samples:
        first = by_list.setdefault(sample.origin.rsplit(':', 1)[0], [])
        if len(first) < FIRST_IMAGES_CHECKED:
            first.append(sample.path)
    for list_path, first in by_list.items():
        if not any(image_exists(path) for path in first):
            raise utils.RunError(f"{list_path}: none of its first {len(first)} images exists (the first: {first[0]}); "
                                 "check its --train_root")


def draft_scale(crop_width: int, crop_height: int, img_size: int) -> int:
    """Largest JPEG DCT scale (8, 4, 2, else 1) keeping the crop at least img_size on both sides."""
    return next((scale for scale in DCT_SCALES if min(crop_width, crop_height) >= scale * img_size), 1)


def _bgr_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) BGR tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)[::-1]))


def _rgb(image: Image.Image) -> Image.Image:
    """The decoded image in RGB, without a copy when it already is. 16-bit images keep their full range (PIL's own
    conversion would clip them almost white); floating-point ones, whose range no file states, are refused."""
    image.load()
    if image.mode == 'F':
        raise ValueError('a floating-point image (32-bit float pixels): save it as an 8-bit image')
    if image.mode.startswith('I'):  # 16-bit grayscale ('I;16*') or 32-bit integer pixels ('I')
        pixels = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode='L')
    return image if image.mode == 'RGB' else image.convert('RGB')


SHARD_MEMBER = '::'  # an image read in place from a tar shard: `SHARD::OFFSET:SIZE` (gldv2.py names them)


def image_file(path: str) -> str:
    """The file that holds an image: the image's own, or its tar shard."""
    return path.split(SHARD_MEMBER, 1)[0]


def image_exists(path: str) -> bool:
    """Whether the image's file exists (for a shard member: whether the shard holds all of its bytes)."""
    if SHARD_MEMBER not in path:
        return os.path.isfile(path)
    offset, size = (int(part) for part in path.split(SHARD_MEMBER, 1)[1].split(':'))
    return os.path.isfile(image_file(path)) and os.path.getsize(image_file(path)) >= offset + size


def open_image(path: str) -> Image.Image:
    """PIL's image of a file, or of a shard member's bytes (read in place, no extraction)."""
    if SHARD_MEMBER not in path:
        return Image.open(path)
    offset, size = (int(part) for part in path.split(SHARD_MEMBER, 1)[1].split(':'))
    with open(image_file(path), 'rb') as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) < size:
        raise OSError(f'{image_file(path)} is truncated: the member at byte {offset} ends past the file')
    return Image.open(io.BytesIO(data))


def decode_eval_image(path: str, img_size: int, box=None) -> torch.Tensor:
    """Full decode, RGB, cropped to `box` (left, top, right, bottom) when one is given, bilinear (antialiased) resize
    to img_size x img_size, as uint8 BGR."""
    with open_image(path) as image:
        if box and not (box[0] < image.width and box[1] < image.height and box[2] > 0 and box[3] > 0):
            raise BoxOutsideImage(f'its bbx {tuple(box)} lies wholly outside the {image.width}x{image.height} image')
        rgb = _rgb(image)
        resized = (rgb.crop(box) if box else rgb).resize((img_size, img_size), Image.Resampling.BILINEAR)
    return _bgr_tensor(resized)


class BoxOutsideImage(ValueError):
    """A query's bbx covers none of its image (a crop would be black)."""


def decode_train_crop(path: str, img_size: int) -> torch.Tensor:
    """Random resized crop (torchvision's geometry and random draws) + horizontal flip, as uint8 BGR; a JPEG whose
    crop is at least 2x img_size on both sides is decoded at a reduced DCT scale (PIL draft mode)."""
    with open_image(path) as image:
        top, left, height, width = RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO))
        box = (left, top, left + width, top + height)
        full_width = image.width
        scale = draft_scale(width, height, img_size)
        drafted = image.draft('RGB', (image.width // scale, image.height // scale)) if scale > 1 else None
        rgb = _rgb(image)
        if drafted is None:
            # crop then resize, exactly as torchvision's RandomResizedCrop does on a PIL image
            crop = rgb.crop(box).resize((img_size, img_size), Image.Resampling.BILINEAR)
        else:
            # the reduced image's pixel k covers original pixels [k * reduction, (k + 1) * reduction)
            reduction = full_width / drafted[1][2]
            reduced_box = tuple(coordinate / reduction for coordinate in box)
            crop = rgb.resize((img_size, img_size), Image.Resampling.BILINEAR, box=reduced_box)
    if torch.rand(1).item() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _bgr_tensor(crop)


def decode_image(path: str, img_size: int, augment: bool, box=None) -> tuple[torch.Tensor, bool]:
    """(uint8 BGR image: a random resized crop and flip with `augment`, else the evaluation resize of the image or of
    its `box`; whether the file was truncated, then decoded with its missing part filled in as the original did)."""
    def decode():
        return decode_train_crop(path, img_size) if augment else decode_eval_image(path, img_size, box)
    try:
        return decode(), False
    except FileNotFoundError:
        raise
    except OSError:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        try:
            return decode(), True
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def image_problem(path: str, error: BaseException) -> str:
    """Short reason why `path` could not be read."""
    if isinstance(error, FileNotFoundError):
        return 'missing file'
    if SHARD_MEMBER not in path and os.path.isfile(path) and os.path.getsize(path) == 0:
        return 'empty file'
    if isinstance(error, Image.UnidentifiedImageError):
        return 'not a decodable image'
    if isinstance(error, BoxOutsideImage):
        return str(error)
    return f"cannot decode ({error})"


class PackedStrings:
    """Read-only list of strings in one bytes buffer: forked loader workers copy every page whose Python objects
    they touch (reference counts), so millions of path strings in a list would be copied into every worker."""

    def __init__(self, strings):
        encoded = [string.encode('utf-8') for string in strings]
        self.buffer = b''.join(encoded)
        self.ends = np.cumsum([len(item) for item in encoded], dtype=np.int64)

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, index: int) -> str:
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.buffer[start:int(self.ends[index])].decode('utf-8')


class ImageDataset(Dataset):
    """Images of a list as uint8 BGR tensors (float work is left to BatchTransform on the batch); an item is
    dict(image=uint8 (3, img_size, img_size), label, fine_label, index, bad, truncated: the path of a truncated file
    decoded with its missing part filled in, else '').
    train=True: an unreadable image is replaced by the next readable sample in list order (all of it returned) and
    'bad' lists each skipped 'path: reason', joined by '; '.
    train=False: an unreadable image gives a black image and 'bad' = 'path: reason (list:line); what to do', for
    the evaluation loop to stop every process with (raising in a loader worker would bury the message)."""

    def __init__(self, samples, img_size: int, train: bool, augment: bool, seed: int = 0,
                 teacher_features: str | None = None, views: int = 0):
        self.seed, self.img_size, self.train, self.augment = seed, img_size, train, augment and train
        # the teacher cache's features file, opened in each loader worker, and its number of views (see __getitem__)
        self.teacher_features, self._teacher_rows, self.views = teacher_features, None, views
        self.paths = PackedStrings([sample.path for sample in samples])
        self.origins = PackedStrings([sample.origin for sample in samples])
        self.labels = np.array([sample.label for sample in samples], dtype=np.int64)
        self.fine_labels = np.array([sample.fine_label for sample in samples], dtype=np.int64)
        self.boxes = {index: sample.box for index, sample in enumerate(samples) if sample.box}

    def __len__(self):
        return len(self.labels)

    def _item(self, index: int, image: torch.Tensor, truncated: bool, bad: str) -> dict:
        return dict(image=image, label=int(self.labels[index]), fine_label=int(self.fine_labels[index]),
                    index=index, bad=bad, truncated=self.paths[index] if truncated else '')

    def __getitem__(self, key) -> dict:
        """Item `key`: a sample index or (sample index, epoch); a training sample's draws are seeded by (seed, epoch,
        index). With `views` (a teacher cache's), epoch e draws view e mod views, its lighting included ('lighting'),
        so that the student sees exactly the image whose teacher feature was stored."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.views:
            epoch %= self.views
        if not self.train:
            path = self.paths[index]
            try:
                return self._item(index, *decode_image(path, self.img_size, self.augment, self.boxes.get(index)), '')
            except IMAGE_READ_ERRORS as error:
                blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
                return self._item(index, blank, False, f"{path}: {image_problem(path, error)} ({self.origins[index]}); "
                                                       "fix the file or remove it from the list")
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed (and never restore) a GPU's
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63))
            item = self._train_item(index)
            if self.views and self.augment:
                item['lighting'] = torch.randn(3) * LIGHTING_STD
        if self.teacher_features:
            item['teacher_feature'] = self.teacher_feature(index, epoch)
        return item

    def teacher_feature(self, index: int, view: int) -> torch.Tensor:
        """The cached teacher feature of sample `index` in `view` (the image the pre-pass decoded for it,
        replacement included), as float32."""
        if self._teacher_rows is None:
            self._teacher_rows = np.load(self.teacher_features, mmap_mode='r')
        return torch.from_numpy(self._teacher_rows[view, index].astype(np.float32))

    def _train_item(self, index: int) -> dict:
        problems = []
        for attempt in range(min(MAX_REPLACEMENT_ATTEMPTS, len(self))):
            candidate = (index + attempt) % len(self)
            path = self.paths[candidate]
            try:
                return self._item(candidate, *decode_image(path, self.img_size, self.augment), '; '.join(problems))
            except IMAGE_READ_ERRORS as error:
                problems.append(f"{path}: {image_problem(path, error)} ({self.origins[candidate]})")
        raise RuntimeError(f"{len(problems)} consecutive training images are unreadable, starting at "
                           f"{self.origins[index]}: {'; '.join(problems[:3])}; check --train_root")


def batch_messages(batch: dict, field: str) -> list[str]:
    """The non-empty messages of a batch's 'bad' or 'truncated' field (see ImageDataset)."""
    return [message for message in batch.get(field, ()) if message]


def report_truncated(paths, logger):
    """Say once a run of each truncated image that it was used; the original used them too."""
    for path in sorted(set(paths)):
        logger.once(f'truncated {path}',
                    f'truncated image (decoded with its missing part filled in, as the original did): {path}')


class ContiguousShardSampler(Sampler):
    """Indices [start, end) of this rank's contiguous shard: every index exactly once over all ranks."""

    def __init__(self, total: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise utils.RunError(f"rank {rank} outside [0, {world_size})")
        self.start, self.end = total * rank // world_size, total * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self):
        return self.end - self.start


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler yielding (sample index, epoch), the key of its augmentation draws (for workers that live
    across epochs), whose epoch can start after its first `skip` samples (an epoch resumed mid-way)."""

    def __init__(self, *arguments, **keywords):
        super().__init__(*arguments, **keywords)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return ((index, self.epoch) for index in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self):
        return self.num_samples - self.skip


def _ignore_interrupts(worker_id: int):
    # Ctrl-C reaches the whole process group: the training process stops cleanly, its workers must not die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(dataset, batch_size: int, num_workers: int, *, seed: int, rank: int, world_size: int
                       ) -> DataLoader:
    """Shuffled loader over this rank's part (set its sampler's epoch before each epoch): the order comes from
    (seed, epoch), each sample's augmentation from (seed, epoch, index), whatever the workers or a mid-epoch resume."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
    return make_loader(dataset, sampler, batch_size, num_workers, drop_last=True)


def build_eval_loader(dataset, batch_size: int, num_workers: int, rank: int, world_size: int) -> DataLoader:
    """Loader over this rank's contiguous shard, in list order, no padding (see utils.gather_in_order)."""
    return make_loader(dataset, ContiguousShardSampler(len(dataset), rank, world_size), batch_size, num_workers,
                       drop_last=False)


def make_loader(dataset, sampler, batch_size: int | None, num_workers: int, drop_last: bool,
                batches: list[list] | None = None) -> DataLoader:
    """The suite's loader: persistent workers that leave Ctrl-C to the main process, pinned memory on GPUs.
    `batches` (lists of keys) replaces `sampler` and `batch_size`."""
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=_ignore_interrupts if num_workers > 0 else None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      worker_init_fn=_ignore_interrupts if num_workers > 0 else None)


def read_checked_list(root: str | None, list_path: str | None, root_flag: str, rank: int = 0,
                      world_size: int = 1) -> list[Sample]:
    """The samples of a validation or test list (none without one), their images checked (check_images_exist)."""
    if not list_path:
        return []
    samples = read_eval_samples(root, list_path)
    check_images_exist(samples, root_flag, rank, world_size)
    return samples


def check_images_exist(samples, root_flag: str, rank: int, world_size: int):
    """Each process checks that the images of its own contiguous part exist (the part it evaluates); a missing one
    stops every process, named with its list line: 'list:line: path: no such image (and 3 more); fix ...'."""
    shard = ContiguousShardSampler(len(samples), rank, world_size)
    missing = [sample for sample in samples[shard.start:shard.end] if not image_exists(sample.path)]
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    utils.stop_if_any_process_failed([f"{missing[0].origin}: {missing[0].path}: no such image{more}; fix the list or "
                                      f"{root_flag}"] if missing else [])


class BatchTransform:
    """uint8 BGR batch (B, 3, H, W) -> float32 on its device: to [0, 1], PCA lighting noise when augment and train,
    then (x - mean) / std, in `memory_format` (channels_last for a channels-last ResNet12)."""

    def __init__(self, augment: bool, memory_format: torch.memory_format = torch.contiguous_format):
        self.augment, self.memory_format, self._constants = augment, memory_format, {}

    def _on(self, device: torch.device):
        if device not in self._constants:
            self._constants[device] = tuple(torch.tensor(values, dtype=torch.float32, device=device) for values in (
                PIXEL_MEAN_BGR, PIXEL_STD_BGR, LIGHTING_EIGENVALUES, LIGHTING_EIGENVECTORS))
        return self._constants[device]

    def lighting_noise(self, batch_size: int, device: torch.device, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3) per-image noise V @ (alpha * eigenvalues), alpha ~ N(0, LIGHTING_STD) drawn here unless given (the
        draws of a teacher cache's views come with their samples)."""
        _, _, eigenvalues, eigenvectors = self._on(device)
        if alpha is None:
            alpha = torch.randn(batch_size, 3, device=device) * LIGHTING_STD
        return (alpha.to(device) * eigenvalues) @ eigenvectors.T

    def __call__(self, images_uint8: torch.Tensor, train: bool, lighting: torch.Tensor | None = None) -> torch.Tensor:
        mean, std, _, _ = self._on(images_uint8.device)
        images = images_uint8.float().div_(255)
        if self.augment and train:
            images.add_(self.lighting_noise(images.shape[0], images.device, lighting)[:, :, None, None])
        return images.sub_(mean[:, None, None]).div_(std[:, None, None]).contiguous(memory_format=self.memory_format)
