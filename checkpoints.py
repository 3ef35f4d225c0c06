"""Resuming: the checkpoint format, its atomic writer, and choosing the checkpoint to resume from."""
import dataclasses
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

import model
import utils

CHECKPOINT_NAME = 'checkpoint.pth.tar'
PREVIOUS_CHECKPOINT_NAME = 'checkpoint.prev.pth.tar'
BEST_NAME = 'max_acc.pth'


@dataclass
class RunProgress:
    """Epochs done, iterations into the next (a checkpoint within an epoch), the best validation accuracy, its epoch."""
    epoch: int = 0
    iteration: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0


@dataclass
class EpochState:
    """One process's current epoch, enough to resume it mid-way: batches done, sums over the steps that counted (loss,
    cross-entropy, distillation, each times the batch size; correct; samples), files bad or truncated, generators."""
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


def _convert_generators(fields: dict, to_plain: bool) -> dict:
    """An EpochState's fields with its generators' arrays as lists when `to_plain` (plain data, which
    all_gather_object and a weights-only checkpoint carry), else back as arrays."""
    generators = dict(fields['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    keys = keys.tolist() if to_plain else np.array(keys, dtype=np.uint32)
    generators['numpy'] = (name, keys, position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            state = generators[device]
            generators[device] = state.tolist() if to_plain else torch.tensor(state, dtype=torch.uint8)
    return dict(fields, random_state=generators)


def save_atomically(obj, path: str, previous_path: str | None = None, verify: bool = False):
    """torch.save `obj` atomically (utils.write_atomically). `verify` reads the file back (tensors memory-mapped)
    before it replaces anything; `previous_path` keeps the file it replaces: a damaged latest is never the only one."""
    def read_back(temporary):
        try:
            torch.load(temporary, map_location='cpu', weights_only=True, mmap=True)
        except Exception as error:  # whatever the bytes on disk raise, they are not what was saved
            raise utils.RunError(f'{path}: the file just written does not read back ({utils.first_line(error)}); '
                                 'the one that was there is kept: check the storage, then rerun') from None
    utils.write_atomically(path, lambda file: torch.save(obj, file), check=read_back if verify else None,
                           previous_path=previous_path)


class Checkpoints:
    """The latest training state (the previous one kept beside it) and max_acc.pth, written by rank 0 while every
    process waits. `flags`, the settings that change the run's trajectory without naming its directory, are stored
    in every checkpoint: a resume with other values stops before anything is loaded or written. `architecture` (the
    student's backbone, img_size and width_divisor) is written beside the weights: the files describe their model."""

    def __init__(self, run_dir: str, *, rank: int, world_size: int, logger, student, optimizer, scaler,
                 head_fixed: bool, flags: dict, architecture: dict):
        self.run_dir, self.rank, self.world_size, self.logger = run_dir, rank, world_size, logger
        self.student, self.optimizer, self.scaler = student, optimizer, scaler
        self.head_fixed, self.flags, self.architecture = head_fixed, dict(flags), dict(architecture)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save_epoch_end(self, progress: RunProgress, improved: bool):
        """The checkpoint after an epoch, and max_acc.pth when the epoch improved."""
        def write():
            if improved:
                save_atomically(model.student_weights(self.student, not self.head_fixed, self.architecture),
                                self.path(BEST_NAME))
            self._save(self.training_state(progress))
        self._write_on_rank_zero(write)

    def save_within_epoch(self, progress: RunProgress, current: EpochState):
        """The checkpoint within an epoch, with every process's position, partial sums and random generators."""
        every_process = utils.gather_objects(_convert_generators(dataclasses.asdict(current), to_plain=True))
        self._write_on_rank_zero(lambda: self._save(dict(self.training_state(progress),
                                                         epoch_progress=every_process)))

    def training_state(self, progress: RunProgress) -> dict:
        """Everything an exact resume needs; the frozen shared head is not stored (it comes from the teacher)."""
        student_state = {key: value for key, value in self.student.state_dict().items()
                         if not (self.head_fixed and key.startswith('head.'))}
        return {'student': student_state, 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'progress': dataclasses.asdict(progress),
                'seed': self.flags.get('seed'), 'flags': self.flags,
                'batches_seen': getattr(self.student.backbone, 'batches_seen', 0),
                model.ARCHITECTURE_KEY: model.describe(getattr(self.student, 'module', self.student).head,
                                                       **self.architecture)}

    def resume(self) -> tuple[RunProgress | None, EpochState]:
        """Load the checkpoint choose_checkpoint picks: (its progress, or None for a new run; where in the epoch)."""
        chosen, state = choose_checkpoint(self.run_dir, self.rank, self.logger)
        if not chosen:
            return None, EpochState()
        if state is None:
            state = torch.load(chosen, map_location='cpu', weights_only=True)
        self.load_training_state(state, chosen)
        progress = RunProgress(**state['progress'])
        epoch_state, where = EpochState(), f'the end of epoch {progress.epoch}'
        if progress.iteration:
            every_process = state.get('epoch_progress') or []
            if len(every_process) != self.world_size:
                raise utils.RunError(f'{chosen} was written within an epoch by {len(every_process)} processes; '
                                     f'resume it with {len(every_process)} processes '
                                     "(the epoch's batches are split among them)")
            epoch_state = EpochState(**_convert_generators(every_process[self.rank], to_plain=False))
            where = f'epoch {progress.epoch + 1} iteration {epoch_state.iteration}'
        self.logger.info(f'resumed from {chosen} at {where}')
        return progress, epoch_state

    def load_training_state(self, state: dict, path: str):
        """Load the student, optimizer, scaler and DropBlock progress of a checkpoint of this configuration."""
        check_flags(state['flags'], self.flags, path)
        current = self.student.state_dict()
        misfits = [f'{key} {tuple(value.shape)} here, {tuple(current[key].shape)} in the file'
                   for key, value in state['student'].items() if key in current and value.shape != current[key].shape]
        missing, unexpected = ([], []) if misfits else self.student.load_state_dict(state['student'], strict=False)
        missing = [key for key in missing if not (self.head_fixed and key.startswith('head.'))]
        if misfits or missing or unexpected:
            raise utils.RunError(f'{path} does not fit the student (shapes {misfits[:2]}, missing {missing[:3]}, '
                                 f'unexpected {unexpected[:3]}): it was written by another configuration; rerun '
                                 'with its flags or give another --suffix')
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scaler.is_enabled() and state['scaler']:
            self.scaler.load_state_dict(state['scaler'])
        if hasattr(self.student.backbone, 'batches_seen'):
            self.student.backbone.batches_seen = int(state['batches_seen'])

    def _save(self, state: dict):
        save_atomically(state, self.path(CHECKPOINT_NAME), self.path(PREVIOUS_CHECKPOINT_NAME), verify=True)

    def _write_on_rank_zero(self, write):
        """Rank 0 writes while the others wait; a failed write stops every process (none waits for rank 0)."""
        problems = []
        if self.rank == 0:
            try:
                write()
            except utils.RunError as error:  # the writer's own line
                problems.append(str(error))
            except (OSError, RuntimeError) as error:
                problems.append(f'could not write a checkpoint in {self.run_dir}: {utils.first_line(error)}; '
                                'the files already there are whole: free space or fix the storage, then rerun')
        utils.stop_if_any_process_failed(problems)


def latest_progress(run_dir: str, rank: int) -> tuple[dict, dict] | None:
    """(progress, flags) of `run_dir`'s latest checkpoint, read by rank 0 (tensors memory-mapped) and given to every
    process; None when there is none, or it does not load (resume() then names it or falls back)."""
    found = None
    if rank == 0:
        try:
            state = torch.load(os.path.join(run_dir, CHECKPOINT_NAME), map_location='cpu', weights_only=True,
                               mmap=True)
            found = (dict(state['progress']), dict(state['flags']))
        except Exception:  # whatever the file is, resume() handles it
            found = None
    return utils.gather_objects(found)[0]


def check_flags(stored: dict, flags: dict, path: str):
    """Stop, naming each flag and both values, where `flags` differ from those a checkpoint at `path` stored."""
    changed = [f'--{name} {flags[name]} (the checkpoint has {stored[name]})'
               for name in flags if name in stored and stored[name] != flags[name]]
    if changed:
        raise utils.RunError(f'{path} was written with other settings: {"; ".join(changed)}; rerun with the '
                             "checkpoint's values to resume, or give another --suffix for a new run")


def choose_checkpoint(run_dir: str, rank: int, logger) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from on every process, or None for a new run; its state on rank 0, else None): the
    latest if it loads, else the previous one, the latest then set aside (renamed) and record.txt saying why."""
    decision, problems, failures, state = [], [], [], None
    if rank == 0:
        for path in (os.path.join(run_dir, CHECKPOINT_NAME), os.path.join(run_dir, PREVIOUS_CHECKPOINT_NAME)):
            if not os.path.exists(path):
                continue
            try:
                state = torch.load(path, map_location='cpu', weights_only=True)
            except (OSError, MemoryError):
                raise  # the storage or the machine, not the file: nothing is set aside
            except Exception as error:  # any damage: truncated, zeroed, not a checkpoint at all
                failures.append((path, utils.first_line(error)))
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
