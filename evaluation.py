"""Everything that scores features: TAR at FAR (verification.py), nearest-neighbour accuracy and GAP, the ROC plot,
feature extraction, and the test report of a run (student, teacher, and student queries against teacher gallery)."""
import math
import os
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as functional
from tqdm import tqdm

import datasets
import precision
import utils
import verification


def nearest_neighbours(features, gallery_features=None, device=None,
                       tile_elements=verification.DEFAULT_TILE_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each item's leave-one-out best match, the j != i of highest features[i] . gallery[j] (ties
    to the smaller j), scored in row blocks; empty for fewer than two items. The gallery defaults to the features."""
    device = torch.device(device) if device is not None else utils.default_device()
    queries, gallery = verification.query_and_gallery(features, gallery_features, device)
    num_items = queries.shape[0]
    best_index = torch.zeros(num_items if num_items > 1 else 0, dtype=torch.int64, device=device)
    best_score = torch.zeros(len(best_index), dtype=torch.float32, device=device)
    rows_per_block = max(1, int(tile_elements) // max(num_items, 1))
    for first_row in range(0, len(best_index), rows_per_block):
        end_row = min(first_row + rows_per_block, num_items)
        scores = queries[first_row:end_row] @ gallery.T
        rows = torch.arange(end_row - first_row, device=device)
        scores[rows, rows + first_row] = -math.inf
        best_score[first_row:end_row], best_index[first_row:end_row] = scores.max(dim=1)
    return best_index.cpu().numpy(), best_score.cpu().numpy()


def _accuracy_of(best_index: np.ndarray, labels) -> float:
    if len(best_index) == 0:
        return math.nan
    class_ids = verification.label_tensor(labels, len(best_index), 'cpu').numpy()
    return float((class_ids[best_index] == class_ids).mean())


def evaluate_features(features, coarse_labels, fine_labels, gallery_features=None, coarse_mask=None,
                      fine_mask=None, fars=verification.DEFAULT_FARS, num_thresholds=2000, device=None,
                      tile_elements=verification.DEFAULT_TILE_ELEMENTS) -> dict:
    """Per level L of 'coarse' and 'fine': {L: [TARs], 'L_curve': (far, tar), 'L_undefined': why the TARs are NaN or
    None, 'L_impostor_pairs' (the FARs' denominator), 'L_nn_accuracy', 'L_gap' (None without labels)}, the curves from
    one pass over the pair scores. A level's mask replaces its labels as the positive pairs; no fine labels nor mask
    means fine is coarse."""
    if fine_labels is None and fine_mask is None:
        fine_labels, fine_mask = coarse_labels, coarse_mask
    label_pairs = [(None if coarse_mask is not None else coarse_labels, coarse_mask),
                   (None if fine_mask is not None else fine_labels, fine_mask)]
    curves = verification._evaluate_pairs(features, gallery_features, label_pairs, num_thresholds, device,
                                          tile_elements)
    best_index, best_score = nearest_neighbours(features, gallery_features, device, tile_elements)
    result = {}
    for level, (far, tar), labels, pairs in zip(('coarse', 'fine'), curves, (coarse_labels, fine_labels), label_pairs):
        result[level] = verification._tars_from_curve(far, tar, fars)
        result[f'{level}_curve'] = (far, tar)
        result[f'{level}_undefined'] = verification.undefined_reason((far, tar))
        result[f'{level}_impostor_pairs'] = impostor_pair_count(len(features), *pairs, tile_elements=tile_elements)
        result[f'{level}_nn_accuracy'] = None if labels is None else _accuracy_of(best_index, labels)
        result[f'{level}_gap'] = None if labels is None else nearest_neighbour_gap(best_index, best_score, labels)
    return result


def impostor_pair_count(num_items: int, labels=None, mask=None,
                        tile_elements=verification.DEFAULT_TILE_ELEMENTS) -> int:
    """Impostor (negative) pairs i < j of a list of `num_items` images, the denominator of its FARs: every pair less
    the positive ones, which come from `mask` (verification.PairMask's form, counted a block of rows at a time) or
    else from `labels` (by class sizes). Never a pair matrix; cross figures score the same pairs, so the same count."""
    all_pairs = num_items * (num_items - 1) // 2
    if mask is not None:
        pair_mask = verification.PairMask(mask, num_items)
        rows_per_block = max(1, int(tile_elements) // max(num_items, 1))
        positive_pairs = sum(int(np.count_nonzero(pair_mask.rows(first_row, min(first_row + rows_per_block,
                                                                                num_items))))
                             for first_row in range(0, num_items, rows_per_block))
    else:
        class_sizes = np.bincount(verification.label_tensor(labels, num_items, 'cpu').numpy())
        positive_pairs = int((class_sizes * (class_sizes - 1) // 2).sum())
    return all_pairs - positive_pairs


def fars_below_resolution(impostor_pairs: int, fars=verification.DEFAULT_FARS) -> list[float]:
    """The FARs below 1 / impostor_pairs, the smallest nonzero FAR the list can measure (every FAR without an
    impostor pair): their TARs come from the published rule, not from a measured threshold."""
    # Exact decimal arithmetic: FAR 1e-1 over 10 pairs is measurable, whatever 0.1's binary rounding.
    return [far for far in fars if Fraction(str(float(far))) * impostor_pairs < 1]


def resolution_note(name: str, grain: str, impostor_pairs: int) -> str | None:
    """The line naming the default FARs below the list's resolution (see fars_below_resolution), or None."""
    below = fars_below_resolution(impostor_pairs)
    if not below or not impostor_pairs:
        return None
    labels = far_label(below[0]) if len(below) == 1 else f'{far_label(below[0])}..{far_label(below[-1])}'
    return (f'note: {name} {grain}: {impostor_pairs} impostor pairs resolve FARs down to 1/{impostor_pairs} = '
            f'{1 / impostor_pairs:.1e}; for {labels} the FAR is below that: values of the published rule, not '
            f'measurements')


def nearest_neighbour_gap(best_index: np.ndarray, best_score: np.ndarray, labels) -> float:
    """GAP of leave-one-out recognition: image i predicts its nearest other image's label, scored by their cosine,
    and its solution is its own label. NaN for fewer than two images."""
    if len(best_index) == 0:
        return math.nan
    labels = np.asarray(labels).reshape(-1).tolist()
    predictions = {image: {'class': labels[neighbour], 'score': float(score)}
                   for image, (neighbour, score) in enumerate(zip(best_index.tolist(), best_score.tolist()))}
    return global_average_precision(predictions, {image: [label] for image, label in enumerate(labels)})


def plot_roc(curves: dict, path: str):
    """Save TAR against FAR (log axis) for each named (far, tar) curve as an image at `path`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, (far, tar) in curves.items():
        shown = np.asarray(far) > 0  # a log axis cannot show FAR = 0
        axes.plot(np.asarray(far)[shown], np.asarray(tar)[shown], label=name)
    axes.set(xscale='log', xlabel='FAR (false accept rate)', ylabel='TAR (verification rate)', ylim=(0, 1.01))
    axes.grid(True, which='both', alpha=0.3)
    if curves:
        axes.legend(loc='lower right')
    figure.tight_layout()
    utils.write_atomically(path, lambda file: figure.savefig(file, format='png', dpi=120))
    plt.close(figure)


def far_label(far: float) -> str:
    """'TAR@1e-2' for FAR 0.01: the name of a TAR in printed lines and in results.json."""
    mantissa, exponent = f'{far:.0e}'.split('e')
    return f'TAR@{mantissa}e{int(exponent)}'


def format_labelled_tars(name: str, result: dict) -> str:
    """'student TARs, coarse: TAR@1e-1=0.9, ...; fine: ...': each figure named by its FAR."""
    grains = [f'{grain}: ' + ', '.join(f'{far_label(far)}={float(tar):.5f}' for far, tar in
                                      zip(verification.DEFAULT_FARS, result[grain])) for grain in ('coarse', 'fine')]
    return f'{name} TARs, ' + '; '.join(grains)


def format_tar_line(prefix: str, coarse: list, fine: list) -> str:
    """'test acc: coarsegrained:[0.9, ...]--finegrained:[...]' (prefix 'test acc' or 'cross acc')."""
    coarse_text, fine_text = (str([round(float(value), 5) for value in values]) for values in (coarse, fine))
    return f'{prefix}: coarsegrained:{coarse_text}--finegrained:{fine_text}'


def global_average_precision(predictions, solution):
    """Google Landmarks v2 recognition GAP (micro AP), non-landmark queries kept: `predictions` maps a query id to
    {'class': landmark, 'score': confidence}, `solution` a query id to its landmarks ([] for a non-landmark query);
    other queries are ignored. Sorted by score descending, then query id, then class, GAP = sum_i precision(i) *
    rel(i) / M: rel(i) whether its class is in its query's solution, precision(i) counting every prediction so far
    (as ignore_non_gt_test_images=False), M the number of queries with a landmark (GAP 0 when M is 0)."""
    if not isinstance(predictions, Mapping) or not isinstance(solution, Mapping):
        raise utils.RunError("predictions and solution must be dicts keyed by query id")
    for query, prediction in predictions.items():
        if not isinstance(prediction, Mapping) or "class" not in prediction or "score" not in prediction:
            raise utils.RunError(f"predictions[{query!r}] must be a dict with keys "
                                 f"'class' and 'score', got {prediction!r}")
    num_expected = sum(1 for landmarks in solution.values() if len(landmarks))
    if num_expected == 0:
        return 0.0
    scored = [(-float(p["score"]), query, p["class"]) for query, p in predictions.items() if query in solution]
    gap, correct = 0.0, 0
    for i, (_, query, label) in enumerate(sorted(scored), start=1):
        if label in solution[query]:
            correct += 1
            gap += correct / i
    return gap / num_expected


# ------------------------------------------------------------------------------------------- the test of a run
@torch.no_grad()
def extract_features(backbone, loader, device: torch.device, amp: str, show_progress: bool = False
                     ) -> tuple[torch.Tensor, list[str]]:
    """(L2-normalised float32 features of `loader`'s images in list order, truncated files decoded), on every
    process; an unreadable image on any process stops every process (StopOnEveryRank)."""
    backbone.eval()
    batch_transform = datasets.BatchTransform(augment=False)
    features, indices, problems, truncated = [], [], [], []
    for batch in tqdm(loader, desc='features', disable=not show_progress, dynamic_ncols=True):
        problems.extend(datasets.batch_messages(batch, 'bad'))
        truncated.extend(datasets.batch_messages(batch, 'truncated'))
        if problems:
            break
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=False)
        with precision.autocast_context(device, amp):
            output = backbone(images)
        features.append(functional.normalize(output.float(), dim=1))
        indices.append(batch['index'].to(device))
    utils.stop_if_any_process_failed(problems)
    local_features = torch.cat(features) if features else torch.zeros(0, backbone.feature_dim, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    total = len(loader.dataset)
    return utils.gather_in_order(local_features, local_indices, total).cpu(), utils.gather_messages(truncated)


def features_of(backbone, loader, device: torch.device, amp: str, rank: int, logger) -> torch.Tensor:
    """extract_features's features, the truncated files it decoded said once a run."""
    features, truncated = extract_features(backbone, loader, device, amp, show_progress=rank == 0)
    datasets.report_truncated(truncated, logger)
    return features


def test_report(student_features, coarse_labels, fine_labels, teacher_features=None, coarse_mask=None,
                fine_mask=None) -> dict:
    """{'student': evaluate_features(...)}, with teacher features 'teacher' and 'cross' (student against teacher)."""
    pairs = {'student': (student_features, None)}
    if teacher_features is not None:
        pairs.update(teacher=(teacher_features, None), cross=(student_features, teacher_features))
    return {name: evaluate_features(features, coarse_labels, fine_labels, gallery_features=gallery,
                                    coarse_mask=coarse_mask, fine_mask=fine_mask)
            for name, (features, gallery) in pairs.items()}


def check_test_list(samples, coarse_mask: str | None, fine_mask: str | None, logger):
    """Before any work: stop on a pair mask that does not fit the test list; say which TARs it cannot give (nan)."""
    for mask in filter(None, (coarse_mask, fine_mask)):
        verification.PairMask(mask, len(samples))
    for grain, labels, mask in (('coarse', [sample.label for sample in samples], coarse_mask),
                                ('fine', [sample.fine_label for sample in samples], fine_mask)):
        problem = verification.labels_problem(labels) if samples and not mask else None
        if problem:
            logger.info(f'note: the test list gives no {grain} TARs: {problem}; they will be reported as nan')


def run_test(loader, student_backbone, teacher_backbone=None, *, device: torch.device, amp: str, rank: int, logger,
             output_dir: str, coarse_mask=None, fine_mask=None):
    """The final test: open-set features of every process, then on rank 0 the report (see log_report) and
    opensetFeat.npy in `output_dir`; a figure that cannot exist is written as nan with a line saying why."""
    student_features = features_of(student_backbone, loader, device, amp, rank, logger)
    teacher_features = (features_of(teacher_backbone, loader, device, amp, rank, logger)
                        if teacher_backbone is not None else None)
    if rank != 0:
        return
    utils.write_atomically(os.path.join(output_dir, 'opensetFeat.npy'),
                           lambda file: np.save(file, student_features.numpy().astype(np.float32)))
    report = test_report(student_features, loader.dataset.labels, loader.dataset.fine_labels, teacher_features,
                         coarse_mask=coarse_mask, fine_mask=fine_mask)
    log_report(logger, report, os.path.join(output_dir, 'roc.png'))


def resolution_figures(result: dict) -> dict:
    """results.json's {'impostor_pairs': {grain: count}, 'below_resolution': {grain: ['TAR@1e-3', ...]}} of a figure
    set: the tar_at_far names whose FAR is below 1 / impostor pairs."""
    pairs = {grain: result[f'{grain}_impostor_pairs'] for grain in ('coarse', 'fine')}
    return {'impostor_pairs': pairs,
            'below_resolution': {grain: [far_label(far) for far in fars_below_resolution(count)]
                                 for grain, count in pairs.items()}}


def log_report(logger, report: dict, roc_path: str):
    """The TAR lines and nearest-neighbour lines of record.txt, tensorboard scalars, results.json and roc.png."""
    names = {'student': 'test acc', 'teacher': 'teacher acc', 'cross': 'cross acc'}
    curves = {}
    for name, result in report.items():
        logger.info(format_tar_line(names[name], result['coarse'], result['fine']))  # the original's line
        logger.info(format_labelled_tars(name, result))
        for grain in ('coarse', 'fine'):
            note = resolution_note(name, grain, result[f'{grain}_impostor_pairs'])
            # Undefined TARs are nan, not values of the rule: their own line below says why.
            if note and not result[f'{grain}_undefined']:
                logger.info(note)
        logger.info(f'{name} nearest-neighbour top-1: coarse={result["coarse_nn_accuracy"]:.5f}, '
                    f'fine={result["fine_nn_accuracy"]:.5f}; GAP: coarse={result["coarse_gap"]:.5f}, '
                    f'fine={result["fine_gap"]:.5f}')
        for grain in ('coarse', 'fine'):
            for far, tar in zip(verification.DEFAULT_FARS, result[grain]):
                if not math.isnan(tar):
                    logger.scalar(f'test/{name}_{grain}_tar@far{far:.0e}', tar, 0)
            if result[f'{grain}_undefined']:
                logger.info(f'{name} {grain} TARs are nan (undefined): {result[f"{grain}_undefined"]}')
            else:
                curves[f'{name} {grain}'] = result[f'{grain}_curve']
    logger.result('test', {name: dict(result, **{f'{grain}_curve': dict(zip(('far', 'tar'), result[f'{grain}_curve']))
                                                 for grain in ('coarse', 'fine')},
                                      tar_at_far={grain: dict(zip(map(far_label, verification.DEFAULT_FARS),
                                                                  result[grain])) for grain in ('coarse', 'fine')},
                                      **resolution_figures(result))
                           for name, result in report.items()})
    plot_roc(curves, roc_path)
