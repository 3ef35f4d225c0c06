"""Shared helpers of LandMark_distill.

Sections: data (file lists, images, loaders, batch transforms, distributed gathering); synthetic
landmarks (a deterministic data set in the real format, for the demo and tests); model and optimizer
construction. `python helpers.py OUT_DIR` writes the synthetic set.
"""
import argparse
import contextlib
import copy
import itertools
import os
import pickle
import signal
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFile, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import RandomResizedCrop

import model as models


# ============================================================================================ data

# SPEC §4 constants, in BGR channel order (the images are reversed to BGR before any float work).
PIXEL_MEAN_BGR = (0.406, 0.456, 0.485)
PIXEL_STD_BGR = (0.225, 0.224, 0.229)
LIGHTING_STD = 0.1
LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DCT_SCALES = (8, 4, 2)
# A train sample whose image (and this many following ones) cannot be read stops the epoch.
MAX_REPLACEMENT_ATTEMPTS = 32
# Exceptions that mean "this file is not a readable image" rather than a bug in our code.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(slots=True)
class Sample:
    """One image of a file list: absolute path, (combined/mapped) label, fine-grained label.

    `origin` is 'list_file:line' of the line it came from, used in error messages.
    """
    path: str
    label: int
    fine_label: int
    origin: str = ''


class ImageReadError(RuntimeError):
    """An evaluation image that cannot be read (missing, empty or undecodable)."""


@contextlib.contextmanager
def _truncated_images_allowed():
    """Decode a truncated file as the original did (PIL's LOAD_TRUNCATED_IMAGES): the missing part is filled in."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _parse_integer(text: str, origin: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{origin}: {what} {text!r} is not an integer") from None


def read_list_file(list_path: str) -> list[tuple[str, int, int | None, str]]:
    """Parse a tab-separated list `relative_path<TAB>name<TAB>label[<TAB>fine_label]`.

    Returns (relative_path, label, fine_label or None, 'file:line') per non-blank line; raises
    ValueError 'file:line: reason' on a malformed line.
    """
    with open(list_path, 'rb') as handle:
        raw_lines = handle.read().split(b'\n')
    entries = []
    for line_number, raw_line in enumerate(raw_lines, start=1):
        origin = f"{list_path}:{line_number}"
        try:
            line = raw_line.decode('utf-8').rstrip('\r')
        except UnicodeDecodeError:
            raise ValueError(f"{origin}: line is not valid UTF-8; save the list as UTF-8") from None
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) not in (3, 4):
            raise ValueError(f"{origin}: expected 3 or 4 tab-separated fields "
                             f"(relative_path, name, label[, fine_label]), found {len(fields)}")
        if not fields[0].strip():
            raise ValueError(f"{origin}: empty image path")
        label = _parse_integer(fields[2], origin, 'label')
        fine_label = _parse_integer(fields[3], origin, 'fine label') if len(fields) == 4 else None
        entries.append((fields[0], label, fine_label, origin))
    return entries


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for plain python data (dict, tuple, int, float, str) and numpy scalars/arrays only."""
    ALLOWED_GLOBALS = {
        ('numpy', 'dtype'), ('numpy', 'ndarray'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a label map holds plain data only")
        return super().find_class(module, name)


def _load_plain_object(path: str):
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location='cpu', weights_only=True)
    with open(path, 'rb') as handle:
        if handle.read(6) != b'\x93NUMPY':
            handle.seek(0)
            return _PlainDataUnpickler(handle).load()
        handle.seek(0)
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        _, _, dtype = read_header(handle)
        if dtype.hasobject:
            loaded = _PlainDataUnpickler(handle).load()
        else:
            handle.seek(0)
            loaded = np.load(handle, allow_pickle=False)
        return loaded.item() if isinstance(loaded, np.ndarray) and loaded.shape == () else loaded


def load_label_map(path: str) -> dict[int, int]:
    """Read a saved dict `label -> (final_label, score)` and return `label -> final_label`.

    Accepted files, none of which can run code when read: `torch.save` (read with weights_only=True),
    a plain `pickle.dump`, or `numpy.save` of the dict; the pickled ones are read by an unpickler that
    refuses every class except numpy's scalar/array reconstruction. A bare `label -> final_label` value is
    also accepted.
    """
    try:
        loaded = _load_plain_object(path)
    except Exception as error:  # any unreadable file becomes one clear message
        raise ValueError(f"{path}: cannot read the label map ({models.first_line(error)}); save it as a dict "
                         f"label -> (final_label, score) of plain numbers with torch.save or pickle") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: label map must be a dict label -> (final_label, score), "
                         f"found {type(loaded).__name__}")
    label_map = {}
    for key, value in loaded.items():
        final = value[0] if isinstance(value, (tuple, list)) and len(value) >= 1 else value
        if isinstance(final, torch.Tensor) and final.numel() == 1:
            final = final.item()
        if not isinstance(key, (int, np.integer)) or not isinstance(final, (int, np.integer)):
            raise ValueError(f"{path}: entry {key!r}: {value!r} is not integer label -> (final_label, score)")
        label_map[int(key)] = int(final)
    return label_map


def read_train_samples(roots: list[str], lists: list[str], label_map: str | None = None
                       ) -> tuple[list[Sample], int]:
    """Read the training lists paired with their image roots; return (samples, num_classes).

    The labels of list k are shifted by the number of distinct labels in lists 0..k-1; `label_map`
    (see load_label_map) then maps combined labels to final ones, absent labels staying as they are.
    num_classes is the largest final label + 1. A fourth column is ignored (fine_label = label).
    """
    if len(roots) != len(lists):
        raise ValueError(f"got {len(roots)} train roots but {len(lists)} train lists; "
                         f"give one --train_root per --train_list, in the same order")
    final_label_of = load_label_map(label_map) if label_map else {}
    samples = []
    offset = 0
    for root, list_path in zip(roots, lists):
        entries = read_list_file(list_path)
        for relative_path, label, _, origin in entries:
            final_label = final_label_of.get(label + offset, label + offset)
            samples.append(Sample(os.path.join(root, relative_path), final_label, final_label, origin))
        offset += len({label for _, label, _, _ in entries})
    if not samples:
        raise ValueError(f"no training images in {', '.join(lists)}")
    num_classes = max(sample.label for sample in samples) + 1
    return samples, num_classes


def read_eval_samples(root: str, list_path: str) -> list[Sample]:
    """Read a val/test list; column 3 is the (coarse) label, optional column 4 the fine label."""
    samples = []
    for relative_path, label, fine_label, origin in read_list_file(list_path):
        samples.append(Sample(os.path.join(root, relative_path), label,
                              label if fine_label is None else fine_label, origin))
    if not samples:
        raise ValueError(f"{list_path}: the list has no images")
    return samples


def check_images_exist(samples, root_flag: str):
    """Raise ValueError 'list:line: path: no such image' naming the first listed image that is not a file."""
    missing = [sample for sample in samples if not os.path.isfile(sample.path)]
    if missing:
        more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise ValueError(f"{missing[0].origin}: {missing[0].path}: no such image{more}; fix the list or {root_flag}")


def check_labels(samples, num_classes: int, source: str):
    """Raise ValueError 'file:line: label 7 outside [0, 5)' for the first label outside [0, num_classes)."""
    for position, sample in enumerate(samples):
        if not 0 <= sample.label < num_classes:
            origin = sample.origin or f"{source}:{position + 1}"
            raise ValueError(f"{origin}: label {sample.label} outside [0, {num_classes}); "
                             f"{source} must use labels 0..{num_classes - 1} (check --num_classes and the list)")


def draft_scale(crop_width: int, crop_height: int, img_size: int) -> int:
    """Largest JPEG DCT scale (8, 4, 2, else 1) keeping the crop at least img_size on both sides."""
    for scale in DCT_SCALES:
        if crop_width >= scale * img_size and crop_height >= scale * img_size:
            return scale
    return 1


def _bgr_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) BGR tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)[::-1]))


def _rgb(image: Image.Image) -> Image.Image:
    """The decoded image in RGB, without a copy when it already is."""
    image.load()
    return image if image.mode == 'RGB' else image.convert('RGB')


def decode_eval_image(path: str, img_size: int) -> torch.Tensor:
    """Full decode, RGB, bilinear (antialiased) resize to img_size x img_size, as uint8 BGR."""
    with Image.open(path) as image:
        resized = _rgb(image).resize((img_size, img_size), Image.Resampling.BILINEAR)
    return _bgr_tensor(resized)


def decode_train_crop(path: str, img_size: int) -> torch.Tensor:
    """Random resized crop (torchvision's geometry and random draws) + horizontal flip, as uint8 BGR.

    A JPEG whose crop is at least 2x img_size on both sides is decoded at a reduced DCT scale
    (PIL draft mode), the crop box mapped into the reduced image.
    """
    with Image.open(path) as image:
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


def image_problem(path: str, error: BaseException) -> str:
    """Short reason why `path` could not be read."""
    if isinstance(error, FileNotFoundError):
        return 'missing file'
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return 'empty file'
    if isinstance(error, Image.UnidentifiedImageError):
        return 'not a decodable image'
    return f"cannot decode ({error})"


class PackedStrings:
    """Read-only list of strings held in one bytes buffer.

    DataLoader workers forked from the main process copy every memory page whose Python objects they
    touch (reference counts); millions of path strings in a list would be copied into every worker.
    """

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
    """Images of a list as uint8 BGR tensors; float work is left to BatchTransform on the batch.

    Item: dict(image=uint8 (3, img_size, img_size) BGR, label, fine_label, index, bad, truncated).
    A truncated file is decoded as the original decoded it, the missing part filled in; 'truncated' then names
    its path (else '').
    train=True: an unreadable image is replaced by the next readable sample in list order (its image,
    labels and index are returned) and 'bad' lists each skipped 'path: reason', joined by '; '.
    train=False: an unreadable image gives a black image and 'bad' = 'path: reason (list:line); what to do', for
    the evaluation loop to stop every process with (raising in a loader worker would bury the message).
    augment (train only): random resized crop + flip; otherwise the evaluation resize.
    The samples are stored packed (see PackedStrings); `sample(index)` gives one back.
    """

    def __init__(self, samples, img_size: int, train: bool, augment: bool, seed: int = 0):
        self.seed = seed
        self.paths = PackedStrings([sample.path for sample in samples])
        self.origins = PackedStrings([sample.origin for sample in samples])
        self.labels = np.array([sample.label for sample in samples], dtype=np.int64)
        self.fine_labels = np.array([sample.fine_label for sample in samples], dtype=np.int64)
        self.img_size = img_size
        self.train = train
        self.augment = augment and train

    def __len__(self):
        return len(self.labels)

    def sample(self, index: int) -> Sample:
        """The Sample at `index` (path, label, fine label, origin)."""
        return Sample(self.paths[index], int(self.labels[index]), int(self.fine_labels[index]),
                      self.origins[index])

    def _decode_once(self, path: str) -> torch.Tensor:
        if self.augment:
            return decode_train_crop(path, self.img_size)
        return decode_eval_image(path, self.img_size)

    def _decode(self, path: str) -> tuple[torch.Tensor, bool]:
        """(image, whether the file was truncated and decoded with its missing part filled in)."""
        try:
            return self._decode_once(path), False
        except FileNotFoundError:
            raise
        except OSError:
            # the original decoded every file with PIL's LOAD_TRUNCATED_IMAGES; retry as it did
            with _truncated_images_allowed():
                return self._decode_once(path), True

    def _item(self, index: int, image: torch.Tensor, truncated: bool, bad: str) -> dict:
        return dict(image=image, label=int(self.labels[index]), fine_label=int(self.fine_labels[index]),
                    index=index, bad=bad, truncated=self.paths[index] if truncated else '')

    def __getitem__(self, key) -> dict:
        """Item `key`: a sample index, or (sample index, epoch) as the training sampler gives them; a training
        sample's augmentation draws come from a generator seeded by (seed, epoch, index)."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if not self.train:
            path = self.paths[index]
            try:
                return self._item(index, *self._decode(path), '')
            except IMAGE_READ_ERRORS as error:
                blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
                return self._item(index, blank, False, f"{path}: {image_problem(path, error)} "
                                                       f"({self.origins[index]}); fix the file or remove it from the list")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63))
            return self._train_item(index)

    def _train_item(self, index: int) -> dict:
        problems = []
        for attempt in range(min(MAX_REPLACEMENT_ATTEMPTS, len(self))):
            candidate = (index + attempt) % len(self)
            path = self.paths[candidate]
            try:
                return self._item(candidate, *self._decode(path), '; '.join(problems))
            except IMAGE_READ_ERRORS as error:
                problems.append(f"{path}: {image_problem(path, error)}")
        raise RuntimeError(f"{len(problems)} consecutive training images are unreadable, starting at "
                           f"{self.origins[index]}: {'; '.join(problems[:3])}; check --train_root")


class ContiguousShardSampler(Sampler):
    """Indices [start, end) of this rank's contiguous shard: every index exactly once over all ranks."""

    def __init__(self, total: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.start = total * rank // world_size
        self.end = total * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self):
        return self.end - self.start


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that yields (sample index, epoch), the key of the sample's augmentation draws (loader
    workers that live across epochs learn the epoch from it), and whose epoch can start after its first `skip`
    samples (an epoch resumed mid-way)."""

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
    # Ctrl-C reaches the whole process group: the training process stops cleanly, its loader workers must not
    # die under it first
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0):
    """Set the epoch of a training loader (its shuffle and augmentation draws), skipping its first batches."""
    loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)


def build_train_loader(dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int
                       ) -> DataLoader:
    """Shuffled, seeded loader over this rank's part; call start_epoch before each epoch.

    The order comes from (seed, epoch) and each sample's augmentation from (seed, epoch, sample index), so any
    number of workers, and an epoch resumed mid-way, draw exactly the same batches.
    """
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0,
                      worker_init_fn=_ignore_interrupts if num_workers > 0 else None)


def build_eval_loader(dataset, batch_size: int, num_workers: int, rank: int, world_size: int) -> DataLoader:
    """Loader over this rank's contiguous shard, in list order, no padding (see gather_in_order)."""
    sampler = ContiguousShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False, persistent_workers=num_workers > 0,
                      worker_init_fn=_ignore_interrupts if num_workers > 0 else None)


class BatchTransform:
    """uint8 BGR batch (B, 3, H, W) -> normalised float32 on the batch's device.

    to [0, 1], PCA lighting noise (SPEC §4) when augment and train, then (x - mean) / std, in
    `memory_format` (channels_last for a channels-last ResNet12).
    """

    def __init__(self, augment: bool, memory_format: torch.memory_format = torch.contiguous_format):
        self.augment = augment
        self.memory_format = memory_format
        self._constants = {}

    def _on(self, device: torch.device):
        if device not in self._constants:
            self._constants[device] = tuple(
                torch.tensor(values, dtype=torch.float32, device=device)
                for values in (PIXEL_MEAN_BGR, PIXEL_STD_BGR, LIGHTING_EIGENVALUES, LIGHTING_EIGENVECTORS))
        return self._constants[device]

    def lighting_noise(self, batch_size: int, device: torch.device, generator=None) -> torch.Tensor:
        """(B, 3) per-image noise V @ (alpha * eigenvalues), alpha ~ N(0, LIGHTING_STD)."""
        _, _, eigenvalues, eigenvectors = self._on(device)
        alpha = torch.randn(batch_size, 3, device=device, generator=generator) * LIGHTING_STD
        return (alpha * eigenvalues) @ eigenvectors.T

    def __call__(self, images_uint8: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        mean, std, _, _ = self._on(images_uint8.device)
        images = images_uint8.float().div_(255)
        if self.augment and train:
            images.add_(self.lighting_noise(images.shape[0], images.device, generator)[:, :, None, None])
        images = images.sub_(mean[:, None, None]).div_(std[:, None, None])
        return images.contiguous(memory_format=self.memory_format)


def gather_in_order(local_values: torch.Tensor, local_indices: torch.Tensor, total: int) -> torch.Tensor:
    """Collect every process's rows (all_gather when distributed) into a (total, ...) tensor in list order.

    Raises RuntimeError unless the indices over all processes are exactly 0..total-1 once each.
    """
    local_indices = local_indices.to(device=local_values.device, dtype=torch.long)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world_size = dist.get_world_size()
        count = torch.tensor([local_values.shape[0]], device=local_values.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count)
        counts = [int(value) for value in counts]
        longest = max(counts)
        padded_values = local_values.new_zeros((longest, *local_values.shape[1:]))
        padded_values[:local_values.shape[0]] = local_values
        padded_indices = local_indices.new_zeros(longest)
        padded_indices[:local_indices.shape[0]] = local_indices
        gathered_values = [torch.empty_like(padded_values) for _ in range(world_size)]
        gathered_indices = [torch.empty_like(padded_indices) for _ in range(world_size)]
        dist.all_gather(gathered_values, padded_values.contiguous())
        dist.all_gather(gathered_indices, padded_indices)
        values = torch.cat([part[:length] for part, length in zip(gathered_values, counts)])
        indices = torch.cat([part[:length] for part, length in zip(gathered_indices, counts)])
    else:
        values, indices = local_values, local_indices
    if indices.numel() != total or (indices.numel() and (
            indices.min() < 0 or indices.max() >= total or
            not bool((torch.bincount(indices, minlength=total) == 1).all()))):
        raise RuntimeError(f"gathered {indices.numel()} rows for {total} images with missing or repeated "
                           f"indices; every process must evaluate its own contiguous shard once")
    ordered = values.new_empty((total, *values.shape[1:]))
    ordered[indices] = values
    return ordered

# ============================================================================ synthetic landmarks
# Deterministic synthetic landmark data in the real list format (SPEC section 4).
#
# Each landmark is a procedural building: one to four blocks side by side on a plinth, each block with
# its own body colour from the landmark's palette, a roof shape (flat, gable, dome, spire, battlements)
# and a facade pattern (stripes, checks, diagonals, dots, window grid). Identity is carried by global
# cues (palette, silhouette, pattern type) so that features learnt on some landmarks transfer to unseen
# ones. Every view warps the landmark with a random perspective (viewpoint), scale and offset (crop),
# over a fresh background (sky, horizon, ground, distant clutter), adds occluders in front and changes
# the lighting (gain, tint, gamma, shading gradient, noise).
#
# Labels. train.txt and val.txt hold the training landmarks (label = landmark, val = other views).
# test.txt holds unseen landmarks, 10 views each. Some test landmarks come in twin pairs: two landmarks
# of one site that share palette, plinth and layout and differ in one block's roof and facade pattern.
# Column 3 (coarse) is the site, so it merges each twin pair; column 4 (fine) is the landmark, so it
# tells the twins apart, so fine verification has near-identical negative pairs that coarse verification
# counts as positives. Training landmarks contain such twins too, each one its own class, so that a
# model can learn the fine differences.
#
# Every random draw comes from a generator seeded by (seed, split, landmark, view), so the same seed
# gives the same bytes whatever the sizes of the other splits.

ROOF_TYPES = ('flat', 'gable', 'dome', 'spire', 'battlements')
PATTERN_TYPES = ('horizontal_stripes', 'vertical_stripes', 'checks', 'diagonals', 'dots', 'windows')
TWIN_PAIR_EVERY = 5          # one twin pair per this many landmarks, so pairs hold 40% of them
CANVAS_SCALE = 2             # the landmark is drawn at this multiple of image_size, then warped down
JPEG_QUALITY = 90
SPLIT_CODES = {'train': 1, 'test': 2}
TWIN_STREAM = 1              # generator keys of a twin: (seed, split, site, TWIN_STREAM)
VIEW_STREAM = 1 << 20        # generator keys of a view: (seed, split, landmark, VIEW_STREAM, view)


def _generator(*keys):
    """A numpy generator determined by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence([int(key) for key in keys]))


def _hsv_to_rgb(hue, saturation, value):
    """One colour from HSV in [0, 1] to an RGB tuple of ints."""
    rgb = Image.new('HSV', (1, 1), (int((hue % 1.0) * 255), int(saturation * 255), int(value * 255)))
    return rgb.convert('RGB').getpixel((0, 0))


def _random_palette(rng):
    """Four colours around two base hues: two body colours, a roof colour and a pattern colour."""
    base_hue = rng.uniform(0, 1)
    second_hue = base_hue + rng.choice([0.08, 0.33, 0.5, 0.67]) + rng.uniform(-0.04, 0.04)
    body = _hsv_to_rgb(base_hue, rng.uniform(0.35, 0.95), rng.uniform(0.55, 0.95))
    body_alternate = _hsv_to_rgb(base_hue + rng.uniform(-0.05, 0.05), rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.9))
    roof = _hsv_to_rgb(second_hue, rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.9))
    pattern_value = rng.choice([rng.uniform(0.05, 0.3), rng.uniform(0.85, 1.0)])
    pattern = _hsv_to_rgb(second_hue + 0.5, rng.uniform(0.0, 0.9), pattern_value)
    return {'body': body, 'body_alternate': body_alternate, 'roof': roof, 'pattern': pattern}


def _random_block(rng):
    """Parameters of one block of a landmark: size, body colour choice, roof and facade pattern."""
    return {
        'width_weight': rng.uniform(0.5, 1.5),
        'height': rng.uniform(0.25, 0.7),
        'alternate_body': bool(rng.random() < 0.35),
        'roof': ROOF_TYPES[rng.integers(len(ROOF_TYPES))],
        'roof_height': rng.uniform(0.1, 0.35),
        'pattern': PATTERN_TYPES[rng.integers(len(PATTERN_TYPES))],
        'pattern_period': rng.uniform(0.05, 0.14),
    }


def random_landmark(rng):
    """Parameters of one landmark scene, drawn from rng."""
    block_count = int(rng.integers(1, 5))
    blocks = [_random_block(rng) for _ in range(block_count)]
    if block_count > 1 and rng.random() < 0.5:
        half = blocks[:(block_count + 1) // 2]
        blocks = half + [dict(block) for block in reversed(half[:block_count // 2])]
    return {
        'palette': _random_palette(rng),
        'blocks': blocks,
        'plinth_height': rng.uniform(0.02, 0.1),
        'plinth_colour': _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.3, 0.8)),
        'width': rng.uniform(0.55, 0.95),
    }


def twin_landmark(landmark, rng):
    """A near-identical sibling: one block gets another roof and another facade pattern."""
    twin = dict(landmark, blocks=[dict(block) for block in landmark['blocks']])
    block = twin['blocks'][int(rng.integers(len(twin['blocks'])))]
    block['roof'] = rng.choice([roof for roof in ROOF_TYPES if roof != block['roof']])
    block['pattern'] = rng.choice([pattern for pattern in PATTERN_TYPES if pattern != block['pattern']])
    return twin


def _pattern_mask(pattern, width, height, period):
    """Boolean (height, width) facade pattern with the given period in pixels."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    if pattern == 'horizontal_stripes':
        return (rows / period) % 1.0 < 0.4
    if pattern == 'vertical_stripes':
        return (columns / period) % 1.0 < 0.4
    if pattern == 'checks':
        return ((rows // period) + (columns // period)) % 2 == 0
    if pattern == 'diagonals':
        return ((rows + columns) / (1.4 * period)) % 1.0 < 0.4
    if pattern == 'dots':
        offset_rows = (rows % period) - period / 2
        offset_columns = (columns % period) - period / 2
        return offset_rows ** 2 + offset_columns ** 2 < (0.3 * period) ** 2
    cell_rows = (rows - 0.3 * period) % (1.6 * period)
    cell_columns = (columns - 0.25 * period) % period
    inside = (cell_rows < period) & (cell_columns < 0.5 * period)
    return inside & (rows > 0.3 * period) & (rows < height - 0.3 * period)


def _draw_roof(draw, block, left, right, top, colour):
    """Draws the roof shape of a block whose body spans [left, right] from y=top downwards."""
    width = right - left
    height = block['roof_height'] * width * 1.5
    if block['roof'] == 'gable':
        draw.polygon([(left, top), (right, top), ((left + right) / 2, top - height)], fill=colour)
    elif block['roof'] == 'dome':
        draw.pieslice([left, top - height, right, top + height], 180, 360, fill=colour)
    elif block['roof'] == 'spire':
        middle = (left + right) / 2
        draw.polygon([(left + 0.2 * width, top), (right - 0.2 * width, top), (middle, top - 2.5 * height)],
                     fill=colour)
    elif block['roof'] == 'battlements':
        merlon_count = 5
        merlon_width = width / (2 * merlon_count - 1)
        for merlon in range(merlon_count):
            merlon_left = left + 2 * merlon * merlon_width
            draw.rectangle([merlon_left, top - 0.6 * height, merlon_left + merlon_width, top], fill=colour)


def render_landmark(landmark, canvas_size):
    """The landmark alone as an RGBA image (alpha 0 outside it), canvas_size pixels square."""
    canvas = Image.new('RGBA', (canvas_size, canvas_size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    palette = landmark['palette']
    total_width = landmark['width'] * canvas_size
    ground = canvas_size * 0.97
    plinth_top = ground - landmark['plinth_height'] * canvas_size
    left_edge = (canvas_size - total_width) / 2
    draw.rectangle([left_edge - 0.03 * canvas_size, plinth_top, left_edge + total_width + 0.03 * canvas_size, ground],
                   fill=landmark['plinth_colour'] + (255,))
    weights = np.array([block['width_weight'] for block in landmark['blocks']])
    edges = left_edge + np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * total_width
    facades = []
    for block, left, right in zip(landmark['blocks'], edges[:-1], edges[1:]):
        top = plinth_top - block['height'] * canvas_size
        body = palette['body_alternate'] if block['alternate_body'] else palette['body']
        draw.rectangle([left, top, right, plinth_top], fill=body + (255,))
        _draw_roof(draw, block, left, right, top, palette['roof'] + (255,))
        facades.append((block, int(round(left)), int(round(right)), int(round(top)), int(round(plinth_top))))
    pixels = np.array(canvas)
    for block, left, right, top, bottom in facades:
        inset = max(1, (right - left) // 12)
        region = pixels[top + inset:bottom - inset, left + inset:right - inset]
        if region.shape[0] < 2 or region.shape[1] < 2:
            continue
        period = max(3.0, block['pattern_period'] * canvas_size)
        mask = _pattern_mask(block['pattern'], region.shape[1], region.shape[0], period)
        region[mask, :3] = palette['pattern']
    return Image.fromarray(pixels, 'RGBA')


def _perspective_coefficients(output_points, input_points):
    """PIL PERSPECTIVE data mapping output pixel coordinates to input coordinates (4 point pairs)."""
    system = []
    targets = []
    for (x, y), (u, v) in zip(output_points, input_points):
        system.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        system.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        targets.extend([u, v])
    return np.linalg.solve(np.array(system, dtype=np.float64), np.array(targets, dtype=np.float64))


def _background(rng, size):
    """A fresh outdoor background: sky gradient, horizon, ground, distant clutter."""
    sky_hue = rng.uniform(0.5, 0.7) if rng.random() < 0.6 else rng.uniform(0, 1)
    sky_top = np.array(_hsv_to_rgb(sky_hue, rng.uniform(0.1, 0.7), rng.uniform(0.5, 1.0)), np.float32)
    sky_bottom = np.array(_hsv_to_rgb(sky_hue + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.4),
                                      rng.uniform(0.6, 1.0)), np.float32)
    ground_colour = np.array(_hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.7)),
                             np.float32)
    horizon = int(size * rng.uniform(0.55, 0.9))
    fraction = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    image = sky_top * (1 - fraction) + sky_bottom * fraction
    image[horizon:] = ground_colour
    pixels = np.repeat(image[:, None, :], size, axis=1).clip(0, 255).astype(np.uint8)
    background = Image.fromarray(pixels, 'RGB').convert('RGBA')
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(0, 5))):
        colour = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.2, 0.8)) + (255,)
        width = size * rng.uniform(0.05, 0.3)
        height = size * rng.uniform(0.05, 0.35)
        left = size * rng.uniform(-0.1, 1.0)
        if rng.random() < 0.5:
            draw.rectangle([left, horizon - height, left + width, horizon], fill=colour)
        else:
            draw.ellipse([left, horizon - height, left + width, horizon + 0.2 * height], fill=colour)
    return background


def _occlude(image, rng):
    """Draws up to two foreground occluders (people, cars, bushes) over half of the views."""
    size = image.size[0]
    draw = ImageDraw.Draw(image)
    occluder_count = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    for _ in range(occluder_count):
        colour = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.9)) + (255,)
        width = size * rng.uniform(0.06, 0.25)
        height = size * rng.uniform(0.1, 0.35)
        left = size * rng.uniform(-0.1, 1.0)
        bottom = size * rng.uniform(0.8, 1.1)
        if rng.random() < 0.5:
            draw.rounded_rectangle([left, bottom - height, left + width, bottom], radius=width / 3, fill=colour)
        else:
            draw.ellipse([left, bottom - height, left + width, bottom], fill=colour)


def _relight(image, rng):
    """Global gain, colour tint, gamma, a linear shading gradient and sensor noise."""
    size = image.shape[0]
    gamma_table = (np.arange(256, dtype=np.float32) / 255.0) ** rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    shading = 1.0 + rng.uniform(0, 0.4) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    pixels = np.take(gamma_table, image) * (shading[:, :, None] * gain) * 255
    noise_amplitude = int(rng.integers(0, 8))
    # uniform integer noise: as good as Gaussian here and several times cheaper to draw
    pixels += rng.integers(-noise_amplitude, noise_amplitude + 1, size=pixels.shape, dtype=np.int16)
    return (pixels.clip(0, 255) + 0.5).astype(np.uint8)


def render_view(landmark_image, rng, image_size):
    """One photograph of a rendered landmark: viewpoint, scale, crop, background, occlusion, lighting."""
    side = image_size * rng.uniform(0.8, 1.4)
    centre_x = image_size * (0.5 + rng.uniform(-0.15, 0.15))
    centre_y = image_size * (0.5 + rng.uniform(-0.1, 0.15))
    rotation = np.deg2rad(rng.uniform(-8, 8))
    yaw = rng.uniform(-0.3, 0.3)
    pitch = rng.uniform(-0.15, 0.15)
    unit_corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    # yaw shortens one vertical edge and pitch one horizontal edge, as seen from off-axis
    unit_corners[:, 1] *= 1 + yaw * np.sign(unit_corners[:, 0])
    unit_corners[:, 0] *= 1 + pitch * np.sign(unit_corners[:, 1])
    unit_corners[:, 0] *= rng.uniform(0.85, 1.15)
    unit_corners += rng.uniform(-0.05, 0.05, size=unit_corners.shape)
    rotation_matrix = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    output_corners = unit_corners @ rotation_matrix.T * side + [centre_x, centre_y]
    canvas_size = landmark_image.size[0]
    input_corners = [(0, 0), (canvas_size, 0), (canvas_size, canvas_size), (0, canvas_size)]
    coefficients = _perspective_coefficients(output_corners, input_corners)
    warped = landmark_image.transform((image_size, image_size), Image.Transform.PERSPECTIVE, tuple(coefficients),
                                      Image.Resampling.BILINEAR)
    view = Image.alpha_composite(_background(rng, image_size), warped)
    _occlude(view, rng)
    view = view.convert('RGB')
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return Image.fromarray(_relight(np.asarray(view), rng), 'RGB')


def _write_views(out_dir, relative_dir, landmark_image, rng_keys, view_indices, image_size):
    """Renders and saves the given views of one landmark; returns their relative paths."""
    os.makedirs(os.path.join(out_dir, relative_dir), exist_ok=True)
    relative_paths = []
    for view_index in view_indices:
        view = render_view(landmark_image, _generator(*rng_keys, view_index), image_size)
        relative_path = f'{relative_dir}/{view_index:02d}.jpg'
        view.save(os.path.join(out_dir, relative_path), format='JPEG', quality=JPEG_QUALITY)
        relative_paths.append(relative_path)
    return relative_paths


def _landmarks_with_twins(seed, split_code, count):
    """count landmarks of one split and the site of each: the first count // TWIN_PAIR_EVERY sites are twins."""
    twin_pair_count = count // TWIN_PAIR_EVERY
    landmarks = []
    sites = []
    site = 0
    while len(landmarks) < count:
        landmark = random_landmark(_generator(seed, split_code, site))
        landmarks.append(landmark)
        sites.append(site)
        if site < twin_pair_count and len(landmarks) < count:
            landmarks.append(twin_landmark(landmark, _generator(seed, split_code, site, TWIN_STREAM)))
            sites.append(site)
        site += 1
    return landmarks, sites


def _write_list(path, rows):
    """A UTF-8 tab-separated list, one row a line."""
    with open(path, 'w', encoding='utf-8', newline='\n') as list_file:
        for row in rows:
            list_file.write('\t'.join(str(field) for field in row) + '\n')


def make_synthetic_landmarks(out_dir, seed=0, num_train_landmarks=150, train_views=10, num_test_landmarks=50,
                             test_views=10, image_size=96, val_views=2):
    """Writes a synthetic landmark data set under out_dir and returns its lists.

    train.txt: `path<TAB>name<TAB>label`, num_train_landmarks landmarks x train_views views.
    val.txt: the same landmarks, val_views other views each, labels in the training label space.
    test.txt: `path<TAB>name<TAB>coarse<TAB>fine`, num_test_landmarks unseen landmarks x test_views views;
    coarse labels merge twin landmark pairs (sites), fine labels separate them.
    Returns {'root', 'train_list', 'val_list', 'test_list', 'num_classes'} (paths absolute).
    The same arguments always give byte-identical files.
    """
    if min(num_train_landmarks, train_views, num_test_landmarks, test_views) < 1 or val_views < 0:
        raise ValueError('make_synthetic_landmarks: landmark and view counts must be positive '
                         f'(got train {num_train_landmarks}x{train_views}, val views {val_views}, '
                         f'test {num_test_landmarks}x{test_views})')
    if seed < 0:
        raise ValueError(f'make_synthetic_landmarks: seed {seed} is negative; use a seed >= 0')
    if image_size < 16:
        raise ValueError(f'make_synthetic_landmarks: image_size {image_size} is too small; use 16 or more')
    out_dir = os.path.abspath(out_dir)
    canvas_size = CANVAS_SCALE * image_size
    train_rows, val_rows, test_rows = [], [], []
    train_landmarks, _ = _landmarks_with_twins(seed, SPLIT_CODES['train'], num_train_landmarks)
    for label, landmark in enumerate(train_landmarks):
        landmark_image = render_landmark(landmark, canvas_size)
        name = f'train_landmark_{label:04d}'
        keys = (seed, SPLIT_CODES['train'], label, VIEW_STREAM)
        paths = _write_views(out_dir, f'train/{label:04d}', landmark_image, keys, range(train_views), image_size)
        train_rows += [(path, name, label) for path in paths]
        paths = _write_views(out_dir, f'val/{label:04d}', landmark_image, keys,
                             range(train_views, train_views + val_views), image_size)
        val_rows += [(path, name, label) for path in paths]
    test_landmarks, sites = _landmarks_with_twins(seed, SPLIT_CODES['test'], num_test_landmarks)
    for fine_label, (landmark, site) in enumerate(zip(test_landmarks, sites)):
        landmark_image = render_landmark(landmark, canvas_size)
        name = f'test_site_{site:04d}_landmark_{fine_label:04d}'
        keys = (seed, SPLIT_CODES['test'], fine_label, VIEW_STREAM)
        paths = _write_views(out_dir, f'test/{fine_label:04d}', landmark_image, keys, range(test_views), image_size)
        test_rows += [(path, name, site, fine_label) for path in paths]
    lists = {'train_list': os.path.join(out_dir, 'train.txt'), 'val_list': os.path.join(out_dir, 'val.txt'),
             'test_list': os.path.join(out_dir, 'test.txt')}
    _write_list(lists['train_list'], train_rows)
    _write_list(lists['val_list'], val_rows)
    _write_list(lists['test_list'], test_rows)
    return dict(lists, root=out_dir, num_classes=len(train_landmarks))


# ============================================================================ model and optimizer
DEFAULT_NUM_CLASSES = 252903


def build_model(student_name: str, img_size: int, num_classes: int | None, student_weights: str | None,
                teacher_name: str | None, teacher_weights: str | None, head_fixed: bool,
                width_divisor: int = 1, grad_checkpointing: bool = False, channels_last: bool = False,
                init_head_from_teacher: bool = False, stochastic_teacher: bool = True,
                drop_block_schedule: str = 'published') -> models.DistillationModel:
    """The student (from `student_weights` when given) with its head, and the frozen teacher when distilling.

    With `head_fixed` the student's head IS the teacher's (one frozen copy in memory). Otherwise the student has
    its own trainable head: a fresh Xavier-initialised one (as the original), or a copy of the teacher's with
    `init_head_from_teacher`. `stochastic_teacher`: see models.DistillationModel.
    """
    teacher = None
    if teacher_name:
        teacher = models.load_classifier(teacher_name, teacher_weights, img_size, width_divisor)
        teacher_classes = teacher.head.weight.shape[0]
        if num_classes not in (None, teacher_classes):
            raise ValueError(f'--num_classes {num_classes} but the teacher {teacher_weights} classifies '
                             f'{teacher_classes} classes; drop --num_classes')
        num_classes = teacher_classes
    num_classes = num_classes or DEFAULT_NUM_CLASSES
    if student_weights:
        backbone = models.load_backbone(student_name, student_weights, img_size, width_divisor,
                                        drop_block_schedule).train()
    else:
        backbone = models.create_backbone(student_name, img_size, width_divisor, drop_block_schedule)
    if grad_checkpointing:
        if not hasattr(backbone, 'set_grad_checkpointing'):
            raise ValueError(f'--grad_checkpointing needs a Swin student, not {student_name}')
        backbone.set_grad_checkpointing(True)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if head_fixed:
        head = teacher.head
    elif teacher is not None and init_head_from_teacher:
        head = copy.deepcopy(teacher.head).requires_grad_(True)
    else:
        head = models.CosFaceHead(num_classes, backbone.feature_dim)
    return models.DistillationModel(models.Classifier(backbone, head), teacher, stochastic_teacher)


def parameter_report(distiller: models.DistillationModel) -> str:
    """'student para trainable/sum A/B; teacher para trainable/sum C/D' as record.txt has it."""
    def counts(module):
        if module is None:
            return 0, 0
        parameters = list(module.parameters())
        return (sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))
    student_trainable, student_total = counts(distiller.student)
    teacher_trainable, teacher_total = counts(distiller.teacher)
    return (f'student para trainable/sum {student_trainable}/{student_total}; '
            f'teacher para trainable/sum {teacher_trainable}/{teacher_total}')


def build_optimizer(name: str, parameters, lr: float, weight_decay: float, momentum: float = 0.0):
    """SGD (no momentum unless given, as the original), Adam or AdamW over the given parameters only."""
    parameters = list(parameters)
    if name == 'SGD':
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == 'Adam':
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == 'AdamW':
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f'unknown --optim {name!r}; choose SGD, Adam or AdamW')


def main(argv=None):
    """Command line: python helpers.py OUT_DIR [--seed 0 ...] writes the synthetic landmark set."""
    parser = argparse.ArgumentParser(description='Write a deterministic synthetic landmark data set.')
    parser.add_argument('out_dir')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num_train_landmarks', type=int, default=150)
    parser.add_argument('--train_views', type=int, default=10)
    parser.add_argument('--val_views', type=int, default=2)
    parser.add_argument('--num_test_landmarks', type=int, default=50)
    parser.add_argument('--test_views', type=int, default=10)
    parser.add_argument('--image_size', type=int, default=96)
    arguments = parser.parse_args(argv)
    result = make_synthetic_landmarks(arguments.out_dir, arguments.seed, arguments.num_train_landmarks,
                                      arguments.train_views, arguments.num_test_landmarks, arguments.test_views,
                                      arguments.image_size, arguments.val_views)
    print('\n'.join(f'{key}: {value}' for key, value in result.items()))


if __name__ == '__main__':
    main()
