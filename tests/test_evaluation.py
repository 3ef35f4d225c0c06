"""evaluation.py: TAR@FAR against a full-matrix reference of the original's algorithm, edge cases, nearest neighbours,
run names, logging.

The reference below scores every pair at once and follows the original's steps literally; it is itself checked
against the original code's own outputs (tests/data/original_tar_cases.npz), so that the tiled, chunked and
masked paths of utils are compared with something proven, not with a second copy of our reading.
"""
import itertools
import json
import os

import numpy as np
import pytest
import torch

import checkpoints
import evaluation
import run_directory  # noqa: E402
import verification  # noqa: E402

FARS = (0.5, 0.3, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference: the whole score matrix, the original's algorithm step by step
# ----------------------------------------------------------------------------------------------------------------------

def reference_curve(features, positive_pairs, gallery=None, num_thresholds=2000):
    """FAR and TAR per threshold over the pairs i < j, using every score at once (float64).

    Thresholds lo + (hi - lo) * k / T for k = 1..T; a pair is accepted at a threshold t when its score is at least
    t - unit / 2 + 2e-6; the denominators count every negative / positive pair, accepted anywhere or not."""
    features = np.asarray(features, dtype=np.float64)
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    other = features if gallery is None else np.asarray(gallery, dtype=np.float64)
    other = other / np.linalg.norm(other, axis=1, keepdims=True)
    upper_rows, upper_columns = np.triu_indices(len(features), 1)
    scores = (features @ other.T)[upper_rows, upper_columns]
    positive = np.asarray(positive_pairs, dtype=bool)
    low, high = scores.min(), scores.max()
    thresholds = low + (high - low) * np.arange(1, num_thresholds + 1) / num_thresholds
    unit = (high - low) / num_thresholds
    accepted = scores[:, None] >= (thresholds - unit / 2 + 2e-6)[None, :]
    with np.errstate(invalid='ignore'):
        far = accepted[~positive].sum(axis=0) / (~positive).sum()
        tar = accepted[positive].sum(axis=0) / positive.sum()
    return far, tar


def reference_tars(far, tar, fars):
    """The original's lookup: binary search for the bracketing thresholds, 0 when the lower FAR is 8x the target or
    more, else the mean of the two TARs; a FAR equal to the target answers its own TAR."""
    results = []
    for target in fars:
        lower, upper = 0, len(far) - 1
        found = None
        while upper - lower > 1:
            middle = (lower + upper) // 2
            if far[middle] == target:
                found = tar[middle]
                break
            if far[middle] < target:
                upper = middle
            else:
                lower = middle
        if found is None:
            found = 0.0 if far[lower] / target >= 8 else (tar[lower] + tar[upper]) / 2
        results.append(round(float(found), 5))
    return results


def test_reference_reproduces_the_original_code():
    cases = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'original_tar_cases.npz'))
    for name in ('lattice', 'small', 'ties', 'clustered', 'no_fine_pairs'):
        for grain in ('coarse', 'fine'):
            far, tar = reference_curve(cases[f'{name}_features'], pairs_from_labels(cases[f'{name}_{grain}']))
            # NaN where the original gave NaN (no positive pair), equal everywhere else
            np.testing.assert_array_equal(reference_tars(far, tar, verification.DEFAULT_FARS),
                                          cases[f'{name}_expected_{grain}'])


def pairs_from_labels(labels):
    labels = np.asarray(labels)
    upper_rows, upper_columns = np.triu_indices(len(labels), 1)
    return labels[upper_rows] == labels[upper_columns]


def sign_features(labels, dimension=64, flip=0.2, seed=0):
    """Entries +-1/8 (unit norm exactly, so every score is an exact multiple of 1/32 in float32 and float64):
    per label a random sign prototype, per image each sign flipped with probability `flip`."""
    generator = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    prototypes = {label: generator.choice([-1.0, 1.0], size=dimension) for label in classes}
    features = np.stack([prototypes[label] for label in labels])
    flips = generator.random(features.shape) < flip
    features[flips] *= -1
    return (features / np.sqrt(dimension)).astype(np.float32)


LABEL_PATTERNS = {
    'ten_per_label': np.repeat(np.arange(12), 10),
    'uneven_sizes': np.concatenate([np.full(size, label) for label, size in enumerate([1, 2, 3, 5, 8, 13, 21, 34])]),
    'shuffled_with_singletons': np.random.default_rng(3).permutation(np.concatenate([np.repeat(np.arange(20), 4),
                                                                                     np.arange(100, 130)])),
    'one_big_class': np.concatenate([np.zeros(60, dtype=int), np.arange(1, 41)]),
}


# ----------------------------------------------------------------------------------------------------------------------
# TAR@FAR against the reference
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('pattern', sorted(LABEL_PATTERNS))
def test_tar_at_far_equals_full_matrix_reference(pattern, tmp_path):
    labels = LABEL_PATTERNS[pattern]
    features = sign_features(labels, seed=len(labels))
    positive = pairs_from_labels(labels)
    far, tar = reference_curve(features, positive)
    expected = reference_tars(far, tar, FARS)
    assert expected[0] > 0  # the clusters make the curve informative

    assert verification.tar_at_far(features, labels=labels, fars=FARS, device='cpu') == expected
    mask_path = os.path.join(tmp_path, 'mask.npy')
    np.save(mask_path, positive)
    # Tiny tiles: many row blocks, one or two rows each, read block by block from the memory-mapped file.
    assert verification.tar_at_far(features, mask=positive, fars=FARS, tile_elements=150) == expected
    assert verification.tar_at_far(torch.from_numpy(features), mask=mask_path, fars=FARS, tile_elements=700) == expected
    curve_far, curve_tar = verification.far_tar_curve(features, labels=labels, tile_elements=400)
    np.testing.assert_array_equal(curve_far, far)
    np.testing.assert_array_equal(curve_tar, tar)


def test_targets_on_curve_values_and_at_eight_times():
    labels = LABEL_PATTERNS['ten_per_label']
    features = sign_features(labels, seed=len(labels))
    far, tar = reference_curve(features, pairs_from_labels(labels))
    values = np.unique(far[far > 0])[::-1]
    # A target equal to a FAR of the curve keeps that threshold as the lower bracket.
    on_curve = tuple(float(value) for value in values[1:8])
    # A FAR followed by one under an eighth of it (here the smallest, then 0): the target FAR / 8 gives 0 (the
    # lower FAR is not under 8x the target), a hair more does not.
    following_values = np.append(values[1:], 0.0)
    jump = next(value for value, following in zip(values, following_values) if following < value / 8)
    at_eight = (float(jump) / 8, float(jump) / 8 * (1 + 1e-9))
    targets = on_curve + at_eight
    got = verification.tar_at_far(features, labels=labels, fars=targets)
    assert got == reference_tars(far, tar, targets)
    assert got[-2] == 0.0 and got[-1] > 0


def test_label_comparison_and_small_chunks_give_the_same_answer(monkeypatch):
    labels = LABEL_PATTERNS['one_big_class']
    features = sign_features(labels, seed=21)
    far, tar = reference_curve(features, pairs_from_labels(labels))
    # Too many positive pairs to list: each tile compares labels; chunks of a few scores each.
    monkeypatch.setattr(verification, 'SPARSE_POSITIVE_LIMIT', 10)
    monkeypatch.setattr(verification, 'CHUNK_ELEMENTS', 64)
    tars = verification.tar_at_far(features, labels=labels, fars=FARS, tile_elements=900)
    assert tars == reference_tars(far, tar, FARS)


def test_string_labels_and_default_fars():
    labels = LABEL_PATTERNS['ten_per_label']
    features = sign_features(labels, flip=0.25, seed=5)
    far, tar = reference_curve(features, pairs_from_labels(labels))
    expected = reference_tars(far, tar, verification.DEFAULT_FARS)
    names = np.array([f'landmark_{label}' for label in labels])
    assert verification.tar_at_far(features, labels=names) == expected
    assert len(expected) == 8


def test_gaussian_clusters_match_reference_within_float32():
    generator = np.random.default_rng(7)
    labels = np.repeat(np.arange(30), 5)
    centres = generator.normal(size=(30, 24))
    features = (centres[labels] + 0.9 * generator.normal(size=(150, 24))).astype(np.float32)
    far, tar = reference_curve(features, pairs_from_labels(labels))
    got = verification.tar_at_far(features, labels=labels, fars=FARS, tile_elements=1000)
    # float32 against float64 scores may move a pair across an edge; one pair is 1/300 of the positives.
    np.testing.assert_allclose(got, reference_tars(far, tar, FARS), atol=4e-3)
    assert got[2] > 0.5


def test_fast_binning_equals_binary_search_on_float32_scores(monkeypatch):
    generator = np.random.default_rng(8)
    labels = np.repeat(np.arange(300), 5)
    features = generator.normal(size=(1500, 48)).astype(np.float32)
    features[::7] = features[1::7][:len(features[::7])]  # exact duplicate scores as well
    monkeypatch.setattr(verification, 'CHUNK_ELEMENTS', 5000)
    fast = verification.far_tar_curve(features, labels=labels, tile_elements=1 << 18)
    monkeypatch.setattr(verification, 'MIN_ARITHMETIC_STEP', np.inf)  # every score through torch.searchsorted
    exact = verification.far_tar_curve(features, labels=labels, tile_elements=1 << 18)
    np.testing.assert_array_equal(fast[0], exact[0])
    np.testing.assert_array_equal(fast[1], exact[1])
    assert 0 < fast[0][1000] < 1


def test_score_range_is_the_exact_float32_range():
    generator = np.random.default_rng(9)
    features = torch.nn.functional.normalize(torch.from_numpy(generator.normal(size=(700, 64))).float(), dim=1)
    scores = features @ features.T
    upper = torch.triu(torch.ones(700, 700, dtype=torch.bool), diagonal=1)
    expected = (scores[upper].min().item(), scores[upper].max().item())
    np.testing.assert_allclose(verification._score_range(features, features, tile_elements=20000), expected, atol=1e-6)


def test_cross_scores_use_gallery_for_the_second_image():
    labels = LABEL_PATTERNS['uneven_sizes']
    features = sign_features(labels, seed=11)
    gallery = sign_features(labels, flip=0.3, seed=11)  # same prototypes, other flips
    positive = pairs_from_labels(labels)
    far, tar = reference_curve(features, positive, gallery=gallery)
    expected = reference_tars(far, tar, FARS)
    assert verification.tar_at_far(features, labels=labels, fars=FARS, gallery_features=gallery,
                                   tile_elements=300) == expected
    # Swapping the roles scores the other triangle: in general a different answer.
    far_swapped, tar_swapped = reference_curve(gallery, positive, gallery=features)
    assert verification.tar_at_far(gallery, labels=labels, fars=FARS, gallery_features=features) == \
        reference_tars(far_swapped, tar_swapped, FARS)
    assert not np.array_equal(far, far_swapped)


def test_evaluate_features_shares_one_pass_for_coarse_and_fine(tmp_path):
    coarse = LABEL_PATTERNS['ten_per_label']
    fine = coarse * 2 + (np.arange(len(coarse)) % 2)
    features = sign_features(fine, flip=0.15, seed=2)
    result = evaluation.evaluate_features(features, coarse, fine, fars=FARS, tile_elements=500)
    for level, labels in (('coarse', coarse), ('fine', fine)):
        far, tar = reference_curve(features, pairs_from_labels(labels))
        assert result[level] == reference_tars(far, tar, FARS)
        np.testing.assert_array_equal(result[f'{level}_curve'][0], far)
        assert result[f'{level}_nn_accuracy'] == pytest.approx(brute_force_nearest_neighbour(features, labels))
    assert result['coarse'] != result['fine']

    fine_mask = os.path.join(tmp_path, 'fine.npy')
    np.save(fine_mask, pairs_from_labels(fine))
    masked = evaluation.evaluate_features(features, coarse, None, coarse_mask=pairs_from_labels(coarse),
                                          fine_mask=fine_mask, fars=FARS)
    assert masked['coarse'] == result['coarse'] and masked['fine'] == result['fine']
    assert masked['fine_nn_accuracy'] is None

    gallery = sign_features(fine, flip=0.3, seed=2)
    cross = evaluation.evaluate_features(features, coarse, fine, gallery_features=gallery, fars=FARS)
    far, tar = reference_curve(features, pairs_from_labels(fine), gallery=gallery)
    assert cross['fine'] == reference_tars(far, tar, FARS)
    assert cross['coarse_nn_accuracy'] == pytest.approx(brute_force_nearest_neighbour(features, coarse, gallery))


# ----------------------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------------------

def test_no_positive_pair_gives_nan_where_the_original_did():
    labels = np.arange(20)
    tars = verification.tar_at_far(sign_features(labels), labels=labels)
    far, tar = reference_curve(sign_features(labels), pairs_from_labels(labels))
    expected = reference_tars(far, tar, verification.DEFAULT_FARS)
    assert np.isnan(expected[0]) and expected[-1] == 0.0
    np.testing.assert_array_equal(tars, expected)
    result = evaluation.evaluate_features(sign_features(labels), labels, labels)
    assert result['fine_undefined'] == 'no positive pair (no two test images share a label)'


def test_all_pairs_positive_gives_nan():
    labels = np.zeros(20, dtype=int)
    assert np.isnan(verification.tar_at_far(sign_features(labels), labels=labels)).all()
    result = evaluation.evaluate_features(sign_features(labels), labels, None)
    assert result['coarse_undefined'] == 'no negative pair (every test image has the same label)'


def test_duplicate_features_accept_nothing():
    labels = np.repeat(np.arange(5), 4)
    features = np.tile(sign_features([0])[0], (20, 1))
    far, tar = verification.far_tar_curve(features, labels=labels)
    # min == max: every edge lies 2e-6 above the single score
    assert not far.any() and not tar.any()
    assert verification.tar_at_far(features, labels=labels) == [0.0] * 8


@pytest.mark.parametrize('count', [0, 1])
def test_fewer_than_two_features_give_undefined_figures(count):
    features, labels = np.ones((count, 8), dtype=np.float32), np.zeros(count)
    assert np.isnan(verification.tar_at_far(features, labels=labels)).all()
    result = evaluation.evaluate_features(features, labels, labels)
    assert np.isnan(result['coarse']).all() and np.isnan(result['fine']).all()
    assert result['coarse_undefined'] == 'fewer than two test images: there is no pair to score'
    assert np.isnan(result['coarse_nn_accuracy'])


def test_labels_and_mask_both_or_neither_is_an_error():
    labels = np.repeat(np.arange(3), 3)
    features = sign_features(labels)
    with pytest.raises(ValueError, match='not both'):
        verification.tar_at_far(features, labels=labels, mask=pairs_from_labels(labels))
    with pytest.raises(ValueError, match='give labels'):
        verification.tar_at_far(features)


def test_mask_of_wrong_length_is_an_error(tmp_path):
    labels = np.repeat(np.arange(3), 3)
    features = sign_features(labels)
    with pytest.raises(ValueError, match='36 pairs'):
        verification.tar_at_far(features, mask=np.ones(35, dtype=bool))
    path = os.path.join(tmp_path, 'short.npy')
    np.save(path, np.ones(45, dtype=bool))
    with pytest.raises(ValueError, match='short.npy'):
        verification.tar_at_far(features, mask=path)
    with pytest.raises(ValueError, match='labels has 8 entries'):
        verification.tar_at_far(features, labels=labels[:8])


# ----------------------------------------------------------------------------------------------------------------------
# Nearest neighbours
# ----------------------------------------------------------------------------------------------------------------------

def brute_force_nearest_neighbour(features, labels, gallery=None):
    features = np.asarray(features, dtype=np.float64)
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    other = features if gallery is None else np.asarray(gallery, dtype=np.float64)
    other = other / np.linalg.norm(other, axis=1, keepdims=True)
    scores = features @ other.T
    np.fill_diagonal(scores, -np.inf)
    labels = np.asarray(labels)
    return float(np.mean(labels[scores.argmax(axis=1)] == labels))  # argmax: first index among ties


def test_nearest_neighbour_accuracy_matches_brute_force():
    labels = LABEL_PATTERNS['shuffled_with_singletons']
    features = sign_features(labels, flip=0.3, seed=4)  # many exactly tied scores
    expected = brute_force_nearest_neighbour(features, labels)
    assert 0.2 < expected < 1
    result = evaluation.evaluate_features(features, labels, None, tile_elements=300)
    assert result['coarse_nn_accuracy'] == pytest.approx(expected)
    gallery = sign_features(labels, flip=0.1, seed=4)
    result = evaluation.evaluate_features(features, labels, None, gallery_features=gallery, tile_elements=300)
    assert result['coarse_nn_accuracy'] == pytest.approx(brute_force_nearest_neighbour(features, labels, gallery))


# ----------------------------------------------------------------------------------------------------------------------
# Run directory, logging, formatting
# ----------------------------------------------------------------------------------------------------------------------

RECIPE = dict(dataset='TLD', backbone_class='Swin_tiny', is_distill=True, kd_loss='KD',
              kd_weight=1.0, init_weights=None, augment=True, lr=0.001, optim='AdamW', lr_scheduler='cosine',
              step_size=20, gamma=0.1, max_epoch=200, warmup_epoch=10, batch_size=256, head_fixed=True, suffix='')


@pytest.mark.parametrize('changes, expected', [
    ({}, 'TLD-Swin_tiny-KD-1.0/lr0.001_AdamW_cosine_epoch200_warmup10_bs256-head_fixed'),
    ({'is_distill': False, 'head_fixed': False},
     'TLD-Swin_tiny-no_distill/lr0.001_AdamW_cosine_epoch200_warmup10_bs256'),
    ({'init_weights': 'teacher.pth', 'augment': False, 'suffix': '_try2'},
     'TLD-Swin_tiny-KD-1.0-Pre-NoAug/lr0.001_AdamW_cosine_epoch200_warmup10_bs256-head_fixed_try2'),
    ({'backbone_class': 'Resnet12', 'lr': 0.01, 'optim': 'SGD', 'lr_scheduler': 'step', 'max_epoch': 40,
      'warmup_epoch': 0, 'kd_loss': 'global_KD', 'kd_weight': 0.5},
     'TLD-Resnet12-global_KD-0.5/lr0.01_SGD-step20-gamma0.1_step_epoch40_warmup0_bs256-head_fixed'),
    ({'lr_scheduler': 'multistep', 'step_size': '30,60', 'gamma': 0.2, 'lr': 0.00012345},
     'TLD-Swin_tiny-KD-1.0/lr0.00012_AdamW-step30,60-gamma0.2_multistep_epoch200_warmup10_bs256-head_fixed'),
])
def test_run_directory_names(changes, expected):
    assert run_directory.RunName(**{**RECIPE, **changes}).directory('runs') == os.path.join('runs', expected)


def test_logger_appends_and_is_silent_off_rank_zero(tmp_path, capsys):
    run_dir = os.path.join(tmp_path, 'run')
    for line in ('first', 'second'):
        logger = run_directory.Logger(run_dir)
        logger.info(line)
        logger.scalar('test/coarse_tar', 0.5, 3)
        logger.close()
    with open(os.path.join(run_dir, 'record.txt'), encoding='utf-8') as record:
        assert record.read() == 'first\nsecond\n'
    assert capsys.readouterr().out == 'first\nsecond\n'
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(run_dir))

    silent_dir = os.path.join(tmp_path, 'silent')
    logger = run_directory.Logger(silent_dir, rank=1)
    logger.info('hidden')
    logger.scalar('x', 1.0, 0)
    logger.close()
    assert not os.path.exists(silent_dir)
    assert capsys.readouterr().out == ''


def test_save_atomically_replaces_whole_files_only(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, 'checkpoint.pth.tar')
    checkpoints.save_atomically({'epoch': 1}, path)
    checkpoints.save_atomically({'epoch': 2}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 2}

    def interrupted(obj, file, *arguments, **keywords):
        file.write(b'half')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomically({'epoch': 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 2}
    assert os.listdir(tmp_path) == ['checkpoint.pth.tar']


def test_format_tar_line_and_roc_plot(tmp_path):
    line = evaluation.format_tar_line('test acc', [0.917654, 0.5], [0.1, 0.0])
    assert line == 'test acc: coarsegrained:[0.91765, 0.5]--finegrained:[0.1, 0.0]'
    assert [evaluation.far_label(far) for far in (1e-1, 1e-2, 1e-8)] == ['TAR@1e-1', 'TAR@1e-2', 'TAR@1e-8']
    coarse, fine = [0.917654, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0, float('nan')], [0.1] * 8
    assert evaluation.format_labelled_tars('cross', {'coarse': coarse, 'fine': fine}) == (
        'cross TARs, coarse: TAR@1e-1=0.91765, TAR@1e-2=0.50000, TAR@1e-3=0.25000, TAR@1e-4=0.12500, '
        'TAR@1e-5=0.06250, TAR@1e-6=0.03125, TAR@1e-7=0.00000, TAR@1e-8=nan; fine: TAR@1e-1=0.10000, '
        'TAR@1e-2=0.10000, TAR@1e-3=0.10000, TAR@1e-4=0.10000, TAR@1e-5=0.10000, TAR@1e-6=0.10000, '
        'TAR@1e-7=0.10000, TAR@1e-8=0.10000')
    labels = np.repeat(np.arange(6), 5)
    curve = verification.far_tar_curve(sign_features(labels), labels=labels)
    path = os.path.join(tmp_path, 'roc.png')
    evaluation.plot_roc({'student coarse': curve, 'student fine': curve}, path)
    with open(path, 'rb') as image:
        assert image.read(8) == b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------------------------------------------------
# FARs below the test list's resolution (1 / impostor pairs)
# ----------------------------------------------------------------------------------------------------------------------

# 24 images: 4 landmarks x 6 views (60 positive of 276 pairs); fine splits them unevenly into 3 + 2 + 1 views.
RESOLUTION_COARSE = np.repeat(np.arange(4), 6)
RESOLUTION_FINE = np.array([3 * label + view for label in range(4) for view in (0, 0, 0, 1, 1, 2)])
BELOW_1_OVER_216 = ['TAR@1e-3', 'TAR@1e-4', 'TAR@1e-5', 'TAR@1e-6', 'TAR@1e-7', 'TAR@1e-8']


def brute_force_impostor_pairs(labels):
    return sum(first != second for first, second in itertools.combinations(list(labels), 2))


def test_impostor_pairs_and_fars_below_resolution_of_24_images():
    assert brute_force_impostor_pairs(RESOLUTION_COARSE) == 216
    fine_pairs = brute_force_impostor_pairs(RESOLUTION_FINE)
    assert fine_pairs == 276 - 4 * (3 + 1)
    features = sign_features(RESOLUTION_FINE, seed=24)
    result = evaluation.evaluate_features(features, RESOLUTION_COARSE, RESOLUTION_FINE)
    assert result['coarse_impostor_pairs'] == 216 and result['fine_impostor_pairs'] == fine_pairs
    assert isinstance(result['coarse_impostor_pairs'], int)
    labels = [evaluation.far_label(far) for far in evaluation.fars_below_resolution(216)]
    assert labels == BELOW_1_OVER_216
    # the printed TARs are still the published rule's, below the resolution as well
    assert result['coarse'] == verification.tar_at_far(features, labels=RESOLUTION_COARSE)
    assert result['fine'] == verification.tar_at_far(features, labels=RESOLUTION_FINE)


def test_report_names_fars_below_resolution_in_record_and_results(tmp_path):
    features = sign_features(RESOLUTION_COARSE, seed=24)
    teacher = sign_features(RESOLUTION_COARSE, flip=0.3, seed=24)
    report = evaluation.test_report(features, RESOLUTION_COARSE, RESOLUTION_FINE, teacher)
    run_dir = os.path.join(tmp_path, 'run')
    logger = run_directory.Logger(run_dir, tensorboard=False)
    logger.start()
    evaluation.log_report(logger, report, os.path.join(run_dir, 'roc.png'))
    with open(os.path.join(run_dir, 'record.txt'), encoding='utf-8') as record:
        lines = record.read().splitlines()
    student_coarse = ('note: student coarse: 216 impostor pairs resolve FARs down to 1/216 = 4.6e-03; for '
                      'TAR@1e-3..TAR@1e-8 the FAR is below that: values of the published rule, not measurements')
    # right after the student's TAR lines
    assert lines.index(student_coarse) == lines.index(evaluation.format_labelled_tars('student', report['student'])) + 1
    notes = [line for line in lines if line.startswith('note: ')]
    assert [line.split(':')[1] for line in notes] == [f' {name} {grain}' for name in ('student', 'teacher', 'cross')
                                                      for grain in ('coarse', 'fine')]
    assert notes[-1].startswith('note: cross fine: 260 impostor pairs resolve FARs down to 1/260 = 3.8e-03; '
                                'for TAR@1e-3..TAR@1e-8 the FAR is below that')
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as file:
        results = json.load(file)['test']
    for name in ('student', 'teacher', 'cross'):
        assert results[name]['impostor_pairs'] == {'coarse': 216, 'fine': 260}
        assert results[name]['below_resolution'] == {'coarse': BELOW_1_OVER_216, 'fine': BELOW_1_OVER_216}
        assert list(results[name]['tar_at_far']['coarse'].values()) == report[name]['coarse']


def test_ten_impostor_pairs_resolve_far_one_tenth_and_nine_do_not():
    ten, nine = [0] * 5 + [1] * 2, [0] * 3 + [1] * 3
    assert (brute_force_impostor_pairs(ten), brute_force_impostor_pairs(nine)) == (10, 9)
    assert evaluation.impostor_pair_count(len(ten), labels=ten) == 10
    assert evaluation.impostor_pair_count(len(nine), labels=np.array(['a', 'a', 'a', 'b', 'b', 'b'])) == 9
    assert 1e-1 not in evaluation.fars_below_resolution(10) and 1e-2 in evaluation.fars_below_resolution(10)
    assert evaluation.fars_below_resolution(9) == list(verification.DEFAULT_FARS)
    assert evaluation.fars_below_resolution(10 ** 8) == []
    assert 'for TAR@1e-1..TAR@1e-8 the FAR' in evaluation.resolution_note('student', 'fine', 9)
    assert 'for TAR@1e-8 the FAR' in evaluation.resolution_note('student', 'fine', 10 ** 7)
    assert evaluation.resolution_note('student', 'fine', 10 ** 8) is None


def test_no_resolution_line_for_undefined_tars(tmp_path):
    labels = np.arange(20)  # no positive pair: nan TARs, already explained by their own line
    report = evaluation.test_report(sign_features(labels), labels, None)
    assert report['student']['coarse_impostor_pairs'] == 190
    run_dir = os.path.join(tmp_path, 'run')
    logger = run_directory.Logger(run_dir, tensorboard=False)
    logger.start()
    evaluation.log_report(logger, report, os.path.join(run_dir, 'roc.png'))
    with open(os.path.join(run_dir, 'record.txt'), encoding='utf-8') as record:
        text = record.read()
    assert 'TARs are nan (undefined)' in text and 'impostor pairs' not in text


def test_mask_impostor_pairs_are_the_pairs_it_leaves_out(tmp_path):
    num_items = 23
    pairs = list(itertools.combinations(range(num_items), 2))  # numpy.triu_indices(N, 1) order
    positive = np.array([(first * second) % 7 == 1 for first, second in pairs])
    expected = sum(not (first * second) % 7 == 1 for first, second in pairs)
    path = os.path.join(tmp_path, 'mask.npy')
    np.save(path, positive.astype(np.uint8))
    # Tiny tiles: one or two rows a block, so that every block boundary counts.
    for mask in (positive, path):
        for tile_elements in (1, 40, 10 ** 6):
            assert evaluation.impostor_pair_count(num_items, mask=mask, tile_elements=tile_elements) == expected
    labels = np.arange(num_items)  # no label pair: the mask alone defines the positives
    features = sign_features(labels, seed=23)
    result = evaluation.evaluate_features(features, labels, None, coarse_mask=path, fine_mask=positive,
                                          tile_elements=50)
    assert result['coarse_impostor_pairs'] == result['fine_impostor_pairs'] == expected
