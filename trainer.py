"""The loss, the learning-rate schedule, and the train, validation and test loops."""
import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils

KD_LOSSES = ('KD', 'global_KD', 'tempered_KD')


class DistillationLoss(nn.Module):
    """Cross-entropy on the student's logits plus a distillation term (SPEC §2).

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
            teacher_log_probs = F.log_softmax(teacher_logits, dim=1)
            student_log_probs = F.log_softmax(student_logits / self.temperature, dim=1)
            return self.world_size * (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum()
        teacher_log_probs = F.log_softmax(teacher_logits / self.temperature, dim=1)
        student_log_probs = F.log_softmax(student_logits / self.temperature, dim=1)
        kl_per_sample = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=1)
        # a mean over the local batch is already the global mean once DDP averages gradients
        return kl_per_sample.mean() * self.temperature ** 2


def learning_rate(epoch_progress: float, epoch: int, base_lr: float, min_lr: float, warmup_epochs: int,
                  max_epoch: int, scheduler: str, step_size: list[int], gamma: float) -> float:
    """The rate at `epoch_progress` = epoch + iteration / iterations_per_epoch (epochs numbered from 1).

    Linear warm-up while epoch_progress < warmup_epochs, then cosine as the original (SPEC §3), or a
    step decay by `gamma` every `step_size[0]` epochs (`step`) or at each epoch in `step_size` (`multistep`).
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
    """torch.autocast for `--amp bf16|fp16`, a null context for `none`."""
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (identity without torch.distributed)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value) -> list:
    """Every process's `value`, in rank order, on every process (a one-element list without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_messages(messages: list[str]) -> list[str]:
    """All processes' messages, in rank order, on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return messages
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, messages)
    return [message for rank_messages in gathered for message in rank_messages]


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


def train_one_epoch(model, student, criterion, optimizer, scaler, loader, batch_transform, epoch: int,
                    schedule, device: torch.device, amp: str, logger, log_interval: int, world_size: int,
                    show_progress: bool, progress: EpochProgress | None = None, control=None):
    """One pass over `loader` (from `progress.iteration` when resuming); returns a dict of epoch averages (over
    all processes), the bad and truncated images, and 'stopped': the signal that stopped the epoch early, or None.

    `model` is the DistillationModel (its teacher gives the targets), `student` the module that is trained
    (the DDP wrapper of model.student when distributed), `schedule(epoch_progress, epoch)` the learning rate.
    `control` (a RunControl) decides after each iteration whether to write a checkpoint or to stop.
    Figures stay on the device between log points, so that a GPU is not made to wait every step.
    """
    model.train()
    progress = progress or EpochProgress()
    first_iteration = progress.iteration
    iterations = first_iteration + len(loader)
    sums = torch.tensor(progress.sums, dtype=torch.float64, device=device)
    non_finite = NonFiniteWatch(device, skips_allowed=scaler.is_enabled())
    batches = iter(loader)
    if progress.random_state is not None:
        # a resumed epoch draws on from where the interrupted one wrote its checkpoint
        set_random_state(progress.random_state)
    bar = tqdm(batches, desc=f'epoch {epoch}', disable=not show_progress, dynamic_ncols=True,
               initial=first_iteration, total=iterations)
    start, lr, stopped = time.perf_counter(), schedule(epoch + first_iteration / iterations, epoch), None
    for iteration, batch in enumerate(bar, start=first_iteration):
        lr = schedule(epoch + iteration / iterations, epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        progress.bad_images.extend(path for message in _named(batch, 'bad') for path in message.split('; '))
        progress.truncated_images.extend(_named(batch, 'truncated'))
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=True)
        labels = batch['label'].to(device, non_blocking=True)
        with autocast_context(device, amp):
            # the teacher first: its temporaries are freed before the student's activations are saved
            teacher_features, teacher_logits = (model.teacher_outputs(images, labels)
                                                if model.teacher is not None else (None, None))
            student_features, student_logits = student(images, labels)
        loss, cross_entropy, distillation = criterion(student_features, student_logits, teacher_features,
                                                      teacher_logits, labels)
        finite = torch.isfinite(loss)
        non_finite.update(finite, iteration)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        batch_size = labels.numel()
        progress.samples += batch_size
        progress.iteration = iteration + 1
        correct = (student_logits.argmax(dim=1) == labels).sum()
        figures = torch.stack([loss.detach() * batch_size, cross_entropy * batch_size, distillation * batch_size,
                               correct.to(loss.dtype)]).double()
        sums += torch.where(finite, figures, torch.zeros_like(figures))  # a step the scaler skipped adds nothing
        if (iteration + 1) % log_interval == 0 or iteration + 1 == iterations:
            non_finite.check(epoch)
            step = (epoch - 1) * iterations + iteration
            logger.scalar('train/ce_loss', cross_entropy.item(), step)
            logger.scalar('train/kd_loss', distillation.item(), step)
            logger.scalar('train/lr', lr, step)
            if show_progress:
                images_per_second = (progress.samples * world_size /
                                     max(time.perf_counter() - start, 1e-9))
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_second:.1f}')
        if control is not None and iteration + 1 < iterations:
            write_checkpoint, stopped = control.after_iteration()
            if write_checkpoint or stopped:
                # never a checkpoint of weights that a non-finite loss has already spoilt
                non_finite.check(epoch)
                progress.sums = sums.tolist()
                progress.random_state = random_state()
                control.write_checkpoint(epoch, progress)
            if stopped:
                bar.close()
                break
    if control is not None:
        control.end_of_epoch()
    totals = dict(zip(('loss', 'ce', 'kd', 'correct', 'samples'),
                      global_sum(sums.tolist() + [progress.samples], device)))
    samples = max(totals['samples'], 1.0)
    return {'lr': lr, 'loss': totals['loss'] / samples, 'ce': totals['ce'] / samples, 'kd': totals['kd'] / samples,
            'accuracy': totals['correct'] / samples, 'samples': totals['samples'], 'stopped': stopped,
            'iteration': progress.iteration,
            'bad_images': gather_messages(progress.bad_images),
            'truncated_images': gather_messages(progress.truncated_images)}


class RunControl:
    """When to write a checkpoint within an epoch and when to stop, decided the same way on every process.

    SIGTERM (eviction) and SIGINT (Ctrl-C) only ask the run to stop: the processes agree on it through an
    all-reduce issued after one iteration and read after the next, so that no GPU waits for it, and all stop
    after the same iteration. A third signal interrupts at once. `checkpoint_seconds` > 0 asks for a checkpoint
    whenever that much time has passed since the last one (rank 0's clock decides).
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_seconds: float, device: torch.device, write_checkpoint):
        self.checkpoint_seconds = checkpoint_seconds
        self.device = device
        self._write = write_checkpoint
        self.signal_name = None
        self._signals_seen = 0
        self._previous_handlers = {}
        self._last_checkpoint = time.monotonic()
        self._pending = None
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._is_clock = not self._distributed or dist.get_rank() == 0

    def install_signal_handlers(self):
        """Route SIGTERM and SIGINT to a stop request (main thread only)."""
        for number in self.SIGNALS:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def restore_signal_handlers(self):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _on_signal(self, number, frame):
        self._signals_seen += 1
        self.signal_name = self.signal_name or signal.Signals(number).name
        if self._signals_seen >= 3:
            raise KeyboardInterrupt(f'{signal.Signals(number).name} received three times')

    def _local_flags(self) -> torch.Tensor:
        due = (self.checkpoint_seconds > 0 and self._is_clock and
               time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds)
        return torch.tensor([float(self.signal_name is not None), float(due)], device=self.device)

    def after_iteration(self) -> tuple[bool, str | None]:
        """(write a checkpoint now, the name of the signal to stop for or None), the same on every process."""
        flags = self._local_flags()
        if self._distributed:
            decided = self._collect()
            self._pending = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True))
            flags = decided
        if flags is None:
            return False, None
        stop, due = (bool(value) for value in flags.tolist())
        return due, (self.signal_name or 'a signal on another process') if stop else None

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
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return (self.signal_name or 'a signal on another process') if flags[0].item() else None

    def write_checkpoint(self, epoch: int, progress: EpochProgress):
        """Write the mid-epoch checkpoint through the run's writer (every process calls it)."""
        self._write(epoch, progress)
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
        if dist.is_available() and dist.is_initialized():
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
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
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
                     gather_in_order, show_progress: bool = False) -> tuple[torch.Tensor, list[str]]:
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
