"""The run: its directory and lock, the loss, the learning-rate schedule, the training epoch, validation,
checkpoints and resume, and the final feature-matching test. main.py builds the pieces (TrainingParts) and hands
them to a Trainer."""
import dataclasses
import math
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import model as models
import utils

KD_LOSSES = ('KD', 'global_KD', 'tempered_KD')


class DistillationLoss(nn.Module):
    """Cross-entropy on the student's logits plus a distillation term.

    `KD` (the original): sum over batch and classes of p_t * (log p_t - log_softmax(s / T)), with
    p_t = softmax(teacher_logits) untempered and no T^2 factor. `global_KD`: summed squared error between
    student and teacher features. `tempered_KD`: the usual Hinton loss, both sides tempered, T^2 scaling,
    mean over the batch. `kind=None`: cross-entropy alone (how a teacher is trained).
    Summed terms are multiplied by `world_size`, so that DDP's gradient averaging over processes yields the
    gradient of the sum over the GLOBAL batch, as one process with the same global batch would.
    """

    def __init__(self, kind: str | None, weight: float = 1.0, temperature: float = 4.0, world_size: int = 1):
        super().__init__()
        if kind is not None and kind not in KD_LOSSES:
            raise ValueError(f'unknown --kd_loss {kind!r}; choose one of {", ".join(KD_LOSSES)}')
        self.kind, self.weight, self.temperature, self.world_size = kind, weight, temperature, world_size

    def forward(self, student_features, student_logits, teacher_features, teacher_logits, labels):
        """Return (loss to back-propagate, cross-entropy, distillation term per global batch)."""
        cross_entropy = F.cross_entropy(student_logits.float(), labels)
        if self.kind is None:
            return cross_entropy, cross_entropy.detach(), torch.zeros((), device=labels.device)
        distillation = self.distillation_term(student_features.float(), student_logits.float(),
                                              teacher_features.float(), teacher_logits.float())
        return cross_entropy + self.weight * distillation, cross_entropy.detach(), distillation.detach()

    def distillation_term(self, student_features, student_logits, teacher_features, teacher_logits):
        if self.kind == 'global_KD':
            return self.world_size * (student_features - teacher_features).pow(2).sum()
        if self.kind == 'KD':
            # the original's KL: the teacher untempered, the student at temperature T, summed, no T^2
            teacher_log_probs = F.log_softmax(teacher_logits, dim=1)
            student_log_probs = F.log_softmax(student_logits / self.temperature, dim=1)
            return self.world_size * F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction='sum')
        teacher_log_probs = F.log_softmax(teacher_logits / self.temperature, dim=1)
        student_log_probs = F.log_softmax(student_logits / self.temperature, dim=1)
        # a mean over the local batch is already the global mean once DDP averages gradients
        return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction='batchmean') * \
            self.temperature ** 2


def learning_rate(epoch_progress: float, epoch: int, *, base_lr: float, min_lr: float, warmup_epochs: int,
                  max_epoch: int, scheduler: str, step_size: list[int], gamma: float) -> float:
    """The rate at `epoch_progress` = epoch + iteration / iterations_per_epoch (epochs numbered from 1).

    Linear warm-up while epoch_progress < warmup_epochs, then cosine as the original (which divides by max_epoch,
    not max_epoch - warmup), or a step decay by `gamma` every `step_size[0]` epochs (`step`) or at each epoch in
    `step_size` (`multistep`).
    """
    if epoch_progress < warmup_epochs:
        return base_lr * epoch_progress / warmup_epochs
    if scheduler == 'cosine':
        cosine = 0.5 * (1 + math.cos(math.pi * (epoch_progress - warmup_epochs) / max_epoch))
        return min_lr + (base_lr - min_lr) * cosine
    epochs_done = epoch - 1
    if scheduler == 'step':
        return base_lr * gamma ** (epochs_done // step_size[0])
    if scheduler == 'multistep':
        return base_lr * gamma ** sum(epochs_done >= milestone for milestone in step_size)
    raise ValueError(f'unknown --lr_scheduler {scheduler!r}; choose cosine, step or multistep')


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for `--amp bf16|fp16`, disabled for `none`."""
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'none')


def distributed() -> bool:
    """Whether this process is one of several under torch.distributed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (identity without torch.distributed)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_in_order(local_values: torch.Tensor, local_indices: torch.Tensor, total: int) -> torch.Tensor:
    """Collect every process's rows (all_gather when distributed) into a (total, ...) tensor in list order.

    Raises RuntimeError unless the indices over all processes are exactly 0..total-1 once each.
    """
    local_indices = local_indices.to(device=local_values.device, dtype=torch.long)
    if distributed():
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


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN or infinite; the last checkpoint on disk stays the good one."""


class StopOnEveryRank(RuntimeError):
    """A problem met by one process (an unreadable evaluation image), raised by every process with its message."""


def stop_if_any_process_failed(messages: list[str]):
    """Raise StopOnEveryRank with the first problem of any process, on every process; nothing when none has one.

    Every process calls this at the same point, so that none waits in a collective for one that stopped.
    """
    problems = gather_messages(messages[:1])
    if problems:
        raise StopOnEveryRank(problems[0])


def _named(batch, field: str) -> list[str]:
    """The non-empty messages of a batch's string field ('bad' or 'truncated')."""
    return [message for message in batch.get(field, ()) if message]


@dataclass
class EpochProgress:
    """What one process has accumulated in the current epoch, enough to resume it mid-way: batches done, the sums
    of loss, cross-entropy and distillation (each times the batch size) and of correct predictions, samples,
    and the files reported bad or truncated."""
    iteration: int = 0
    sums: list = field(default_factory=lambda: [0.0] * 4)
    samples: int = 0
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


def train_one_epoch(parts: 'TrainingParts', epoch: int, *, device: torch.device, amp: str, logger,
                    log_interval: int, world_size: int, show_progress: bool, progress: EpochProgress | None = None,
                    control=None) -> dict:
    """One pass over parts.train_loader (from `progress.iteration` when resuming); returns a dict of epoch
    averages (over all processes), the bad and truncated images, and 'stopped': the signal that stopped the epoch
    early, or None. `control` (a RunControl) decides after each iteration whether to write a checkpoint or to stop.
    Figures stay on the device between log points, so that a GPU is not made to wait every step.
    """
    parts.distiller.train()
    progress = progress or EpochProgress()
    first_iteration, first_samples = progress.iteration, progress.samples
    iterations = first_iteration + len(parts.train_loader)
    sums = torch.tensor(progress.sums, dtype=torch.float64, device=device)
    non_finite = NonFiniteWatch(device, skips_allowed=parts.scaler.is_enabled())
    batches = iter(parts.train_loader)
    if progress.random_state is not None:
        # a resumed epoch draws on from where the interrupted one wrote its checkpoint
        set_random_state(progress.random_state)
    bar = tqdm(batches, desc=f'epoch {epoch}', disable=not show_progress, dynamic_ncols=True,
               initial=first_iteration, total=iterations)
    start, lr, stopped = time.perf_counter(), parts.schedule(epoch + first_iteration / iterations, epoch), None
    for iteration, batch in enumerate(bar, start=first_iteration):
        lr = parts.schedule(epoch + iteration / iterations, epoch)
        for group in parts.optimizer.param_groups:
            group['lr'] = lr
        progress.bad_images.extend(path for message in _named(batch, 'bad') for path in message.split('; '))
        progress.truncated_images.extend(_named(batch, 'truncated'))
        loss, cross_entropy, distillation, figures = training_step(parts, batch, device, amp)
        finite = torch.isfinite(loss)
        non_finite.update(finite, iteration)
        sums += torch.where(finite, figures, torch.zeros_like(figures))  # a step the scaler skipped adds nothing
        progress.samples += batch['label'].numel()
        progress.iteration = iteration + 1
        if (iteration + 1) % log_interval == 0 or iteration + 1 == iterations:
            non_finite.check(epoch)
            step = (epoch - 1) * iterations + iteration
            for tag, value in (('train/ce_loss', cross_entropy.item()), ('train/kd_loss', distillation.item()),
                               ('train/lr', lr)):
                logger.scalar(tag, value, step)
            if show_progress:
                images_per_second = ((progress.samples - first_samples) * world_size /
                                     max(time.perf_counter() - start, 1e-9))
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_second:.1f}')
        if control is not None and iteration + 1 < iterations:
            stopped = _checkpoint_within_epoch(control, epoch, progress, sums, non_finite)
            if stopped:
                bar.close()
                break
    if control is not None:
        control.end_of_epoch()
    return _epoch_figures(sums, progress, device, lr=lr, stopped=stopped)


def training_step(parts: 'TrainingParts', batch: dict, device: torch.device, amp: str):
    """One optimizer step on a batch: (loss, cross-entropy, distillation term, figures to sum: loss,
    cross-entropy and distillation times the batch size, correct predictions)."""
    images = parts.batch_transform(batch['image'].to(device, non_blocking=True), train=True)
    labels = batch['label'].to(device, non_blocking=True)
    teacher = parts.distiller.teacher
    with autocast_context(device, amp):
        # the teacher first: its temporaries are freed before the student's activations are saved
        teacher_features, teacher_logits = (parts.distiller.teacher_outputs(images, labels)
                                            if teacher is not None else (None, None))
        student_features, student_logits = parts.student(images, labels)
    loss, cross_entropy, distillation = parts.criterion(student_features, student_logits, teacher_features,
                                                        teacher_logits, labels)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    batch_size = labels.numel()
    correct = (student_logits.argmax(dim=1) == labels).sum()
    figures = torch.stack([loss.detach() * batch_size, cross_entropy * batch_size, distillation * batch_size,
                           correct.to(loss.dtype)]).double()
    return loss, cross_entropy, distillation, figures


def _checkpoint_within_epoch(control, epoch: int, progress: EpochProgress, sums: torch.Tensor,
                             non_finite: 'NonFiniteWatch') -> str | None:
    """Write a checkpoint when the processes agree it is time or that they must stop; the signal's name or None."""
    write_checkpoint, stopped = control.after_iteration()
    if write_checkpoint or stopped:
        # never a checkpoint of weights that a non-finite loss has already spoilt
        non_finite.check(epoch)
        progress.sums = sums.tolist()
        progress.random_state = random_state()
        control.write_checkpoint(epoch, progress)
    return stopped


def _epoch_figures(sums: torch.Tensor, progress: EpochProgress, device: torch.device, lr: float,
                   stopped: str | None) -> dict:
    totals = dict(zip(('loss', 'ce', 'kd', 'correct', 'samples'),
                      global_sum(sums.tolist() + [progress.samples], device)))
    samples = max(totals['samples'], 1.0)
    return {'lr': lr, 'loss': totals['loss'] / samples, 'ce': totals['ce'] / samples, 'kd': totals['kd'] / samples,
            'accuracy': totals['correct'] / samples, 'samples': totals['samples'], 'stopped': stopped,
            'iteration': progress.iteration, 'bad_images': gather_messages(progress.bad_images),
            'truncated_images': gather_messages(progress.truncated_images)}


class StopSignals:
    """SIGTERM (eviction) and SIGINT (Ctrl-C) only ask the run to stop (`name` is then the first signal's name);
    a third signal interrupts at once."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name = None
        self._seen = 0
        self._previous_handlers = {}

    def install(self):
        """Route SIGTERM and SIGINT here (main thread only)."""
        for number in self.SIGNALS:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def restore(self):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _on_signal(self, number, frame):
        self._seen += 1
        self.name = self.name or signal.Signals(number).name
        if self._seen >= 3:
            raise KeyboardInterrupt(f'{signal.Signals(number).name} received three times')


class RunControl:
    """When to write a checkpoint within an epoch and when to stop, decided the same way on every process.

    A stop request (see StopSignals) is agreed through an all-reduce of CPU tensors (over gloo, beside NCCL)
    issued after one iteration and read after the next, so that no GPU stream waits for it, and all processes stop
    after the same iteration. `checkpoint_seconds` > 0 asks for a checkpoint whenever that much time has passed
    since the last one (rank 0's clock decides).
    """

    def __init__(self, checkpoint_seconds: float, write_checkpoint):
        self.checkpoint_seconds = checkpoint_seconds
        self._write = write_checkpoint
        self.signals = StopSignals()
        self._last_checkpoint = time.monotonic()
        self._pending = None
        self._distributed = distributed()
        self._is_clock = not self._distributed or dist.get_rank() == 0
        # a CPU group for these flags: a device tensor would copy from the host, and wait for the GPU, each step
        self._group = dist.new_group(backend='gloo') if self._distributed and dist.get_backend() != 'gloo' else None

    def _local_flags(self) -> torch.Tensor:
        due = (self.checkpoint_seconds > 0 and self._is_clock and
               time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds)
        return torch.tensor([float(self.signals.name is not None), float(due)])

    def after_iteration(self) -> tuple[bool, str | None]:
        """(write a checkpoint now, the name of the signal to stop for or None), the same on every process."""
        flags = self._local_flags()
        if self._distributed:
            decided = self._collect()
            self._pending = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
            flags = decided
        if flags is None:
            return False, None
        stop, due = (bool(value) for value in flags.tolist())
        return due, (self.signals.name or 'a signal on another process') if stop else None

    def _collect(self):
        if self._pending is None:
            return None
        flags, work = self._pending
        self._pending = None
        work.wait()
        return flags

    def end_of_epoch(self):
        """Drain the decision in flight; the epoch's own checkpoint follows."""
        if self._distributed:
            self._collect()

    def stop_requested(self) -> str | None:
        """Whether any process was asked to stop (a collective: every process calls it at the same point)."""
        flags = self._local_flags()
        if self._distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return (self.signals.name or 'a signal on another process') if flags[0].item() else None

    def write_checkpoint(self, epoch: int, progress: EpochProgress):
        """Write the mid-epoch checkpoint through the run's writer (every process calls it)."""
        self._write(epoch, progress)
        self.checkpoint_written()

    def checkpoint_written(self):
        """Restart the clock of time-based checkpoints (after any checkpoint, the epoch's own included)."""
        self._last_checkpoint = time.monotonic()


class NonFiniteWatch:
    """Watches the loss for NaN or infinity without making the GPU wait each step; `check` stops every process.

    In bf16 or fp32 the first non-finite loss stops the run. Under fp16 the gradient scaler skips such a step and
    lowers its scale, so the run stops only after FP16_SKIPS_ALLOWED non-finite steps in a row.
    """
    FP16_SKIPS_ALLOWED = 100

    def __init__(self, device: torch.device, skips_allowed: bool):
        self.limit = self.FP16_SKIPS_ALLOWED if skips_allowed else 1
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)
        self.last_iteration = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, finite: torch.Tensor, iteration: int):
        self.in_a_row = torch.where(finite, torch.zeros_like(self.in_a_row), self.in_a_row + 1)
        reached = (self.in_a_row >= self.limit) & (self.longest < self.limit)
        self.last_iteration = torch.where(reached, torch.full_like(self.last_iteration, iteration),
                                          self.last_iteration)
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def check(self, epoch: int):
        """Raise NonFiniteLossError on every process once any of them has reached the limit."""
        figures = torch.stack([self.longest, self.last_iteration])
        if distributed():
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        longest, iteration = figures.tolist()
        if longest >= self.limit:
            in_a_row = f' ({self.limit} steps in a row, each skipped by the fp16 gradient scaler)' \
                if self.limit > 1 else ''
            raise NonFiniteLossError(
                f'epoch {epoch} iteration {iteration}: the loss is not finite{in_a_row}; the run directory keeps the '
                'checkpoint of the last good epoch, which a rerun would reach again: start a new run (another '
                '--suffix) with a lower --lr, or --amp bf16 instead of fp16')


def broadcast_batch_norm_statistics(module: nn.Module):
    """Give every process rank 0's BatchNorm statistics, so that validation, the best-epoch choice and the saved
    weights are about one model (between DDP's broadcasts each process updates its own)."""
    if not distributed():
        return
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for buffer in layer.buffers():
                dist.broadcast(buffer, src=0)


@torch.no_grad()
def validate(classifier, loader, batch_transform, device: torch.device, amp: str):
    """{'loss', 'accuracy', 'interval', 'truncated_images'}: cross-entropy and top-1 accuracy of margin-free cosine
    logits, the half-width of the accuracy's 95% interval, and the truncated files decoded on the way. An
    unreadable image on any process stops every process (StopOnEveryRank)."""
    classifier.eval()
    # summed cross-entropy and correct predictions stay on the device until the end
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    samples = 0
    problems, truncated = [], []
    for batch in loader:
        problems.extend(_named(batch, 'bad'))
        truncated.extend(_named(batch, 'truncated'))
        if problems:
            break
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=False)
        labels = batch['label'].to(device, non_blocking=True)
        with autocast_context(device, amp):
            _, logits = classifier(images)
        samples += labels.numel()
        sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction='sum'),
                             (logits.argmax(dim=1) == labels).sum().float()]).double()
    stop_if_any_process_failed(problems)
    loss_sum, correct, samples = global_sum(sums.tolist() + [samples], device)
    samples = max(samples, 1.0)
    accuracy = correct / samples
    interval = 1.96 * math.sqrt(accuracy * (1 - accuracy) / samples)
    return {'loss': loss_sum / samples, 'accuracy': accuracy, 'interval': interval,
            'truncated_images': gather_messages(truncated)}


@torch.no_grad()
def extract_features(backbone, loader, batch_transform, device: torch.device, amp: str, total: int,
                     show_progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(L2-normalised float32 features of every image of `loader`'s list in list order, truncated files decoded on
    the way), on every process. An unreadable image on any process stops every process (StopOnEveryRank)."""
    backbone.eval()
    features, indices = [], []
    problems, truncated = [], []
    for batch in tqdm(loader, desc='features', disable=not show_progress, dynamic_ncols=True):
        problems.extend(_named(batch, 'bad'))
        truncated.extend(_named(batch, 'truncated'))
        if problems:
            break
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=False)
        with autocast_context(device, amp):
            output = backbone(images)
        features.append(F.normalize(output.float(), dim=1))
        indices.append(batch['index'].to(device))
    stop_if_any_process_failed(problems)
    feature_dim = getattr(backbone, 'feature_dim', None) or (features[0].shape[1] if features else 0)
    local_features = torch.cat(features) if features else torch.zeros(0, feature_dim, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    return gather_in_order(local_features, local_indices, total).cpu(), gather_messages(truncated)


def test_report(student_features, teacher_features, coarse_labels, fine_labels, coarse_mask, fine_mask):
    """TAR@FAR and nearest-neighbour accuracy (coarse, fine) of the student, the teacher and student-to-teacher."""
    pairs = {'student': (student_features, None)}
    if teacher_features is not None:
        pairs.update(teacher=(teacher_features, None), cross=(student_features, teacher_features))
    report = {}
    for name, (features, gallery) in pairs.items():
        report[name] = utils.evaluate_features(features, coarse_labels, fine_labels, gallery_features=gallery,
                                               coarse_mask=coarse_mask, fine_mask=fine_mask)
    return report


# ---------------------------------------------------------------------------------------------------------- the run
CHECKPOINT_NAME = 'checkpoint.pth.tar'
PREVIOUS_CHECKPOINT_NAME = 'checkpoint.prev.pth.tar'
BEST_NAME = 'max_acc.pth'


class RunInterrupted(Exception):
    """The run stopped on a signal after writing its checkpoint; carries the exit status."""

    def __init__(self, exit_status: int):
        super().__init__(exit_status)
        self.exit_status = exit_status


@dataclass
class RunPlace:
    """Where a run happens: its directory, its logger, and this process among the run's processes."""
    run_dir: str
    logger: object
    rank: int
    world_size: int
    device: torch.device


@dataclass
class TrainingParts:
    """What main.py builds for training: `student` is the module the step calls (distiller.student, or its DDP
    form), `schedule(epoch_progress, epoch)` the learning rate."""
    distiller: nn.Module
    student: nn.Module
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: object
    val_loader: object
    batch_transform: object
    schedule: object


def hold_run_directory(run_dir: str, rank: int, world_size: int) -> utils.RunLock | None:
    """Create the run directory and take its lock (rank 0; returned for release); every process stops if another
    run holds it, or if the run directory is not on storage that every process shares."""
    lock, problems = None, []
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        try:
            lock = utils.RunLock(run_dir).acquire()
        except utils.RunDirectoryBusy as error:
            problems.append(str(error))
    stop_if_any_process_failed(problems)
    try:
        if world_size > 1:
            check_shared_storage(run_dir, rank)
    except StopOnEveryRank:
        if lock is not None:
            lock.release()
        raise
    return lock


def check_shared_storage(run_dir: str, rank: int):
    """Every process must read the token that rank 0 wrote into the run directory: checkpoints, max_acc.pth and
    the resume decision are written by rank 0 and read by all."""
    token_path = os.path.join(run_dir, '.shared_storage_check')
    token = []
    if rank == 0:
        token = [f'{socket.gethostname()}:{os.getpid()}:{time.time()}']
        with open(token_path, 'w', encoding='utf-8') as handle:
            handle.write(token[0])
    token = gather_messages(token)[0]  # every process waits here until the token is written
    try:
        with open(token_path, encoding='utf-8') as handle:
            seen = handle.read()
    except OSError:
        seen = None
    problems = [] if seen == token else [
        f'process {rank} on host {socket.gethostname()} does not see {run_dir} as rank 0 wrote it: --save_dir must '
        'be storage that every host shares (SAVE_DIR in start.sh)']
    problems = gather_messages(problems)
    if rank == 0:
        os.remove(token_path)
    if problems:
        raise StopOnEveryRank(problems[0])


def seed_epoch(seed: int, epoch: int, rank: int):
    """Reseed every generator from (seed, epoch, rank): a resumed epoch draws what an uninterrupted one drew."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def advance_progress(progress: dict, epoch: int, validation: dict | None, validating: bool) -> bool:
    """Mark `epoch` done in `progress`, and as the best epoch when it is (returned): without a validation list the
    latest epoch is; ties go to the later epoch, as the original."""
    improved = not validating or (validation is not None and validation['accuracy'] >= progress['best_accuracy'])
    if improved:
        progress.update(best_accuracy=validation['accuracy'] if validation else -1.0, best_epoch=epoch)
    progress.update(epoch=epoch, iteration=0)
    return improved


class Trainer:
    """Resume, then the epoch loop: train, validate, keep the best student, write the checkpoints; stop on a signal.

    `progress` (epochs done, iterations into the next, best accuracy and epoch) is what the checkpoints carry
    besides the weights; `logged_images` the files already reported bad or truncated in this run.
    """

    def __init__(self, args, parts: TrainingParts, place: RunPlace):
        self.args, self.parts, self.place = args, parts, place
        self.progress = {'epoch': 0, 'iteration': 0, 'best_accuracy': -1.0, 'best_epoch': 0}
        self.logged_images = set()
        self.checkpoints = Checkpoints(place, parts, head_fixed=args.head_fixed, seed=args.seed)
        self.control = RunControl(args.checkpoint_minutes * 60, self._write_within_epoch)

    def fit(self):
        """Train from where the run directory's checkpoint left off to --max_epoch."""
        resumed, epoch_progress = self.checkpoints.resume()
        self.progress = resumed or self.progress
        self.control.signals.install()
        try:
            for epoch in range(self.progress['epoch'] + 1, self.args.max_epoch + 1):
                self._epoch(epoch, epoch_progress)
                epoch_progress = EpochProgress()
        finally:
            self.control.signals.restore()
        if self.parts.val_loader is not None and self.progress['best_epoch']:
            log_best_epoch(self.place.logger, self.progress)

    def best_student(self) -> nn.Module:
        """The backbone of max_acc.pth, or the student as it is when no epoch was trained (an untrained floor)."""
        best, args = self.checkpoints.path(BEST_NAME), self.args
        if not os.path.exists(best):
            return self.parts.distiller.student.backbone
        return models.load_backbone(args.backbone_class, best, args.img_size, args.demo_width_divisor,
                                    args.drop_block).to(self.place.device)

    def _epoch(self, epoch: int, epoch_progress: EpochProgress):
        args, parts, place = self.args, self.parts, self.place
        seed_epoch(args.seed, epoch, place.rank)
        parts.train_loader.sampler.set_epoch(epoch, skip=epoch_progress.iteration * parts.train_loader.batch_size)
        stats = train_one_epoch(parts, epoch, device=place.device, amp=args.amp, logger=place.logger,
                                log_interval=args.log_interval, world_size=place.world_size,
                                show_progress=place.rank == 0, progress=epoch_progress, control=self.control)
        if stats['stopped']:
            stop_run(place.logger, stats['stopped'], f'in epoch {epoch} after iteration {stats["iteration"]}',
                     self.checkpoints.path(CHECKPOINT_NAME))
        check_bad_images(stats, args.max_bad_images, epoch, place.logger, self.logged_images)
        broadcast_batch_norm_statistics(parts.distiller.student)
        validation = None
        if parts.val_loader is not None and (epoch % args.eval_interval == 0 or epoch == args.max_epoch):
            validation = validate(parts.distiller.student, parts.val_loader, parts.batch_transform, place.device,
                                  args.amp)
            log_truncated(validation['truncated_images'], place.logger, self.logged_images)
        log_epoch(place.logger, epoch, stats, validation)
        improved = advance_progress(self.progress, epoch, validation, validating=parts.val_loader is not None)
        self.checkpoints.save_epoch_end(self.progress, improved)
        self.control.checkpoint_written()
        stopped = self.control.stop_requested()
        if stopped:
            stop_run(place.logger, stopped, f'after epoch {epoch}', self.checkpoints.path(CHECKPOINT_NAME))

    def _write_within_epoch(self, epoch: int, current: EpochProgress):
        self.checkpoints.save_within_epoch(dict(self.progress, epoch=epoch - 1, iteration=current.iteration), current)


def stop_run(logger, signal_name: str, where: str, checkpoint_path: str):
    """Say where the run stopped and how to resume it, and end it with the signal's exit status."""
    logger.info(f'stopped by {signal_name} {where}: checkpoint written to {checkpoint_path}; the same command '
                'resumes from there')
    raise RunInterrupted(128 + getattr(signal, signal_name, signal.SIGTERM))


def log_best_epoch(logger, progress: dict):
    logger.info(f'best epoch {progress["best_epoch"]}: eval_acc={progress["best_accuracy"]:.4f}')
    logger.result('best_epoch', progress['best_epoch'])
    logger.result('best_accuracy', progress['best_accuracy'])


class Checkpoints:
    """The run's files for resuming: the latest state (the previous one kept beside it) and max_acc.pth. Rank 0
    writes them, atomically, and every process waits for the write; `resume` chooses and loads one."""

    def __init__(self, place: RunPlace, parts: TrainingParts, *, head_fixed: bool, seed: int):
        self.place, self.parts, self.head_fixed, self.seed = place, parts, head_fixed, seed

    def path(self, name: str) -> str:
        return os.path.join(self.place.run_dir, name)

    def save_epoch_end(self, progress: dict, improved: bool):
        """The checkpoint after an epoch, and max_acc.pth when the epoch improved."""
        def write():
            if improved:
                utils.save_atomically(models.student_weights(self.parts.distiller.student,
                                                             include_head=not self.head_fixed), self.path(BEST_NAME))
            self._save(training_state(self.parts, progress, head_fixed=self.head_fixed, seed=self.seed))
        self._write_on_rank_zero(write)

    def save_within_epoch(self, progress: dict, current: EpochProgress):
        """The checkpoint within an epoch, with every process's position, partial sums and random generators."""
        every_process = gather_objects(checkpoint_epoch_state(current))
        self._write_on_rank_zero(lambda: self._save(dict(
            training_state(self.parts, progress, head_fixed=self.head_fixed, seed=self.seed),
            epoch_progress=every_process)))

    def _save(self, state: dict):
        utils.save_atomically(state, self.path(CHECKPOINT_NAME), self.path(PREVIOUS_CHECKPOINT_NAME), verify=True)

    def _write_on_rank_zero(self, write):
        """Rank 0 writes while the others wait; a write that fails (disk full, storage gone) stops every process
        with its message instead of leaving the others waiting for rank 0."""
        problems = []
        if self.place.rank == 0:
            try:
                write()
            except (OSError, RuntimeError) as error:
                problems.append(f'could not write a checkpoint in {self.place.run_dir}: {models.first_line(error)}; '
                                'the files already there are whole: free space or fix the storage, then rerun')
        stop_if_any_process_failed(problems)

    def resume(self) -> tuple[dict | None, EpochProgress]:
        """(the progress of the checkpoint chosen by choose_checkpoint, or None for a new run; where to resume
        within the epoch), the student, optimizer and scaler loaded from it."""
        chosen, state = choose_checkpoint(self.place.run_dir, self.place.rank, self.place.logger)
        if not chosen:
            return None, EpochProgress()
        if state is None:
            state = torch.load(chosen, map_location='cpu', weights_only=True)
        load_training_state(self.parts, state, chosen, head_fixed=self.head_fixed, seed=self.seed)
        progress = dict(state['progress'])
        progress.setdefault('iteration', 0)
        epoch_progress = EpochProgress()
        if progress['iteration']:
            epoch_progress = this_process_epoch_progress(state.get('epoch_progress') or [], chosen, self.place)
            where = f'epoch {progress["epoch"] + 1} iteration {epoch_progress.iteration}'
        else:
            where = f'the end of epoch {progress["epoch"]}'
        self.place.logger.info(f'resumed from {chosen} at {where}')
        return progress, epoch_progress


def this_process_epoch_progress(every_process: list, path: str, place: RunPlace) -> EpochProgress:
    """This process's position within the epoch of a checkpoint written within an epoch."""
    if len(every_process) != place.world_size:
        raise SystemExit(f'error: {path} was written within an epoch by {len(every_process)} processes; resume it '
                         f'with {len(every_process)} processes (the epoch\'s batches are split among them)')
    return epoch_progress_from(every_process[place.rank])


def training_state(parts: TrainingParts, progress: dict, *, head_fixed: bool, seed: int) -> dict:
    """Everything an exact resume needs; the frozen shared head is not stored (it comes from the teacher)."""
    student = parts.distiller.student
    student_state = {key: value for key, value in student.state_dict().items()
                     if not (head_fixed and key.startswith('head.'))}
    return {'student': student_state, 'optimizer': parts.optimizer.state_dict(), 'scaler': parts.scaler.state_dict(),
            'progress': dict(progress), 'seed': seed, 'batches_seen': getattr(student.backbone, 'batches_seen', 0)}


def load_training_state(parts: TrainingParts, state: dict, path: str, *, head_fixed: bool, seed: int):
    """The student, optimizer, scaler and DropBlock progress of a checkpoint of this configuration."""
    if state.get('seed') != seed:
        raise SystemExit(f'error: {path} was written with --seed {state.get("seed")}; rerun with that seed or '
                         'another --suffix')
    student = parts.distiller.student
    missing, unexpected = student.load_state_dict(state['student'], strict=False)
    missing = [key for key in missing if not (head_fixed and key.startswith('head.'))]
    if missing or unexpected:
        raise SystemExit(f'error: {path} does not fit the student: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}; was it written by another configuration?')
    parts.optimizer.load_state_dict(state['optimizer'])
    if parts.scaler.is_enabled() and state['scaler']:
        parts.scaler.load_state_dict(state['scaler'])
    if hasattr(student.backbone, 'batches_seen'):
        student.backbone.batches_seen = int(state['batches_seen'])


def checkpoint_epoch_state(progress: EpochProgress) -> dict:
    """An EpochProgress as plain Python data, which all_gather_object and a weights-only checkpoint can carry."""
    state = dataclasses.asdict(progress)
    generators = dict(state['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, keys.tolist(), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = generators[device].tolist()
    return dict(state, random_state=generators)


def epoch_progress_from(state: dict) -> EpochProgress:
    """The inverse of checkpoint_epoch_state."""
    generators = dict(state['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = torch.tensor(generators[device], dtype=torch.uint8)
    return EpochProgress(**dict(state, random_state=generators))


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
            aside = f'{path}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
            os.replace(path, aside)
            logger.info(f'{path} does not load ({reason}): set aside as {aside}; resuming from {decision[0]}')
    stop_if_any_process_failed(problems)
    chosen = gather_messages(decision)
    return (chosen[0], state) if chosen else (None, None)


def announce_undefined_figures(samples, coarse_mask: str | None, fine_mask: str | None, logger):
    """Say before any work which test figures the test list cannot give (they are reported as nan at the end)."""
    for grain, labels, mask in (('coarse', [sample.label for sample in samples], coarse_mask),
                                ('fine', [sample.fine_label for sample in samples], fine_mask)):
        problem = utils.labels_problem(labels) if samples and not mask else None
        if problem:
            logger.info(f'note: the test list gives no {grain} TARs: {problem}; they will be reported as nan')


def run_test(args, place: RunPlace, loader, batch_transform, student_backbone: nn.Module,
             teacher_backbone: nn.Module | None, logged_images: set):
    """Open-set features, TAR@FAR (coarse, fine, cross), nearest-neighbour accuracy, opensetFeat.npy, roc.png.

    A figure that cannot exist (no positive or negative pair in a grain, fewer than two images) is written as nan
    with a line saying why; the others are written as usual."""
    def features_of(backbone):
        features, truncated = extract_features(backbone, loader, batch_transform, place.device, args.amp,
                                               total=len(loader.dataset), show_progress=place.rank == 0)
        log_truncated(truncated, place.logger, logged_images)
        return features

    student_features = features_of(student_backbone)
    teacher_features = features_of(teacher_backbone) if teacher_backbone is not None else None
    if place.rank != 0:
        return
    np.save(os.path.join(place.run_dir, 'opensetFeat.npy'), student_features.numpy().astype(np.float32))
    report = test_report(student_features, teacher_features, loader.dataset.labels, loader.dataset.fine_labels,
                         coarse_mask=args.test_mask_coarse, fine_mask=args.test_mask_fine)
    log_test(place.logger, report, os.path.join(place.run_dir, 'roc.png'))


def log_test(logger, report, roc_path):
    """The TAR lines and nearest-neighbour lines of record.txt, tensorboard scalars and roc.png."""
    names = {'student': 'test acc', 'teacher': 'teacher acc', 'cross': 'cross acc'}
    curves = {}
    for name, result in report.items():
        logger.info(utils.format_tar_line(names[name], result['coarse'], result['fine']))
        logger.info(f'{name} nearest-neighbour top-1: coarse={result["coarse_nn_accuracy"]:.5f}, '
                    f'fine={result["fine_nn_accuracy"]:.5f}')
        for grain in ('coarse', 'fine'):
            if result[f'{grain}_undefined']:
                logger.info(f'{name} {grain} TARs are nan (undefined): {result[f"{grain}_undefined"]}')
            for far, tar in zip(utils.DEFAULT_FARS, result[grain]):
                if not math.isnan(tar):
                    logger.scalar(f'test/{name}_{grain}_tar@far{far:.0e}', tar, 0)
            if not result[f'{grain}_undefined']:
                curves[f'{name} {grain}'] = result[f'{grain}_curve']
    logger.result('test', {name: dict(result, **{f'{grain}_curve': dict(zip(('far', 'tar'), result[f'{grain}_curve']))
                                                 for grain in ('coarse', 'fine')})
                           for name, result in report.items()})
    utils.plot_roc(curves, roc_path)


def log_truncated(paths, logger, logged: set):
    """Log each truncated image once a run; they are used, as the original used them."""
    for path in sorted(set(paths) - logged):
        logger.info(f'truncated image (decoded with its missing part filled in, as the original did): {path}')
        logged.add(path)


def check_bad_images(stats, max_fraction: float, epoch: int, logger, logged: set):
    """Log each replaced or truncated image once a run; stop when more than `max_fraction` of the epoch was
    unreadable (truncated images are used, and do not count)."""
    log_truncated(stats['truncated_images'], logger, logged)
    bad = sorted(set(stats['bad_images']))
    for message in bad:
        if message not in logged:
            logger.info(f'bad image (replaced): {message}')
            logged.add(message)
    if bad:
        logger.info(f'epoch {epoch}: {len(bad)} bad images replaced')
    if len(bad) > max_fraction * max(stats['samples'], 1):
        raise SystemExit(f'error: epoch {epoch}: {len(bad)} of {int(stats["samples"])} images were unreadable, '
                         f'more than --max_bad_images {max_fraction}; fix the data (see record.txt)')


def log_epoch(logger, epoch, stats, validation):
    """The epoch line of record.txt (the original's format) and its tensorboard scalars; an epoch that was not
    validated has no validation figures."""
    evaluated = ''
    scalars = [('train/accuracy', stats['accuracy']), ('train/epoch_ce_loss', stats['ce']),
               ('train/epoch_kd_loss', stats['kd'])]
    if validation is not None:
        evaluated = (f'eval_loss={validation["loss"]:.4f}, '
                     f'eval_acc={validation["accuracy"]:.4f}+{validation["interval"]:.4f}, ')
        scalars += [('val/loss', validation['loss']), ('val/accuracy', validation['accuracy'])]
    logger.info(f'epoch {epoch}  lr {stats["lr"]:.6g}: train_acc={stats["accuracy"]:.4f}, {evaluated}'
                f'avg_ce_loss={stats["ce"]:.4f}, avg_kd_loss={stats["kd"]:.4f}')
    logger.epoch_result({'epoch': epoch, 'lr': stats['lr'], 'train_accuracy': stats['accuracy'], 'loss': stats['loss'],
                         'ce': stats['ce'], 'kd': stats['kd'],
                         'val_loss': validation['loss'] if validation else None,
                         'val_accuracy': validation['accuracy'] if validation else None})
    for tag, value in scalars:
        logger.scalar(tag, value, epoch)
