"""The run directory: its name, its lock (one run at a time), the check that every process shares it, its logger."""
import dataclasses
import json
import os
import pathlib
import socket
import sys
import threading
import time
from contextlib import suppress

import utils


@dataclasses.dataclass(frozen=True)
class RunName:
    """The flags that name a run directory."""
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
        """`save_dir/<model and distillation>/<optimisation>`, as the original named runs."""
        distillation = f'{self.kd_loss}-{self.kd_weight}' if self.is_distill else 'no_distill'
        first = (f'{self.dataset}-{self.backbone_class}-{distillation}' + ('-Pre' if self.init_weights else '')
                 + ('' if self.augment else '-NoAug'))
        stepped = self.lr_scheduler in ('step', 'multistep')
        optimizer = self.optim + (f'-step{self.step_size}-gamma{self.gamma}' if stepped else '')
        second = (f'lr{self.lr:.2g}_{optimizer}_{self.lr_scheduler}_epoch{self.max_epoch}_warmup{self.warmup_epoch}'
                  f'_bs{self.batch_size}' + ('-head_fixed' if self.head_fixed else '') + (self.suffix or ''))
        return os.path.join(save_dir, first, second)


class Logger:
    """Append-only `record.txt` + console + tensorboardX scalars + results.json, silent when rank != 0. Nothing is
    written in the run directory before `start`: a run stopped by a start-up check leaves no files there. Without a
    run directory (an export): the console alone."""

    def __init__(self, run_dir: str | None, rank: int = 0, tensorboard: bool = True):
        self.run_dir, self.active, self.tensorboard = run_dir, rank == 0, tensorboard
        self.writer, self.results, self.started = None, {}, False
        self._pending, self._said = [], set()  # record.txt's lines not written yet; the keys `once` was given

    def start(self):
        """The run has passed its start-up checks: write the lines said so far, open tensorboard, read results.json."""
        was_started, self.started = self.started, True
        if was_started or not self.active or self.run_dir is None:
            return
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
        """Append `message` to record.txt (once the run has started) and echo it on the console."""
        if self.active:
            self._pending.append(message)
            if self.started:
                self._write_pending()
            sys.stdout.write(f'{message}\n')
            sys.stdout.flush()

    def _write_pending(self):
        if self.run_dir is None:
            self._pending = []
            return
        with open(os.path.join(self.run_dir, 'record.txt'), 'a', encoding='utf-8') as record:
            record.writelines(f'{line}\n' for line in self._pending)
        self._pending = []

    def once(self, key: str, message: str):
        """info(message) the first time `key` is given in this run, nothing after (a bad image seen every epoch)."""
        if key not in self._said:
            self._said.add(key)
            self.info(message)

    def scalar(self, tag, value, step):
        self.start()
        if self.active and self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def result(self, key: str, value):
        """Set one top-level entry of results.json (see RESULTS_NAME) and rewrite the file."""
        self.start()
        if self.active and self.run_dir is not None:
            self.results[key] = value
            utils.write_json(self.results, os.path.join(self.run_dir, RESULTS_NAME))

    def epoch_result(self, figures: dict):
        """Add an epoch's figures to results.json, replacing those of the same or later epochs (a resumed run)."""
        epochs = [entry for entry in self.results.get('epochs', []) if entry['epoch'] < figures['epoch']]
        self.result('epochs', epochs + [figures])

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# A run's figures, for scripts and the demo table: 'parameters' (student trainable and total, teacher total, student
# backbone), 'epochs' (epoch, lr, train_accuracy, loss, ce, kd, val_loss, val_accuracy or null), 'best_epoch',
# 'best_accuracy', 'test': {'student' | 'teacher' | 'cross': {'coarse', 'fine' (TARs at FAR 1e-1 ... 1e-8, null where
# undefined), '<grain>_undefined' (why, or null), '<grain>_nn_accuracy', '<grain>_gap' (of the nearest-neighbour
# predictions), '<grain>_curve' ({'far': [...], 'tar': [...]}), 'tar_at_far' ({'coarse' | 'fine': {'TAR@1e-1': ...}},
# the names the printed lines use), 'impostor_pairs' ({grain: count}), 'below_resolution' ({grain: the tar_at_far
# names whose FAR is below 1 / impostor pairs})}}, 'test_list' (the list and masks those figures are of); a
# --benchmark's figures under its name (see retrieval.benchmark_report).
RESULTS_NAME = 'results.json'


def read_results(run_dir: str) -> dict:
    """A run directory's results.json, or {} when it has none yet; RunError when it is not a JSON object."""
    path = os.path.join(run_dir, RESULTS_NAME)
    try:
        results = json.loads(pathlib.Path(path).read_text(encoding='utf-8'))
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


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.path.getmtime(path) > seconds
    except OSError:
        return False


class RunLock:
    """`run.lock`: one run at a time. It names its holder (host, process id, start time), is written whole and touched
    every HEARTBEAT_SECONDS; one that cannot be read is a run starting. A run takes it (free or stale) only while it
    holds `run.lock.takeover`, created exclusively: of two runs that race for it, exactly one takes it."""
    HEARTBEAT_SECONDS = 60
    STALE_SECONDS = 600
    TAKEOVER_STALE_SECONDS = 60

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, 'run.lock')
        self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        self._stop, self._thread = threading.Event(), None
        self.created_directories = []  # made for this run: removed again if it leaves them empty (a refused start)

    def acquire(self) -> 'RunLock':
        """Take the lock or raise RunDirectoryBusy naming the holder."""
        takeover = f'{self.path}.takeover'
        if _older_than(takeover, self.TAKEOVER_STALE_SECONDS):
            with suppress(FileNotFoundError):
                os.remove(takeover)  # left by a run that died while taking the lock
        try:
            os.close(os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise self._busy(self._read_holder()) from None
        try:
            holder = self._read_holder()
            # an unreadable lock is a run starting, unless it stays so (left half written by an older version)
            stale = _older_than(self.path, self.TAKEOVER_STALE_SECONDS) if holder is None else self._is_stale(holder)
            if os.path.exists(self.path) and not stale:
                raise self._busy(holder)
            utils.write_json(self.holder, self.path)
        finally:
            os.remove(takeover)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _read_holder(self) -> dict | None:
        """The holder the lock names, or None when it cannot be read."""
        try:
            holder = json.loads(pathlib.Path(self.path).read_text(encoding='utf-8'))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _is_stale(self, holder: dict) -> bool:
        """Whether `holder`'s process is gone (same host) or its heartbeat is older than STALE_SECONDS."""
        if holder.get('host') == self.holder['host']:
            if holder.get('pid') == self.holder['pid']:
                return True  # left by an earlier run in this same process
            try:
                os.kill(int(holder.get('pid', -1)), 0)
            except ProcessLookupError:
                return True
            except (ValueError, OverflowError, TypeError):
                return False
            except PermissionError:
                pass
        # a live process (maybe another user's), unless its id was reused after the holder died: its heartbeat decides
        return _older_than(self.path, self.STALE_SECONDS)

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
            if self._read_holder() == self.holder:
                with suppress(FileNotFoundError):
                    os.remove(self.path)
        for directory in reversed(self.created_directories):
            with suppress(OSError):  # not empty: the run wrote there, and it stays
                os.rmdir(directory)

    def _heartbeat(self):
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            with suppress(OSError):
                os.utime(self.path)


def hold_run_directory(run_dir: str, rank: int, world_size: int) -> RunLock | None:
    """Create the run directory and take its lock (rank 0; returned for release); every process stops if another
    run holds it, or if the run directory is not on storage that every process shares."""
    lock = RunLock(run_dir)  # acquired on rank 0 alone; releasing an unacquired lock does nothing

    def take():
        missing = os.path.abspath(run_dir)
        while not os.path.exists(missing) and os.path.dirname(missing) != missing:
            lock.created_directories.insert(0, missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as error:
            raise utils.RunError(f'cannot create the run directory {run_dir}: {utils.first_line(error)}; give a '
                                 '--save_dir where this user may write') from None
        lock.acquire()
    utils.on_rank_zero(rank, take)
    if world_size > 1:
        try:
            check_shared_storage(run_dir, rank)
        except utils.StopOnEveryRank:
            lock.release()
            raise
    return lock if rank == 0 else None


def check_shared_storage(run_dir: str, rank: int, flag: str = '--save_dir'):
    """Every process must read the token that rank 0 wrote into the directory: checkpoints, max_acc.pth and the
    resume decision (or the teacher cache) are written by rank 0 and read by all."""
    token_path = pathlib.Path(run_dir, '.shared_storage_check')
    token = [f'{socket.gethostname()}:{os.getpid()}:{time.time()}'] if rank == 0 else []
    if rank == 0:
        token_path.write_text(token[0], encoding='utf-8')
    token = utils.gather_messages(token)[0]  # every process waits here until the token is written
    try:
        seen = token_path.read_text(encoding='utf-8')
    except OSError:
        seen = None
    try:
        utils.stop_if_any_process_failed([] if seen == token else [
            f'process {rank} on host {socket.gethostname()} does not see {run_dir} as rank 0 wrote it: {flag} must '
            'be storage that every host shares'])
    finally:
        if rank == 0:
            token_path.unlink()


def training_directory(args) -> str:
    """The run directory the flags name (see RunName)."""
    return RunName(**{field.name: getattr(args, field.name) for field in dataclasses.fields(RunName)}).directory(
        args.save_dir)
