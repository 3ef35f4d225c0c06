"""Widened ResNet12 student: a 5x5 stride-2 stem and four residual blocks of widths 128, 256, 512, 1024. State-dict
keys are the original system's (`layerN.0.conv1`, `layerN.0.downsample.0` ...), so that its files load as they are.

DropBlock after blocks 3 and 4 has two schedules. 'annealed' (the intended one): the keep rate falls from 1 to 0.9
over the first 40,000 training batches, counted by the plain attribute `batches_seen` (not in the state dict; the
trainer restores it on resume). 'published': the published multi-GPU runs kept the counter on DataParallel's
per-step replicas, where it never left 0: every batch used the keep rate 1 - 0.1 / 40000, DropBlock in effect off.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (128, 256, 512, 1024)
DROP_RATE = 0.1
DROP_BLOCK_SIZE = 5
KEEP_RATE_ANNEAL_BATCHES = 40000
LEAKY_SLOPE = 0.1
DROP_BLOCK_SCHEDULES = ('published', 'annealed')


def keep_rate_after(batches_seen: int, drop_rate: float = DROP_RATE,
                    anneal_batches: int = KEEP_RATE_ANNEAL_BATCHES) -> float:
    """DropBlock keep rate after `batches_seen` training batches: 1 annealed linearly to 1 - drop_rate."""
    return max(1.0 - drop_rate * batches_seen / anneal_batches, 1.0 - drop_rate)


def drop_block_seed_probability(keep_rate: float, height: int, width: int, block_size: int) -> float:
    """The original's gamma: (1 - keep) / block^2 * map area / number of valid seed positions."""
    valid_positions = (height - block_size + 1) * (width - block_size + 1)
    return (1.0 - keep_rate) / block_size ** 2 * height * width / valid_positions


class DropBlock(nn.Module):
    """DropBlock as the original computed it: seeds per sample and channel on the (H - b + 1) x (W - b + 1) positions
    where a whole b x b block fits, each zeroing the block below and right of it; kept activations are rescaled by
    elements / kept over the whole batch. Identity in eval mode, at keep rate 1, and on maps smaller than a block."""

    def __init__(self, block_size: int = DROP_BLOCK_SIZE):
        super().__init__()
        self.block_size = block_size

    def forward(self, features: torch.Tensor, keep_rate: float) -> torch.Tensor:
        batch, channels, height, width = features.shape
        if not self.training or keep_rate >= 1.0 or min(height, width) < self.block_size:
            return features
        gamma = drop_block_seed_probability(keep_rate, height, width, self.block_size)
        with torch.no_grad():
            seeds = features.new_empty(
                batch, channels, height - self.block_size + 1, width - self.block_size + 1, dtype=torch.float32
            ).bernoulli_(min(gamma, 1.0))
            # a max-pool over the zero-padded seeds spreads each seed over the block below and right of it
            border = self.block_size - 1
            dropped = F.max_pool2d(F.pad(seeds, (border, border, border, border)), self.block_size, stride=1)
            keep_mask = 1.0 - dropped
            kept = keep_mask.sum().clamp_min(1.0)
            keep_mask *= keep_mask.numel() / kept
        return features * keep_mask.to(features.dtype)

    def extra_repr(self) -> str:
        return f'block_size={self.block_size}'


class ResidualBlock(nn.Module):
    """Three 3x3 conv-BN (LeakyReLU after the first two), 1x1 conv-BN shortcut, add, LeakyReLU, 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                        nn.BatchNorm2d(out_channels))
        self.activation = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.bn1(self.conv1(features)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.activation(out + self.downsample(features)))


class ResNet12(nn.Module):
    """(B, 3, H, W) -> (B, feature_dim); 384 px input ends in a 12x12 map before the average pool."""

    def __init__(self, width_divisor: int = 1, drop_rate: float = DROP_RATE,
                 keep_rate_anneal_batches: int = KEEP_RATE_ANNEAL_BATCHES, drop_block_schedule: str = 'published'):
        super().__init__()
        if width_divisor < 1 or any(width % width_divisor for width in WIDTHS):
            raise ValueError(f'width_divisor {width_divisor} must be a positive divisor of {WIDTHS[0]}')
        if drop_block_schedule not in DROP_BLOCK_SCHEDULES:
            raise ValueError(f'drop_block_schedule {drop_block_schedule!r}: choose one of '
                             f'{", ".join(DROP_BLOCK_SCHEDULES)}')
        widths = [width // width_divisor for width in WIDTHS]
        self.conv1 = nn.Conv2d(3, widths[0], 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(ResidualBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(ResidualBlock(widths[0], widths[1]))
        self.layer3 = nn.Sequential(ResidualBlock(widths[1], widths[2]))
        self.layer4 = nn.Sequential(ResidualBlock(widths[2], widths[3]))
        self.dropout = nn.Dropout(drop_rate)
        self.drop_block = DropBlock(DROP_BLOCK_SIZE)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.keep_rate_anneal_batches = keep_rate_anneal_batches
        self.drop_block_schedule = drop_block_schedule
        self.feature_dim = widths[-1]
        self.batches_seen = 0
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='leaky_relu')

    def keep_rate(self) -> float:
        """DropBlock keep rate of the current batch: annealed by `batches_seen`, or the published runs' fixed one."""
        # the original counted the current batch before computing its keep rate, so its replicas always saw 1
        batches = self.batches_seen if self.drop_block_schedule == 'annealed' else 1
        return keep_rate_after(batches, self.drop_rate, self.keep_rate_anneal_batches)

    def compile(self, *args, **kwargs):
        """torch.compile the four blocks in place, not forward: the DropBlock keep rate changes every batch for
        the first 40,000 and would make a compiled whole network recompile at every step."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            layer.compile(*args, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches_seen += 1
        keep_rate = self.keep_rate()
        features = self.relu(self.bn1(self.conv1(images)))
        features = self.dropout(self.layer1(features))
        features = self.dropout(self.layer2(features))
        features = self.drop_block(self.layer3(features), keep_rate)
        features = self.drop_block(self.layer4(features), keep_rate)
        return self.pool(features).flatten(1)
