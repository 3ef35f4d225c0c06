"""Switch off a backbone's random regularisers (dropout, drop-path, ResNet12's DropBlock), so that runs which draw
their masks differently (other process counts, memory formats, compilers, precisions) can take the same steps.
Imported by the tests and by the scripts they run in other processes (which must not import conftest: it hides
GPUs)."""
import torch
from timm.layers import DropPath


def regularisers_off(backbone: torch.nn.Module) -> torch.nn.Module:
    """`backbone` with every dropout, drop-path and DropBlock rate set to 0 (in place)."""
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    if hasattr(backbone, 'drop_rate'):  # ResNet12: DropBlock's keep rate is then 1
        backbone.drop_rate = 0.0
    return backbone
