"""The training loss: cross-entropy on the student's margin logits plus a distillation term."""
import torch
import torch.nn.functional as F
from torch import nn

KD_LOSSES = ('KD', 'global_KD', 'tempered_KD')


class DistillationLoss(nn.Module):
    """Cross-entropy on the student's logits plus a distillation term.

    `KD` (the original): sum over batch and classes of p_t * (log p_t - log_softmax(s / T)), p_t the untempered
    teacher softmax, no T^2. `global_KD`: summed squared error between the features. `tempered_KD`: Hinton's loss,
    both sides tempered, T^2 scaling, batch mean. `kind=None`: cross-entropy alone (how a teacher is trained).
    `feature_weight` > 0 adds that times the sum over the batch of 1 - cos(student feature, teacher feature): the
    student's feature pulled toward the teacher's direction (the squared distance of the normalised features is
    twice this, so the two differ by the weight only). Summed terms are multiplied by `world_size`: DDP's gradient
    averaging then yields the global batch's sum.
    """

    def __init__(self, kind: str | None, weight: float = 1.0, temperature: float = 4.0, world_size: int = 1,
                 feature_weight: float = 0.0):
        super().__init__()
        if kind is not None and kind not in KD_LOSSES:
            raise ValueError(f'unknown --kd_loss {kind!r}; choose one of {", ".join(KD_LOSSES)}')
        self.kind, self.weight, self.temperature, self.world_size = kind, weight, temperature, world_size
        self.feature_weight = feature_weight

    def forward(self, student_features, student_logits, teacher_features, teacher_logits, labels):
        """Return (loss to back-propagate, cross-entropy, distillation term per global batch)."""
        cross_entropy = F.cross_entropy(student_logits.float(), labels)
        if self.kind is None:
            return cross_entropy, cross_entropy.detach(), torch.zeros((), device=labels.device)
        distillation = self.distillation_term(student_features.float(), student_logits.float(),
                                              teacher_features.float(), teacher_logits.float())
        loss = cross_entropy + self.weight * distillation
        if self.feature_weight:
            loss = loss + self.feature_weight * self.feature_term(student_features.float(), teacher_features.float())
        return loss, cross_entropy.detach(), distillation.detach()

    def feature_term(self, student_features, teacher_features):
        """The sum over the batch of 1 - cos(student feature, teacher feature), times `world_size`."""
        cosines = F.cosine_similarity(student_features, teacher_features, dim=1)
        return self.world_size * (1 - cosines).sum()

    def distillation_term(self, student_features, student_logits, teacher_features, teacher_logits):
        if self.kind == 'global_KD':
            return self.world_size * (student_features - teacher_features).pow(2).sum()
        student_log_probs = F.log_softmax(student_logits / self.temperature, dim=1)
        teacher_log_probs = F.log_softmax(teacher_logits / (1.0 if self.kind == 'KD' else self.temperature), dim=1)
        if self.kind == 'KD':  # the original's: a sum, no T^2 factor
            return self.world_size * F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction='sum')
        # a mean over the local batch is already the global mean once DDP averages gradients
        divergence = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction='batchmean')
        return divergence * self.temperature ** 2
