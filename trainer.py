"""The loss, the learning-rate schedule, and the train, validation and test loops."""
import contextlib
import math
import time

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


def train_one_epoch(model, student, criterion, optimizer, scaler, loader, batch_transform, epoch: int,
                    schedule, device: torch.device, amp: str, logger, log_interval: int, world_size: int,
                    show_progress: bool):
    """One pass over `loader`; returns a dict of epoch averages (over all processes) and the bad images.

    `model` is the DistillationModel (its teacher gives the targets), `student` the module that is trained
    (the DDP wrapper of model.student when distributed), `schedule(epoch_progress, epoch)` the learning rate.
    Figures stay on the device between log points, so that a GPU is not made to wait every step.
    """
    model.train()
    iterations = len(loader)
    # loss, cross-entropy, distillation (each times the batch size), correct predictions
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    samples = 0
    first_non_finite = torch.full((), iterations, dtype=torch.long, device=device)
    bad_images, truncated_images = [], []
    progress = tqdm(loader, desc=f'epoch {epoch}', disable=not show_progress, dynamic_ncols=True)
    start = time.perf_counter()
    for iteration, batch in enumerate(progress):
        lr = schedule(epoch + iteration / iterations, epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr
        bad_images.extend(path for message in _named(batch, 'bad') for path in message.split('; '))
        truncated_images.extend(_named(batch, 'truncated'))
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=True)
        labels = batch['label'].to(device, non_blocking=True)
        with autocast_context(device, amp):
            student_features, student_logits = student(images, labels)
            teacher_features, teacher_logits = (model.teacher_outputs(images, labels)
                                                if model.teacher is not None else (None, None))
        loss, cross_entropy, distillation = criterion(student_features, student_logits, teacher_features,
                                                      teacher_logits, labels)
        first_non_finite = torch.where(torch.isfinite(loss) | (first_non_finite < iterations),
                                       first_non_finite, iteration)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        batch_size = labels.numel()
        samples += batch_size
        correct = (student_logits.argmax(dim=1) == labels).sum()
        sums += torch.stack([loss.detach() * batch_size, cross_entropy * batch_size, distillation * batch_size,
                             correct.to(loss.dtype)]).double()
        if (iteration + 1) % log_interval == 0 or iteration + 1 == iterations:
            check_finite(first_non_finite, iterations, epoch)
            step = (epoch - 1) * iterations + iteration
            logger.scalar('train/ce_loss', cross_entropy.item(), step)
            logger.scalar('train/kd_loss', distillation.item(), step)
            logger.scalar('train/lr', lr, step)
            if show_progress:
                images_per_second = samples * world_size / (time.perf_counter() - start)
                progress.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}', img_s=f'{images_per_second:.1f}')
    totals = dict(zip(('loss', 'ce', 'kd', 'correct', 'samples'), global_sum(sums.tolist() + [samples], device)))
    samples = max(totals['samples'], 1.0)
    return {'lr': lr, 'loss': totals['loss'] / samples, 'ce': totals['ce'] / samples, 'kd': totals['kd'] / samples,
            'accuracy': totals['correct'] / samples, 'samples': totals['samples'],
            'bad_images': gather_messages(bad_images), 'truncated_images': gather_messages(truncated_images)}


def check_finite(first_non_finite: torch.Tensor, iterations: int, epoch: int):
    """Stop every process together once any of them has seen a NaN or infinite loss.

    Checkpoints are written at the end of an epoch, so the last one on disk is still the good one.
    """
    first = first_non_finite.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if first.item() < iterations:
        raise NonFiniteLossError(f'epoch {epoch} iteration {first.item()}: the loss is not finite; the run directory '
                                 'keeps the checkpoint of the last good epoch, which a rerun would reach again: '
                                 'start a new run (another --suffix) with a lower --lr, or --amp bf16 instead of fp16')


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
