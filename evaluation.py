"""Everything that scores features: the original's TAR at FAR over all pairs of a test list, nearest-neighbour
accuracy, the ROC plot, feature extraction, and the test report of a run (student, teacher, and the student's
queries against the teacher's gallery)."""
import functools
import hashlib
import math
import os
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as functional
from tqdm import tqdm

import helpers
import utils

DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)

# Scores per tile of the pair matrix: bounds working memory independently of N.
DEFAULT_TILE_ELEMENTS = 1 << 23
# The FAR at the lower bracketing threshold must be below this multiple of the target (the original's 8x rule).
FAR_BRACKET_FACTOR = 8.0
# Offset of the original's histogram edges above t - unit/2.
EDGE_OFFSET = 2e-6
# Positive pairs listed explicitly up to this many (two int64 arrays); beyond, tiles compare labels.
SPARSE_POSITIVE_LIMIT = 1 << 23
# Scores binned together in one cache-sized chunk of a tile.
CHUNK_ELEMENTS = 1 << 18
# Below this threshold spacing the arithmetic bin guess may be far off, so bins come from a binary search.
MIN_ARITHMETIC_STEP = 1e-5


def default_device():
    """The GPU when there is one, else the CPU: where the pair scores are computed."""
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def _normalized_features(features, device, name):
    """(N, d) array or tensor -> float32 L2-normalised tensor on `device`."""
    # a read-only array (a memory-mapped .npy) is copied: torch does not take non-writable memory
    tensor = features if torch.is_tensor(features) else torch.from_numpy(np.require(features, requirements='W'))
    if tensor.ndim != 2:
        raise utils.RunError(f'{name} must be a 2-d (N, d) array, got shape {tuple(tensor.shape)}')
    tensor = tensor.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise utils.RunError(f'{name} contain NaN or infinite values; check the model outputs')
    return functional.normalize(tensor, dim=1)


def _query_and_gallery(features, gallery_features, device):
    queries = _normalized_features(features, device, 'features')
    if gallery_features is None:
        return queries, queries
    gallery = _normalized_features(gallery_features, device, 'gallery_features')
    if gallery.shape != queries.shape:
        raise utils.RunError(f'gallery_features shape {tuple(gallery.shape)} differs from features shape '
                             f'{tuple(queries.shape)}; cross scoring pairs image i with image j of the same list')
    return queries, gallery


def _label_tensor(labels, num_items, device):
    """Any labels (ints, strings, tensor) -> int64 tensor of class ids."""
    array = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    array = array.reshape(-1)
    if array.shape[0] != num_items:
        raise utils.RunError(f'labels has {array.shape[0]} entries but there are {num_items} features')
    class_ids = np.unique(array, return_inverse=True)[1].reshape(-1)
    return torch.as_tensor(class_ids, dtype=torch.int64, device=device)


def _triangle_offset(row, num_items):
    """Position of pair (row, row + 1) in numpy.triu_indices(num_items, 1) order."""
    return row * (2 * num_items - row - 1) // 2


class _PairMask:
    """Upper-triangle boolean pair mask held in memory or read block by block from a memory-mapped .npy."""

    def __init__(self, mask, num_items):
        self.num_items = num_items
        self.expected = num_items * (num_items - 1) // 2
        self.path = None
        if isinstance(mask, (str, os.PathLike)):
            self.path = os.fspath(mask)
            if not os.path.isfile(self.path):
                raise utils.RunError(f'mask file {self.path} does not exist')
            mapped = np.load(self.path, mmap_mode='r')
            self._check(mapped, self.path)
            del mapped
            self.array = None
        else:
            self.array = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
            self._check(self.array, 'mask')
            self.array = self.array.reshape(-1)

    def _check(self, array, source):
        if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
            raise utils.RunError(f'{source}: mask dtype {array.dtype} is not boolean')
        if array.size != self.expected:
            raise utils.RunError(f'{source}: mask has {array.size} entries but {self.num_items} features have '
                                 f'{self.expected} pairs (numpy.triu_indices(N, 1) order); was it built for another '
                                 f'test list?')

    def rows(self, first_row, end_row):
        """Mask entries of pairs (i, j > i) for first_row <= i < end_row, in triangle order, as a bool array."""
        start = _triangle_offset(first_row, self.num_items)
        stop = _triangle_offset(end_row, self.num_items)
        if self.array is not None:
            return np.asarray(self.array[start:stop] != 0)
        # A fresh map per block drops the pages read before, so resident memory stays at one block.
        mapped = np.load(self.path, mmap_mode='r').reshape(-1)
        block = np.asarray(mapped[start:stop] != 0)
        del mapped
        return block


class _PairLabelSet:
    """Which pairs are positive, given per tile as flat indices into the (rows, N - first_row) score tile.

    From labels, the positive pairs (i < j, same class) are listed once, sorted by i, when there are at most
    SPARSE_POSITIVE_LIMIT of them; otherwise each tile compares labels. From a mask, each block of the mask
    is read and its True entries located."""

    def __init__(self, class_ids=None, mask=None):
        self.class_ids = class_ids
        self.mask = mask
        self.first = self.second = None
        if class_ids is not None:
            classes = class_ids.cpu().numpy()
            sizes = np.bincount(classes)
            if int((sizes * (sizes - 1) // 2).sum()) <= SPARSE_POSITIVE_LIMIT:
                self.first, self.second = _same_class_pairs(classes)

    def positive_index(self, first_row, end_row, valid_square):
        rows = end_row - first_row
        device = valid_square.device
        if self.mask is not None:
            num_columns = self.mask.num_items - first_row
            offsets = np.flatnonzero(self.mask.rows(first_row, end_row))
            # Row a of the block starts at row_starts[a] in the block's stretch of the triangle.
            row_lengths = self.mask.num_items - 1 - np.arange(first_row, end_row)
            row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
            local_rows = np.searchsorted(row_starts, offsets, side='right') - 1
            local_columns = local_rows + 1 + (offsets - row_starts[local_rows])
            return torch.from_numpy(local_rows * num_columns + local_columns).to(device)
        num_columns = len(self.class_ids) - first_row
        if self.first is not None:
            start, stop = np.searchsorted(self.first, [first_row, end_row])
            local_rows = self.first[start:stop] - first_row
            local_columns = self.second[start:stop] - first_row
            return torch.from_numpy(local_rows * num_columns + local_columns).to(device)
        tile = self.class_ids[first_row:end_row, None] == self.class_ids[None, first_row:]
        tile[:, :rows] &= valid_square
        return torch.nonzero(tile.view(-1)).squeeze(1)


def _same_class_pairs(classes):
    """All pairs (i < j) with classes[i] == classes[j], as two int64 arrays sorted by i then j."""
    order = np.argsort(classes, kind='stable')
    boundaries = np.flatnonzero(np.diff(classes[order])) + 1
    firsts, seconds = [], []
    for members in np.split(order, boundaries):
        if len(members) > 1:
            upper_rows, upper_columns = np.triu_indices(len(members), 1)
            firsts.append(members[upper_rows])
            seconds.append(members[upper_columns])
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first, second = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    order = np.lexsort((second, first))
    return first[order], second[order]


def _pair_label_set(labels, mask, num_items, device):
    if labels is not None and mask is not None:
        raise utils.RunError('give either labels or mask, not both: they define the positive pairs twice')
    if labels is None and mask is None:
        raise utils.RunError('give labels (one per feature) or mask (upper-triangle pair mask) to define positive '
                             'pairs')
    if mask is not None:
        return _PairLabelSet(mask=_PairMask(mask, num_items))
    return _PairLabelSet(class_ids=_label_tensor(labels, num_items, device))


def _row_blocks(num_items, tile_elements):
    """Row ranges whose tiles (rows x columns from the first row on) hold at most about tile_elements scores."""
    # Per-tile float32 histogram counts stay exact below 2**24.
    rows_per_block = max(1, min(int(tile_elements), 1 << 24) // num_items)
    return [(first, min(first + rows_per_block, num_items)) for first in range(0, num_items - 1, rows_per_block)]


def _score_tiles(queries, gallery, tile_elements):
    """Yield (first_row, end_row, scores, valid_square): scores[a, b] = queries[first_row + a] .
    gallery[first_row + b] for b from 0 to N - first_row; the pairs i < j are b > a. Only the leading
    (rows x rows) square holds pairs i >= j; valid_square marks its entries with b > a. The same block always
    gives bit-identical scores (same shapes, same kernel)."""
    num_items = queries.shape[0]
    for first_row, end_row in _row_blocks(num_items, tile_elements):
        scores = queries[first_row:end_row] @ gallery[first_row:].T
        index = torch.arange(end_row - first_row, device=queries.device)
        yield first_row, end_row, scores, index[None, :] > index[:, None]


def _tile_range(scores, valid_square):
    """(min, max) over the pairs of a tile; its entries i >= j are overwritten by a valid score."""
    rows = valid_square.shape[0]
    scores[:, :rows].masked_fill_(~valid_square, scores[0, -1])
    low, high = torch.aminmax(scores)
    return float(low), float(high)


def _score_range(queries, gallery, tile_elements):
    """Exact smallest and largest float32 score over pairs i < j."""
    ranges = [_tile_range(scores, valid_square) for _, _, scores, valid_square in
              _score_tiles(queries, gallery, tile_elements)]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _threshold_edges(smallest, largest, num_thresholds):
    """The original's histogram edges, in float64 and as float32 rounded up.

    Thresholds t_k = smallest + (largest - smallest) * k / T for k = 1..T (the lowest is one unit above the
    smallest score), unit = (largest - smallest) / T, edges e_k = t_k - unit/2 + 2e-6. A pair is accepted at
    t_k when its score >= e_k; a score below e_1 is never accepted. The float32 edges are rounded up, so that
    for a float32 score s, s >= edges32[k] exactly when s >= e_k in real arithmetic.
    """
    steps = np.arange(1, num_thresholds + 1, dtype=np.float64)
    thresholds = smallest + (largest - smallest) * steps / num_thresholds
    unit = (largest - smallest) / num_thresholds
    edges = thresholds - unit / 2 + EDGE_OFFSET
    edges32 = edges.astype(np.float32)
    below = edges32.astype(np.float64) < edges
    edges32[below] = np.nextafter(edges32[below], np.float32(np.inf))
    return edges, edges32


@contextmanager
def _one_thread_on_cpu(device: torch.device):
    """Many small cache-resident operations: on the CPU one thread avoids a thread-pool handshake per operation,
    which costs milliseconds each on a busy machine."""
    if device.type != 'cpu':
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _TileHistogram:
    """Per tile, how many scores have exactly b edges at or below them (b = 1..T; b = 0, below the lowest edge,
    is counted for the positive pairs only), for all pairs and for the positive pairs.

    Scores become positions g = (s - edge_0) / step, so edge k sits at g = k. Where g is farther than
    `margin` from an integer (a bound on the float32 rounding of g and of the edges, doubled), floor(g)
    decides every comparison, and torch.histc counts it; the few scores near an edge, and the sparse
    positive pairs, are placed by an exact binary search on the float32 edges. The tile is processed in
    chunks that stay in cache."""

    def __init__(self, edges, edges32, device):
        self.count = len(edges32)
        self.edges32 = torch.from_numpy(edges32).to(device)
        self.step = (edges[-1] - edges[0]) / (self.count - 1)
        self.arithmetic = self.count >= 3 and self.step >= MIN_ARITHMETIC_STEP
        if self.arithmetic:
            self.inverse_step = 1.0 / self.step
            self.margin = 1e-3 + 8.4e-7 * self.inverse_step
            self.shift = torch.tensor(-float(edges[0]) * self.inverse_step, dtype=torch.float32, device=device)
            self.one = torch.ones((), dtype=torch.float32, device=device)

    def exact_counts(self, scores):
        """Histogram (length T + 1, int64) of any float32 scores by the number of edges at or below each, by
        binary search."""
        edges_below = torch.searchsorted(self.edges32, scores.contiguous(), right=True)
        return torch.bincount(edges_below.view(-1), minlength=self.count + 1)

    def __call__(self, scores, valid_square, positive_index):
        """scores: (rows, columns) float32 tile; its leading (rows x rows) square holds pairs only where
        valid_square. Returns (all-pair counts of length T: bins 1..T, positive counts of length T + 1: bins
        0..T), int64 tensors."""
        with _one_thread_on_cpu(scores.device):
            return self._tile_counts(scores, valid_square, positive_index)

    def _tile_counts(self, scores, valid_square, positive_index):
        rows = valid_square.shape[0]
        positive_counts = self.exact_counts(scores.view(-1).index_select(0, positive_index))
        if not self.arithmetic:
            all_counts = self.exact_counts(scores[:, rows:]) + self.exact_counts(scores[:, :rows][valid_square])
            return all_counts[1:], positive_counts
        histogram = torch.zeros(self.count, dtype=torch.float32, device=scores.device)
        near_edge_scores = []
        chunk_rows = max(1, CHUNK_ELEMENTS // scores.shape[1])
        for first in range(0, rows, chunk_rows):
            chunk = scores[first:first + chunk_rows]
            positions = torch.addcmul(self.shift, chunk, self.one, value=self.inverse_step)
            distance = torch.round(positions).sub_(positions).abs_()
            near_edge = distance < self.margin
            chunk_valid = valid_square[first:first + chunk_rows]
            near_edge[:, :rows] &= chunk_valid
            positions[:, :rows].masked_fill_(~chunk_valid, -1.0)
            near_edge_scores.append(chunk[near_edge])
            # Outside [0, T] histc ignores a value: scores below the lowest edge are never accepted, and scores
            # near an edge are counted by the exact search. histc's bin j holds the scores with j + 1 edges below.
            positions.masked_fill_(near_edge, -1.0)
            # float32 counts stay exact below 2**24 per bin, which the tile size guarantees.
            histogram += torch.histc(positions, bins=self.count, min=0, max=self.count)
        all_counts = histogram.round_().to(torch.int64) + self.exact_counts(torch.cat(near_edge_scores))[1:]
        return all_counts, positive_counts


def _pair_histograms(queries, gallery, label_sets, edges, edges32, tile_elements):
    """Counts of pairs accepted at each threshold: ([(positive counts, number of positive pairs)] per label set,
    all-pair counts), counts as int64 numpy arrays of length T."""
    device = queries.device
    tile_histogram = _TileHistogram(edges, edges32, device)
    all_histogram = torch.zeros(len(edges32), dtype=torch.int64, device=device)
    positive_histograms = [torch.zeros(len(edges32) + 1, dtype=torch.int64, device=device) for _ in label_sets]
    for first_row, end_row, scores, valid_square in _score_tiles(queries, gallery, tile_elements):
        for index, label_set in enumerate(label_sets):
            positive_index = label_set.positive_index(first_row, end_row, valid_square)
            if index == 0:
                all_counts, positive_counts = tile_histogram(scores, valid_square, positive_index)
                all_histogram += all_counts
            else:
                positive_counts = tile_histogram.exact_counts(scores.view(-1).index_select(0, positive_index))
            positive_histograms[index] += positive_counts

    # Bin k - 1 of the all-pair histogram holds scores with exactly k edges at or below them: the pairs accepted
    # at threshold k are those of bins k - 1 and above.
    def at_or_above(histogram):
        return np.cumsum(histogram.cpu().numpy()[::-1])[::-1].copy()
    positives = [(at_or_above(histogram[1:]), int(histogram.sum())) for histogram in positive_histograms]
    return positives, at_or_above(all_histogram)


def _curves(positive_counts, total_positive, all_counts, total_pairs):
    """FAR and TAR per threshold from the pairs accepted there; NaN throughout where there is no positive
    (TAR) or no negative (FAR) pair, as the original's 0 / 0."""
    negative_counts = all_counts - positive_counts
    with np.errstate(invalid='ignore', divide='ignore'):
        far = negative_counts / np.float64(total_pairs - total_positive)
        tar = positive_counts / np.float64(total_positive)
    return far, tar


# Why TARs cannot exist: said before the work (labels_problem) and after it (undefined_reason).
FEWER_THAN_TWO_IMAGES = 'fewer than two test images: there is no pair to score'
NO_POSITIVE_PAIR = 'no positive pair (no two test images share a label)'
NO_NEGATIVE_PAIR = 'no negative pair (every test image has the same label)'


def labels_problem(labels) -> str | None:
    """Why TARs over these labels cannot exist, or None."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < 2:
        return FEWER_THAN_TWO_IMAGES
    counts = np.unique(labels, return_counts=True)[1]
    if counts.max() < 2:
        return NO_POSITIVE_PAIR
    if len(counts) == 1:
        return NO_NEGATIVE_PAIR
    return None


def undefined_reason(curve) -> str | None:
    """Why the TARs of a (far, tar) curve are undefined (NaN), or None when they are defined."""
    far, tar = curve
    if len(far) == 0:
        return FEWER_THAN_TWO_IMAGES
    if np.isnan(tar).all():
        return NO_POSITIVE_PAIR
    if np.isnan(far).all():
        return NO_NEGATIVE_PAIR
    return None


def _tars_from_curve(far, tar, fars):
    """TAR at each target FAR by the original's binary search over the thresholds (see tar_at_far)."""
    if not len(fars) or any(not target > 0 for target in fars):
        raise utils.RunError(f'target FARs must be a non-empty list of positive rates, got {list(fars)}')
    # without a negative pair FAR is 0 / 0 everywhere and no threshold can be chosen (the original's NaN
    # comparisons would return an arbitrary TAR there)
    if len(far) < 2 or np.isnan(far).all():
        return [math.nan] * len(fars)
    return [round(_tar_at(far, tar, target), 5) for target in fars]


def _tar_at(far, tar, target):
    lower, upper = 0, len(far) - 1
    while upper - lower > 1:
        middle = (lower + upper) // 2
        if far[middle] == target:
            return float(tar[middle])
        if far[middle] < target:
            upper = middle
        else:
            lower = middle
    if far[lower] / target >= FAR_BRACKET_FACTOR:
        return 0.0
    return float((tar[lower] + tar[upper]) / 2)


def _evaluate_pairs(features, gallery_features, label_pairs, num_thresholds, device, tile_elements):
    """Shared machinery: returns a (far, tar) curve per label set given as (labels, mask). Fewer than two features
    give empty curves (no pair to score)."""
    device = torch.device(device) if device is not None else default_device()
    if int(num_thresholds) < 2:
        raise utils.RunError(f'num_thresholds must be at least 2, got {num_thresholds}')
    queries, gallery = _query_and_gallery(features, gallery_features, device)
    num_items = queries.shape[0]
    label_sets = [_pair_label_set(labels, mask, num_items, device) for labels, mask in label_pairs]
    if num_items < 2:
        return [(np.zeros(0), np.zeros(0)) for _ in label_pairs]
    smallest, largest = _score_range(queries, gallery, tile_elements)
    edges, edges32 = _threshold_edges(smallest, largest, int(num_thresholds))
    positive_counts, all_counts = _pair_histograms(queries, gallery, label_sets, edges, edges32,
                                                   tile_elements=tile_elements)
    total_pairs = num_items * (num_items - 1) // 2
    return [_curves(counts, total_positive, all_counts, total_pairs) for counts, total_positive in positive_counts]


def tar_at_far(features, labels=None, mask=None, fars=DEFAULT_FARS, num_thresholds=2000,
               gallery_features=None, device=None, tile_elements=DEFAULT_TILE_ELEMENTS) -> list[float]:
    """TAR at each target FAR over all unordered pairs i < j of `features`, one float per FAR.

    Positive pairs come from `labels` (one per feature: same label = positive) or from `mask` (boolean array
    over numpy.triu_indices(N, 1) order, or the path of such a .npy, read memory-mapped block by block);
    exactly one must be given. With `gallery_features` the pair (i, j), i < j, is scored
    features[i] . gallery_features[j] (student query against teacher gallery).

    The original's algorithm, step by step (T = num_thresholds):
    - features are L2-normalised; scores are float32 dot products, computed in row tiles (never N x N);
    - lo, hi = the smallest and largest score, unit = (hi - lo) / T; thresholds t_k = lo + (hi - lo) * k / T for
      k = 1..T (the lowest is one unit above lo, the highest is hi); a pair is accepted at t_k when
      score >= t_k - unit/2 + 2e-6 (exact comparison). A score below the lowest of these edges is never
      accepted, yet counts in the denominators;
    - FAR_k = accepted negatives / all negatives, TAR_k = accepted positives / all positives;
    - for target f, a binary search over 0-based indices l = 0, u = T - 1: while u - l > 1, middle m: FAR_m == f
      answers TAR_m; FAR_m < f moves u to m, otherwise l to m. Then 0 when FAR_l / f >= 8 (the grid has no
      threshold near f), else (TAR_l + TAR_u) / 2. Rounded to 5 decimals.
    Undefined figures are NaN, as the original's 0 / 0: where there is no positive pair (e.g. a fine label
    no two images share) every TAR that the 8x rule does not make 0; every TAR where there is no negative pair
    (all images share one label) or fewer than two features.
    Errors: labels and mask both or neither, a mask of the wrong length, non-finite features.
    Cost: two passes over the row tiles (min/max, then the histogram), each N^2 d / 2 multiply-adds, on the GPU
    when there is one; memory O(N d + tile_elements). The histogram pass re-scores the same tiles, so the
    extremes it bins against are bit-identical to the first pass.
    """
    far, tar = far_tar_curve(features, labels, mask, num_thresholds, gallery_features, device, tile_elements)
    return _tars_from_curve(far, tar, fars)


def far_tar_curve(features, labels=None, mask=None, num_thresholds=2000, gallery_features=None, device=None,
                  tile_elements=DEFAULT_TILE_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(far, tar) float64 arrays of length num_thresholds, one point per threshold, as in tar_at_far (empty for
    fewer than two features)."""
    return _evaluate_pairs(features, gallery_features, [(labels, mask)], num_thresholds=num_thresholds,
                           device=device, tile_elements=tile_elements)[0]


def nearest_neighbours(features, gallery_features=None, device=None,
                       tile_elements=DEFAULT_TILE_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each item's leave-one-out best match: the j != i of highest score, features[i] .
    gallery_features[j] when a gallery is given, else features[i] . features[j]; ties go to the smaller j. Empty
    arrays for fewer than two items. Scores are computed in row blocks (never the whole matrix)."""
    device = torch.device(device) if device is not None else default_device()
    queries, gallery = _query_and_gallery(features, gallery_features, device)
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


def nearest_neighbor_accuracy(features, labels, gallery_features=None, device=None,
                              tile_elements=DEFAULT_TILE_ELEMENTS) -> float:
    """Leave-one-out top-1 accuracy: item i counts as correct when its nearest neighbour (see nearest_neighbours)
    has its label; NaN for fewer than two items."""
    best_index, _ = nearest_neighbours(features, gallery_features, device, tile_elements)
    return _accuracy_of(best_index, labels)


def _accuracy_of(best_index: np.ndarray, labels) -> float:
    if len(best_index) == 0:
        return math.nan
    class_ids = _label_tensor(labels, len(best_index), 'cpu').numpy()
    return float((class_ids[best_index] == class_ids).mean())


def evaluate_features(features, coarse_labels, fine_labels, gallery_features=None, coarse_mask=None,
                      fine_mask=None, fars=DEFAULT_FARS, num_thresholds=2000, device=None,
                      tile_elements=DEFAULT_TILE_ELEMENTS) -> dict:
    """Coarse and fine TAR@FAR and curves from one pass over the pair scores, and nearest-neighbour accuracy.

    A mask, when given, defines that level's positive pairs instead of its labels (labels are still used for
    the nearest-neighbour accuracy; None there gives None). fine_labels None (and no fine_mask) means the fine
    level equals the coarse one. Returns {'coarse': [TARs], 'fine': [TARs], 'coarse_curve': (far, tar),
    'fine_curve': (far, tar), 'coarse_nn_accuracy': float | None, 'fine_nn_accuracy': float | None,
    'coarse_gap': float | None, 'fine_gap': float | None, 'coarse_undefined': reason | None, 'fine_undefined':
    reason | None}; undefined TARs are NaN (see tar_at_far) and the reason says why. The GAP is that of the
    leave-one-out nearest-neighbour predictions (see nearest_neighbour_gap).
    """
    if fine_labels is None and fine_mask is None:
        fine_labels, fine_mask = coarse_labels, coarse_mask
    label_pairs = [(None if coarse_mask is not None else coarse_labels, coarse_mask),
                   (None if fine_mask is not None else fine_labels, fine_mask)]
    curves = _evaluate_pairs(features, gallery_features, label_pairs, num_thresholds=num_thresholds, device=device,
                             tile_elements=tile_elements)
    best_index, best_score = nearest_neighbours(features, gallery_features, device, tile_elements)
    result = {}
    for level, (far, tar), labels in zip(('coarse', 'fine'), curves, (coarse_labels, fine_labels)):
        result[level] = _tars_from_curve(far, tar, fars)
        result[f'{level}_curve'] = (far, tar)
        result[f'{level}_undefined'] = undefined_reason((far, tar))
        result[f'{level}_nn_accuracy'] = None if labels is None else _accuracy_of(best_index, labels)
        result[f'{level}_gap'] = None if labels is None else nearest_neighbour_gap(best_index, best_score, labels)
    return result


def nearest_neighbour_gap(best_index: np.ndarray, best_score: np.ndarray, labels) -> float:
    """Global Average Precision (see global_average_precision) of leave-one-out recognition: image i predicts the
    label of its nearest other image with that cosine as the score; every image is a landmark query whose
    solution is its own label. NaN for fewer than two images."""
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
        far, tar = np.asarray(far), np.asarray(tar)
        shown = far > 0  # a log axis cannot show FAR = 0
        axes.plot(far[shown], tar[shown], label=name)
    axes.set_xscale('log')
    axes.set_xlabel('FAR (false accept rate)')
    axes.set_ylabel('TAR (verification rate)')
    axes.set_ylim(0, 1.01)
    axes.grid(True, which='both', alpha=0.3)
    if curves:
        axes.legend(loc='lower right')
    figure.tight_layout()
    utils.write_atomically(path, lambda file: figure.savefig(file, format='png', dpi=120))
    plt.close(figure)


def format_tar_line(prefix: str, coarse: list, fine: list) -> str:
    """'test acc: coarsegrained:[0.9, ...]--finegrained:[...]' (prefix 'test acc' or 'cross acc')."""
    def listed(values):
        return '[' + ', '.join(repr(round(float(value), 5)) for value in values) + ']'
    return f'{prefix}: coarsegrained:{listed(coarse)}--finegrained:{listed(fine)}'


# ------------------------------------------------------------------------------- the field's retrieval metrics
# protocol -> (gnd keys whose images are positives, gnd keys whose images are junk)
_PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
_GND_KEYS = ("easy", "hard", "junk")


def _gather(entry, keys):
    """Concatenate the index lists of ``entry`` under ``keys`` (duplicates kept)."""
    parts = [np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in keys]
    return np.concatenate(parts)


def _query_scores(column, ok, junk, kappas):
    """AP and precision at each kappa of one ranked column (see revisitop_map)."""
    positions = np.flatnonzero(np.isin(column, ok))
    junk_positions = np.flatnonzero(np.isin(column, junk))
    # Remove junk from the ranking: each positive moves up by the junk ranked before it.
    positions = positions - np.searchsorted(junk_positions, positions, side="left")
    k = np.arange(positions.size, dtype=np.float64)
    r = positions.astype(np.float64)
    precision_0 = np.where(r > 0, k / np.maximum(r, 1.0), 1.0)
    precision_1 = (k + 1.0) / (r + 1.0)
    ap = float(np.sum((precision_0 + precision_1) / 2.0)) / ok.size
    if positions.size == 0:  # no positive in the ranking at all
        return ap, np.zeros(len(kappas))
    one_based = positions + 1
    cut = np.minimum(one_based.max(), np.asarray(kappas))
    p_at = np.array([np.count_nonzero(one_based <= c) / c for c in cut], dtype=np.float64)
    return ap, p_at


def revisitop_map(ranks, gnd, kappas=(1, 5, 10)):
    """Revisited Oxford/Paris mAP and mean precision@kappa for the three protocols.

    ``ranks`` is (database x queries): column q lists database indices, best first.
    ``gnd[q]`` is a dict with ``easy``, ``hard`` and ``junk`` database indices. Per
    protocol the positive ('ok') and junk images are: easy: ok = easy, junk = junk +
    hard; medium: ok = easy + hard, junk = junk; hard: ok = hard, junk = junk + easy.
    Junk images are removed from the ranking, so each positive's 0-based position r
    drops by the number of junk images ranked before it. AP is the trapezoidal rule:
    the k-th positive (0-based) adds (k / r (1 if r = 0) + (k + 1) / (r + 1)) / 2
    divided by the number of ok entries. Precision at kappa, with p the 1-based
    junk-free positions and kq = min(max(p), kappa), is #(p <= kq) / kq (0 where no
    positive appears in the ranking). Queries without an ok image get NaN AP and NaN
    precisions and are left out of ``map`` and ``mp_at`` (NaN if every query lacks
    one). Returns {protocol: {'map', 'aps', 'mp_at', 'p_at'}}.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise utils.RunError(f"ranks must be a 2-D integer array (database x queries), "
                             f"got dtype {ranks.dtype} and shape {ranks.shape}")
    if len(gnd) != ranks.shape[1]:
        raise utils.RunError(f"gnd has {len(gnd)} entries but ranks has {ranks.shape[1]} "
                             f"query columns")
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or any(key not in entry for key in _GND_KEYS):
            raise utils.RunError(f"gnd[{q}] must be a dict with keys 'easy', 'hard' and "
                                 f"'junk', got {entry!r}")
    kappas = [int(kappa) for kappa in kappas]
    if any(kappa < 1 for kappa in kappas):
        raise utils.RunError(f"kappas must be positive integers, got {kappas}")

    results = {}
    for protocol, (ok_keys, junk_keys) in _PROTOCOLS.items():
        aps = np.full(len(gnd), np.nan)
        p_at = np.full((len(gnd), len(kappas)), np.nan)
        for q, entry in enumerate(gnd):
            ok = _gather(entry, ok_keys)
            if ok.size:
                aps[q], p_at[q] = _query_scores(ranks[:, q], ok, _gather(entry, junk_keys), kappas)
        valid = ~np.isnan(aps)
        if valid.any():
            mean_ap, mp_at = float(aps[valid].mean()), p_at[valid].mean(axis=0)
        else:
            mean_ap, mp_at = float("nan"), np.full(len(kappas), np.nan)
        results[protocol] = {"map": mean_ap, "aps": aps, "mp_at": mp_at, "p_at": p_at}
    return results


def gldv2_map_at_k(predictions, solution, k=100):
    """Google Landmarks v2 retrieval mAP@k.

    ``predictions`` maps a query id to its ranked index ids (best first);
    ``solution`` maps a query id to its non-empty list of ground-truth index ids.
    For each solution query, AP@k = sum over the first k predictions, at 1-based
    rank i, of precision@i * rel(i), divided by min(len(ground truth), k); a
    repeated prediction still takes its place in the ranking but only its first
    occurrence can be relevant (and counted as a hit). The result is the mean over
    the solution's queries: a solution query without a prediction scores 0, and
    predictions for queries outside the solution are ignored (the challenge
    scores only its solution's queries).
    """
    if not isinstance(predictions, Mapping) or not isinstance(solution, Mapping):
        raise utils.RunError("predictions and solution must be dicts keyed by query id")
    if not solution:
        raise utils.RunError("solution is empty: mAP@k is undefined")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise utils.RunError(f"k must be a positive integer, got {k!r}")
    total = 0.0
    for query, truth in solution.items():
        truth = set(truth)
        if not truth:
            raise utils.RunError(f"solution[{query!r}] has no ground-truth index id")
        seen, hits, ap = set(), 0, 0.0
        for rank, item in enumerate(list(predictions.get(query, ()))[:k], start=1):
            if item in truth and item not in seen:
                hits += 1
                ap += hits / rank
            seen.add(item)
        total += ap / min(len(truth), k)
    return total / len(solution)


def global_average_precision(predictions, solution):
    """Google Landmarks v2 recognition GAP (micro AP), non-landmark queries kept.

    ``predictions`` maps a query id to {'class': landmark, 'score': confidence};
    ``solution`` maps a query id to its list of landmarks ([] for a non-landmark
    query). Predictions are sorted by score descending, then query id, then
    class; the i-th prediction is relevant when its class is in its query's
    solution list, and GAP = (1 / M) * sum_i precision(i) * rel(i), where
    precision(i) counts every prediction so far (non-landmark queries included,
    as with ignore_non_gt_test_images=False) and M is the number of solution
    queries with at least one landmark (GAP is 0 when M is 0). Predictions for
    queries outside the solution are ignored.
    """
    if not isinstance(predictions, Mapping) or not isinstance(solution, Mapping):
        raise utils.RunError("predictions and solution must be dicts keyed by query id")
    for query, prediction in predictions.items():
        if not isinstance(prediction, Mapping) or "class" not in prediction \
                or "score" not in prediction:
            raise utils.RunError(f"predictions[{query!r}] must be a dict with keys "
                                 f"'class' and 'score', got {prediction!r}")
    num_expected = sum(1 for landmarks in solution.values() if len(landmarks))
    if num_expected == 0:
        return 0.0
    scored = [(-float(p["score"]), query, p["class"])
              for query, p in predictions.items() if query in solution]
    gap, correct = 0.0, 0
    for i, (_, query, label) in enumerate(sorted(scored), start=1):
        if label in solution[query]:
            correct += 1
            gap += correct / i
    return gap / num_expected


# --------------------------------------------------------------------------------- the field's benchmarks, scored
BENCHMARK_TILE_ROWS = 8192  # database rows scored at once: 1,129 GLDv2 queries x 8,192 rows is 37 MB of scores


def ranked_database(queries, database, device=None, queries_at_once: int = 16) -> np.ndarray:
    """(database x queries) database indices, best cosine first (ties: the smaller index first), as revisitop's
    `ranks`; a few queries at a time, so that only (queries_at_once x database) scores are ever held."""
    device = torch.device(device) if device is not None else default_device()
    database = _normalized_features(database, device, 'database features')
    queries = _normalized_features(queries, device, 'query features')
    ranks = np.empty((database.shape[0], queries.shape[0]), dtype=np.int64)
    for first in range(0, queries.shape[0], queries_at_once):
        scores = queries[first:first + queries_at_once] @ database.T
        ranks[:, first:first + queries_at_once] = scores.sort(dim=1, descending=True, stable=True).indices.T.cpu()
    return ranks


def top_k_neighbours(queries, database, k: int = 100, device=None, tile_rows: int = BENCHMARK_TILE_ROWS):
    """(indices, cosines), each (queries x k), of every query's k best database rows, best first. `database` is read
    `tile_rows` rows at a time (an array, a memory-mapped .npy or a tensor) and a running top-k kept: the full score
    matrix is never held."""
    device = torch.device(device) if device is not None else default_device()
    queries = _normalized_features(queries, device, 'query features')
    best_scores = torch.empty(queries.shape[0], 0, device=device)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.int64, device=device)
    for first in range(0, len(database), tile_rows):
        scores = queries @ _normalized_features(database[first:first + tile_rows], device, 'database features').T
        tile_best = scores.topk(min(k, scores.shape[1]), dim=1)  # the tile's own best first: small to merge
        candidates = torch.cat([best_scores, tile_best.values], dim=1)
        best_scores, order = candidates.topk(min(k, candidates.shape[1]), dim=1)
        best_indices = torch.cat([best_indices, tile_best.indices + first], dim=1).gather(1, order)
    return best_indices.cpu().numpy(), best_scores.cpu().numpy()


def revisitop_figures(queries, database, gnd, device=None) -> dict:
    """{protocol: {'map', 'mp_at'}} of revisitop_map for the features' ranking (mP at 1, 5 and 10)."""
    results = revisitop_map(ranked_database(queries, database, device), gnd)
    return {protocol: {'map': figures['map'], 'mp_at': figures['mp_at'].tolist()}
            for protocol, figures in results.items()}


def gldv2_figures(queries, database, images, device=None) -> dict:
    """GLDv2 retrieval mAP@100 of the features' 100 best index images: {'private', 'public', 'all'}."""
    best, _ = top_k_neighbours(queries, database, k=100, device=device)
    predictions = {query: [images.database_ids[index] for index in row]
                   for query, row in zip(images.query_ids, best.tolist())}
    figures = {'all': gldv2_map_at_k(predictions, images.solution)}
    for usage in ('Private', 'Public'):
        part = {query: truth for query, truth in images.solution.items() if images.usage[query] == usage}
        figures[usage.lower()] = gldv2_map_at_k(predictions, part) if part else math.nan
    return figures


def benchmark_report(images, student: tuple, teacher: tuple | None = None, device=None) -> dict:
    """The figures of `images` (a helpers.BenchmarkImages) for the student's (query, database) features, and with
    the teacher's, for the teacher and for the student's queries against the teacher's database ('cross')."""
    models = {'student': student}
    if teacher is not None:
        models.update(teacher=teacher, cross=(student[0], teacher[1]))
    if images.gnd is not None:
        return {name: revisitop_figures(queries, database, images.gnd, device)
                for name, (queries, database) in models.items()}
    return {name: gldv2_figures(queries, database, images, device) for name, (queries, database) in models.items()}


def benchmark_lines(name: str, report: dict) -> list[str]:
    """record.txt's lines of a benchmark report, in percent as the field prints them."""
    lines = []
    for model, figures in report.items():
        if 'all' in figures:
            lines.append(f'{name} {model}: mAP@100 private {100 * figures["private"]:.2f}, public '
                         f'{100 * figures["public"]:.2f}, all {100 * figures["all"]:.2f}')
            continue
        maps = ', '.join(f'{protocol[0].upper()} {100 * figures[protocol]["map"]:.2f}' for protocol in _PROTOCOLS)
        precisions = ', '.join(f'{protocol[0].upper()} ' + '/'.join(f'{100 * value:.2f}' for value in
                                                                    figures[protocol]['mp_at'])
                               for protocol in _PROTOCOLS)
        lines.append(f'{name} {model}: mAP {maps}; mP@1/5/10 {precisions}')
    return lines


def saved_features(path: str, count: int, extract, rank: int, logger):
    """The (count x d) features saved at `path` by an earlier run (on rank 0; None elsewhere), or `extract()`'s on
    every process, saved at `path` by rank 0 for the next run. Every process takes the same branch."""
    reuse = utils.gather_objects(rank == 0 and _whole_features(path, count))[0]
    if reuse:
        logger.info(f'features read from {path} (saved by an earlier run)')
        return np.load(path, mmap_mode='r') if rank == 0 else None
    features = extract()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        utils.write_atomically(path, lambda file: np.save(file, features.numpy()))  # float32 already
    return features


def run_benchmark(images, backbones: dict, model_keys: dict, *, feature_dir: str, img_size: int, batch_size: int,
                  num_workers: int, device: torch.device, amp: str, rank: int, world_size: int, logger):
    """Score `backbones` ({'student': ..., optionally 'teacher': ...}) on a benchmark's images: the features of its
    queries and database (saved in `feature_dir` under a name made of the model's key in `model_keys` and the
    images, so that a rerun or another test of the same model reads them instead), then on rank 0 the report in
    record.txt and results.json (under the benchmark's name)."""
    parts = {part: (helpers.build_test_loader(samples, img_size, batch_size, num_workers, rank=rank,
                                              world_size=world_size), _images_digest(samples))
             for part, samples in (('queries', images.queries), ('database', images.database))}
    features = {}
    for model, backbone in backbones.items():
        features[model] = tuple(
            saved_features(_feature_path(feature_dir, f'{images.name}-{part}', model_keys[model], digest),
                           len(loader.dataset), functools.partial(_features, backbone, loader, device, amp, rank,
                                                                  logger), rank, logger)
            for part, (loader, digest) in parts.items())
    if rank != 0:
        return
    report = benchmark_report(images, features['student'], features.get('teacher'), device)
    for line in benchmark_lines(images.name, report):
        logger.info(line)
    logger.result(images.name, report)


def _images_digest(samples) -> str:
    """sha1 of the images' paths and boxes."""
    digest = hashlib.sha1()
    for sample in samples:
        digest.update(f'{sample.path} {sample.box}\n'.encode())
    return digest.hexdigest()


def _feature_path(feature_dir: str, name: str, model_key: str, images_digest: str) -> str:
    """`feature_dir/<name>-<digest of the model's key and of the images>.npy`."""
    identity = f'{model_key}\n{images_digest}'
    return os.path.join(feature_dir, f'{name}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}.npy')


def _features(backbone, loader, device: torch.device, amp: str, rank: int, logger) -> torch.Tensor:
    features, truncated = extract_features(backbone, loader, helpers.BatchTransform(augment=False), device, amp,
                                           total=len(loader.dataset), show_progress=rank == 0)
    helpers.report_truncated(truncated, logger)
    return features


def _whole_features(path: str, count: int) -> bool:
    try:
        features = np.load(path, mmap_mode='r')
    except (OSError, ValueError):
        return False
    return features.ndim == 2 and features.shape[0] == count and features.dtype == np.float32


# ------------------------------------------------------------------------------------------- the test of a run
@torch.no_grad()
def extract_features(backbone, loader, batch_transform, device: torch.device, amp: str, total: int,
                     show_progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(L2-normalised float32 features of every image of `loader`'s list in list order, truncated files decoded on
    the way), on every process. An unreadable image on any process stops every process (StopOnEveryRank)."""
    backbone.eval()
    features, indices = [], []
    problems, truncated = [], []
    for batch in tqdm(loader, desc='features', disable=not show_progress, dynamic_ncols=True):
        problems.extend(helpers.batch_messages(batch, 'bad'))
        truncated.extend(helpers.batch_messages(batch, 'truncated'))
        if problems:
            break
        images = batch_transform(batch['image'].to(device, non_blocking=True), train=False)
        with utils.autocast_context(device, amp):
            output = backbone(images)
        features.append(functional.normalize(output.float(), dim=1))
        indices.append(batch['index'].to(device))
    utils.stop_if_any_process_failed(problems)
    feature_dim = getattr(backbone, 'feature_dim', None) or (features[0].shape[1] if features else 0)
    local_features = torch.cat(features) if features else torch.zeros(0, feature_dim, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    return utils.gather_in_order(local_features, local_indices, total).cpu(), utils.gather_messages(truncated)


def test_report(student_features, coarse_labels, fine_labels, teacher_features=None, coarse_mask=None,
                fine_mask=None) -> dict:
    """The report of a test list: {'student': evaluate_features(...)} and, when the teacher's features are given,
    'teacher' and 'cross' (the student's queries against the teacher's gallery) beside it."""
    pairs = {'student': (student_features, None)}
    if teacher_features is not None:
        pairs.update(teacher=(teacher_features, None), cross=(student_features, teacher_features))
    return {name: evaluate_features(features, coarse_labels, fine_labels, gallery_features=gallery,
                                    coarse_mask=coarse_mask, fine_mask=fine_mask)
            for name, (features, gallery) in pairs.items()}


def check_test_list(samples, coarse_mask: str | None, fine_mask: str | None, logger):
    """Before any work: stop when a pair mask does not fit the test list, and say which test figures the list
    cannot give (they are reported as nan at the end)."""
    for mask in (coarse_mask, fine_mask):
        if mask:
            _PairMask(mask, len(samples))
    for grain, labels, mask in (('coarse', [sample.label for sample in samples], coarse_mask),
                                ('fine', [sample.fine_label for sample in samples], fine_mask)):
        problem = labels_problem(labels) if samples and not mask else None
        if problem:
            logger.info(f'note: the test list gives no {grain} TARs: {problem}; they will be reported as nan')


def run_test(loader, batch_transform, student_backbone, teacher_backbone=None, *, device: torch.device, amp: str,
             rank: int, logger, output_dir: str, coarse_mask=None, fine_mask=None):
    """The final test: open-set features of every process, then on rank 0 the report (TAR@FAR coarse, fine and
    cross, nearest-neighbour accuracy) in record.txt and results.json, opensetFeat.npy and roc.png in `output_dir`.

    A figure that cannot exist (no positive or negative pair in a grain, fewer than two images) is written as nan
    with a line saying why; the others are written as usual."""
    def features_of(backbone):
        features, truncated = extract_features(backbone, loader, batch_transform, device, amp,
                                               total=len(loader.dataset), show_progress=rank == 0)
        helpers.report_truncated(truncated, logger)
        return features

    student_features = features_of(student_backbone)
    teacher_features = features_of(teacher_backbone) if teacher_backbone is not None else None
    if rank != 0:
        return
    utils.write_atomically(os.path.join(output_dir, 'opensetFeat.npy'),
                           lambda file: np.save(file, student_features.numpy().astype(np.float32)))
    report = test_report(student_features, loader.dataset.labels, loader.dataset.fine_labels, teacher_features,
                         coarse_mask=coarse_mask, fine_mask=fine_mask)
    log_report(logger, report, os.path.join(output_dir, 'roc.png'))


def log_report(logger, report: dict, roc_path: str):
    """The TAR lines and nearest-neighbour lines of record.txt, tensorboard scalars, results.json and roc.png."""
    names = {'student': 'test acc', 'teacher': 'teacher acc', 'cross': 'cross acc'}
    curves = {}
    for name, result in report.items():
        logger.info(format_tar_line(names[name], result['coarse'], result['fine']))
        logger.info(f'{name} nearest-neighbour top-1: coarse={result["coarse_nn_accuracy"]:.5f}, '
                    f'fine={result["fine_nn_accuracy"]:.5f}; GAP: coarse={result["coarse_gap"]:.5f}, '
                    f'fine={result["fine_gap"]:.5f}')
        for grain in ('coarse', 'fine'):
            if result[f'{grain}_undefined']:
                logger.info(f'{name} {grain} TARs are nan (undefined): {result[f"{grain}_undefined"]}')
            for far, tar in zip(DEFAULT_FARS, result[grain]):
                if not math.isnan(tar):
                    logger.scalar(f'test/{name}_{grain}_tar@far{far:.0e}', tar, 0)
            if not result[f'{grain}_undefined']:
                curves[f'{name} {grain}'] = result[f'{grain}_curve']
    logger.result('test', {name: dict(result, **{f'{grain}_curve': dict(zip(('far', 'tar'), result[f'{grain}_curve']))
                                                 for grain in ('coarse', 'fine')})
                           for name, result in report.items()})
    plot_roc(curves, roc_path)
