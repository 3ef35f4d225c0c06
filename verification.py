"""The published metric: TAR at FAR over all pairs of an open-set list, computed in row tiles (never the N x N score
matrix), exactly as the original computed its curve and lookup."""
import math
import os
from contextlib import contextmanager

import numpy as np
import torch

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


def query_and_gallery(features, gallery_features, device):
    queries = utils.normalized_features(features, device, 'features')
    if gallery_features is None:
        return queries, queries
    gallery = utils.normalized_features(gallery_features, device, 'gallery_features')
    if gallery.shape != queries.shape:
        raise utils.RunError(f'gallery_features shape {tuple(gallery.shape)} differs from features shape '
                             f'{tuple(queries.shape)}; cross scoring pairs image i with image j of the same list')
    return queries, gallery


def label_tensor(labels, num_items, device):
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


class PairMask:
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
        return _PairLabelSet(mask=PairMask(mask, num_items))
    return _PairLabelSet(class_ids=label_tensor(labels, num_items, device))


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
    device = torch.device(device) if device is not None else utils.default_device()
    if int(num_thresholds) < 2:
        raise utils.RunError(f'num_thresholds must be at least 2, got {num_thresholds}')
    queries, gallery = query_and_gallery(features, gallery_features, device)
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
