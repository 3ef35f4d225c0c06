"""Features computed once and kept: the teacher cache (with its pre-pass and checks) and the benchmarks' features."""
import concurrent.futures
import fcntl
import functools
import json
import os
import shutil
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

import datasets
import model
import precision
import utils


# the most a features file's .npy header takes (NumPy pads it to a multiple of 64 bytes)
NPY_HEADER_BYTES = 4096


class FeatureStore:
    """`features.npy` (views x images x feature, memory-mapped), `manifest.json` (`identity`, and once complete the
    checksum) and `stamps.npy` (each image's size and modification time, `images` naming them) in a directory. NaN
    marks a row not yet computed: a killed computation continues where it stopped. Rows whose image changed on disk
    since it was read are the rows `changed_rows` names."""

    def __init__(self, directory: str, identity: dict, shape: tuple[int, int, int], dtype: str = 'float32',
                 images: list[str] | None = None):
        self.directory, self.identity, self.shape, self.dtype = directory, identity, tuple(shape), dtype
        self.path, self.manifest_path, self.stamps_path = (
            os.path.join(directory, name) for name in ('features.npy', 'manifest.json', 'stamps.npy'))
        self.images, self._stamps = images, None

    def manifest(self) -> dict | None:
        try:
            with open(self.manifest_path, encoding='utf-8') as handle:
                manifest = json.load(handle)
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def differences(self, manifest: dict) -> list[str]:
        """What the stored features were computed for that this run differs in."""
        stored = manifest.get('identity', {})
        return [f'{name} {stored.get(name)!r} (this run: {value!r})' for name, value in self.identity.items()
                if stored.get(name) != value]

    def damage(self, manifest: dict) -> str | None:
        """Why the features file cannot be used as it is (missing, truncated, not the manifest's), or None."""
        try:
            array = np.load(self.path, mmap_mode='r')
        except (OSError, ValueError, EOFError) as error:
            return f'{self.path} does not load ({utils.first_line(error)})'
        if array.shape != self.shape or array.dtype != np.dtype(self.dtype):
            return f'{self.path} holds {array.shape} {array.dtype}, not {self.shape} {self.dtype}'
        if not manifest.get('complete'):
            return None  # NaN rows are the ones still to compute
        if manifest.get('crc32') != checksum(self.path):
            return f'{self.path} fails its checksum'
        return None if np.isfinite(array).all() else f'{self.path} holds values that are not finite'


    def stamps(self) -> np.ndarray:
        """(size, modification time in ns) of each of `images` now, (-1, -1) for one that is missing."""
        if self._stamps is None:
            with concurrent.futures.ThreadPoolExecutor(32) as pool:  # a shared file system answers many at once
                self._stamps = np.array(list(pool.map(_stamp, self.images or [], chunksize=256)), dtype=np.int64)
        return self._stamps

    def changed_rows(self) -> np.ndarray:
        """Images (row indices) that changed on disk since their rows were computed: every row without stamps."""
        if self.images is None:
            return np.zeros(0, dtype=np.int64)
        try:
            stored = np.load(self.stamps_path)
        except (OSError, ValueError, EOFError):
            stored = None
        if stored is None or stored.shape != self.stamps().shape:
            return np.arange(len(self.images))
        return np.nonzero((stored != self.stamps()).any(axis=1))[0]

    def whole(self) -> bool:
        """Whether the directory holds this store's features, complete, undamaged, of its images as they are."""
        manifest = self.manifest()
        return bool(manifest and manifest.get('complete') and not self.differences(manifest)
                    and not self.damage(manifest) and not len(self.changed_rows()))

    def create(self, features: np.ndarray | None = None):
        """A features file holding `features`, or NaN rows to fill (then the manifest says it is not complete); its
        space reserved at once, so that a full disk stops here rather than in a later write to the mapped file."""
        os.makedirs(self.directory, exist_ok=True)
        try:
            array = np.lib.format.open_memmap(self.path, mode='w+', dtype=self.dtype, shape=self.shape)
            with open(self.path, 'r+b') as handle:
                os.posix_fallocate(handle.fileno(), 0, os.path.getsize(self.path))
        except OSError:
            if os.path.exists(self.path):
                os.remove(self.path)  # no features file without its manifest
            raise
        array[:] = np.nan if features is None else features
        array.flush()
        self.save_stamps()
        self.complete(features is not None)

    def forget(self, rows: np.ndarray):
        """Mark `rows` (every view) as not computed and the store as not complete, with the images' stamps now."""
        self.complete(False)
        features = self.open(writable=True)
        features[:, rows] = np.nan
        features.flush()
        self.save_stamps()

    def save_stamps(self):
        if self.images is not None:
            utils.write_atomically(self.stamps_path, lambda file: np.save(file, self.stamps()))

    def complete(self, filled: bool = True):
        """Write the manifest; a filled file's with its checksum: from then on it is read, never written."""
        manifest = {'identity': self.identity, 'shape': list(self.shape), 'dtype': self.dtype, 'complete': filled}
        utils.write_json(dict(manifest, crc32=checksum(self.path)) if filled else manifest, self.manifest_path)

    def open(self, writable: bool = False) -> np.ndarray:
        return np.load(self.path, mmap_mode='r+' if writable else 'r')

    def hold(self, exclusive: bool) -> bool:
        """Mark the store as in use by this process (shared: waits while another process creates it) or take it
        for writing (exclusive: only while no other process holds it); whether that was granted. The mark lasts
        until `release_held` or the process's end."""
        if self.directory not in _HELD:
            os.makedirs(self.directory, exist_ok=True)
            _HELD[self.directory] = open(os.path.join(self.directory, 'in_use.lock'), 'a+b')
        try:
            fcntl.flock(_HELD[self.directory], fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            return False
        return True


# the stores this process holds (FeatureStore.hold), by directory
_HELD = {}


def release_held():
    """Let go of every store this process holds."""
    while _HELD:
        _HELD.popitem()[1].close()


def _stamp(path: str) -> tuple[int, int]:
    try:
        status = os.stat(datasets.image_file(path))  # a shard member: its shard's
    except OSError:
        return -1, -1
    return status.st_size, status.st_mtime_ns


def checksum(path: str, block_size: int = 1 << 24) -> int:
    """crc32 of a file's bytes, read `block_size` at a time."""
    return functools.reduce(lambda value, block: zlib.crc32(block, value), utils.file_blocks(path, block_size), 0)


def prepare_teacher_cache(cache: FeatureStore, *, rebuild: bool, rank: int, logger) -> bool:
    """Make the teacher cache ready to fill; whether rows remain to compute (on every process). Another run's cache
    stops the run unless `rebuild`; a damaged one is set up again; this run's is kept (a relaunch goes on), the rows
    of images changed on disk since computed again. Rank 0 marks the cache in use for as long as the run lasts:
    what another run trains from is never replaced or altered."""
    def decide() -> bool:
        try:
            return _prepare(cache, rebuild, logger)
        except OSError as error:
            raise utils.RunError(f'--teacher_cache {cache.directory}: {error.strerror or error}: give a writable '
                                 'directory with room for the cache') from None
    return utils.on_rank_zero(rank, decide)


def _prepare(cache: FeatureStore, rebuild: bool, logger) -> bool:
    if os.path.exists(cache.directory) and not os.path.isdir(cache.directory):
        raise utils.RunError(f'--teacher_cache {cache.directory} is a file: give a directory')
    cache.hold(exclusive=False)
    manifest = cache.manifest()
    foreign = cache.differences(manifest) if manifest is not None else []
    damage = cache.damage(manifest) if manifest is not None and not foreign else None  # reads the whole file
    if foreign and not rebuild:
        raise utils.RunError(f'{cache.directory} holds the teacher cache of another run: {"; ".join(foreign)}; '
                             'give another --teacher_cache directory, or --teacher_cache_rebuild to replace it')
    in_use = (f'{cache.directory} is in use by another run that trains from it, which would read features being '
              'rewritten: wait for that run to end, or give another --teacher_cache directory')
    if manifest is not None and not foreign and not damage:
        changed = cache.changed_rows()
        if len(changed):
            if not cache.hold(exclusive=True):
                raise utils.RunError(f'{len(changed)} training images changed on disk since the teacher cache was '
                                     f'computed, but {in_use}')
            logger.info(f'teacher cache: {len(changed)} images changed on disk since their features were computed '
                        f'(the first: {cache.images[changed[0]]}); computing their rows again')
            cache.forget(changed)
            cache.hold(exclusive=False)
            return True
        return not manifest.get('complete')
    if not cache.hold(exclusive=True):
        raise utils.RunError(in_use)
    if damage:
        logger.info(f'teacher cache damaged: {damage}; computing it again')
    size = int(np.prod(cache.shape)) * np.dtype(cache.dtype).itemsize + NPY_HEADER_BYTES
    free = shutil.disk_usage(cache.directory).free
    logger.info(f'teacher cache: {utils.size_text(size)} in {cache.path} ({utils.size_text(free)} free)')
    if size > free:
        raise utils.RunError(f'{cache.directory} has {utils.size_text(free)} free, too little for the teacher cache '
                             f'({utils.size_text(size)}): free space or give another --teacher_cache')
    cache.create()
    cache.hold(exclusive=False)
    return True


# the pre-pass computes a view's rows in chunks of this many images, each chunk one batch whose random draws (the
# train-mode teacher's stochastic depth) are seeded by (seed, view, chunk): the same features whatever the number of
# processes, the loader or an interruption. Large enough to keep a GPU (or the CPU at small sizes) busy.
CHUNK = 64


def draw_seed(seed: int, view: int, chunk: int) -> int:
    """The seed of the teacher's random draws for `chunk` (images CHUNK * chunk onwards) of `view`."""
    return ((seed * 1_000_003 + view) * 1_000_000_007 + chunk) % (1 << 63)


def chunk_keys(view: int, chunk: int, images: int) -> list[tuple[int, int]]:
    """The dataset keys (image, view) of a chunk."""
    return [(index, view) for index in range(chunk * CHUNK, min((chunk + 1) * CHUNK, images))]


@torch.no_grad()
def teacher_chunk(teacher_backbone, batch: dict, batch_transform, *, stochastic: bool, seed: int, device,
                  amp: str) -> torch.Tensor:
    """The teacher's float32 features of a chunk's batch: in train mode (stochastic depth, dropout; BatchNorm frozen)
    when `stochastic`, its random draws seeded by `seed` alone, else in eval mode."""
    images = batch_transform(batch['image'].to(device, non_blocking=True), train=True, lighting=batch.get('lighting'))
    model.set_stochastic(teacher_backbone, stochastic)
    # this device's generator alone, restored afterwards: the training's own random state is not touched
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.default_generator.manual_seed(seed)
        if device.type == 'cuda':
            torch.cuda.manual_seed(seed)
        with precision.autocast_context(device, amp):
            output = teacher_backbone(images).float()
    if not bool(torch.isfinite(output).all()):
        raise utils.RunError('the teacher gives non-finite features: check the teacher file and --amp')
    return output


@torch.no_grad()
def fill_teacher_cache(cache: FeatureStore, teacher_backbone, dataset, batch_transform, *, stochastic: bool,
                       seed: int, device, amp: str, num_workers: int, rank: int, world_size: int, logger):
    """Compute this process's share of the chunks with a missing (NaN) row, every view (`dataset` keyed by
    (index, view)), each chunk whole (see teacher_chunk); then the checksum."""
    features = cache.open(writable=True)
    views, images = cache.shape[:2]
    chunks = -(-images // CHUNK)
    first, last = chunks * rank // world_size, chunks * (rank + 1) // world_size
    # a row is written front to back: one whose first or last value is still NaN was not finished
    unfinished = np.zeros((views, chunks * CHUNK), dtype=bool)
    unfinished[:, :images] = np.isnan(features[:, :, 0]) | np.isnan(features[:, :, -1])
    unfinished = unfinished.reshape(views, chunks, CHUNK).any(axis=2)
    todo = [(view, chunk) for view in range(views) for chunk in range(first, last) if unfinished[view, chunk]]
    loader = datasets.make_loader(dataset, None, None, num_workers, drop_last=False,
                                  batches=[chunk_keys(view, chunk, images) for view, chunk in todo])
    begun, done = time.perf_counter(), 0
    bar = tqdm(loader, desc='teacher cache', disable=rank != 0, dynamic_ncols=True)
    for (view, chunk), batch in zip(todo, bar):
        output = teacher_chunk(teacher_backbone, batch, batch_transform, stochastic=stochastic,
                               seed=draw_seed(seed, view, chunk), device=device, amp=amp)
        features[view, chunk * CHUNK:chunk * CHUNK + len(output)] = output.cpu().numpy()
        done += len(output)
        bar.set_postfix(img_s=f'{done * world_size / max(time.perf_counter() - begun, 1e-9):.1f}')
    features.flush()
    del features
    utils.gather_messages([])  # every process has written its part
    utils.on_rank_zero(rank, cache.complete)
    logger.info(f'teacher cache complete: {cache.path} ({done} features computed by this process in '
                f'{time.perf_counter() - begun:.0f} s)')


@torch.no_grad()
def check_teacher_cache(cache: FeatureStore, teacher_backbone, dataset, batch_transform, *, stochastic: bool,
                        seed: int, device, amp: str):
    """Recompute one random stored chunk: a stale or foreign cache stops the run. It must agree to rounding when
    stored in float32 without autocast, else within float16 storage and bf16 arithmetic."""
    views, images = cache.shape[:2]
    generator = np.random.default_rng(seed)
    view, chunk = int(generator.integers(views)), int(generator.integers(-(-images // CHUNK)))
    keys = chunk_keys(view, chunk, images)
    batch = next(iter(datasets.make_loader(dataset, None, None, 0, drop_last=False, batches=[keys])))
    live = teacher_chunk(teacher_backbone, batch, batch_transform, stochastic=stochastic,
                         seed=draw_seed(seed, view, chunk), device=device, amp=amp).cpu()
    stored = torch.from_numpy(cache.open()[view, keys[0][0]:keys[-1][0] + 1].astype(np.float32))
    error = float(((live - stored).norm(dim=1) / live.norm(dim=1).clamp_min(1e-12)).max())
    tolerance = 1e-4 if cache.dtype == 'float32' and amp == 'none' else 5e-2
    if not error <= tolerance:
        raise utils.RunError(f'{cache.path}: the stored teacher features of view {view}, rows {keys[0][0]} to '
                             f"{keys[-1][0]} differ from the teacher's (relative error {error:.2g}): the cache is "
                             'stale or another teacher\'s; rerun with --teacher_cache_rebuild')
