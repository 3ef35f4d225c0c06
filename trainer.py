"""The run: the learning-rate schedule, the training step and epoch, validation, and the Trainer that resumes, keeps
the best student and stops cleanly on a signal. helpers.py builds the pieces, losses.py holds the distillation loss."""
import dataclasses
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoints
import datasets
import losses
import precision
import utils
from checkpoints import EpochState, RunProgress


def learning_rate(epoch_position: float, epoch: int, *, base_lr: float, min_lr: float, warmup_epochs: int,
                  max_epoch: int, scheduler: str, step_size: list[int], gamma: float) -> float:
    """The rate at epoch_position = epoch + iteration / iterations_per_epoch (epochs from 1): linear warm-up, then
    cosine over max_epoch (as the original, not max_epoch - warmup), or decay by `gamma` at step_size's epochs."""
    if epoch_position < warmup_epochs:
        return base_lr * epoch_position / warmup_epochs
    if scheduler == 'cosine':
        cosine = 0.5 * (1 + math.cos(math.pi * (epoch_position - warmup_epochs) / max_epoch))
        return min_lr + (base_lr - min_lr) * cosine
    if scheduler == 'step':
        return base_lr * gamma ** ((epoch - 1) // step_size[0])
    return base_lr * gamma ** sum(epoch - 1 >= milestone for milestone in step_size)


class StopSignals:
    """SIGTERM (eviction) and SIGINT (Ctrl-C) ask the training to stop (`name`: the first signal's); a third
    interrupts at once. Outside training (`at_once` says where, and what is left on disk) the first ends the run."""

    def __init__(self):
        self.name = self.at_once = None
        self._seen, self._previous_handlers = 0, {}

    def install(self):
        """Route SIGTERM and SIGINT here (main thread only)."""
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def restore(self):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _on_signal(self, number, frame):
        self._seen += 1
        self.name = self.name or signal.Signals(number).name
        if self.at_once:
            raise RunInterrupted(128 + number, f'stopped by {signal.Signals(number).name} {self.at_once}')
        if self._seen >= 3:
            raise KeyboardInterrupt(f'{signal.Signals(number).name} received three times')


class RunControl:
    """When to checkpoint within an epoch and when to stop, the same on every process, agreed by an all-reduce of CPU
    tensors (gloo) read an iteration late so that no GPU waits; time-based checkpoints follow rank 0's clock."""

    def __init__(self, checkpoint_seconds: float, signals: StopSignals):
        self.checkpoint_seconds, self.signals = checkpoint_seconds, signals
        self._last_checkpoint, self._pending = time.monotonic(), None
        self._distributed = utils.distributed()
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
        if self._distributed:  # decide on the last iteration's reduced flags while this one's are reduced
            flags, self._pending = self.drain(), (
                flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
        if flags is None:
            return False, None
        stop, due = (bool(value) for value in flags.tolist())
        return due, (self.signals.name or 'a signal on another process') if stop else None

    def drain(self) -> torch.Tensor | None:
        """The flags of the all-reduce in flight once it is done (None when none is); the epoch's end drains it too."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending[1].wait()
        return pending[0]

    def stop_requested(self) -> str | None:
        """Whether any process was asked to stop (a collective: every process calls it at the same point)."""
        flags = self._local_flags()
        if self._distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return (self.signals.name or 'a signal on another process') if flags[0].item() else None

    def checkpoint_written(self):
        """Restart the clock of time-based checkpoints (after any checkpoint, the epoch's own included)."""
        self._last_checkpoint = time.monotonic()


class NonFiniteWatch:
    """Watches the loss for NaN or infinity without making the GPU wait each step; `check` stops every process at the
    first non-finite loss, or under fp16 (whose scaler skips such steps) at FP16_SKIPS_ALLOWED of them in a row."""
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
        if utils.distributed():
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        longest, iteration = figures.tolist()
        if longest >= self.limit:
            in_a_row = (f' ({self.limit} steps in a row, each skipped by the fp16 gradient scaler)'
                        if self.limit > 1 else '')
            raise NonFiniteLossError(
                f'epoch {epoch} iteration {iteration}: the loss is not finite{in_a_row}; the run directory keeps the '
                'checkpoint of the last good epoch, which a rerun would reach again: start a new run (another '
                '--suffix) with a lower --lr, or --amp bf16 instead of fp16')


def broadcast_batch_norm_statistics(module: nn.Module):
    """Copy rank 0's BatchNorm statistics to every process (DDP leaves each its own): one model is validated, saved."""
    if utils.distributed():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                for buffer in layer.buffers():
                    dist.broadcast(buffer, src=0)


@torch.no_grad()
def validate(classifier, loader, batch_transform, device: torch.device, amp: str):
    """{'loss', 'accuracy', 'interval', 'truncated_images'}: cross-entropy and top-1 accuracy of margin-free logits,
    the half-width of the accuracy's 95% interval, the truncated files; an unreadable image stops every process."""
    classifier.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss and correct, summed on the device
    samples, problems, truncated = 0, [], []
    for batch in loader:
        problems.extend(datasets.batch_messages(batch, 'bad'))
        truncated.extend(datasets.batch_messages(batch, 'truncated'))
        if problems:
            break
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=False)
        labels = batch['label'].to(device, non_blocking=True)
        with precision.autocast_context(device, amp):
            _, logits = classifier(images)
        samples += labels.numel()
        sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction='sum'),
                             (logits.argmax(dim=1) == labels).sum().float()]).double()
    utils.stop_if_any_process_failed(problems)
    loss_sum, correct, samples = utils.global_sum(sums.tolist() + [samples], device)
    samples = max(samples, 1.0)
    accuracy = correct / samples
    interval = 1.96 * math.sqrt(accuracy * (1 - accuracy) / samples)
    return {'loss': loss_sum / samples, 'accuracy': accuracy, 'interval': interval,
            'truncated_images': utils.gather_messages(truncated)}


class NonFiniteLossError(utils.RunError):
    """Raised when a loss becomes NaN or infinite; the last checkpoint on disk stays the good one."""


class RunInterrupted(Exception):
    """The run stopped on a signal, its files whole; carries the exit status and the line to log, if not yet said."""

    def __init__(self, exit_status: int, message: str | None = None):
        super().__init__(exit_status)
        self.exit_status, self.message = exit_status, message


@dataclasses.dataclass
class RunPlace:
    """Where a run happens: its directory, its logger, and this process among the run's processes."""
    run_dir: str
    logger: object
    rank: int
    world_size: int
    device: torch.device


@dataclasses.dataclass
class TrainingParts:
    """What helpers.py builds for training; `student` is what the step calls (distiller.student or its DDP form)."""
    distiller: nn.Module
    student: nn.Module
    criterion: losses.DistillationLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: object
    val_loader: object
    batch_transform: object
    schedule: object


def seed_epoch(seed: int, epoch: int, rank: int):
    """Reseed every generator from (seed, epoch, rank): a resumed epoch draws what an uninterrupted one drew."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def training_step(parts: TrainingParts, batch: dict, device: torch.device, amp: str):
    """One optimizer step on a batch: (loss, cross-entropy, distillation term, the step's sums: loss,
    cross-entropy and distillation times the batch size, correct predictions, batch size)."""
    images = parts.batch_transform(batch['image'].to(device, non_blocking=True), train=True,
                                   lighting=batch.get('lighting'))
    labels = batch['label'].to(device, non_blocking=True)
    distiller, teacher_features, teacher_logits = parts.distiller, None, None
    with precision.autocast_context(device, amp):
        if 'teacher_feature' in batch:  # from the teacher's cache: its logits through its classifier
            teacher_features = batch['teacher_feature'].to(device, non_blocking=True)
            teacher_logits = distiller.teacher_logits(teacher_features, labels)
        elif distiller.teacher is not None:
            # the teacher first: its temporaries are freed before the student's activations are saved
            teacher_features, teacher_logits = distiller.teacher_outputs(images, labels)
        student_features, student_logits = parts.student(images, labels)
    loss, cross_entropy, distillation = parts.criterion(student_features, student_logits, teacher_features,
                                                        teacher_logits, labels)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    batch_size, correct = labels.numel(), (student_logits.argmax(dim=1) == labels).sum()
    sums = torch.stack([loss.detach() * batch_size, cross_entropy * batch_size, distillation * batch_size,
                        correct.to(loss.dtype), torch.full_like(loss.detach(), batch_size)]).double()
    return loss, cross_entropy, distillation, sums


def train_one_epoch(parts: TrainingParts, epoch: int, *, place: RunPlace, amp: str, log_interval: int,
                    state: EpochState, progress: RunProgress, files: checkpoints.Checkpoints,
                    control: 'RunControl') -> dict:
    """One pass over parts.train_loader from `state.iteration`: averages over all processes, bad and truncated images,
    'stopped' (the signal that stopped it early, or None); a step the fp16 scaler skipped counts in no average."""
    parts.distiller.train()
    first_iteration, iterations = state.iteration, state.iteration + len(parts.train_loader)
    sums, first_samples = torch.tensor(state.sums, dtype=torch.float64, device=place.device), state.sums[4]
    non_finite = NonFiniteWatch(place.device, skips_allowed=parts.scaler.is_enabled())
    batches = iter(parts.train_loader)  # draws the loader's seed: before the generators are restored, as it was
    if state.random_state is not None:  # a resumed epoch draws on from where its checkpoint was written
        checkpoints.set_random_state(state.random_state)
    bar = tqdm(batches, desc=f'epoch {epoch}', disable=place.rank != 0, dynamic_ncols=True,
               initial=first_iteration, total=iterations)
    start, lr, stopped = time.perf_counter(), parts.schedule(epoch + first_iteration / iterations, epoch), None
    for iteration, batch in enumerate(bar, start=first_iteration):
        lr = parts.schedule(epoch + iteration / iterations, epoch)
        for group in parts.optimizer.param_groups:
            group['lr'] = lr
        state.bad_images.extend(path for message in datasets.batch_messages(batch, 'bad')
                                for path in message.split('; '))
        state.truncated_images.extend(datasets.batch_messages(batch, 'truncated'))
        loss, cross_entropy, distillation, step_sums = training_step(parts, batch, place.device, amp)
        finite = torch.isfinite(loss)
        non_finite.update(finite, iteration)
        sums += torch.where(finite, step_sums, torch.zeros_like(step_sums))
        state.iteration = iteration + 1
        if state.iteration % log_interval == 0 or state.iteration == iterations:
            non_finite.check(epoch)
            for tag, value in (('train/ce_loss', cross_entropy.item()), ('train/kd_loss', distillation.item()),
                               ('train/lr', lr)):
                place.logger.scalar(tag, value, (epoch - 1) * iterations + iteration)
            if place.rank == 0:
                images_per_second = ((float(sums[4]) - first_samples) * place.world_size /
                                     max(time.perf_counter() - start, 1e-9))
                bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_second:.1f}')
        if state.iteration == iterations:
            break
        checkpoint_due, stopped = control.after_iteration()
        if checkpoint_due or stopped:
            non_finite.check(epoch)  # never a checkpoint of weights that a non-finite loss has already spoilt
            state.sums, state.random_state = sums.tolist(), checkpoints.random_state()
            files.save_within_epoch(dataclasses.replace(progress, iteration=state.iteration), state)
            control.checkpoint_written()
        if stopped:
            bar.close()
            break
    control.drain()  # before the epoch's own checkpoint
    totals = dict(zip(('loss', 'ce', 'kd', 'correct', 'samples'), utils.global_sum(sums.tolist(), place.device)))
    samples = max(totals['samples'], 1.0)
    return {'lr': lr, 'loss': totals['loss'] / samples, 'ce': totals['ce'] / samples, 'kd': totals['kd'] / samples,
            'accuracy': totals['correct'] / samples, 'samples': totals['samples'], 'stopped': stopped,
            'iteration': state.iteration, 'bad_images': utils.gather_messages(state.bad_images),
            'truncated_images': utils.gather_messages(state.truncated_images)}


class Trainer:
    """Resume, then per epoch train, validate, keep the best, checkpoint with `flags` (a resume with others stops)."""

    def __init__(self, args, parts: TrainingParts, place: RunPlace, flags: dict, signals: StopSignals):
        self.args, self.parts, self.place, self.progress = args, parts, place, RunProgress()
        self.files = checkpoints.Checkpoints(
            place.run_dir, rank=place.rank, world_size=place.world_size, logger=place.logger,
            student=parts.distiller.student, optimizer=parts.optimizer, scaler=parts.scaler,
            head_fixed=args.head_fixed, flags=flags, architecture={
                'backbone': args.backbone_class, 'img_size': args.img_size, 'width_divisor': args.demo_width_divisor})
        self.control = RunControl(args.checkpoint_minutes * 60, signals)

    def fit(self):
        """Train from where the run directory's checkpoint left off to --max_epoch."""
        args, parts, place = self.args, self.parts, self.place
        resumed, state = self.files.resume()
        self.progress = resumed or self.progress
        for epoch in range(self.progress.epoch + 1, args.max_epoch + 1):
            seed_epoch(args.seed, epoch, place.rank)
            parts.train_loader.sampler.set_epoch(epoch, skip=state.iteration * parts.train_loader.batch_size)
            averages = train_one_epoch(parts, epoch, place=place, amp=args.amp, log_interval=args.log_interval,
                                       state=state, progress=self.progress, files=self.files, control=self.control)
            self._end_epoch(epoch, averages)
            state = EpochState()
        if parts.val_loader is not None and self.progress.best_epoch:
            place.logger.info(f'best epoch {self.progress.best_epoch}: eval_acc={self.progress.best_accuracy:.4f}')
            place.logger.result('best_epoch', self.progress.best_epoch)
            place.logger.result('best_accuracy', self.progress.best_accuracy)

    def _end_epoch(self, epoch: int, averages: dict):
        """Stop on a signal, or validate, log, and write the epoch's checkpoint (and max_acc.pth if it is best)."""
        args, parts, place, progress = self.args, self.parts, self.place, self.progress
        if averages['stopped']:
            self._stop(averages['stopped'], f'in epoch {epoch} after iteration {averages["iteration"]}')
        check_bad_images(averages, args.max_bad_images, epoch, place.logger)
        broadcast_batch_norm_statistics(parts.distiller.student)
        validation = None
        if parts.val_loader is not None and (epoch % args.eval_interval == 0 or epoch == args.max_epoch):
            validation = validate(parts.distiller.student, parts.val_loader, parts.batch_transform, place.device,
                                  args.amp)
            datasets.report_truncated(validation['truncated_images'], place.logger)
        log_epoch(place.logger, epoch, averages, validation)
        # without a validation list the latest epoch is the best; ties go to the later epoch, as the original
        improved = parts.val_loader is None or (validation is not None and
                                                validation['accuracy'] >= progress.best_accuracy)
        if improved:
            progress.best_accuracy, progress.best_epoch = (validation['accuracy'] if validation else -1.0), epoch
        progress.epoch, progress.iteration = epoch, 0
        self.files.save_epoch_end(progress, improved)
        self.control.checkpoint_written()
        if stopped := self.control.stop_requested():
            self._stop(stopped, f'after epoch {epoch}')

    def _stop(self, signal_name: str, where: str):
        """Say where the run stopped and how to resume it, and end it with the signal's exit status."""
        self.place.logger.info(f'stopped by {signal_name} {where}: checkpoint written to '
                               f'{self.files.path(checkpoints.CHECKPOINT_NAME)}; the same command resumes from there')
        raise RunInterrupted(128 + getattr(signal, signal_name, signal.SIGTERM))

    def best_weights(self) -> str | None:
        """max_acc.pth, or None if no epoch was trained; stop if it is missing: the test would score other weights."""
        best = self.files.path(checkpoints.BEST_NAME)
        if self.progress.best_epoch and not os.path.isfile(best):
            raise utils.RunError(f'{best}, the weights of the best epoch {self.progress.best_epoch}, is missing: put '
                                 'it back to test this run, or start a new one (another --suffix)')
        return best if self.progress.best_epoch else None


def check_bad_images(averages: dict, max_fraction: float, epoch: int, logger):
    """Log each replaced or truncated image once a run; stop when over `max_fraction` of the epoch was unreadable."""
    datasets.report_truncated(averages['truncated_images'], logger)
    bad = sorted(set(averages['bad_images']))
    for message in bad:
        logger.once(f'bad {message}', f'bad image (replaced): {message}')
    if bad:
        logger.info(f'epoch {epoch}: {len(bad)} bad images replaced')
    if len(bad) > max_fraction * max(averages['samples'], 1):
        raise utils.RunError(f'epoch {epoch}: {len(bad)} of {int(averages["samples"])} images were unreadable, '
                             f'more than --max_bad_images {max_fraction}; fix the data (see record.txt)')


def log_epoch(logger, epoch: int, averages: dict, validation: dict | None):
    """The epoch's line in record.txt (the original's format), its results row and its tensorboard scalars."""
    evaluated = ''
    scalars = [('train/accuracy', averages['accuracy']), ('train/epoch_ce_loss', averages['ce']),
               ('train/epoch_kd_loss', averages['kd'])]
    if validation is not None:
        evaluated = (f'eval_loss={validation["loss"]:.4f}, '
                     f'eval_acc={validation["accuracy"]:.4f}+{validation["interval"]:.4f}, ')
        scalars += [('val/loss', validation['loss']), ('val/accuracy', validation['accuracy'])]
    logger.info(f'epoch {epoch}  lr {averages["lr"]:.6g}: train_acc={averages["accuracy"]:.4f}, {evaluated}'
                f'avg_ce_loss={averages["ce"]:.4f}, avg_kd_loss={averages["kd"]:.4f}')
    logger.epoch_result({'epoch': epoch, 'lr': averages['lr'], 'train_accuracy': averages['accuracy'],
                         'loss': averages['loss'], 'ce': averages['ce'], 'kd': averages['kd'],
                         'val_loss': validation['loss'] if validation else None,
                         'val_accuracy': validation['accuracy'] if validation else None})
    for tag, value in scalars:
        logger.scalar(tag, value, epoch)


def step_sizes(text: str) -> list[int]:
    """'30' -> [30]; '30,60' -> [30, 60]; [] for text that is not integers."""
    try:
        return [int(part) for part in str(text).split(',') if part.strip()]
    except ValueError:
        return []
