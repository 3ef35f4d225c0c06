"""Backbones, the CosFace head, the distillation model, and loading of every supported weights file."""
import math
import pickle
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet12
import swin_transformer
import utils
from resnet12 import ResNet12

FEATURE_DIM = 1024
BACKBONE_NAMES = ('Swin_base', 'Swin_tiny', 'Resnet12')
HEAD_KEY = 'head.weight'
# classifier keys of timm / official Swin files (a linear head with bias); never part of a backbone
LINEAR_CLASSIFIER_KEYS = ('head.weight', 'head.bias', 'head.fc.weight', 'head.fc.bias')
# wrappers the original and common trainers put in front of backbone keys
KEY_PREFIXES = ('encoder.', 'module.', 'backbone.')
IGNORED_KEY_PREFIXES = ('distill_layer',)
STATE_DICT_CONTAINERS = ('model_state', 'params', 'model', 'state_dict', 'student')
# beside the weights in this suite's files: how to build the model again (see describe)
ARCHITECTURE_KEY = 'architecture'
_LISTED_KEYS = 6
# the largest image side built: a 4096 px image is 200 MB as float32 before any activation; a mistyped size beyond it
# (100000 px: 120 GB an image) would exhaust the memory instead of stopping
MAX_IMG_SIZE = 4096
# ResNet12's stride-2 stem halves the side, then its four 2x2 max-pools need 16 px: 30 px ends in an empty map
RESNET12_SMALLEST_IMAGE = 2 * 2 ** len(resnet12.WIDTHS) - 1


def create_backbone(name: str, img_size: int = 384, width_divisor: int = 1,
                    drop_block_schedule: str = 'published') -> nn.Module:
    """Feature extractor (B, 3, img_size, img_size) -> (B, 1024 // width_divisor), with attribute `feature_dim`.
    width_divisor > 1 narrows every stage (CPU demo only). Swin needs token grids that fit its 12x12 windows (96, 192,
    384...); drop_block_schedule is ResNet12's (see resnet12.py)."""
    if name in swin_transformer.SWIN_CONFIGS:
        return swin_transformer.create_swin(name, img_size=img_size, width_divisor=width_divisor)
    if name == 'Resnet12':
        return ResNet12(width_divisor=width_divisor, drop_block_schedule=drop_block_schedule)
    raise utils.RunError(f'unknown backbone {name!r}; choose one of {", ".join(BACKBONE_NAMES)}')


def width_divisors(name: str) -> list[int]:
    """The --demo_width_divisor values backbone `name` is built with: the divisors of its narrowest width (Swin's
    embedding, ResNet12's first stage), which divide every other width too."""
    narrowest = swin_transformer.EMBED_DIM if name in swin_transformer.SWIN_CONFIGS else math.gcd(*resnet12.WIDTHS)
    return [divisor for divisor in range(1, narrowest + 1) if narrowest % divisor == 0]


def image_sizes_text(name: str) -> str:
    """The image sizes backbone `name` takes, in words: '31 to 4096' or Swin's list."""
    if name in swin_transformer.SWIN_CONFIGS:
        return ', '.join(map(str, swin_transformer.fitting_image_sizes(MAX_IMG_SIZE)))
    return f'{RESNET12_SMALLEST_IMAGE} to {MAX_IMG_SIZE}'


def image_size_problem(name: str, img_size: int) -> str | None:
    """Why backbone `name` cannot take images of `img_size` px, naming the sizes it takes; None when it can."""
    if img_size > MAX_IMG_SIZE:
        return (f'over {MAX_IMG_SIZE} px, the largest image this suite builds; {name} takes --img_size '
                f'{image_sizes_text(name)}')
    if img_size < 1:
        return f'not a positive size; {name} takes --img_size {image_sizes_text(name)}'
    if name == 'Resnet12' and img_size < RESNET12_SMALLEST_IMAGE:
        return (f'too small: the stride-2 stem and four 2x2 max-pools of Resnet12 leave no pixel of an image under '
                f'{RESNET12_SMALLEST_IMAGE} px; Resnet12 takes --img_size {image_sizes_text(name)}')
    if name in swin_transformer.SWIN_CONFIGS:
        return swin_transformer.image_size_message(img_size)
    return None


class CosFaceHead(nn.Module):
    """Large-margin cosine classifier without bias: logits = s * (cos(x, W_c) - m * [c == label])."""

    def __init__(self, num_classes: int, feature_dim: int = FEATURE_DIM, scale: float = 32.0, margin: float = 0.1):
        super().__init__()
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.xavier_uniform_(self.weight)
        self._frozen_norms = None  # (weight identity, scale / class norms) while the weight is frozen

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (B, num_classes); the margin is subtracted at `labels` when they are given."""
        # float32 outside autocast: bf16 cosines would move logits by ~0.1 at s=32, and casting the 1 GB weight
        # to bf16 on every step costs more memory traffic than the float32 product itself
        with torch.autocast(device_type=features.device.type, enabled=False):
            unit_features = F.normalize(features.float(), dim=1)
            weight = self.weight.float()
            # divide by the class norms after the product instead of normalising a copy of the whole weight
            logits = (unit_features @ weight.t()) * self._scaled_inverse_norms(weight)
            if labels is not None:
                rows = torch.arange(logits.shape[0], device=logits.device)
                logits[rows, labels] -= self.scale * self.margin
        return logits

    def _scaled_inverse_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """scale / ||W_c||; kept while a frozen weight is unchanged, so that the 1 GB weight of the shared head
        is read for its norms once, not by the teacher and the student at every step."""
        if weight.requires_grad:
            return torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12).reciprocal() * self.scale
        # an in-place change (load_state_dict, copy_) bumps _version; a move to another device changes data_ptr
        identity = (weight.data_ptr(), weight._version, weight.device, self.scale)
        if self._frozen_norms is None or self._frozen_norms[0] != identity:
            norms = torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12).reciprocal() * self.scale
            self._frozen_norms = (identity, norms)
        return self._frozen_norms[1]

    def extra_repr(self) -> str:
        return f'num_classes={self.weight.shape[0]}, feature_dim={self.weight.shape[1]}, ' \
               f'scale={self.scale}, margin={self.margin}'


class Classifier(nn.Module):
    """A backbone followed by a CosFace head."""

    def __init__(self, backbone: nn.Module, head: CosFaceHead):
        super().__init__()
        feature_dim = getattr(backbone, 'feature_dim', head.weight.shape[1])
        if head.weight.shape[1] != feature_dim:
            raise utils.RunError(f'head expects {head.weight.shape[1]}-d features, backbone gives {feature_dim}')
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, float32 logits)."""
        features = self.backbone(images)
        return features, self.head(features, labels)


def set_stochastic(network: nn.Module, active: bool) -> nn.Module:
    """Train mode (stochastic depth, dropout, DropBlock drawn at random) when `active`, else eval mode; BatchNorm
    statistics frozen either way (a frozen teacher's)."""
    network.train(active)
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return network


class DistillationModel(nn.Module):
    """Student classifier and an optional frozen teacher (or only its head, `teacher_head`, beside cached features).
    `stochastic_teacher` (the published runs put the whole model in train mode) keeps the teacher's stochastic depth
    active while the student trains; its BatchNorm statistics never change. A head shared with the student (the
    head-fixed method) is frozen with the teacher."""

    def __init__(self, student: Classifier, teacher: Classifier | None = None, stochastic_teacher: bool = False,
                 teacher_head: CosFaceHead | None = None):
        super().__init__()
        self.student, self.teacher, self.stochastic_teacher = student, teacher, stochastic_teacher
        self.teacher_head = teacher_head
        for frozen in (teacher, teacher_head):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()

    def train(self, mode: bool = True) -> 'DistillationModel':
        super().train(mode)
        if self.teacher is not None:
            set_stochastic(self.teacher, mode and self.stochastic_teacher)
        return self

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (features, logits), the margin applied at `labels` as for the student."""
        if self.teacher is None:
            raise RuntimeError('this DistillationModel has no teacher')
        return self.teacher(images, labels)

    @torch.no_grad()
    def teacher_logits(self, teacher_features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's logits from its (stored) features, the margin at `labels`."""
        return (self.teacher.head if self.teacher is not None else self.teacher_head)(teacher_features, labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters that require grad (never the teacher's, nor a shared head)."""
        return [parameter for parameter in self.student.parameters() if parameter.requires_grad]


class WeightsFileError(utils.RunError):
    """A weights file that cannot be used; the message is one line naming the file and what to do."""


def _load_file(path: str, mmap: bool = False):
    """torch.load with weights_only=True (tensors memory-mapped with `mmap`); every failure becomes one line naming the
    file."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise WeightsFileError(f'{path}: no such weights file') from None
    except IsADirectoryError:
        raise WeightsFileError(f'{path} is a directory, not a weights file') from None
    except pickle.UnpicklingError as error:
        if 'weights only' in str(error).lower():
            raise WeightsFileError(
                f'{path}: refused to load: the file holds pickled objects other than tensors and plain containers '
                f'(nothing in it was run); re-save its state dict with torch.save') from None
        raise WeightsFileError(f'{path}: not a weights file, or a damaged one ({utils.first_line(error)}); give a file '
                               'written by torch.save') from None
    except OSError as error:
        raise WeightsFileError(f'{path}: cannot read the weights file ({utils.first_line(error)})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise WeightsFileError(f'{path}: corrupt or truncated weights file ({utils.first_line(error)}); copy it again '
                               'or use another') from None
    except Exception as error:  # a text file or any other bytes torch.load cannot parse
        raise WeightsFileError(f'{path}: not a weights file ({utils.first_line(error)}); give a file written by '
                               'torch.save') from None


def _extract_state_dict(loaded, path: str) -> dict:
    if not isinstance(loaded, dict):
        raise WeightsFileError(f'{path}: expected a dict of tensors, found {type(loaded).__name__}')
    for container in STATE_DICT_CONTAINERS:
        if isinstance(loaded.get(container), dict):
            loaded = loaded[container]
            break
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise WeightsFileError(f'{path}: not a state dict: entries {_list_keys(not_tensors)} are not tensors '
                               f'(expected a bare state dict or one under {"/".join(STATE_DICT_CONTAINERS)})')
    return loaded


def _list_keys(keys) -> str:
    keys = sorted(map(str, keys))
    listed = ', '.join(keys[:_LISTED_KEYS])
    return listed + (f' and {len(keys) - _LISTED_KEYS} more' if len(keys) > _LISTED_KEYS else '')


def read_weights(path: str, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Any supported file -> (backbone state dict in this project's key layout, cosine head weight or None): the
    original teacher and student files (prefixed keys, older timm Swin layout), this project's ({'params': ...}) and
    official / timm Swin files (their linear classifier dropped). Only tensors are unpickled."""
    return _read_file(path, name)[:2]


def _read_file(path: str, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict | None]:
    """read_weights's (state dict, head weight), and the file's description (see describe) or None, from one load."""
    loaded, state = _load_file(path), {}
    for key, value in _extract_state_dict(loaded, path).items():
        if key.startswith(IGNORED_KEY_PREFIXES):
            continue
        while key.startswith(KEY_PREFIXES):  # each prefix is one word and its dot
            key = key.split('.', 1)[1]
        if key in state:
            raise utils.RunError(f'{path}: key {key!r} appears twice once prefixes are removed')
        state[key] = value
    has_linear_bias = 'head.bias' in state or 'head.fc.bias' in state
    head = state.get(HEAD_KEY)
    head_weight = head if head is not None and not has_linear_bias and head.ndim == 2 else None
    state = {key: value for key, value in state.items() if key not in LINEAR_CLASSIFIER_KEYS}
    if name in swin_transformer.SWIN_CONFIGS:
        state = swin_transformer.convert_old_layout(state)
    return state, head_weight, _description_in(loaded, path)


def _backbone_mismatch(backbone: nn.Module, state: dict) -> tuple[list, list, list]:
    expected = backbone.state_dict()
    # BatchNorm counters are absent from files written by old PyTorch versions and are not weights
    missing = [key for key in expected if key not in state and not key.endswith('num_batches_tracked')]
    unexpected = [key for key in state if key not in expected]
    misshaped = [f'{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})'
                 for key in state if key in expected and state[key].shape != expected[key].shape]
    return missing, unexpected, misshaped


def _fits(state: dict, name: str) -> bool:
    """Whether `state` loads into backbone `name` exactly (built on the meta device: no memory, no weights)."""
    with torch.device('meta'):
        candidate = create_backbone(name)
    converted = swin_transformer.convert_old_layout(state) if name in swin_transformer.SWIN_CONFIGS else state
    return not any(_backbone_mismatch(candidate, converted))


def _read_backbone(name: str, path: str, **options) -> tuple[nn.Module, torch.Tensor | None, dict | None]:
    """(backbone `name` with the file's weights, the file's head weight or None, its description or None); a key that
    does not fit raises."""
    state, head_weight, described = _read_file(path, name)
    backbone = create_backbone(name, **options)
    missing, unexpected, misshaped = _backbone_mismatch(backbone, state)
    if missing or unexpected or misshaped:
        problems = [f'{label} keys: {_list_keys(keys)}' for label, keys in
                    (('missing', missing), ('unexpected', unexpected), ('misshaped', misshaped)) if keys]
        fitting = [other for other in BACKBONE_NAMES
                   if (missing or unexpected) and other != name and _fits(state, other)]
        hint = f' (it fits {" / ".join(fitting)})' if fitting else ''
        raise utils.RunError(f'{path} does not fit backbone {name}{hint}: ' + '; '.join(problems))
    backbone.load_state_dict(state, strict=False)
    return backbone, head_weight, described


def load_backbone(name: str, path: str, img_size: int = 384, width_divisor: int = 1,
                  drop_block_schedule: str = 'published') -> nn.Module:
    """Backbone with weights from any supported file (see read_weights), in eval mode; a head in the file is skipped."""
    return _read_backbone(name, path, img_size=img_size, width_divisor=width_divisor,
                          drop_block_schedule=drop_block_schedule)[0].eval()


def load_classifier(name: str, path: str, img_size: int = 384, width_divisor: int = 1) -> Classifier:
    """Backbone and CosFace head from one file (e.g. the teacher); the file must hold the head weight."""
    backbone, head_weight, described = _read_backbone(name, path, img_size=img_size, width_divisor=width_divisor)
    return Classifier(backbone, _head_of(head_weight, backbone.feature_dim, name, path, described)).eval()


def load_head(name: str, path: str, width_divisor: int = 1) -> 'CosFaceHead':
    """The CosFace head of a classifier file alone (for a teacher whose features are cached)."""
    _, head_weight, described = _read_file(path, name)
    return _head_of(head_weight, FEATURE_DIM // width_divisor, name, path, described)


def _head_of(head_weight: torch.Tensor | None, feature_dim: int, name: str, path: str,
             described: dict | None) -> 'CosFaceHead':
    if head_weight is None:
        raise utils.RunError(f'{path} holds no cosine head weight ({HEAD_KEY!r}, no bias) to build a {name} classifier')
    if head_weight.shape[1] != feature_dim:
        raise utils.RunError(f'{path}: head weight {tuple(head_weight.shape)} does not match the '
                             f'{feature_dim}-d features of {name}')
    described = described or {}  # the scale and margin it was trained with; the original's: 32, 0.1
    # build the head without allocating and initialising a second num_classes x feature_dim matrix
    with torch.device('meta'):
        head = CosFaceHead(head_weight.shape[0], head_weight.shape[1], scale=described.get('head_scale', 32.0),
                           margin=described.get('head_margin', 0.1))
    head.weight = nn.Parameter(head_weight.float())
    return head


def student_weights(classifier: Classifier, include_head: bool, architecture: dict | None = None) -> dict:
    """{'params': {backbone keys..., 'head.weight' if include_head}, 'architecture': describe(...)}, this project's
    format, `architecture` giving the backbone's name, image size and width divisor; the tensors share storage with
    the model."""
    classifier = getattr(classifier, 'module', classifier)
    params = dict(classifier.backbone.state_dict())
    if include_head:
        params[HEAD_KEY] = classifier.head.weight.detach()
    weights = {'params': params}
    if architecture is not None:
        weights[ARCHITECTURE_KEY] = describe(classifier.head, **architecture)
    return weights


def describe(head: CosFaceHead, backbone: str, img_size: int, width_divisor: int) -> dict:
    """How to build a model again, kept beside its weights: backbone, image size, widths, classes, head scale and
    margin (plain numbers and text, which a weights-only load reads)."""
    return {'backbone': backbone, 'img_size': int(img_size), 'width_divisor': int(width_divisor),
            'feature_dim': int(head.weight.shape[1]), 'num_classes': int(head.num_classes),
            'head_scale': float(head.scale), 'head_margin': float(head.margin)}


def read_architecture(path: str) -> dict | None:
    """The description a weights file of this suite holds (see describe); None for files without one (the original's,
    older ones of this suite, timm's), which are built from the flags."""
    return _description_in(_load_file(path, mmap=True) if _is_zip(path) else _load_file(path), path)


def _description_in(loaded, path: str) -> dict | None:
    """The checked description of a loaded weights file, or None; a field out of range stops in one line."""
    described = loaded.get(ARCHITECTURE_KEY) if isinstance(loaded, dict) else None
    if described is None:
        return None
    if not isinstance(described, dict):
        raise WeightsFileError(f'{path}: its {ARCHITECTURE_KEY!r} entry is not a description this suite wrote '
                               f'({str(described)[:80]}); remove it to build the model from the flags')
    if problem := next(_architecture_problems(described), None):
        field, value, why = problem
        raise WeightsFileError(f'{path}: its {ARCHITECTURE_KEY!r} record gives {field} {value!r}, {why}: the '
                               'record does not describe a model this suite builds; save the file again with this '
                               'suite, or remove the record to build the model from the flags')
    return described


def _is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a size


def _architecture_problems(described: dict):
    """(field, value, why it is wrong) of each field of a description (see describe) out of its type or range."""
    backbone = described.get('backbone')
    if backbone not in BACKBONE_NAMES:
        yield 'backbone', backbone, f'not one of {", ".join(BACKBONE_NAMES)}'
        return
    divisor = described.get('width_divisor')
    if not _is_whole_number(divisor) or divisor not in width_divisors(backbone):
        yield 'width_divisor', divisor, (f'not a divisor of the {backbone} widths (one of '
                                         f'{", ".join(map(str, width_divisors(backbone)))})')
        return
    img_size = described.get('img_size')
    if not _is_whole_number(img_size):
        yield 'img_size', img_size, f'not a whole number; {backbone} takes --img_size {image_sizes_text(backbone)}'
    elif problem := image_size_problem(backbone, img_size):
        yield 'img_size', img_size, problem
    feature_dim = described.get('feature_dim')
    if not _is_whole_number(feature_dim) or feature_dim != FEATURE_DIM // divisor:
        yield 'feature_dim', feature_dim, (f'but a {backbone} of width_divisor {divisor} gives '
                                           f'{FEATURE_DIM // divisor}-d features')
    classes = described.get('num_classes')
    if not _is_whole_number(classes) or classes < 1:
        yield 'num_classes', classes, 'not a positive whole number'
    for field in ('head_scale', 'head_margin'):  # absent from older files: the original's 32 and 0.1 then
        value = described.get(field, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
                field == 'head_scale' and value <= 0):
            yield field, value, 'not a finite number' + (' above 0' if field == 'head_scale' else '')


def _is_zip(path: str) -> bool:
    """Whether torch.save wrote `path` in its zip format (which memory-maps; the legacy format does not)."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False
