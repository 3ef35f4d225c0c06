"""Run names, the logger and results.json, atomic file writes, the collectives every room shares, and the one
error a run stops with."""
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class RunError(ValueError):
    """A problem the user must fix: its message is the one line main.py prints (once, on rank 0) before it exits."""


@dataclass(frozen=True)
class RunName:
    """The flags that name a run directory, and the name the original gave it (directory)."""
    dataset: str
    backbone_class: str
    is_distill: bool
    kd_loss: str
    kd_weight: float
    init_weights: str | None
    augment: bool
    lr: float
    optim: str
    lr_scheduler: str
    step_size: str
    gamma: float
    max_epoch: int
    warmup_epoch: int
    batch_size: int
    head_fixed: bool
    suffix: str

    def directory(self, save_dir: str) -> str:
        """`save_dir/<first>/<second>`.

        `<first>` = `{dataset}-{backbone_class}` + `-{kd_loss}-{kd_weight}` (distillation) or `-no_distill`,
        + `-Pre` when `init_weights` is set, + `-NoAug` unless `augment`.
        `<second>` = `lr{lr:.2g}_{optim}_{lr_scheduler}_epoch{max_epoch}_warmup{warmup_epoch}_bs{batch_size}`
        + `-head_fixed` when `head_fixed`, + `suffix`; for `step`/`multistep` schedules the optimizer part is
        `{optim}-step{step_size}-gamma{gamma}`.
        """
        first = f'{self.dataset}-{self.backbone_class}'
        first += f'-{self.kd_loss}-{self.kd_weight}' if self.is_distill else '-no_distill'
        if self.init_weights:
            first += '-Pre'
        if not self.augment:
            first += '-NoAug'
        optimizer_part = self.optim
        if self.lr_scheduler in ('step', 'multistep'):
            optimizer_part = f'{self.optim}-step{self.step_size}-gamma{self.gamma}'
        second = (f'lr{self.lr:.2g}_{optimizer_part}_{self.lr_scheduler}_epoch{self.max_epoch}'
                  f'_warmup{self.warmup_epoch}_bs{self.batch_size}')
        if self.head_fixed:
            second += '-head_fixed'
        second += self.suffix or ''
        return os.path.join(save_dir, first, second)


class Logger:
    """Append-only `record.txt` + console + tensorboardX scalars + results.json; every method does nothing when
    rank != 0. Nothing is written in the run directory before `start`: a run stopped by a start-up check leaves
    none of its files there (its lines reach the console only)."""

    def __init__(self, run_dir: str, rank: int = 0, tensorboard: bool = True):
        self.run_dir, self.active, self.tensorboard = run_dir, rank == 0, tensorboard
        self.record_path = os.path.join(run_dir, 'record.txt')
        self.writer, self.results, self.started = None, {}, False
        self._pending, self._said = [], set()  # record.txt's lines not written yet; the keys `once` was given

    def start(self):
        """The run has passed its start-up checks: write the lines said so far, open tensorboard, read results.json."""
        if self.started or not self.active:
            self.started = True
            return
        self.started = True
        os.makedirs(self.run_dir, exist_ok=True)
        self._write_pending()
        try:
            self.results = read_results(self.run_dir)  # a resumed run adds to its figures
        except ValueError as damage:  # never let a damaged file block a rerun
            path = os.path.join(self.run_dir, RESULTS_NAME)
            self.info(f'{damage}: set aside as {set_aside(path)}; this run writes a new one')
        if self.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=self.run_dir)

    def info(self, message: str):
        """Append `message` as a line of record.txt (once the run has started) and echo it on the console."""
        if not self.active:
            return
        self._pending.append(message)
        if self.started:
            self._write_pending()
        sys.stdout.write(f'{message}\n')
        sys.stdout.flush()

    def _write_pending(self):
        with open(self.record_path, 'a', encoding='utf-8') as record:
            record.writelines(f'{line}\n' for line in self._pending)
        self._pending = []

    def once(self, key: str, message: str):
        """info(message) the first time `key` is given in this run, nothing after (a bad image seen every epoch)."""
        if key not in self._said:
            self._said.add(key)
            self.info(message)

    def scalar(self, tag, value, step):
        """Write one tensorboard scalar (nothing when tensorboard is off)."""
        self.start()
        if not self.active or self.writer is None:
            return
        self.writer.add_scalar(tag, float(value), step)

    def result(self, key: str, value):
        """Set one top-level entry of the run's results.json (see RESULTS_NAME) and rewrite the file."""
        self.start()
        if not self.active:
            return
        self.results[key] = value
        write_json(self.results, os.path.join(self.run_dir, RESULTS_NAME))

    def epoch_result(self, figures: dict):
        """Add an epoch's figures to results.json, replacing those of the same or later epochs (a resumed run)."""
        if not self.active:
            return
        epochs = [entry for entry in self.results.get('epochs', []) if entry['epoch'] < figures['epoch']]
        self.result('epochs', epochs + [figures])

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# A run's figures as data, for scripts and the demo table: 'parameters' (student trainable and total, teacher total,
# student backbone), 'epochs' (epoch, lr, train_accuracy, loss, ce, kd, val_loss and val_accuracy or null),
# 'best_epoch', 'best_accuracy', and 'test': {'student' | 'teacher' | 'cross': {'coarse', 'fine' (TARs at FAR
# 1e-1 ... 1e-8, null where undefined), 'coarse_undefined', 'fine_undefined' (why, or null), 'coarse_nn_accuracy',
# 'fine_nn_accuracy', 'coarse_gap', 'fine_gap' (of the nearest-neighbour predictions), 'coarse_curve', 'fine_curve'
# ({'far': [...], 'tar': [...]})}}; a --benchmark run's figures under its name (see evaluation.benchmark_report).
RESULTS_NAME = 'results.json'


def read_results(run_dir: str) -> dict:
    """A run directory's results.json, or {} when it has none yet; RunError when it is not a JSON object."""
    path = os.path.join(run_dir, RESULTS_NAME)
    try:
        with open(path, encoding='utf-8') as handle:
            results = json.load(handle)
    except FileNotFoundError:
        return {}
    except ValueError as error:  # not UTF-8, or not JSON: truncated, empty
        raise RunError(f'{path} is not JSON ({str(error).splitlines()[0]})') from None
    if not isinstance(results, dict):
        raise RunError(f'{path} holds a JSON {type(results).__name__}, not an object')
    return results


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
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(value, path: str):
    """`value` as JSON at `path`, written atomically (NaN as null)."""
    write_atomically(path, lambda file: file.write(json.dumps(_json_ready(value)).encode('utf-8')))


def write_atomically(path: str, write, check=None, previous_path: str | None = None):
    """write(binary file) into a temporary file beside `path`, flushed to disk, checked by check(temporary path),
    then renamed over `path` (its old content kept at `previous_path` when given): an interrupted or failed write
    (a full disk) leaves the previous file whole and no temporary behind."""
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
            _keep_as(path, previous_path)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):  # a full disk, storage gone: one line, the previous file kept
            raise RunError(f'could not write {path} ({error.strerror or error}); the file that was there is whole: '
                           'free space or fix the storage, then rerun') from None
        raise


def _keep_as(path: str, kept_path: str):
    """Make `kept_path` hold what `path` holds while `path` stays in place, so that a kill at any moment leaves a
    latest file: a hard link renamed over `kept_path` (a copy where links are not supported)."""
    link = f'{kept_path}.{os.getpid()}.link'
    try:
        os.link(path, link)
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, kept_path)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for plain python data (containers, numbers, strings) and numpy scalars/arrays only: nothing else is
    ever constructed."""
    ALLOWED_GLOBALS = {
        ('numpy', 'dtype'), ('numpy', 'ndarray'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")
        return super().find_class(module, name)


def load_plain_data(path: str):
    """What a `torch.save`, `pickle.dump` or `numpy.save` file holds, read without running any code from it
    (torch's weights_only loader; an unpickler that refuses every class but numpy's array reconstruction)."""
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


# ------------------------------------------------------------------------------------------------------ collectives
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
    """Collect every process's rows (all_gather when distributed) into a (total, ...) tensor in list order.

    Raises RuntimeError unless the indices over all processes are exactly 0..total-1 once each.
    """
    local_indices = local_indices.to(device=local_values.device, dtype=torch.long)
    if distributed():
        values, indices = _all_gather_rows(local_values, local_indices)
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


def _all_gather_rows(local_values: torch.Tensor, local_indices: torch.Tensor):
    """Every process's rows and their indices, concatenated in rank order (shards may differ in length)."""
    counts = gather_objects(local_values.shape[0])

    def gathered(tensor):
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])
    return gathered(local_values), gathered(local_indices)


class StopOnEveryRank(RunError):
    """A problem met by one process (an unreadable evaluation image), raised by every process with its message."""


def stop_if_any_process_failed(messages: list[str]):
    """Raise StopOnEveryRank with the first problem of any process, on every process; nothing when none has one.

    Every process calls this at the same point, so that none waits in a collective for one that stopped.
    """
    problems = gather_messages(messages[:1])
    if problems:
        raise StopOnEveryRank(problems[0])


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for `--amp bf16|fp16`, disabled for `none`."""
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'none')
