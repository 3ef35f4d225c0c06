"""Backbones, CosFace head, distillation model and checkpoint loading."""
import json
import math
import os
import pickle
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    checkpoint_filter_fn,
    get_relative_position_index,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402
import resnet12  # noqa: E402
import swin_transformer  # noqa: E402

SMALL_IMAGE = 96
NUM_LANDMARKS = 252903
ORIGINAL_PARAMETER_COUNTS = {'Swin_base': 86878584, 'Swin_tiny': 48899740, 'Resnet12': 32137856}
ORIGINAL_SWIN = {
    'Swin_base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'Swin_tiny': dict(embed_dim=128, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
}


def stock_timm_swin(name, img_size, embed_dim=None, num_heads=None):
    """timm's own SwinTransformer with the original's configuration, untouched by this project."""
    config = dict(ORIGINAL_SWIN[name])
    config['embed_dim'] = embed_dim or config['embed_dim']
    config['num_heads'] = num_heads or config['num_heads']
    return SwinTransformer(img_size=img_size, patch_size=4, window_size=12, num_classes=0, mlp_ratio=4.0,
                           qkv_bias=True, drop_path_rate=0.1, **config)


def perturb(module, generator_seed=0):
    """Random weights everywhere (timm initialises biases and LayerNorms to constants)."""
    generator = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return module


def to_old_swin_layout(state_dict, window_area=144, prefix='encoder.'):
    """Current timm keys -> the older layout of the original checkpoints, fixed buffers included (garbage values)."""
    old = {}
    for key, value in state_dict.items():
        match = re.match(r'layers\.(\d+)\.downsample\.(.*)', key)
        if match:
            key = f'layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}'
        old[prefix + key] = value.clone()
        if key.endswith('attn.relative_position_bias_table'):
            block = key[:-len('attn.relative_position_bias_table')]
            old[prefix + block + 'attn.relative_position_index'] = torch.randint(0, 5, (window_area, window_area))
            old[prefix + block + 'attn_mask'] = torch.full((4, window_area, window_area), -100.0)
    return old


def images(batch, size=SMALL_IMAGE, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def parameter_count(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope='module')
def swin_base_small():
    return model.create_backbone('Swin_base', img_size=SMALL_IMAGE)


@pytest.fixture(scope='module')
def resnet12_full():
    return model.create_backbone('Resnet12', img_size=SMALL_IMAGE)


# ---------------------------------------------------------------- architectures


def test_swin_base_parameters_and_output(swin_base_small):
    assert parameter_count(swin_base_small) == ORIGINAL_PARAMETER_COUNTS['Swin_base']
    assert swin_base_small.feature_dim == model.FEATURE_DIM
    with torch.no_grad():
        assert swin_base_small.eval()(images(2)).shape == (2, 1024)


def test_resnet12_parameters_and_output(resnet12_full):
    assert parameter_count(resnet12_full) == ORIGINAL_PARAMETER_COUNTS['Resnet12']
    with torch.no_grad():
        assert resnet12_full.eval()(images(2)).shape == (2, 1024)


def test_swin_tiny_parameters_at_every_supported_size():
    for img_size in (SMALL_IMAGE, 192):
        backbone = model.create_backbone('Swin_tiny', img_size=img_size)
        assert parameter_count(backbone) == ORIGINAL_PARAMETER_COUNTS['Swin_tiny']
    with torch.no_grad():
        assert backbone.eval()(images(1, 192)).shape == (1, 1024)


def original_swin_layout(name: str) -> tuple[list[int], list[int], list[int]]:
    """(blocks per stage, heads per stage, relative-position bias table rows) of the original's state dict."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'original_state_dict_keys.json')) as f:
        keys = json.load(f)[name]
    blocks, heads, table_rows = {}, {}, set()
    for key, shape, _ in keys:
        match = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', key)
        if match:
            blocks[int(match[1])] = max(blocks.get(int(match[1]), 0), int(match[2]) + 1)
        if key.endswith('attn.relative_position_bias_table'):
            heads[int(key.split('.')[1])] = shape[1]
            table_rows.add(shape[0])
    return [blocks[stage] for stage in sorted(blocks)], [heads[stage] for stage in sorted(heads)], sorted(table_rows)


@pytest.mark.parametrize('name', ['Swin_tiny', 'Swin_base'])
def test_swin_depths_heads_and_windows_are_the_originals(name):
    depths, heads, table_rows = original_swin_layout(name)
    assert table_rows == [(2 * 12 - 1) ** 2]  # the original's 12x12 windows
    backbone = model.create_backbone(name, img_size=384)
    assert [len(stage.blocks) for stage in backbone.layers] == depths
    assert [stage.blocks[0].attn.num_heads for stage in backbone.layers] == heads
    if name == 'Swin_base':
        return
    # at 384 px every stage uses the full 12x12 window; the last stage's 12x12 grid neither shifts nor partitions
    assert all(block.attn.window_size == (12, 12) for stage in backbone.layers for block in stage.blocks)
    assert backbone.layers[3].blocks[1].shift_size == (0, 0)
    assert backbone.layers[0].blocks[1].shift_size == (6, 6)
    drop_rates = [block.drop_path1.drop_prob for stage in backbone.layers for block in stage.blocks
                  if hasattr(block.drop_path1, 'drop_prob')]
    assert drop_rates[-1] == pytest.approx(0.1)


def test_unsupported_image_size_is_refused():
    with pytest.raises(ValueError, match='img_size 128'):
        model.create_backbone('Swin_tiny', img_size=128)
    with pytest.raises(ValueError, match='unknown backbone'):
        model.create_backbone('Resnet18')


def test_width_divisor_narrows_features():
    assert model.create_backbone('Resnet12', width_divisor=8).feature_dim == 128
    swin = model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=4)
    with torch.no_grad():
        assert swin.eval()(images(1)).shape == (1, 256)


def test_relative_position_index_matches_timm_for_a_full_window():
    expected = get_relative_position_index(12, 12)
    assert torch.equal(swin_transformer.relative_position_index_in_table(12, 12), expected)


def test_small_grid_reads_the_central_offsets_of_the_full_table():
    """At 96 px stages 3-4 have 6x6 and 3x3 grids; timm then uses 6x6 / 3x3 windows with their own small tables.
    Our backbone keeps the 23x23 table; cropping its centre into stock timm must give the same features."""
    ours = perturb(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=4)).eval()
    reference = stock_timm_swin('Swin_tiny', SMALL_IMAGE, embed_dim=32, num_heads=(1, 1, 2, 4)).eval()
    cropped = {}
    for key, value in ours.state_dict().items():
        if key.endswith('relative_position_bias_table'):
            window = reference.get_submodule(key.rsplit('.', 1)[0]).window_size[0]
            table = value.view(23, 23, -1)[11 - (window - 1):11 + window, 11 - (window - 1):11 + window]
            value = table.reshape(-1, value.shape[1])
        cropped[key] = value
    reference.load_state_dict(cropped, strict=True)
    assert reference.layers[3].blocks[0].attn.window_size == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(images(2)), reference(images(2)), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    backbone = perturb(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=8)).eval()
    backbone(images(1)).square().sum().backward()
    plain = [parameter.grad.clone() for parameter in backbone.parameters()]
    backbone.zero_grad()
    backbone.set_grad_checkpointing(True)
    backbone(images(1)).square().sum().backward()
    for before, parameter in zip(plain, backbone.parameters()):
        torch.testing.assert_close(parameter.grad, before)


# ---------------------------------------------------------------- DropBlock


def test_keep_rate_schedule():
    assert resnet12.keep_rate_after(0) == 1.0
    assert resnet12.keep_rate_after(20000) == pytest.approx(0.95)
    assert resnet12.keep_rate_after(40000) == pytest.approx(0.9)
    assert resnet12.keep_rate_after(10 ** 6) == pytest.approx(0.9)


def test_published_drop_block_keeps_the_first_batch_rate():
    """The published multi-GPU run's counter never left its first value: keep rate 1 - 0.1 / 40000 throughout."""
    backbone = resnet12.ResNet12(width_divisor=16).train()
    backbone.batches_seen = 39999
    backbone(images(2, 64))
    assert backbone.keep_rate() == 1 - 0.1 / 40000


def test_batches_seen_counts_training_forwards_only():
    backbone = resnet12.ResNet12(width_divisor=16, drop_block_schedule='annealed')
    assert backbone.batches_seen == 0
    backbone.train()
    backbone(images(2, 64))
    backbone(images(2, 64))
    assert backbone.batches_seen == 2
    backbone.eval()
    backbone(images(2, 64))
    assert backbone.batches_seen == 2
    assert not any('batches_seen' in key for key in backbone.state_dict())
    backbone.batches_seen = 19999
    backbone.train()
    backbone(images(2, 64))
    assert backbone.keep_rate() == pytest.approx(0.95)


def expected_dropped_fraction(keep_rate, side, block=5):
    """The original's formula, as we read its DropBlock: seeds with probability gamma on the (side-4)^2 valid
    positions, each zeroing a 5x5 block."""
    gamma = (1 - keep_rate) / block ** 2 * side ** 2 / (side - block + 1) ** 2
    covering = torch.tensor([min(i, side - block) - max(0, i - block + 1) + 1 for i in range(side)],
                            dtype=torch.float64)
    seeds_covering = covering[:, None] * covering[None, :]
    return (1 - (1 - gamma) ** seeds_covering).mean().item()


@pytest.mark.parametrize('side', [24, 12])
def test_drop_block_statistics(side):
    torch.manual_seed(0)
    drop_block = resnet12.DropBlock(5).train()
    ones = torch.ones(64, 64, side, side)
    out = drop_block(ones, 0.9)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(expected_dropped_fraction(0.9, side), abs=0.006)
    # kept activations are rescaled by numel / kept, so a map of ones keeps its mean exactly
    kept = (~dropped).sum().item()
    assert torch.allclose(out[~dropped], torch.tensor(ones.numel() / kept))
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)
    # every dropped element lies in a fully dropped 5x5 block that starts on a valid seed position
    whole_blocks = -F.max_pool2d(-dropped.float(), 5, stride=1)
    reconstructed = F.max_pool2d(F.pad(whole_blocks, (4, 4, 4, 4)), 5, stride=1)
    assert torch.equal(reconstructed.bool(), dropped)
    assert torch.equal(drop_block.eval()(ones, 0.9), ones)


def test_drop_block_seed_probability_is_the_original_formula():
    assert resnet12.drop_block_seed_probability(0.9, 24, 24, 5) == pytest.approx(0.1 / 25 * 576 / 400)
    assert resnet12.drop_block_seed_probability(0.9, 12, 12, 5) == pytest.approx(0.1 / 25 * 144 / 64)


# ---------------------------------------------------------------- CosFace head


def dense_cosface(features, weight, labels, scale=32.0, margin=0.1):
    cosine = F.normalize(features.double(), dim=1) @ F.normalize(weight.double(), dim=1).t()
    if labels is not None:
        cosine = cosine - margin * F.one_hot(labels, weight.shape[0]).double()
    return scale * cosine


def test_cosface_logits_and_gradients_match_dense_reference():
    torch.manual_seed(0)
    head = model.CosFaceHead(7, 16)
    features = torch.randn(4, 16, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 6])
    logits = head(features, labels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), dense_cosface(features, head.weight, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(features).double(), dense_cosface(features, head.weight, None),
                               rtol=1e-5, atol=1e-5)
    F.cross_entropy(logits, labels).backward()
    reference_features = features.detach().double().requires_grad_(True)
    reference_weight = head.weight.detach().double().requires_grad_(True)
    F.cross_entropy(dense_cosface(reference_features, reference_weight, labels), labels).backward()
    torch.testing.assert_close(features.grad.double(), reference_features.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), reference_weight.grad, rtol=1e-4, atol=1e-6)


def test_cosface_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = model.CosFaceHead(50, 32)
    features = torch.randn(3, 32)
    labels = torch.tensor([1, 2, 49])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(features.bfloat16(), labels)
    assert logits.dtype == torch.float32
    # only the bf16 rounding of the input features remains
    torch.testing.assert_close(logits.double(), dense_cosface(features.bfloat16().float(), head.weight, labels),
                               rtol=1e-5, atol=1e-4)


def test_frozen_cosface_follows_every_change_of_its_weight():
    torch.manual_seed(0)
    head = model.CosFaceHead(9, 16).requires_grad_(False)
    features, labels = torch.randn(3, 16), torch.tensor([0, 4, 8])
    torch.testing.assert_close(head(features, labels).double(), dense_cosface(features, head.weight, labels),
                               rtol=1e-5, atol=1e-5)
    head.load_state_dict({'weight': torch.randn(9, 16) * 3})
    torch.testing.assert_close(head(features, labels).double(), dense_cosface(features, head.weight, labels),
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.weight[2].mul_(5.0)
    torch.testing.assert_close(head(features).double(), dense_cosface(features, head.weight, None),
                               rtol=1e-5, atol=1e-5)
    head.weight = torch.nn.Parameter(torch.randn(9, 16), requires_grad=False)
    torch.testing.assert_close(head(features).double(), dense_cosface(features, head.weight, None),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- distillation model


def snapshot(tensors):
    return {name: tensor.detach().clone() for name, tensor in tensors}


@pytest.mark.parametrize('optimizer_name', ['SGD', 'AdamW'])
def test_distillation_step_updates_only_the_student_backbone(optimizer_name):
    torch.manual_seed(0)
    head = model.CosFaceHead(10, 128)
    teacher = model.Classifier(model.create_backbone('Resnet12', width_divisor=8), head)
    student = model.Classifier(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=8), head)
    distillation = model.DistillationModel(student, teacher)
    distillation.train()
    assert not distillation.teacher.training and distillation.student.training
    trainable = distillation.trainable_parameters()
    optimizer_class = getattr(torch.optim, optimizer_name)
    optimizer = optimizer_class(trainable, lr=0.1, weight_decay=5e-4)

    teacher_before = snapshot(distillation.teacher.state_dict().items())
    student_before = snapshot(distillation.student.backbone.named_parameters())
    head_before = head.weight.detach().clone()
    batch, labels = images(2), torch.tensor([1, 7])
    teacher_features, teacher_logits = distillation.teacher_outputs(batch, labels)
    student_features, student_logits = distillation.student(batch, labels)
    assert teacher_logits.shape == student_logits.shape == (2, 10)
    kd = F.kl_div(F.log_softmax(student_logits / 4, dim=1), F.softmax(teacher_logits, dim=1), reduction='sum')
    (F.cross_entropy(student_logits, labels) + kd).backward()
    optimizer.step()

    assert torch.equal(head.weight, head_before)
    assert all(torch.equal(tensor, teacher_before[name]) for name, tensor in distillation.teacher.state_dict().items())
    assert distillation.teacher.backbone.batches_seen == 0
    assert all(parameter.grad is None for parameter in distillation.teacher.parameters())
    for name, parameter in distillation.student.backbone.named_parameters():
        assert not torch.equal(parameter, student_before[name]), name
    optimizer_ids = {id(parameter) for group in optimizer.param_groups for parameter in group['params']}
    frozen_ids = {id(parameter) for parameter in distillation.teacher.parameters()} | {id(head.weight)}
    assert not optimizer_ids & frozen_ids
    assert optimizer_ids == {id(parameter) for parameter in distillation.student.backbone.parameters()}


def unique_storage_bytes(tensors):
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_full_size_shared_head_is_held_once(swin_base_small, resnet12_full):
    head = model.CosFaceHead(NUM_LANDMARKS, model.FEATURE_DIM)
    head_bytes = head.weight.numel() * head.weight.element_size()
    assert head.weight.numel() == NUM_LANDMARKS * 1024
    distillation = model.DistillationModel(model.Classifier(resnet12_full, head),
                                           model.Classifier(swin_base_small, head))
    assert distillation.student.head is distillation.teacher.head
    backbone_bytes = sum(unique_storage_bytes(list(backbone.parameters()) + list(backbone.buffers()))
                         for backbone in (resnet12_full, swin_base_small))
    model_bytes = unique_storage_bytes(list(distillation.parameters()) + list(distillation.buffers()))
    assert model_bytes == backbone_bytes + head_bytes
    # the state dict (what a checkpoint writes) also holds the head once; Swin's index buffers are not in it
    persistent_bytes = unique_storage_bytes(list(distillation.parameters()) + list(resnet12_full.buffers()))
    assert unique_storage_bytes(distillation.state_dict().values()) == persistent_bytes
    trainable = distillation.trainable_parameters()
    assert sum(parameter.numel() for parameter in trainable) == ORIGINAL_PARAMETER_COUNTS['Resnet12']
    teacher_features, teacher_logits = distillation.teacher_outputs(images(1), torch.tensor([NUM_LANDMARKS - 1]))
    assert teacher_logits.shape == (1, NUM_LANDMARKS) and not teacher_logits.requires_grad
    margin_free = distillation.teacher.head(teacher_features)
    assert margin_free[0, -1] - teacher_logits[0, -1] == pytest.approx(3.2, abs=1e-4)
    assert torch.equal(margin_free[0, :-1], teacher_logits[0, :-1])


# ---------------------------------------------------------------- checkpoint files


def test_original_teacher_file_matches_timm_conversion(tmp_path):
    """Old-layout teacher file (pycls 'model_state', 'encoder.' keys, buffers, cosine head) at 384 px, where our
    backbone is plain timm: its features must equal timm's own checkpoint_filter_fn loaded into stock timm.
    Swin_base's depths and window at a quarter of its width keep the test fast; the key layout is the same."""
    narrow = dict(embed_dim=32, num_heads=(1, 2, 4, 8))
    source = perturb(stock_timm_swin('Swin_base', 384, **narrow))
    head_weight = torch.randn(12, 256)
    old_state = to_old_swin_layout(source.state_dict())
    assert 'encoder.layers.0.downsample.reduction.weight' in old_state
    old_state['encoder.head.weight'] = head_weight
    path = str(tmp_path / 'teacher.pyth')
    torch.save({'epoch': 30, 'model_state': old_state, 'optimizer_state': {}}, path)
    del source

    reference = stock_timm_swin('Swin_base', 384, **narrow).eval()
    bare_old = {key[len('encoder.'):]: value for key, value in old_state.items() if key != 'encoder.head.weight'}
    reference.load_state_dict(checkpoint_filter_fn(bare_old, reference), strict=True)
    teacher = model.load_classifier('Swin_base', path, img_size=384, width_divisor=4)
    assert not teacher.training
    assert torch.equal(teacher.head.weight, head_weight)
    batch = images(1, 384)
    with torch.no_grad():
        expected = reference(batch)
        features, logits = teacher(batch)
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
    assert logits.shape == (1, 12)


def test_prefixed_student_files_load_at_demo_width(tmp_path):
    """'encoder.module.' prefixes, a 'distill_layer' teacher and a head around narrow backbones (the original's own
    files, at full width, are tests/test_fidelity.py's)."""
    torch.manual_seed(0)
    resnet = perturb(model.create_backbone('Resnet12', width_divisor=8)).eval()
    distill_junk = {'distill_layer.encoder.layers.0.blocks.0.norm1.weight': torch.ones(3),
                    'distill_layer.encoder.head.weight': torch.ones(4, 3)}
    resnet_file = {'encoder.module.' + key: value for key, value in resnet.state_dict().items()}
    resnet_file['encoder.module.head.weight'] = torch.randn(10, 128)
    resnet_path = str(tmp_path / 'resnet_max_acc.pth')
    torch.save({'params': {**resnet_file, **distill_junk}}, resnet_path)
    loaded = model.load_backbone('Resnet12', resnet_path, width_divisor=8)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images(2)), resnet(images(2)))
    classifier = model.load_classifier('Resnet12', resnet_path, width_divisor=8)
    assert torch.equal(classifier.head.weight, resnet_file['encoder.module.head.weight'])

    swin = perturb(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=8)).eval()
    swin_file = to_old_swin_layout(swin.state_dict(), window_area=9)
    swin_path = str(tmp_path / 'swin_max_acc.pth')
    torch.save({'params': {**swin_file, **distill_junk}}, swin_path)
    loaded = model.load_backbone('Swin_tiny', swin_path, img_size=SMALL_IMAGE, width_divisor=8)
    with torch.no_grad():
        assert torch.equal(loaded(images(2)), swin(images(2)))


def test_official_swin_file_skips_its_linear_classifier(tmp_path):
    swin = perturb(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=8)).eval()
    official = to_old_swin_layout(swin.state_dict(), prefix='')
    official['head.weight'], official['head.bias'] = torch.randn(1000, 128), torch.randn(1000)
    for container in ('model', None):
        path = str(tmp_path / f'official_{container}.pth')
        torch.save({container: official} if container else official, path)
        state, head_weight = model.read_weights(path, 'Swin_tiny')
        assert head_weight is None
        assert set(state) == set(swin.state_dict())
        loaded = model.load_backbone('Swin_tiny', path, img_size=SMALL_IMAGE, width_divisor=8)
        with torch.no_grad():
            assert torch.equal(loaded(images(1)), swin(images(1)))


def test_own_files_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = model.Classifier(perturb(model.create_backbone('Resnet12', width_divisor=8)),
                                  model.CosFaceHead(5, 128)).eval()
    with_head = str(tmp_path / 'with_head.pth')
    torch.save(model.student_weights(classifier, include_head=True), with_head)
    restored = model.load_classifier('Resnet12', with_head, width_divisor=8)
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        expected_features, expected_logits = classifier(images(2), labels)
        features, logits = restored(images(2), labels)
    assert torch.equal(features, expected_features) and torch.equal(logits, expected_logits)

    without_head = str(tmp_path / 'without_head.pth')
    torch.save(model.student_weights(classifier, include_head=False), without_head)
    assert model.read_weights(without_head, 'Resnet12')[1] is None
    model.load_backbone('Resnet12', without_head, width_divisor=8)
    with pytest.raises(ValueError, match='holds no cosine head weight'):
        model.load_classifier('Resnet12', without_head, width_divisor=8)


# ---------------------------------------------------------------- errors


@pytest.fixture
def resnet_file(tmp_path):
    backbone = model.create_backbone('Resnet12', width_divisor=8)
    path = tmp_path / 'student.pth'
    state = dict(backbone.state_dict())
    torch.save({'params': state}, path)
    return path, state


def assert_one_line(error, path):
    message = str(error.value)
    assert str(path) in message and '\n' not in message


def test_wrong_backbone_names_file_and_keys(resnet_file):
    path, _ = resnet_file
    with pytest.raises(ValueError) as error:
        model.load_backbone('Swin_tiny', str(path), img_size=SMALL_IMAGE, width_divisor=8)
    assert_one_line(error, path)
    assert 'Swin_tiny' in str(error.value)
    assert 'missing keys: layers.0.blocks.0' in str(error.value)
    assert 'unexpected keys: bn1.bias, bn1.num_batches_tracked' in str(error.value)


def test_full_size_wrong_backbone_says_what_the_file_fits(tmp_path, resnet12_full):
    path = tmp_path / 'resnet_full.pth'
    torch.save({'params': resnet12_full.state_dict()}, path)
    with pytest.raises(ValueError, match=r'it fits Resnet12'):
        model.load_backbone('Swin_base', str(path), img_size=SMALL_IMAGE)


def test_missing_unexpected_and_misshaped_keys(tmp_path, resnet_file):
    path, state = resnet_file
    missing = dict(state)
    del missing['layer4.0.conv3.weight']
    unexpected = dict(state, **{'layer5.conv1.weight': torch.zeros(1)})
    cases = {'missing keys: layer4.0.conv3.weight': missing, 'unexpected keys: layer5.conv1.weight': unexpected}
    for expected_message, broken in cases.items():
        broken_path = tmp_path / 'broken.pth'
        torch.save({'params': broken}, broken_path)
        with pytest.raises(ValueError, match=re.escape(expected_message)) as error:
            model.load_backbone('Resnet12', str(broken_path), width_divisor=8)
        assert_one_line(error, broken_path)
    with pytest.raises(ValueError, match=r'misshaped keys: bn1.bias \(file \(16,\), model \(32,\)\)'):
        model.load_backbone('Resnet12', str(path), width_divisor=4)


def test_truncated_file(resnet_file, tmp_path):
    path, _ = resnet_file
    truncated = tmp_path / 'truncated.pth'
    data = path.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='corrupt or truncated') as error:
        model.load_backbone('Resnet12', str(truncated), width_divisor=8)
    assert_one_line(error, truncated)
    with pytest.raises(model.WeightsFileError, match='no such weights file'):
        model.read_weights(str(tmp_path / 'absent.pth'), 'Resnet12')


class CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / 'was_run'
    for writer in ('torch', 'pickle'):
        path = tmp_path / f'malicious_{writer}.pth'
        payload = {'params': {'conv1.weight': CreatesFileWhenUnpickled(str(marker))}}
        if writer == 'torch':
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        assert not marker.exists()
        with pytest.raises(ValueError, match='refused to load') as error:
            model.load_backbone('Resnet12', str(path), width_divisor=8)
        assert_one_line(error, path)
        assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match='expected a dict of tensors'):
        model.read_weights(str(path), 'Resnet12')
    path = tmp_path / 'nested.pth'
    torch.save({'params': {'conv1.weight': torch.zeros(1), 'epoch': 3}}, path)
    with pytest.raises(ValueError, match=r'entries epoch are not tensors'):
        model.read_weights(str(path), 'Resnet12')


# ---------------------------------------------------------------- the published runs' teacher and head


def test_teacher_runs_with_stochastic_depth_as_published_unless_asked_for_eval():
    torch.manual_seed(0)
    teacher_backbone = perturb(model.create_backbone('Swin_tiny', img_size=SMALL_IMAGE, width_divisor=8))
    teacher = model.Classifier(teacher_backbone, model.CosFaceHead(5, 128))
    student = model.Classifier(model.create_backbone('Resnet12', width_divisor=8), teacher.head)
    batch = images(2)
    published = model.DistillationModel(student, teacher, stochastic_teacher=True).train()
    assert teacher.training and not any(parameter.requires_grad for parameter in teacher.parameters())
    first, second = published.teacher_outputs(batch, None)[0], published.teacher_outputs(batch, None)[0]
    assert not torch.equal(first, second) and not first.requires_grad
    deterministic = model.DistillationModel(student, teacher, stochastic_teacher=False).train()
    assert not teacher.training
    assert torch.equal(deterministic.teacher_outputs(batch, None)[0], deterministic.teacher_outputs(batch, None)[0])


def test_a_batchnorm_teacher_keeps_its_statistics():
    teacher = model.Classifier(model.create_backbone('Resnet12', width_divisor=8), model.CosFaceHead(5, 128))
    student = model.Classifier(model.create_backbone('Resnet12', width_divisor=8), teacher.head)
    distiller = model.DistillationModel(student, teacher, stochastic_teacher=True).train()
    before = teacher.backbone.bn1.running_mean.clone()
    distiller.teacher_outputs(images(2), None)
    assert torch.equal(teacher.backbone.bn1.running_mean, before)


def test_distilling_without_head_fixed_starts_a_fresh_head_unless_asked(tmp_path):
    import helpers
    torch.manual_seed(0)
    backbone = model.create_backbone('Resnet12', width_divisor=8)
    teacher_path = str(tmp_path / 'teacher.pth')
    torch.save(model.student_weights(model.Classifier(backbone, model.CosFaceHead(6, 128)), include_head=True),
               teacher_path)
    teacher_head = model.read_weights(teacher_path, 'Resnet12')[1]
    arguments = dict(teacher_name='Resnet12', teacher_weights=teacher_path, head_fixed=False, width_divisor=8)
    fresh = helpers.build_model('Resnet12', 96, None, None, **arguments).student.head.weight
    assert fresh.requires_grad and fresh.shape == (6, 128) and not torch.equal(fresh, teacher_head)
    bound = math.sqrt(6 / (6 + 128))  # Xavier uniform
    assert fresh.abs().max() <= bound and fresh.abs().max() > 0.9 * bound
    copied = helpers.build_model('Resnet12', 96, None, None, init_head_from_teacher=True, **arguments)
    assert torch.equal(copied.student.head.weight, teacher_head) and copied.student.head.weight.requires_grad


@pytest.mark.parametrize('content', [b'just some notes\n', b'', b'PK\x03\x04 not really a zip'])
def test_files_that_are_not_weights_are_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / 'notes.txt'
    path.write_bytes(content)
    with pytest.raises(model.WeightsFileError) as error:
        model.load_classifier('Swin_base', str(path), img_size=SMALL_IMAGE)
    assert_one_line(error, path)
    assert 'weights_only' not in str(error.value)


def test_fused_attention_gives_the_same_features():
    torch.manual_seed(0)
    backbone = model.create_backbone('Swin_tiny', img_size=96, width_divisor=4).eval()
    batch = images(2, 96)
    with torch.no_grad():
        plain = backbone(batch)
        swin_transformer.use_fused_attention(backbone)
        switched = [module.fused_attn for module in backbone.modules() if hasattr(module, 'fused_attn')]
        assert switched and all(switched)
        fused = backbone(batch)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
