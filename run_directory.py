"""The run directory: its name, its lock (one run at a time), the check that every process shares it, and the logger
that writes record.txt, the console, tensorboard and results.json."""
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

import utils


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
            self.info(f'{damage}: set aside as {utils.set_aside(path)}; this run writes a new one')
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
        utils.write_json(self.results, os.path.join(self.run_dir, RESULTS_NAME))

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
# ({'far': [...], 'tar': [...]})}}; a --benchmark run's figures under its name (see retrieval.benchmark_report).
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
        raise utils.RunError(f'{path} is not JSON ({str(error).splitlines()[0]})') from None
    if not isinstance(results, dict):
        raise utils.RunError(f'{path} holds a JSON {type(results).__name__}, not an object')
    return results


# ------------------------------------------------------------------------------------------------------- the lock
class RunDirectoryBusy(utils.RunError):
    """Another live run holds the run directory."""


def read_lock_holder(path: str) -> dict | None:
    """The holder a run.lock names, or None when it cannot be read."""
    try:
        with open(path, encoding='utf-8') as handle:
            holder = json.load(handle)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_is_stale(path: str, holder: dict, own_holder: dict) -> bool:
    """Whether the run.lock at `path`, held by `holder`, may be taken over by `own_holder`: its process is gone
    (same host), or its heartbeat is older than RunLock.STALE_SECONDS."""
    if holder.get('host') == own_holder['host']:
        if holder.get('pid') == own_holder['pid']:
            return True  # left by an earlier run in this same process
        try:
            os.kill(int(holder.get('pid', -1)), 0)
        except ProcessLookupError:
            return True
        except (ValueError, OverflowError, TypeError):
            return False
        except PermissionError:
            pass  # a live process of another user: its heartbeat decides, as below
        # a live process, unless its id was reused after the holder died: then the heartbeat has stopped
    return _older_than(path, RunLock.STALE_SECONDS)


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.path.getmtime(path) > seconds
    except OSError:
        return False


def _create_whole(path: str, content: str) -> bool:
    """Create `path` holding `content`, whole, in one step (a temporary file hard-linked into place): False when
    `path` already exists. A reader never sees it empty or half written."""
    handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, 'w', encoding='utf-8') as file:
            file.write(content)
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)


class RunLock:
    """`run.lock` in a run directory: one run at a time.

    The file names its holder (host, process id, start time), is created whole in one step, and is touched every
    HEARTBEAT_SECONDS by a background thread. A lock whose holder is gone (same host, no such process) or whose
    heartbeat is older than STALE_SECONDS (another host) is stale; a lock that cannot be read is a run starting.
    Taking over a stale lock needs `run.lock.takeover`, created whole too, so that of two runs that find the same
    stale lock at the same instant exactly one takes it.
    """
    HEARTBEAT_SECONDS = 60
    STALE_SECONDS = 600
    TAKEOVER_STALE_SECONDS = 60

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, 'run.lock')
        self.holder = {'host': socket.gethostname(), 'pid': os.getpid(),
                       'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> 'RunLock':
        """Take the lock or raise RunDirectoryBusy naming the holder."""
        content = json.dumps(self.holder)
        if not _create_whole(self.path, content):
            holder = read_lock_holder(self.path)
            # an unreadable lock is a run starting, unless it has been unreadable for long (a run killed while
            # writing it with an older version of this code)
            stale = (_older_than(self.path, self.TAKEOVER_STALE_SECONDS) if holder is None
                     else lock_is_stale(self.path, holder, self.holder))
            if not stale or not self._take_over(holder):
                raise self._busy(holder)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale_holder: dict | None) -> bool:
        """Replace the stale lock of `stale_holder` by ours; False when another run got there first."""
        takeover = f'{self.path}.takeover'
        if _older_than(takeover, self.TAKEOVER_STALE_SECONDS):
            with suppress(FileNotFoundError):
                os.remove(takeover)  # left by a run that died while taking over
        if not _create_whole(takeover, json.dumps(self.holder)):
            return False
        try:
            if read_lock_holder(self.path) != stale_holder:
                return False  # taken over and released, or replaced, since we read it
            utils.write_atomically(self.path, lambda file: file.write(json.dumps(self.holder).encode('utf-8')))
            return True
        finally:
            os.remove(takeover)

    def _busy(self, holder: dict | None) -> RunDirectoryBusy:
        directory = os.path.dirname(self.path)
        if holder is None:
            return RunDirectoryBusy(f'{directory} is being taken by another run that is starting ({self.path}); '
                                    'wait for it, or give another --suffix or --save_dir')
        return RunDirectoryBusy(
            f'{directory} is in use by another run (host {holder.get("host")}, process {holder.get("pid")}, '
            f'started {holder.get("started")}); wait for it to end, or give another --suffix or --save_dir')

    def release(self):
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if read_lock_holder(self.path) == self.holder:
                with suppress(FileNotFoundError):
                    os.remove(self.path)

    def _heartbeat(self):
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            with suppress(OSError):
                os.utime(self.path)


def hold_run_directory(run_dir: str, rank: int, world_size: int) -> RunLock | None:
    """Create the run directory and take its lock (rank 0; returned for release); every process stops if another
    run holds it, or if the run directory is not on storage that every process shares."""
    taken = []

    def take():
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as error:
            raise utils.RunError(f'cannot create the run directory {run_dir}: {utils.first_line(error)}; give a '
                                 '--save_dir where this user may write') from None
        taken.append(RunLock(run_dir).acquire())
    utils.on_rank_zero(rank, take)
    lock = taken[0] if taken else None
    try:
        if world_size > 1:
            check_shared_storage(run_dir, rank)
    except utils.StopOnEveryRank:
        if lock is not None:
            lock.release()
        raise
    return lock


def check_shared_storage(run_dir: str, rank: int, flag: str = '--save_dir'):
    """Every process must read the token that rank 0 wrote into the directory: checkpoints, max_acc.pth and the
    resume decision (or the teacher cache) are written by rank 0 and read by all."""
    token_path = os.path.join(run_dir, '.shared_storage_check')
    token = []
    if rank == 0:
        token = [f'{socket.gethostname()}:{os.getpid()}:{time.time()}']
        with open(token_path, 'w', encoding='utf-8') as handle:
            handle.write(token[0])
    token = utils.gather_messages(token)[0]  # every process waits here until the token is written
    try:
        with open(token_path, encoding='utf-8') as handle:
            seen = handle.read()
    except OSError:
        seen = None
    problems = [] if seen == token else [
        f'process {rank} on host {socket.gethostname()} does not see {run_dir} as rank 0 wrote it: {flag} must '
        'be storage that every host shares']
    problems = utils.gather_messages(problems)
    if rank == 0:
        os.remove(token_path)
    if problems:
        raise utils.StopOnEveryRank(problems[0])


def training_directory(args) -> str:
    """save_dir/<first>/<second>, named from the flags as the original named it (see RunName)."""
    return RunName(**{field.name: getattr(args, field.name) for field in dataclasses.fields(RunName)}).directory(
        args.save_dir)


def test_directory(run_dir: str, weights: str, img_size: int, benchmark: str | None = None,
                   distractors: list[str] | None = None) -> str:
    """Where a --test_only run writes: `<test>-<weights name>-<digest of its path>-<img_size>px` in the run
    directory (test: 'test', or the benchmark's name and its distractor list's), so that its figures are never
    taken for (or written over) the training run's or another test's."""
    test = benchmark or 'test'
    if distractors:
        test += f'+{os.path.splitext(os.path.basename(distractors[1]))[0]}'
    name = os.path.splitext(os.path.basename(weights))[0]
    return os.path.join(run_dir, f'{test}-{name}-{utils.text_digest(os.path.abspath(weights))[:8]}-{img_size}px')
