"""Fidelity to the original system, proven against outputs of the original code itself (tests/data/README.md).

Nothing here builds an "original" file from this project's own key names: the key lists, the seeded weights'
rule, the features, logits and TARs all come from the original code.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluation
import model
import verification  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
BACKBONE_SEEDS = {'Swin_tiny': 101, 'Resnet12': 102, 'Swin_base': 103}
FIXED_BUFFERS = ('relative_position_index', 'attn_mask')
FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
TAR_CASES = ('clustered', 'ties', 'small', 'lattice', 'no_fine_pairs')


def original_keys(backbone):
    with open(os.path.join(DATA, 'original_state_dict_keys.json'), encoding='utf-8') as handle:
        return json.load(handle)[backbone]


def seeded_original_weights(backbone):
    """The original model's state dict filled by the seeded rule of tests/data/README.md, plus its 10-class head.

    The fixed Swin buffers are given as zeros of the original's shapes: the model computes them itself, so a
    loader that read them would give wrong features here.
    """
    generator = torch.Generator().manual_seed(BACKBONE_SEEDS[backbone])
    state = {}
    for key, shape, dtype in original_keys(backbone):
        last = key.rsplit('.', 1)[-1]
        if last in FIXED_BUFFERS:
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        if last == 'num_batches_tracked':
            state[key] = torch.tensor(0)
            continue
        values = torch.randn(shape, generator=generator)
        if last == 'running_var':
            values = 1 + 0.1 * values.abs()
        elif last in ('running_mean', 'bias', 'relative_position_bias_table'):
            values = 0.02 * values
        elif last == 'weight' and len(shape) == 1:
            values = 1 + 0.1 * values
        else:
            values = values / math.sqrt(math.prod(shape[1:]))
        state[key] = values
    head = torch.randn((10, 1024), generator=generator) / 32
    return state, head


def fixed_batch():
    return torch.randn(4, 3, 384, 384, generator=torch.Generator().manual_seed(7))


def test_resnet12_state_dict_is_the_originals():
    expected = [(key, shape) for key, shape, _ in original_keys('Resnet12')]
    ours = [(key, list(value.shape)) for key, value in model.create_backbone('Resnet12').state_dict().items()]
    assert ours == expected


@pytest.mark.parametrize('backbone', ['Swin_tiny', 'Resnet12', 'Swin_base'])
def test_original_files_reproduce_the_originals_features_and_logits(backbone, tmp_path):
    """Teacher file ({'model_state': {'encoder.<key>'}}) and multi-GPU student file ({'params':
    {'encoder.module.<key>'}} with a distillation teacher alongside) give the original's features and logits."""
    state, head = seeded_original_weights(backbone)
    teacher_path = str(tmp_path / 'teacher.pyth')
    torch.save({'epoch': 40, 'model_state': {**{f'encoder.{key}': value for key, value in state.items()},
                                             'encoder.head.weight': head}}, teacher_path)
    student_path = str(tmp_path / 'max_acc.pth')
    teacher_alongside = {'distill_layer.encoder.patch_embed.proj.weight': torch.ones(128, 3, 4, 4),
                         'distill_layer.encoder.layers.0.downsample.norm.weight': torch.ones(512),
                         'distill_layer.head.weight': torch.ones(10, 1024)}
    torch.save({'params': {**{f'encoder.module.{key}': value for key, value in state.items()},
                           'head.weight': head, **teacher_alongside}}, student_path)
    del state
    reference = np.load(os.path.join(DATA, 'original_features.npz'))
    batch = fixed_batch()
    labels = torch.zeros(4, dtype=torch.long)

    classifier = model.load_classifier(backbone, teacher_path)
    with torch.no_grad():
        features, logits = classifier(batch, labels)
    features = torch.nn.functional.normalize(features, dim=1).numpy()
    np.testing.assert_allclose(features, reference[f'{backbone}_features'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits.numpy(), reference[f'{backbone}_logits'], atol=1e-4, rtol=0)
    del classifier

    student = model.load_backbone(backbone, student_path)
    with torch.no_grad():
        student_features = torch.nn.functional.normalize(student(batch), dim=1).numpy()
    np.testing.assert_allclose(student_features, reference[f'{backbone}_features'], atol=1e-4, rtol=0)
    assert torch.equal(model.read_weights(student_path, backbone)[1], head)


# ---------------------------------------------------------------- TAR@FAR


def tar_case(name):
    cases = np.load(os.path.join(DATA, 'original_tar_cases.npz'))
    return {field: cases[f'{name}_{field}'] for field in
            ('features', 'coarse', 'fine', 'expected_coarse', 'expected_fine')}


def positive_pairs(labels):
    counts = np.unique(labels, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def assert_original_tars(tars, expected, labels, exact):
    """Equal to the original's TARs; within one positive pair per value where scores sit on bin edges."""
    tars = np.asarray(tars, dtype=np.float64)
    assert np.array_equal(np.isnan(tars), np.isnan(expected)), (tars, expected)
    defined = ~np.isnan(expected)
    if positive_pairs(labels) == 0:  # no positive pair: the defined values are the 8x rule's exact zeros
        exact = True
    tolerance = 0.0 if exact else 1.0 / positive_pairs(labels) + 1e-5
    np.testing.assert_allclose(tars[defined], expected[defined], atol=tolerance, rtol=0)


def upper_triangle_mask(labels):
    rows, columns = np.triu_indices(len(labels), 1)
    return labels[rows] == labels[columns]


@pytest.mark.parametrize('name', TAR_CASES)
def test_tar_at_far_is_the_originals_by_labels_and_by_mask(name):
    case = tar_case(name)
    exact = name == 'lattice'
    for grain in ('coarse', 'fine'):
        labels, expected = case[grain], case[f'expected_{grain}']
        by_labels = verification.tar_at_far(case['features'], labels=labels, fars=FARS)
        assert_original_tars(by_labels, expected, labels, exact)
        by_mask = verification.tar_at_far(case['features'], mask=upper_triangle_mask(labels), fars=FARS)
        assert_original_tars(by_mask, expected, labels, exact)


@pytest.mark.parametrize('name', TAR_CASES)
def test_cross_scoring_with_the_same_gallery_is_the_originals(name):
    case = tar_case(name)
    result = evaluation.evaluate_features(case['features'], case['coarse'], case['fine'],
                                          gallery_features=case['features'].copy())
    assert_original_tars(result['coarse'], case['expected_coarse'], case['coarse'], name == 'lattice')
    assert_original_tars(result['fine'], case['expected_fine'], case['fine'], name == 'lattice')
