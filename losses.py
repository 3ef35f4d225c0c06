"""The training loss: cross-entropy on the student's margin logits plus a distillation term."""
import torch
import torch.nn.functional as F
from torch import nn

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
