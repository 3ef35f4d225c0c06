"""Features computed once and kept: the teacher cache (with its pre-pass and checks) and the benchmarks' features."""
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
import utils


class FeatureStore:
    """`features.npy` (views x images x feature, memory-mapped) and `manifest.json` (`identity`, and once complete the
    checksum) in a directory. NaN marks a row not yet computed: a killed computation continues where it stopped."""

    def __init__(self, directory: str, identity: dict, shape: tuple[int, int, int], dtype: str = 'float32'):
        self.directory, self.identity, self.shape, self.dtype = directory, identity, tuple(shape), dtype
        self.path, self.manifest_path = (os.path.join(directory, name) for name in ('features.npy', 'manifest.json'))

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
        except (OSError, ValueError) as error:
            return f'{self.path} does not load ({utils.first_line(error)})'
        if array.shape != self.shape or array.dtype != np.dtype(self.dtype):
            return f'{self.path} holds {array.shape} {array.dtype}, not {self.shape} {self.dtype}'
        altered = manifest.get('complete') and manifest.get('crc32') != checksum(self.path)
        return f'{self.path} fails its checksum' if altered else None

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
        self.complete(features is not None)

    def complete(self, filled: bool = True):
        """Write the manifest; a filled file's with its checksum: from then on it is read, never written."""
        manifest = {'identity': self.identity, 'shape': list(self.shape), 'dtype': self.dtype, 'complete': filled}
        utils.write_json(dict(manifest, crc32=checksum(self.path)) if filled else manifest, self.manifest_path)

    def open(self, writable: bool = False) -> np.ndarray:
        return np.load(self.path, mmap_mode='r+' if writable else 'r')


def checksum(path: str) -> int:
    """crc32 of a file's bytes."""
    return functools.reduce(lambda value, block: zlib.crc32(block, value), utils.file_blocks(path), 0)


def prepare_teacher_cache(cache: FeatureStore, *, rebuild: bool, rank: int, logger) -> bool:
    """Make the teacher cache ready to fill; whether rows remain to compute (on every process). Another run's cache
    stops the run unless `rebuild`; a damaged one is set up again; this run's is kept (a relaunch goes on)."""
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
    """Compute this process's missing (NaN) rows, every view (`dataset` keyed by (index, view)); then the checksum."""
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
    """Recompute a few random stored rows: a stale or foreign cache stops the run. They must agree to rounding when
    stored in float32 without autocast, else within float16 storage and bf16 arithmetic."""
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
