"""Swin backbones (the Swin_base teacher and the Swin_tiny student, widened to 128 channels so that its feature is
1024-d like the teacher's) on timm's SwinTransformer: patch 4, window 12, MLP ratio 4, qkv bias, no absolute position
embedding, stochastic depth 0.1; the feature is the average pool after the final LayerNorm. State-dict keys are
timm's current layout; `convert_old_layout` maps the original checkpoints' older layout to it.

Every attention block keeps the bias table of the 12x12 window also when a small image makes a stage's token grid
smaller than the window (timm then shrinks the window to the grid) and reads its central offsets, so that a
checkpoint trained at 384 px loads unchanged at 96 or 192 px.
"""
import re

import torch
from timm.layers import to_2tuple
from timm.models.swin_transformer import SwinTransformer, WindowAttention

EMBED_DIM = 128
PATCH_SIZE = 4
WINDOW_SIZE = 12
MLP_RATIO = 4.0
DROP_PATH_RATE = 0.1
SWIN_CONFIGS = {
    'Swin_base': dict(depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'Swin_tiny': dict(depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
}
# Buffers the older timm and the original Swin code saved in state dicts; they are recomputed, never loaded.
FIXED_BUFFER_NAMES = ('relative_position_index', 'attn_mask')

_OLD_DOWNSAMPLE_KEY = re.compile(r'^layers\.(\d+)\.downsample\.')


def relative_position_index_in_table(window_size, table_window_size, device=None) -> torch.Tensor:
    """(area, area) indices into a bias table of `table_window_size` for every token pair of `window_size`."""
    window_height, window_width = to_2tuple(window_size)
    table_height, table_width = to_2tuple(table_window_size)
    rows, columns = torch.meshgrid(
        torch.arange(window_height, device=device), torch.arange(window_width, device=device), indexing='ij')
    rows, columns = rows.flatten(), columns.flatten()
    row_offsets = rows[:, None] - rows[None, :] + table_height - 1
    column_offsets = columns[:, None] - columns[None, :] + table_width - 1
    return row_offsets * (2 * table_width - 1) + column_offsets


class FullTableWindowAttention(WindowAttention):
    """timm WindowAttention that keeps the bias table of `table_window_size` for a smaller actual window."""

    def __init__(self, dim: int, num_heads: int, window_size, table_window_size, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads=num_heads, window_size=table_window_size, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop)
        self.table_window_size = to_2tuple(table_window_size)
        self.set_window_size(window_size)

    def set_window_size(self, window_size) -> None:
        """Use a window no larger than the table's; the table itself is kept unchanged."""
        window_size = to_2tuple(window_size)
        if any(size > table for size, table in zip(window_size, self.table_window_size)):
            raise ValueError(f'window {window_size} is larger than the bias table window {self.table_window_size}')
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self._init_buffers()

    def _init_buffers(self) -> None:
        # the base class calls this from its __init__, before table_window_size exists (window == table then)
        table_window_size = getattr(self, 'table_window_size', self.window_size)
        index = relative_position_index_in_table(
            self.window_size, table_window_size, device=self.relative_position_bias_table.device)
        self.register_buffer('relative_position_index', index, persistent=False)


class SwinBackbone(SwinTransformer):
    """timm SwinTransformer as a feature extractor: (B, 3, H, W) -> (B, feature_dim); H = W = img_size."""

    def __init__(self, depths, num_heads, img_size: int = 384, embed_dim: int = EMBED_DIM,
                 window_size: int = WINDOW_SIZE, drop_path_rate: float = DROP_PATH_RATE):
        if message := image_size_message(img_size, len(depths), window_size):
            raise ValueError(message)
        super().__init__(
            img_size=img_size, patch_size=PATCH_SIZE, num_classes=0, global_pool='avg', embed_dim=embed_dim,
            depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=MLP_RATIO, qkv_bias=True,
            drop_path_rate=drop_path_rate)
        self.feature_dim = self.num_features
        self.img_size = img_size
        self._keep_full_bias_tables(window_size)

    def _keep_full_bias_tables(self, window_size: int) -> None:
        for block in (block for stage in self.layers for block in stage.blocks):
            attention = block.attn
            if attention.window_size == to_2tuple(window_size):
                continue
            replacement = FullTableWindowAttention(
                block.dim, attention.num_heads, attention.window_size, window_size,
                attn_drop=attention.attn_drop.p, proj_drop=attention.proj_drop.p)
            # keep timm's initialisation of the projections; only the bias table is rebuilt
            replacement.qkv, replacement.proj = attention.qkv, attention.proj
            block.attn = replacement


def image_size_problem(img_size: int, num_stages: int = 4, window_size: int = WINDOW_SIZE) -> str | None:
    """Why `img_size` does not fit the Swin windows, or None when every stage's token grid is a multiple of the
    window or fits inside one window."""
    grid = img_size / PATCH_SIZE
    for stage in range(num_stages):
        if grid != int(grid) or (grid > window_size and grid % window_size):
            return (f'img_size {img_size} gives a {grid:g}-token grid in Swin stage {stage}, which neither fits one '
                    f'{window_size}x{window_size} window nor splits into such windows')
        grid /= 2
    return None


def fitting_image_sizes(largest: int = 768, num_stages: int = 4, window_size: int = WINDOW_SIZE) -> list[int]:
    """The image sizes up to `largest` whose token grids fit the Swin windows (32, 48, 96, 192, 384, 768 ...)."""
    candidates = range(PATCH_SIZE * 2 ** (num_stages - 1), largest + 1, PATCH_SIZE)
    return [size for size in candidates if image_size_problem(size, num_stages, window_size) is None]


def use_fused_attention(backbone: torch.nn.Module) -> None:
    """Switch timm's window attention to torch's fused scaled_dot_product_attention: the features agree within float32
    rounding; off unless asked for, as the CPU gains nothing."""
    for module in backbone.modules():
        if isinstance(module, WindowAttention):
            module.fused_attn = True


def image_size_message(img_size: int, num_stages: int = 4, window_size: int = WINDOW_SIZE) -> str | None:
    """Why `img_size` does not fit the Swin windows and which sizes do, or None when it fits."""
    problem = image_size_problem(img_size, num_stages, window_size)
    if problem is None:
        return None
    sizes = ', '.join(map(str, fitting_image_sizes(num_stages=num_stages, window_size=window_size)))
    return f'{problem}; Swin takes --img_size {sizes}'


def create_swin(name: str, img_size: int = 384, width_divisor: int = 1) -> SwinBackbone:
    """Swin_base or Swin_tiny (SWIN_CONFIGS); width_divisor > 1 (CPU demo only) narrows every stage."""
    if width_divisor < 1 or EMBED_DIM % width_divisor:
        raise ValueError(f'width_divisor {width_divisor} must be a positive divisor of {EMBED_DIM}')
    config = SWIN_CONFIGS[name]
    # fewer heads for narrower stages keep the per-head width of the full model where possible
    num_heads = tuple(max(1, heads // width_divisor) for heads in config['num_heads'])
    return SwinBackbone(config['depths'], num_heads, img_size=img_size, embed_dim=EMBED_DIM // width_divisor)


def convert_old_layout(state_dict: dict) -> dict:
    """Older timm / original Swin keys, which downsample at the END of stage i, -> current timm keys (at the START of
    stage i + 1); fixed buffers are dropped. A state dict in the current layout only loses those."""
    # only the older layout has a downsample in stage 0
    shift_downsample = 'layers.0.downsample.reduction.weight' in state_dict
    converted = {}
    for key, value in state_dict.items():
        if key.rsplit('.', 1)[-1] in FIXED_BUFFER_NAMES:
            continue
        match = _OLD_DOWNSAMPLE_KEY.match(key) if shift_downsample else None
        if match:
            key = f'layers.{int(match.group(1)) + 1}.downsample.{key[match.end():]}'
        converted[key] = value
    return converted
