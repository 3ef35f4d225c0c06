"""Atomic file writes, plain-data loading, the collectives, digests, and the one error a run stops with."""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as functional


class RunError(ValueError):
    """A problem the user must fix: its message is the one line main.py prints (once, on rank 0) before it exits."""


def set_aside(path: str) -> str:
    """Rename a damaged file to `<path>.damaged-<time>` (returned), so that it is kept but no longer read."""
    aside = f'{path}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
    os.replace(path, aside)
    return aside


def _json_ready(value):
    """NaN (an undefined figure) becomes null; numpy numbers and arrays become plain ones."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return int(value) if isinstance(value, np.integer) else value


def write_json(value, path: str):
    """`value` as JSON at `path`, written atomically (NaN as null)."""
    write_atomically(path, lambda file: file.write(json.dumps(_json_ready(value)).encode('utf-8')))


def write_atomically(path: str, write, check=None, previous_path: str | None = None):
    """write(binary file) into a flushed temporary file beside `path`, check(temporary path), then rename it over
    `path` (the old content kept at `previous_path`): a failed write leaves the previous file whole, no temporary."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
        with os.fdopen(handle, 'wb') as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if check is not None:
            check(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; run files are shared
        if previous_path is not None and os.path.exists(path):
            # a hard link (a copy where links fail) renamed into place: a kill at any moment leaves a latest file
            link = f'{previous_path}.{os.getpid()}.link'
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
            os.replace(link, previous_path)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):  # a full disk, storage gone: one line, the previous file kept
            raise RunError(f'could not write {path} ({error.strerror or error}); the file that was there is whole: '
                           'free space or fix the storage, then rerun') from None
        raise


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds plain Python data and numpy scalars/arrays only: nothing else is ever constructed."""
    ALLOWED_GLOBALS = {('numpy', 'dtype'), ('numpy', 'ndarray'),
                       ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
                       ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")
        return super().find_class(module, name)


def load_plain_data(path: str):
    """What a `torch.save`, `pickle.dump` or `numpy.save` file holds, read without running any code from it."""
    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as error:  # torch's paragraphs of advice, reduced to what was refused
            refused = re.search(r'GLOBAL (\S+)', str(error))
            raise pickle.UnpicklingError(f"refusing to load {refused.group(1) if refused else 'an object'}: only "
                                         'plain data is read') from None
    with open(path, 'rb') as handle:
        if handle.read(6) != b'\x93NUMPY':
            handle.seek(0)
            return _PlainDataUnpickler(handle).load()
        version = tuple(handle.read(2))  # (major, minor), after the magic string
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(handle)
        loaded = _PlainDataUnpickler(handle).load() if dtype.hasobject else np.load(path, allow_pickle=False)
        return loaded.item() if isinstance(loaded, np.ndarray) and loaded.shape == () else loaded


# ------------------------------------------------------------------------------------------------------ collectives
def init_distributed():
    """(rank, world_size, device) under torchrun (nccl on GPUs, gloo on the CPU), or a single process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if world_size == 1:
        return 0, 1, device
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world_size, device


def distributed() -> bool:
    """Whether this process is one of several under torch.distributed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (identity without torch.distributed)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value) -> list:
    """Every process's `value`, in rank order, on every process (a one-element list without torch.distributed)."""
    if not distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_messages(messages: list[str]) -> list[str]:
    """All processes' messages, in rank order, on every process."""
    return [message for rank_messages in gather_objects(messages) for message in rank_messages]


def gather_in_order(local_values: torch.Tensor, local_indices: torch.Tensor, total: int) -> torch.Tensor:
    """All processes' rows as one (total, ...) tensor in list order; RuntimeError unless indices are 0..total-1 once."""
    values, indices = local_values, local_indices.to(device=local_values.device, dtype=torch.long)
    if distributed():  # shards may differ in length: each is padded to the longest, then cut back
        counts = gather_objects(values.shape[0])

        def gathered(tensor):
            padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
            padded[:tensor.shape[0]] = tensor
            parts = [torch.empty_like(padded) for _ in counts]
            dist.all_gather(parts, padded)
            return torch.cat([part[:count] for part, count in zip(parts, counts)])
        values, indices = gathered(values), gathered(indices)
    if indices.numel() != total or not torch.equal(indices.sort().values, torch.arange(total, device=indices.device)):
        raise RuntimeError(f"gathered {indices.numel()} rows for {total} images with missing or repeated "
                           f"indices; every process must evaluate its own contiguous shard once")
    ordered = values.new_empty((total, *values.shape[1:]))
    ordered[indices] = values
    return ordered


class StopOnEveryRank(RunError):
    """A problem met by one process (an unreadable evaluation image), raised by every process with its message."""


def stop_if_any_process_failed(messages: list[str]):
    """Raise any process's first problem as StopOnEveryRank on every process (all call it, so none waits alone)."""
    problems = gather_messages(messages[:1])
    if problems:
        raise StopOnEveryRank(problems[0])


def on_rank_zero(rank: int, action):
    """action() on rank 0 while the others wait: its result on every process, or its RunError raised on each."""
    outcome = (None, None)
    if rank == 0:
        try:
            outcome = (None, action())
        except RunError as error:
            outcome = (str(error), None)
    problem, result = gather_objects(outcome)[0]
    if problem is not None:
        raise StopOnEveryRank(problem)
    return result


def default_device():
    """The GPU when there is one, else the CPU: where the pair scores are computed."""
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def normalized_features(features, device, name):
    """(N, d) array or tensor -> float32 L2-normalised tensor on `device`."""
    # a read-only (memory-mapped) array is copied: torch does not take non-writable memory
    tensor = features if torch.is_tensor(features) else torch.from_numpy(np.require(features, requirements='W'))
    if tensor.ndim != 2:
        raise RunError(f'{name} must be a 2-d (N, d) array, got shape {tuple(tensor.shape)}')
    tensor = tensor.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise RunError(f'{name} contain NaN or infinite values; check the model outputs')
    return functional.normalize(tensor, dim=1)


def text_digest(text: str) -> str:
    """sha256 of a text (the suite's one digest, as in file_digest)."""
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def file_digest(paths) -> str:
    """sha256 of the bytes of the given files, in order (None entries skipped)."""
    digest = hashlib.sha256()
    for block in (block for path in paths if path for block in file_blocks(path)):
        digest.update(block)
    return digest.hexdigest()


def file_blocks(path: str, size: int = 1 << 24):
    """The bytes of a file, `size` at a time."""
    with open(path, 'rb') as handle:
        yield from iter(lambda: handle.read(size), b'')


def size_text(size: int) -> str:
    """A number of bytes as '52.0 KB', '1.5 GB'."""
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1024:
            return f'{size:.1f} {unit}' if unit != 'B' else f'{size} B'
        size /= 1024
    return f'{size:.1f} TB'


def first_line(error: Exception) -> str:
    """'Type: first sentence' of an exception, without the paragraphs of advice torch appends."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0].split(". ")[0]}' if lines else type(error).__name__


def parse_bool(text) -> bool:
    """'True'/'1'/'yes' -> True, 'False'/'0'/'no' -> False (the original's `--resume True`)."""
    value = str(text).strip().lower()
    if value not in ('true', '1', 'yes', 'y', 'false', '0', 'no', 'n'):
        raise argparse.ArgumentTypeError(f'{text!r} is not a boolean; give True or False')
    return value in ('true', '1', 'yes', 'y')
