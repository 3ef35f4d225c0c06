"""The published metric: TAR at FAR over all pairs of an open-set list, computed in row tiles (never the N x N score
matrix), exactly as the original computed its curve and lookup."""
import math
import os
from contextlib import contextmanager

import numpy as np
import torch

import utils

DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
DEFAULT_TILE_ELEMENTS = 1 << 23  # scores per tile of the pair matrix: working memory independent of N
FAR_BRACKET_FACTOR = 8.0  # the original's 8x rule: FAR at the lower bracket must be below this multiple of the target
EDGE_OFFSET = 2e-6  # offset of the original's histogram edges above t - unit/2
SPARSE_POSITIVE_LIMIT = 1 << 23  # positive pairs listed explicitly up to this many; beyond, tiles compare labels
CHUNK_ELEMENTS = 1 << 18  # scores binned together in one cache-sized chunk of a tile
MIN_ARITHMETIC_STEP = 1e-5  # below this edge spacing the arithmetic bin guess may be far off: binary search instead

# Why TARs cannot exist: said before the work (labels_problem) and after it (undefined_reason).
FEWER_THAN_TWO_IMAGES = 'fewer than two test images: there is no pair to score'
NO_POSITIVE_PAIR = 'no positive pair (no two test images share a label)'
NO_NEGATIVE_PAIR = 'no negative pair (every test image has the same label)'


def query_and_gallery(features, gallery_features, device):
    """(queries, gallery), L2-normalised on `device`; the gallery is the queries when none is given."""
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
    array = (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).reshape(-1)
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
        self.path = self.array = None
        if isinstance(mask, (str, os.PathLike)):
            self.path = os.fspath(mask)
            if not os.path.isfile(self.path):
                raise utils.RunError(f'mask file {self.path} does not exist')
            self._check(np.load(self.path, mmap_mode='r'), self.path)
        else:
            array = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
            self._check(array, 'mask')
            self.array = array.reshape(-1)

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
        return np.asarray(np.load(self.path, mmap_mode='r').reshape(-1)[start:stop] != 0)


def _same_class_pairs(classes):
    """All pairs (i < j) with classes[i] == classes[j], as two int64 arrays sorted by i then j."""
    order = np.argsort(classes, kind='stable')
    boundaries = np.flatnonzero(np.diff(classes[order])) + 1
    firsts, seconds = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for members in np.split(order, boundaries):
        if len(members) > 1:
            upper_rows, upper_columns = np.triu_indices(len(members), 1)
            firsts.append(members[upper_rows])
            seconds.append(members[upper_columns])
    first, second = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    order = np.lexsort((second, first))
    return first[order], second[order]


class _PairLabelSet:
    """Which pairs are positive, per tile as flat indices into its (rows, N - first_row) scores: from a mask, its
    block's True entries; from labels, a sorted list of the positive pairs when there are at most
    SPARSE_POSITIVE_LIMIT of them, else a comparison of labels per tile."""

    def __init__(self, labels, mask, num_items, device):
        if labels is not None and mask is not None:
            raise utils.RunError('give either labels or mask, not both: they define the positive pairs twice')
        if labels is None and mask is None:
            raise utils.RunError('give labels (one per feature) or mask (upper-triangle pair mask) to define positive '
                                 'pairs')
        self.mask = PairMask(mask, num_items) if mask is not None else None
        self.class_ids = label_tensor(labels, num_items, device) if mask is None else None
        self.first = self.second = None
        if self.class_ids is not None:
            classes = self.class_ids.cpu().numpy()
            sizes = np.bincount(classes)
            if int((sizes * (sizes - 1) // 2).sum()) <= SPARSE_POSITIVE_LIMIT:
                self.first, self.second = _same_class_pairs(classes)

    def positive_index(self, first_row, end_row, valid_square):
        num_columns = (self.mask.num_items if self.mask is not None else len(self.class_ids)) - first_row
        if self.mask is not None:
            offsets = np.flatnonzero(self.mask.rows(first_row, end_row))
            # Row a of the block starts at row_starts[a] in the block's stretch of the triangle.
            row_lengths = self.mask.num_items - 1 - np.arange(first_row, end_row)
            row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
            local_rows = np.searchsorted(row_starts, offsets, side='right') - 1
            local_columns = local_rows + 1 + (offsets - row_starts[local_rows])
        elif self.first is not None:
            start, stop = np.searchsorted(self.first, [first_row, end_row])
            local_rows = self.first[start:stop] - first_row
            local_columns = self.second[start:stop] - first_row
        else:
            tile = self.class_ids[first_row:end_row, None] == self.class_ids[None, first_row:]
            tile[:, :end_row - first_row] &= valid_square
            return torch.nonzero(tile.view(-1)).squeeze(1)
        return torch.from_numpy(local_rows * num_columns + local_columns).to(valid_square.device)


def _score_tiles(queries, gallery, tile_elements):
    """Yield (first_row, end_row, scores, valid_square): scores[a, b] = queries[first_row + a] . gallery[first_row + b]
    for b < N - first_row, so pairs i < j are b > a; valid_square marks b > a in the leading (rows x rows) square.
    The same block always gives bit-identical scores (same shapes, same kernel)."""
    num_items = queries.shape[0]
    # Per-tile float32 histogram counts stay exact below 2**24.
    rows_per_block = max(1, min(int(tile_elements), 1 << 24) // num_items)
    for first_row in range(0, num_items - 1, rows_per_block):
        end_row = min(first_row + rows_per_block, num_items)
        scores = queries[first_row:end_row] @ gallery[first_row:].T
        index = torch.arange(end_row - first_row, device=queries.device)
        yield first_row, end_row, scores, index[None, :] > index[:, None]


def _score_range(queries, gallery, tile_elements):
    """Exact smallest and largest float32 score over pairs i < j."""
    low, high = math.inf, -math.inf
    for _, _, scores, valid_square in _score_tiles(queries, gallery, tile_elements):
        # Entries i >= j are overwritten by a valid score of the tile.
        scores[:, :valid_square.shape[0]].masked_fill_(~valid_square, scores[0, -1])
        tile_low, tile_high = torch.aminmax(scores)
        low, high = min(low, float(tile_low)), max(high, float(tile_high))
    return low, high


def _threshold_edges(smallest, largest, num_thresholds):
    """The original's histogram edges e_k = t_k - unit/2 + 2e-6 (see tar_at_far), in float64 and as float32 rounded
    up, so that a float32 score s >= edges32[k] exactly when s >= e_k in real arithmetic."""
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
    """One CPU thread: for many small operations a thread-pool handshake each costs milliseconds on a busy machine."""
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
    """Per tile, how many scores have exactly b edges at or below them, for all pairs (b = 1..T) and for the
    positive pairs (b = 0..T).

    Scores become positions g = (s - edge_0) / step, so edge k sits at g = k. Where g is farther than `margin` (a
    doubled bound on the float32 rounding of g and of the edges) from an integer, floor(g) decides every comparison
    and torch.histc counts it; scores near an edge, and the sparse positive pairs, are placed by an exact binary
    search on the float32 edges. The tile is processed in chunks that stay in cache."""

    def __init__(self, edges, edges32, device):
        self.count = len(edges32)
        self.edges32 = torch.from_numpy(edges32).to(device)
        step = (edges[-1] - edges[0]) / (self.count - 1)
        self.arithmetic = self.count >= 3 and step >= MIN_ARITHMETIC_STEP
        if self.arithmetic:
            self.inverse_step = 1.0 / step
            self.margin = 1e-3 + 8.4e-7 * self.inverse_step
            self.shift = torch.tensor(-float(edges[0]) * self.inverse_step, dtype=torch.float32, device=device)
            self.one = torch.ones((), dtype=torch.float32, device=device)

    def exact_counts(self, scores):
        """Histogram (length T + 1, int64) of float32 scores by the number of edges at or below each."""
        edges_below = torch.searchsorted(self.edges32, scores.contiguous(), right=True)
        return torch.bincount(edges_below.view(-1), minlength=self.count + 1)

    def __call__(self, scores, valid_square, positive_index):
        """(all-pair counts of bins 1..T, positive counts of bins 0..T), int64, of a float32 tile whose leading
        (rows x rows) square holds pairs only where valid_square."""
        with _one_thread_on_cpu(scores.device):
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
                near_edge = torch.round(positions).sub_(positions).abs_() < self.margin
                chunk_valid = valid_square[first:first + chunk_rows]
                near_edge[:, :rows] &= chunk_valid
                positions[:, :rows].masked_fill_(~chunk_valid, -1.0)
                near_edge_scores.append(chunk[near_edge])
                # histc ignores values outside [0, T]: scores below the lowest edge are never accepted, and those
                # near an edge go to the exact search. Its bin j holds the scores with j + 1 edges below; float32
                # counts stay exact below 2**24 per bin, which the tile size guarantees.
                positions.masked_fill_(near_edge, -1.0)
                histogram += torch.histc(positions, bins=self.count, min=0, max=self.count)
            all_counts = histogram.round_().to(torch.int64) + self.exact_counts(torch.cat(near_edge_scores))[1:]
            return all_counts, positive_counts


def _pair_histograms(queries, gallery, label_sets, edges, edges32, tile_elements):
    """([(positive counts, number of positive pairs)] per label set, all-pair counts): pairs accepted at each
    threshold, as int64 numpy arrays of length T."""
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

    # Bin k - 1 holds scores with exactly k edges at or below them: threshold k accepts bins k - 1 and above.
    def at_or_above(histogram):
        return np.cumsum(histogram.cpu().numpy()[::-1])[::-1].copy()
    positives = [(at_or_above(histogram[1:]), int(histogram.sum())) for histogram in positive_histograms]
    return positives, at_or_above(all_histogram)


def labels_problem(labels) -> str | None:
    """Why TARs over these labels cannot exist, or None."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < 2:
        return FEWER_THAN_TWO_IMAGES
    counts = np.unique(labels, return_counts=True)[1]
    if counts.max() < 2:
        return NO_POSITIVE_PAIR
    return NO_NEGATIVE_PAIR if len(counts) == 1 else None


def undefined_reason(curve) -> str | None:
    """Why the TARs of a (far, tar) curve are undefined (NaN), or None when they are defined."""
    far, tar = curve
    if len(far) == 0:
        return FEWER_THAN_TWO_IMAGES
    if np.isnan(tar).all():
        return NO_POSITIVE_PAIR
    return NO_NEGATIVE_PAIR if np.isnan(far).all() else None


def _tars_from_curve(far, tar, fars):
    """TAR at each target FAR by the original's binary search over the thresholds (see tar_at_far)."""
    if not len(fars) or any(not target > 0 for target in fars):
        raise utils.RunError(f'target FARs must be a non-empty list of positive rates, got {list(fars)}')
    # Without a negative pair no threshold can be chosen (the original's NaN comparisons give an arbitrary TAR).
    if len(far) < 2 or np.isnan(far).all():
        return [math.nan] * len(fars)
    return [round(_tar_at(far, tar, target), 5) for target in fars]


def _tar_at(far, tar, target):
    lower, upper = 0, len(far) - 1
    while upper - lower > 1:
        middle = (lower + upper) // 2
        if far[middle] == target:
            return float(tar[middle])
        lower, upper = (lower, middle) if far[middle] < target else (middle, upper)
    return 0.0 if far[lower] / target >= FAR_BRACKET_FACTOR else float((tar[lower] + tar[upper]) / 2)


def _evaluate_pairs(features, gallery_features, label_pairs, num_thresholds, device, tile_elements):
    """A (far, tar) curve per label set given as (labels, mask); empty curves for fewer than two features."""
    device = torch.device(device) if device is not None else utils.default_device()
    if int(num_thresholds) < 2:
        raise utils.RunError(f'num_thresholds must be at least 2, got {num_thresholds}')
    queries, gallery = query_and_gallery(features, gallery_features, device)
    num_items = queries.shape[0]
    label_sets = [_PairLabelSet(labels, mask, num_items, device) for labels, mask in label_pairs]
    if num_items < 2:
        return [(np.zeros(0), np.zeros(0)) for _ in label_pairs]
    edges, edges32 = _threshold_edges(*_score_range(queries, gallery, tile_elements), int(num_thresholds))
    positive_counts, all_counts = _pair_histograms(queries, gallery, label_sets, edges, edges32, tile_elements)
    total_pairs = num_items * (num_items - 1) // 2
    curves = []
    for counts, total_positive in positive_counts:
        # NaN throughout where there is no positive (TAR) or no negative (FAR) pair, as the original's 0 / 0.
        with np.errstate(invalid='ignore', divide='ignore'):
            far = (all_counts - counts) / np.float64(total_pairs - total_positive)
            curves.append((far, counts / np.float64(total_positive)))
    return curves


def tar_at_far(features, labels=None, mask=None, fars=DEFAULT_FARS, num_thresholds=2000,
               gallery_features=None, device=None, tile_elements=DEFAULT_TILE_ELEMENTS) -> list[float]:
    """TAR at each target FAR over all unordered pairs i < j of `features`, one float per FAR.

    Positive pairs come from exactly one of `labels` (one per feature: same label = positive) or `mask` (boolean,
    in numpy.triu_indices(N, 1) order, or the path of such a .npy, read memory-mapped block by block). With
    `gallery_features` the pair (i, j) is scored features[i] . gallery_features[j] (student against teacher).

    The original's algorithm (T = num_thresholds):
    - scores are float32 dot products of L2-normalised features, computed in row tiles (never N x N);
    - lo, hi = the smallest and largest score, unit = (hi - lo) / T, thresholds t_k = lo + (hi - lo) * k / T for
      k = 1..T; a pair is accepted at t_k when score >= t_k - unit/2 + 2e-6 exactly (a score below every such edge
      is never accepted, yet counts in the denominators);
    - FAR_k = accepted negatives / all negatives, TAR_k = accepted positives / all positives;
    - for target f, a binary search over indices l = 0, u = T - 1: while u - l > 1, middle m: FAR_m == f answers
      TAR_m; FAR_m < f moves u to m, otherwise l to m. Then 0 when FAR_l / f >= 8 (no threshold near f), else
      (TAR_l + TAR_u) / 2. Rounded to 5 decimals.
    Undefined figures are NaN, as the original's 0 / 0: without a positive pair every TAR the 8x rule does not make
    0; every TAR without a negative pair or with fewer than two features.
    Cost: two passes over the same row tiles (min/max, then the histogram: bit-identical scores), each N^2 d / 2
    multiply-adds, on the GPU when there is one; memory O(N d + tile_elements).
    """
    far, tar = far_tar_curve(features, labels, mask, num_thresholds, gallery_features, device, tile_elements)
    return _tars_from_curve(far, tar, fars)


def far_tar_curve(features, labels=None, mask=None, num_thresholds=2000, gallery_features=None, device=None,
                  tile_elements=DEFAULT_TILE_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(far, tar) float64 arrays, one point per threshold, as in tar_at_far (empty for fewer than two features)."""
    return _evaluate_pairs(features, gallery_features, [(labels, mask)], num_thresholds, device, tile_elements)[0]
