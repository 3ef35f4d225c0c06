"""Features computed once and kept: the teacher cache (the teacher's feature of every training image, its pre-pass
and checks) and the benchmarks' saved features, on one store (features.npy, a manifest naming what they are of, and
a checksum)."""
import json
import os
import shutil
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

import datasets
import utils


class FeatureStore:
    """Features computed once and read many times: `features.npy` (views x images x feature, memory-mapped) in a
    directory, with `manifest.json` naming what they are of (`identity`) and, once complete, the file's checksum.

    A row not yet computed holds NaN, so that a computation killed half way continues where it stopped, and a
    row lost in a crash is computed again. Rank 0 alone writes the manifest.
    """
    MANIFEST = 'manifest.json'
    FEATURES = 'features.npy'

    def __init__(self, directory: str, identity: dict, shape: tuple[int, int, int], dtype: str = 'float32'):
        self.directory, self.identity, self.shape, self.dtype = directory, identity, tuple(shape), dtype
        self.path = os.path.join(directory, self.FEATURES)

    def manifest(self) -> dict | None:
        try:
            with open(os.path.join(self.directory, self.MANIFEST), encoding='utf-8') as handle:
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
        except (OSError, ValueError) as error:
            return f'{self.path} does not load ({utils.first_line(error)})'
        if array.shape != self.shape or array.dtype != np.dtype(self.dtype):
            return f'{self.path} holds {array.shape} {array.dtype}, not {self.shape} {self.dtype}'
        if manifest.get('complete') and manifest.get('crc32') != checksum(self.path):
            return f'{self.path} fails its checksum'
        return None

    def whole(self) -> bool:
        """Whether the directory holds this store's features, complete and undamaged."""
        manifest = self.manifest()
        return bool(manifest and manifest.get('complete') and not self.differences(manifest)
                    and not self.damage(manifest))

    def create(self, features: np.ndarray | None = None):
        """A features file holding `features`, or NaN rows to fill (then the manifest says it is not complete)."""
        os.makedirs(self.directory, exist_ok=True)
        array = np.lib.format.open_memmap(self.path, mode='w+', dtype=self.dtype, shape=self.shape)
        array[:] = np.nan if features is None else features
        array.flush()
        del array
        if features is None:
            self._write_manifest(complete=False)
        else:
            self.complete()

    def complete(self):
        """Record the checksum of the filled file: from now on it is read, never written."""
        self._write_manifest(complete=True, crc32=checksum(self.path))

    def _write_manifest(self, **state):
        utils.write_json(dict(identity=self.identity, shape=list(self.shape), dtype=self.dtype, **state),
                         os.path.join(self.directory, self.MANIFEST))

    def open(self, writable: bool = False) -> np.ndarray:
        return np.load(self.path, mmap_mode='r+' if writable else 'r')


def checksum(path: str) -> int:
    """crc32 of a file's bytes."""
    value = 0
    for block in utils.file_blocks(path):
        value = zlib.crc32(block, value)
    return value


def prepare_teacher_cache(cache: FeatureStore, *, rebuild: bool, rank: int, logger) -> bool:
    """Check the teacher cache's directory and make it ready to fill; whether rows remain to compute (the same on
    every process). A cache of another run stops in one line naming what differs (`rebuild` replaces it; a cache
    of this run is kept, so that a relaunched command does not compute it again); a damaged one is set up again."""
    def decide() -> bool:
        manifest = cache.manifest()
        foreign = cache.differences(manifest) if manifest is not None else []
        damage = cache.damage(manifest) if manifest is not None and not foreign else None  # reads the whole file
        if foreign and not rebuild:
            raise utils.RunError(f'{cache.directory} holds the teacher cache of another run: {"; ".join(foreign)}; '
                                 'give another --teacher_cache directory, or --teacher_cache_rebuild to replace it')
        if manifest is not None and not foreign and not damage:
            return not manifest.get('complete')
        if damage:
            logger.info(f'teacher cache damaged: {damage}; computing it again')
        size = int(np.prod(cache.shape)) * np.dtype(cache.dtype).itemsize
        os.makedirs(cache.directory, exist_ok=True)
        free = shutil.disk_usage(cache.directory).free
        logger.info(f'teacher cache: {size / 2 ** 30:.2f} GB in {cache.path} ({free / 2 ** 30:.1f} GB free)')
        if size > free:
            raise utils.RunError(f'{cache.directory} has {free / 2 ** 30:.1f} GB free, too little for the teacher '
                                 f'cache ({size / 2 ** 30:.2f} GB): free space or give another --teacher_cache')
        cache.create()
        return True
    return utils.on_rank_zero(rank, decide)


@torch.no_grad()
def fill_teacher_cache(cache: FeatureStore, teacher_backbone, dataset, batch_transform, *, device, amp: str,
                       batch_size: int, num_workers: int, rank: int, world_size: int, logger):
    """Compute the rows still missing (NaN) of this process's contiguous part of the training set, in every view,
    with the eval-mode teacher (each view's images as training draws them: `dataset` keyed by (index, view)),
    write them into the cache, and, once every process is done, record its checksum."""
    features = cache.open(writable=True)
    start, end = len(dataset) * rank // world_size, len(dataset) * (rank + 1) // world_size
    # a row is written front to back: one whose first or last value is still NaN was not finished
    unfinished = np.isnan(features[:, start:end, 0]) | np.isnan(features[:, start:end, -1])
    missing = [(int(index) + start, int(view)) for view, index in zip(*np.nonzero(unfinished))]
    teacher_backbone.eval()
    loader = datasets.make_loader(dataset, missing, batch_size, num_workers, drop_last=False)
    begun, done = time.perf_counter(), 0
    bar = tqdm(loader, desc='teacher cache', disable=rank != 0, dynamic_ncols=True)
    for position, batch in enumerate(bar):
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=True,
                                 lighting=batch.get('lighting'))
        with utils.autocast_context(device, amp):
            output = teacher_backbone(images).float()
        if not bool(torch.isfinite(output).all()):
            raise utils.RunError('the teacher gives non-finite features: check the teacher file and --amp')
        indices, views = zip(*missing[position * batch_size:position * batch_size + len(output)])
        features[list(views), list(indices)] = output.cpu().numpy()
        done += len(indices)
        bar.set_postfix(img_s=f'{done * world_size / max(time.perf_counter() - begun, 1e-9):.1f}')
    features.flush()
    del features
    utils.gather_messages([])  # every process has written its part
    utils.on_rank_zero(rank, cache.complete)
    logger.info(f'teacher cache complete: {cache.path}')


@torch.no_grad()
def check_teacher_cache(cache: FeatureStore, teacher_backbone, dataset, batch_transform, *, device, amp: str,
                        seed: int, rows: int = 4):
    """Recompute a few random stored rows with the teacher: a stale or foreign cache stops the run in one line.
    Stored in float32 without autocast the rows must agree to rounding; otherwise within the float16 storage and
    bf16 arithmetic."""
    generator = np.random.default_rng(seed)
    indices = sorted(generator.choice(cache.shape[1], size=min(rows, cache.shape[1]), replace=False).tolist())
    views = generator.integers(0, cache.shape[0], size=len(indices)).tolist()
    items = [dataset[(index, view)] for index, view in zip(indices, views)]
    images = torch.stack([item['image'] for item in items]).to(device)
    lighting = torch.stack([item['lighting'] for item in items]) if 'lighting' in items[0] else None
    teacher_backbone.eval()
    with utils.autocast_context(device, amp):
        live = teacher_backbone(batch_transform(images, train=True, lighting=lighting)).float().cpu()
    stored = torch.from_numpy(cache.open()[views, indices].astype(np.float32))
    error = float(((live - stored).norm(dim=1) / live.norm(dim=1).clamp_min(1e-12)).max())
    tolerance = 1e-4 if cache.dtype == 'float32' and amp == 'none' else 5e-2
    if not error <= tolerance:
        raise utils.RunError(f'{cache.path}: the stored teacher features of rows {indices} differ from the '
                             f"teacher's (relative error {error:.2g}): the cache is stale or another teacher's; "
                             'rerun with --teacher_cache_rebuild')
