"""The run's files for resuming: the checkpoint format, its atomic writer, choosing and reading the checkpoint to
resume from (damaged ones set aside), the run lock and the shared-storage check."""
import dataclasses
import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import zlib
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import helpers
import model as models
import utils

CHECKPOINT_NAME = 'checkpoint.pth.tar'
PREVIOUS_CHECKPOINT_NAME = 'checkpoint.prev.pth.tar'
BEST_NAME = 'max_acc.pth'


@dataclass
class RunProgress:
    """How far the run is: epochs done, iterations into the next one (a checkpoint written within an epoch), and
    the best validation accuracy so far with its epoch."""
    epoch: int = 0
    iteration: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0


@dataclass
class EpochState:
    """What one process has accumulated in the current epoch, enough to resume it mid-way: batches done, the sums
    of loss, cross-entropy and distillation (each times the batch size), of correct predictions and of samples
    over the steps that counted, the files reported bad or truncated, and the random generators."""
    iteration: int = 0
    sums: list = field(default_factory=lambda: [0.0] * 5)
    bad_images: list = field(default_factory=list)
    truncated_images: list = field(default_factory=list)
    random_state: dict | None = None


def random_state() -> dict:
    """The process's random generators (Python, numpy, torch CPU and the current GPU)."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict):
    """Restore what random_state() returned."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def _plain_epoch_state(state: EpochState) -> dict:
    """An EpochState as plain Python data, which all_gather_object and a weights-only checkpoint can carry."""
    plain = dataclasses.asdict(state)
    generators = dict(plain['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, keys.tolist(), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = generators[device].tolist()
    return dict(plain, random_state=generators)


def _epoch_state_from(plain: dict) -> EpochState:
    """The inverse of _plain_epoch_state."""
    generators = dict(plain['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = torch.tensor(generators[device], dtype=torch.uint8)
    plain = dict(plain, random_state=generators)
    if 'samples' in plain:  # written before the sample count joined the sums
        plain['sums'] = list(plain['sums']) + [float(plain.pop('samples'))]
    return EpochState(**plain)


def save_atomically(obj, path: str, previous_path: str | None = None, verify: bool = False):
    """torch.save `obj` to a temporary file beside `path`, then rename it over `path`: an interrupted save
    leaves the previous file intact and no temporary behind. `verify` reads the file back (its structure, the
    tensors memory-mapped) before it replaces anything; `previous_path` keeps the file it replaces, so that a
    damaged latest checkpoint never leaves a run without a good one."""
    def read_back(temporary):
        try:
            torch.load(temporary, map_location='cpu', weights_only=True, mmap=True)
        except Exception as error:  # whatever the bytes on disk raise, they are not what was saved
            raise utils.RunError(f'{path}: the file just written does not read back ({models.first_line(error)}); '
                                 'the one that was there is kept: check the storage, then rerun') from None

    utils.write_atomically(path, lambda file: torch.save(obj, file), check=read_back if verify else None,
                           previous_path=previous_path)


class Checkpoints:
    """The run's checkpoints: the latest training state (the previous one kept beside it) and max_acc.pth. Rank 0
    writes them, atomically, while every process waits; `resume` chooses one and restores the student, optimizer
    and scaler from it.

    `flags` are the settings that change the run's trajectory without naming its directory: stored in every
    checkpoint, and a resume with other values stops before anything is loaded or written.
    """

    def __init__(self, run_dir: str, *, rank: int, world_size: int, logger, student, optimizer, scaler,
                 head_fixed: bool, flags: dict):
        self.run_dir, self.rank, self.world_size, self.logger = run_dir, rank, world_size, logger
        self.student, self.optimizer, self.scaler = student, optimizer, scaler
        self.head_fixed, self.flags = head_fixed, dict(flags)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save_epoch_end(self, progress: RunProgress, improved: bool):
        """The checkpoint after an epoch, and max_acc.pth when the epoch improved."""
        def write():
            if improved:
                save_atomically(models.student_weights(self.student, include_head=not self.head_fixed),
                                self.path(BEST_NAME))
            self._save(self.training_state(progress))
        self._write_on_rank_zero(write)

    def save_within_epoch(self, progress: RunProgress, current: EpochState):
        """The checkpoint within an epoch, with every process's position, partial sums and random generators."""
        every_process = utils.gather_objects(_plain_epoch_state(current))
        self._write_on_rank_zero(lambda: self._save(dict(self.training_state(progress),
                                                         epoch_progress=every_process)))

    def training_state(self, progress: RunProgress) -> dict:
        """Everything an exact resume needs; the frozen shared head is not stored (it comes from the teacher)."""
        student_state = {key: value for key, value in self.student.state_dict().items()
                         if not (self.head_fixed and key.startswith('head.'))}
        return {'student': student_state, 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'progress': dataclasses.asdict(progress),
                'seed': self.flags.get('seed'), 'flags': self.flags,
                'batches_seen': getattr(self.student.backbone, 'batches_seen', 0)}

    def resume(self) -> tuple[RunProgress | None, EpochState]:
        """(the progress of the checkpoint chosen by choose_checkpoint, or None for a new run; where to resume
        within the epoch), the student, optimizer and scaler loaded from it."""
        chosen, state = choose_checkpoint(self.run_dir, self.rank, self.logger)
        if not chosen:
            return None, EpochState()
        if state is None:
            state = torch.load(chosen, map_location='cpu', weights_only=True)
        self.load_training_state(state, chosen)
        progress = RunProgress(**state['progress'])
        epoch_state = EpochState()
        if progress.iteration:
            epoch_state = self._this_process_epoch_state(state.get('epoch_progress') or [], chosen)
            where = f'epoch {progress.epoch + 1} iteration {epoch_state.iteration}'
        else:
            where = f'the end of epoch {progress.epoch}'
        self.logger.info(f'resumed from {chosen} at {where}')
        return progress, epoch_state

    def load_training_state(self, state: dict, path: str):
        """The student, optimizer, scaler and DropBlock progress of a checkpoint of this configuration."""
        self._check_flags(state, path)
        student = self.student
        current = student.state_dict()
        misfits = [f'{key} {tuple(value.shape)} here, {tuple(current[key].shape)} in the file'
                   for key, value in state['student'].items() if key in current and value.shape != current[key].shape]
        missing, unexpected = [], []
        if not misfits:
            missing, unexpected = student.load_state_dict(state['student'], strict=False)
        missing = [key for key in missing if not (self.head_fixed and key.startswith('head.'))]
        if misfits or missing or unexpected:
            raise utils.RunError(f'{path} does not fit the student (shapes {misfits[:2]}, missing {missing[:3]}, '
                                 f'unexpected {unexpected[:3]}): it was written by another configuration; rerun '
                                 'with its flags or give another --suffix')
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scaler.is_enabled() and state['scaler']:
            self.scaler.load_state_dict(state['scaler'])
        if hasattr(student.backbone, 'batches_seen'):
            student.backbone.batches_seen = int(state['batches_seen'])

    def _check_flags(self, state: dict, path: str):
        """Stop when a setting that changes the trajectory differs from the one the checkpoint was written with."""
        stored = state.get('flags') or {'seed': state.get('seed')}
        changed = [f'--{name} {self.flags[name]} (the checkpoint has {stored[name]})'
                   for name in self.flags if name in stored and stored[name] != self.flags[name]]
        if changed:
            raise utils.RunError(f'{path} was written with other settings: {"; ".join(changed)}; rerun with the '
                                 "checkpoint's values to resume, or give another --suffix for a new run")

    def _this_process_epoch_state(self, every_process: list, path: str) -> EpochState:
        """This process's position within the epoch of a checkpoint written within an epoch."""
        if len(every_process) != self.world_size:
            raise utils.RunError(f"{path} was written within an epoch by {len(every_process)} processes; resume it "
                                 f"with {len(every_process)} processes (the epoch's batches are split among them)")
        return _epoch_state_from(every_process[self.rank])

    def _save(self, state: dict):
        save_atomically(state, self.path(CHECKPOINT_NAME), self.path(PREVIOUS_CHECKPOINT_NAME), verify=True)

    def _write_on_rank_zero(self, write):
        """Rank 0 writes while the others wait; a write that fails (disk full, storage gone) stops every process
        with its message instead of leaving the others waiting for rank 0."""
        problems = []
        if self.rank == 0:
            try:
                write()
            except utils.RunError as error:  # the writer's own line
                problems.append(str(error))
            except (OSError, RuntimeError) as error:
                problems.append(f'could not write a checkpoint in {self.run_dir}: {models.first_line(error)}; '
                                'the files already there are whole: free space or fix the storage, then rerun')
        utils.stop_if_any_process_failed(problems)


def choose_checkpoint(run_dir: str, rank: int, logger) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from, the same on every process, or None for a new run; its state on rank 0,
    which read it to choose it, else None). The latest wins if it loads, else the previous one; a latest that does
    not load is set aside (renamed) and record.txt says why."""
    decision, problems, state = [], [], None
    if rank == 0:
        failures = []
        for path in (os.path.join(run_dir, CHECKPOINT_NAME), os.path.join(run_dir, PREVIOUS_CHECKPOINT_NAME)):
            if not os.path.exists(path):
                continue
            try:
                state = torch.load(path, map_location='cpu', weights_only=True)
            except (OSError, MemoryError):
                raise  # the storage or the machine, not the file: nothing is set aside
            except Exception as error:  # any damage: truncated, zeroed, not a checkpoint at all
                failures.append((path, models.first_line(error)))
                continue
            decision.append(path)
            break
        if failures and not decision:
            problems.append('; '.join(f'{path} does not load ({reason})' for path, reason in failures) +
                            ': move the damaged files away to start this run afresh, or put back a good copy')
        elif failures:
            path, reason = failures[0]
            aside = utils.set_aside(path)
            logger.info(f'{path} does not load ({reason}): set aside as {aside}; resuming from {decision[0]}')
    utils.stop_if_any_process_failed(problems)
    chosen = utils.gather_messages(decision)
    return (chosen[0], state) if chosen else (None, None)


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
    lock, problems = None, []
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            lock = RunLock(run_dir).acquire()
        except RunDirectoryBusy as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f'cannot create the run directory {run_dir}: {models.first_line(error)}; give a '
                            '--save_dir where this user may write')
    utils.stop_if_any_process_failed(problems)
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


# ------------------------------------------------------------------------------------------ the teacher's cache
def file_digest(paths) -> str:
    """sha256 of the bytes of the given files, in order (None entries skipped)."""
    digest = hashlib.sha256()
    for path in paths:
        if path:
            for block in _blocks(path):
                digest.update(block)
    return digest.hexdigest()


def _crc(path: str) -> int:
    value = 0
    for block in _blocks(path):
        value = zlib.crc32(block, value)
    return value


def _blocks(path: str, size: int = 1 << 24):
    """The bytes of a file, `size` at a time."""
    with open(path, 'rb') as handle:
        yield from iter(lambda: handle.read(size), b'')


class TeacherCache:
    """The eval-mode teacher's feature of every training image, stored once (`features.npy`, views x images x
    feature, memory-mapped) with `manifest.json`, which names what the cache is valid for (`identity`) and, once
    complete, the file's checksum.

    The teacher's logits are a function of its feature alone (its classifier is the frozen shared head), so the
    stored feature gives them exactly. A row not yet computed holds NaN: a pre-pass killed half way continues where
    it stopped, and a row lost in a crash is computed again.
    """
    MANIFEST = 'manifest.json'
    FEATURES = 'features.npy'

    def __init__(self, directory: str, identity: dict, shape: tuple[int, int, int], dtype: str):
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
        """What the cache in the directory was built for that this run differs in."""
        stored = manifest.get('identity', {})
        return [f'{name} {stored.get(name)!r} (this run: {value!r})' for name, value in self.identity.items()
                if stored.get(name) != value]

    def damage(self, manifest: dict) -> str | None:
        """Why the features file cannot be used as it is (missing, truncated, not the manifest's), or None."""
        try:
            array = np.load(self.path, mmap_mode='r')
        except (OSError, ValueError) as error:
            return f'{self.path} does not load ({models.first_line(error)})'
        if array.shape != self.shape or array.dtype != np.dtype(self.dtype):
            return f'{self.path} holds {array.shape} {array.dtype}, not {self.shape} {self.dtype}'
        if manifest.get('complete') and manifest.get('crc32') != _crc(self.path):
            return f'{self.path} fails its checksum'
        return None

    def create(self):
        """A features file of NaN rows and a manifest that says it is not complete (rank 0)."""
        os.makedirs(self.directory, exist_ok=True)
        array = np.lib.format.open_memmap(self.path, mode='w+', dtype=self.dtype, shape=self.shape)
        array[:] = np.nan
        array.flush()
        del array
        self._write_manifest(complete=False)

    def complete(self):
        """Record the checksum of the filled file: from now on the cache is read, never written (rank 0)."""
        self._write_manifest(complete=True, crc32=_crc(self.path))

    def _write_manifest(self, **state):
        utils.write_json(dict(identity=self.identity, shape=list(self.shape), dtype=self.dtype, **state),
                         os.path.join(self.directory, self.MANIFEST))

    def open(self, writable: bool = False) -> np.ndarray:
        return np.load(self.path, mmap_mode='r+' if writable else 'r')


def prepare_teacher_cache(cache: TeacherCache, *, rebuild: bool, rank: int, logger) -> bool:
    """Check the cache directory and make it ready to fill; whether rows remain to compute (the same on every
    process). A cache of another run stops in one line naming what differs (`rebuild` replaces it; a cache of
    this run is kept, so that a relaunched command does not compute it again); a damaged one is set up again."""
    problems, decision = [], []
    if rank == 0:
        manifest = cache.manifest()
        foreign = cache.differences(manifest) if manifest is not None else []
        damage = cache.damage(manifest) if manifest is not None and not foreign else None  # reads the whole file
        if foreign and not rebuild:
            problems.append(f'{cache.directory} holds the teacher cache of another run: {"; ".join(foreign)}; give '
                            'another --teacher_cache directory, or --teacher_cache_rebuild to replace it')
        elif manifest is None or foreign or damage:
            if damage:
                logger.info(f'teacher cache damaged: {damage}; computing it again')
            size = int(np.prod(cache.shape)) * np.dtype(cache.dtype).itemsize
            os.makedirs(cache.directory, exist_ok=True)
            free = shutil.disk_usage(cache.directory).free
            logger.info(f'teacher cache: {size / 2 ** 30:.2f} GB in {cache.path} ({free / 2 ** 30:.1f} GB free)')
            if size > free:
                problems.append(f'{cache.directory} has {free / 2 ** 30:.1f} GB free, too little for the teacher '
                                f'cache ({size / 2 ** 30:.2f} GB): free space or give another --teacher_cache')
            else:
                cache.create()
                decision.append('fill')
        elif not manifest.get('complete'):
            decision.append('fill')
    utils.stop_if_any_process_failed(problems)
    return bool(utils.gather_messages(decision))


@torch.no_grad()
def fill_teacher_cache(cache: TeacherCache, teacher_backbone, dataset, batch_transform, *, device, amp: str,
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
    loader = helpers.make_loader(dataset, missing, batch_size, num_workers, drop_last=False)
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
    if rank == 0:
        cache.complete()
        logger.info(f'teacher cache complete: {cache.path}')
    utils.gather_messages([])


@torch.no_grad()
def check_teacher_cache(cache: TeacherCache, teacher_backbone, dataset, batch_transform, *, device, amp: str,
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
