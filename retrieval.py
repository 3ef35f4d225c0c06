"""The field's retrieval benchmarks end to end: the revisited Oxford/Paris and GLDv2 readers in their own layouts, their
metrics (revisitop mAP and mP@k, GLDv2 mAP@100), ranking and the running top-k, and the benchmark report."""
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

import datasets
import evaluation
import feature_store
import gldv2
import utils

# ------------------------------------------------------------------------------- the field's benchmarks' images
REVISITOP_SETS = ('roxford5k', 'rparis6k')


@dataclass
class BenchmarkImages:
    """A benchmark's query and database images and what scores their ranking: revisitop's `gnd` (per query its 'easy',
    'hard' and 'junk' database indices), or GLDv2's `solution` (query id -> index ids), `usage` and image ids."""
    name: str
    queries: list[datasets.Sample]
    database: list[datasets.Sample]
    gnd: list[dict] | None = None
    solution: dict | None = None
    usage: dict | None = None
    query_ids: list[str] | None = None
    database_ids: list[str] | None = None
    distractors: int = 0  # the last database images, from --benchmark_distractors


def check_benchmark_images(images: BenchmarkImages, rank: int, world_size: int):
    """Stop, naming the entry and the flag that gives its root, when an image of the benchmark does not exist."""
    own = len(images.database) - images.distractors
    datasets.check_images_exist(images.queries + images.database[:own], '--benchmark_root', rank, world_size)
    datasets.check_images_exist(images.database[own:], '--benchmark_distractors', rank, world_size)


def read_benchmark(name: str, root: str, distractors: list[str] | None = None) -> BenchmarkImages:
    """The images of benchmark `name` ('gldv2', or a revisitop set with optional distractors) under `root`."""
    return read_gldv2(root) if name == 'gldv2' else read_revisitop(root, name, distractors)


def read_revisitop(root: str, name: str, distractors: list[str] | None = None) -> BenchmarkImages:
    """Revisited Oxford or Paris as revisitop lays it out: `root/gnd_<name>.pkl` (read as plain data only) and
    `root/jpg/<image>.jpg`; queries are cropped to their bbx; `distractors` (ROOT, LIST) adds database images."""
    path = os.path.join(root, f'gnd_{name}.pkl')
    if not os.path.isfile(path):
        raise utils.RunError(f'{path}: no such file; --benchmark_root must hold gnd_{name}.pkl and jpg/, as revisitop '
                             'lays them out')
    try:
        content = utils.load_plain_data(path)
    except Exception as error:  # whatever a damaged or foreign pickle raises, the file is named
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise utils.RunError(f'{path}: not a revisitop ground-truth file ({reason}); download gnd_{name}.pkl '
                             'again') from None
    fields = content if isinstance(content, dict) else {}
    images, query_images, gnd = fields.get('imlist'), fields.get('qimlist'), fields.get('gnd')
    if not all(isinstance(value, (list, tuple)) for value in (images, query_images, gnd)):
        raise utils.RunError(f"{path}: not a revisitop ground-truth file (a dict with lists 'imlist', 'qimlist' and "
                             "'gnd' expected)")
    if len(gnd) != len(query_images):
        raise utils.RunError(f'{path}: {len(query_images)} queries in qimlist but {len(gnd)} gnd entries')
    for index, entry in enumerate(gnd):
        if not isinstance(entry, dict) or any(key not in entry for key in ('bbx', 'easy', 'hard', 'junk')):
            raise utils.RunError(f"{path}: gnd[{index}] is not a dict with 'bbx', 'easy', 'hard' and 'junk'")
    images, query_images = [str(image) for image in images], [str(image) for image in query_images]
    database = [datasets.Sample(os.path.join(root, 'jpg', f'{image}.jpg'), 0, 0, f"{path}: imlist[{index}] '{image}'")
                for index, image in enumerate(images)]
    queries = [datasets.Sample(os.path.join(root, 'jpg', f'{image}.jpg'), 0, 0, f"{path}: qimlist[{index}] '{image}'",
                               box=_query_box(path, index, entry.get('bbx')))
               for index, (image, entry) in enumerate(zip(query_images, gnd))]
    extra = read_image_paths(*distractors) if distractors else []
    database += extra
    ground_truth = [{key: _database_indices(path, index, key, entry[key], len(images))
                     for key in ('easy', 'hard', 'junk')} for index, entry in enumerate(gnd)]
    for index, entry in enumerate(ground_truth):
        for first, second in (('easy', 'hard'), ('easy', 'junk'), ('hard', 'junk')):
            both = sorted(set(entry[first]) & set(entry[second]))
            if both:
                raise utils.RunError(f"{path}: gnd[{index}] lists database image {both[0]} in both '{first}' and "
                                     f"'{second}' (each image is in one set at most); download the file again")
    if not queries or not database:
        raise utils.RunError(f'{path}: no {"queries" if not queries else "database images"}; download the file again')
    return BenchmarkImages(name, queries, database, gnd=ground_truth, distractors=len(extra))


def _database_indices(path: str, query: int, key: str, values, database_size: int) -> list[int]:
    """gnd[query][key] as a list of database indices, refused unless each is an integer inside imlist."""
    array = np.asarray(values).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise utils.RunError(f"{path}: gnd[{query}]['{key}'] holds {array.dtype} values, not database indices")
    outside = [int(value) for value in array if not 0 <= value < database_size]
    if outside:
        raise utils.RunError(f"{path}: gnd[{query}] names database image {outside[0]}, outside imlist "
                             f"({database_size} images); download the file again")
    return [int(value) for value in array]


def _query_box(path: str, index: int, bbx) -> tuple[float, float, float, float]:
    """A query's bbx as (left, top, right, bottom), refused unless it is four numbers enclosing an area."""
    try:
        left, top, right, bottom = (float(value) for value in np.asarray(bbx, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise utils.RunError(f'{path}: gnd[{index}] bbx {bbx!r} is not four numbers (left, top, right, '
                             'bottom)') from None
    if not all(math.isfinite(value) for value in (left, top, right, bottom)):
        raise utils.RunError(f'{path}: gnd[{index}] bbx {bbx!r} is not four finite numbers')
    if not (right > left and bottom > top):
        raise utils.RunError(f'{path}: gnd[{index}] bbx {bbx!r} encloses no area')
    return left, top, right, bottom


def read_image_paths(root: str, list_path: str) -> list[datasets.Sample]:
    """The images of a list of paths relative to `root`, one a line (its first tab- or space-separated field)."""
    with open(list_path, encoding='utf-8-sig') as handle:
        lines = [(number, line.split()[0]) for number, line in enumerate(handle, start=1) if line.strip()]
    return [datasets.Sample(os.path.join(root, relative), 0, 0, f'{list_path}:{number}') for number, relative in lines]


def read_gldv2(root: str) -> BenchmarkImages:
    """Google Landmarks v2 retrieval in its own layout: `index.csv`, `test.csv`, `retrieval_solution_v2.1.csv`
    (`id,images,Usage`), `index/a/b/c/<id>.jpg`, `test/a/b/c/<id>.jpg`; the queries are its Private and Public rows."""
    hint = 'download the GLDv2 files again (--benchmark_root holds them as they are downloaded)'
    index_ids = gldv2.unique_ids(os.path.join(root, 'index.csv'), hint)
    test_ids = set(gldv2.unique_ids(os.path.join(root, 'test.csv'), hint))
    known_index = set(index_ids)
    solution_path = os.path.join(root, 'retrieval_solution_v2.1.csv')
    solution, usage, first_line = {}, {}, {}
    for line, values in gldv2.csv_rows(solution_path, ('id', 'images', 'Usage'), hint):
        row = dict(zip(('id', 'images', 'Usage'), values))
        problem = (f"query {row['id']} again (first at line {first_line[row['id']]})" if row['id'] in first_line
                   else None)
        first_line[row['id']] = line
        if row['Usage'] == 'Ignored' and not problem:
            continue
        images = row['images'].split()
        problem = problem or _solution_problem(row, images, test_ids, known_index)
        if problem:
            raise utils.RunError(f'{solution_path}:{line}: {problem}; download the GLDv2 files again')
        solution[row['id']], usage[row['id']] = images, row['Usage']
    if not solution:
        raise utils.RunError(f'{solution_path}: no Private or Public query; download the GLDv2 files again')
    queries = [datasets.Sample(os.path.join(root, 'test', *query[:3], f'{query}.jpg'), 0, 0,
                               f'{solution_path}: query {query}') for query in solution]
    database = [datasets.Sample(os.path.join(root, 'index', *image[:3], f'{image}.jpg'), 0, 0, f'index.csv: {image}')
                for image in index_ids]
    return BenchmarkImages('gldv2', queries, database, solution=solution, usage=usage, query_ids=list(solution),
                           database_ids=index_ids)


def _solution_problem(row: dict, images: list[str], test_ids: set, index_ids: set) -> str | None:
    """What is wrong with a Private or Public row of the retrieval solution, or None."""
    if row['id'] not in test_ids:
        return f"its query {row['id']} is not in test.csv"
    if row['Usage'] not in ('Private', 'Public'):
        return f"Usage {row['Usage']!r} is not Private, Public or Ignored"
    if not images or images == ['None']:
        return 'no ground-truth image'
    return next((f'index image {image} is not in index.csv' for image in images if image not in index_ids), None)


# ------------------------------------------------------------------------------- the field's retrieval metrics
# protocol -> (gnd keys whose images are positives, gnd keys whose images are junk)
_PROTOCOLS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
              "hard": (("hard",), ("junk", "easy"))}
_GND_KEYS = ("easy", "hard", "junk")


def _query_scores(column, ok, junk, kappas):
    """AP and precision at each kappa of one ranked column (see revisitop_map)."""
    positions = np.flatnonzero(np.isin(column, ok))
    # Remove junk from the ranking: each positive moves up by the junk ranked before it.
    positions = positions - np.searchsorted(np.flatnonzero(np.isin(column, junk)), positions, side="left")
    k, r = np.arange(positions.size, dtype=np.float64), positions.astype(np.float64)
    ap = float(np.sum((np.where(r > 0, k / np.maximum(r, 1.0), 1.0) + (k + 1.0) / (r + 1.0)) / 2.0)) / ok.size
    if positions.size == 0:  # no positive in the ranking at all
        return ap, np.zeros(len(kappas))
    cut = np.minimum(positions.max() + 1, np.asarray(kappas))  # 1-based: kappa, or the rank of the last positive
    return ap, np.array([np.count_nonzero(positions < c) / c for c in cut], dtype=np.float64)


def revisitop_map(ranks, gnd, kappas=(1, 5, 10)):
    """Revisited Oxford/Paris mAP and precision@kappa, {protocol: {'map', 'aps', 'mp_at', 'p_at'}}, of `ranks` (database
    x queries, each column best first) against `gnd[q]`'s 'easy', 'hard', 'junk' indices (ok or junk per _PROTOCOLS).
    Junk leaves the ranking: a positive's 0-based rank r drops by the junk above it. The k-th positive adds (k / r (1
    at r = 0) + (k + 1) / (r + 1)) / 2 / #ok to AP; precision@kappa is #(p <= kq) / kq, p the 1-based positive ranks,
    kq = min(max(p), kappa), 0 without one. Queries without an ok image get NaN, left out of the means (NaN if all)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise utils.RunError(f"ranks must be a 2-D integer array (database x queries), "
                             f"got dtype {ranks.dtype} and shape {ranks.shape}")
    if len(gnd) != ranks.shape[1]:
        raise utils.RunError(f"gnd has {len(gnd)} entries but ranks has {ranks.shape[1]} query columns")
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or any(key not in entry for key in _GND_KEYS):
            raise utils.RunError(f"gnd[{q}] must be a dict with keys 'easy', 'hard' and 'junk', got {entry!r}")
    kappas = [int(kappa) for kappa in kappas]
    if any(kappa < 1 for kappa in kappas):
        raise utils.RunError(f"kappas must be positive integers, got {kappas}")
    results = {}
    for protocol, (ok_keys, junk_keys) in _PROTOCOLS.items():
        aps, p_at = np.full(len(gnd), np.nan), np.full((len(gnd), len(kappas)), np.nan)
        for q, entry in enumerate(gnd):
            ok = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in ok_keys])
            if ok.size:  # duplicates kept, as the reference: AP divides by ok.size
                junk = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in junk_keys])
                aps[q], p_at[q] = _query_scores(ranks[:, q], ok, junk, kappas)
        valid = ~np.isnan(aps)
        mean_ap = float(aps[valid].mean()) if valid.any() else float("nan")
        mp_at = p_at[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
        results[protocol] = {"map": mean_ap, "aps": aps, "mp_at": mp_at, "p_at": p_at}
    return results


def gldv2_map_at_k(predictions, solution, k=100):
    """Google Landmarks v2 retrieval mAP@k of `predictions` (query id -> ranked index ids) against `solution` (query
    id -> true index ids): the mean over the solution's queries (0 without predictions; others ignored) of sum_{i <= k}
    precision@i * rel(i) / min(#truth, k) at 1-based rank i, a repeated prediction keeping its rank but never a hit."""
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


# --------------------------------------------------------------------------------- the field's benchmarks, scored
BENCHMARK_TILE_ROWS = 8192  # database rows scored at once: 1,129 GLDv2 queries x 8,192 rows is 37 MB of scores


def ranked_database(queries, database, device=None, queries_at_once: int = 16) -> np.ndarray:
    """Revisitop's `ranks`: (database x queries) indices, best cosine (then smaller index) first; few queries a pass."""
    device = torch.device(device) if device is not None else utils.default_device()
    database = utils.normalized_features(database, device, 'database features')
    queries = utils.normalized_features(queries, device, 'query features')
    ranks = np.empty((database.shape[0], queries.shape[0]), dtype=np.int64)
    for first in range(0, queries.shape[0], queries_at_once):
        scores = queries[first:first + queries_at_once] @ database.T
        ranks[:, first:first + queries_at_once] = scores.sort(dim=1, descending=True, stable=True).indices.T.cpu()
    return ranks


def top_k_neighbours(queries, database, k: int = 100, device=None, tile_rows: int = BENCHMARK_TILE_ROWS):
    """(indices, cosines), each (queries x k), of every query's k best database rows, best first, by a running top-k
    over `tile_rows` rows of `database` (an array, a memory-mapped .npy or a tensor) at a time."""
    device = torch.device(device) if device is not None else utils.default_device()
    queries = utils.normalized_features(queries, device, 'query features')
    best_scores = torch.empty(queries.shape[0], 0, device=device)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.int64, device=device)
    for first in range(0, len(database), tile_rows):
        scores = queries @ utils.normalized_features(database[first:first + tile_rows], device, 'database features').T
        tile_best = scores.topk(min(k, scores.shape[1]), dim=1)  # the tile's own best first: small to merge
        candidates = torch.cat([best_scores, tile_best.values], dim=1)
        best_scores, order = candidates.topk(min(k, candidates.shape[1]), dim=1)
        best_indices = torch.cat([best_indices, tile_best.indices + first], dim=1).gather(1, order)
    return best_indices.cpu().numpy(), best_scores.cpu().numpy()


def revisitop_figures(queries, database, gnd, device=None) -> dict:
    """{protocol: {'map', 'mp_at'}} of revisitop_map for the features' ranking (mP at 1, 5 and 10)."""
    return {protocol: {'map': figures['map'], 'mp_at': figures['mp_at'].tolist()}
            for protocol, figures in revisitop_map(ranked_database(queries, database, device), gnd).items()}


def gldv2_figures(queries, database, images, device=None) -> dict:
    """GLDv2 retrieval mAP@100 of the features' 100 best index images: {'private', 'public', 'all'}."""
    best, _ = top_k_neighbours(queries, database, k=100, device=device, tile_rows=BENCHMARK_TILE_ROWS)
    predictions = {query: [images.database_ids[index] for index in row]
                   for query, row in zip(images.query_ids, best.tolist())}
    figures = {'all': gldv2_map_at_k(predictions, images.solution)}
    for usage in ('Private', 'Public'):
        part = {query: truth for query, truth in images.solution.items() if images.usage[query] == usage}
        figures[usage.lower()] = gldv2_map_at_k(predictions, part) if part else math.nan
    return figures


def benchmark_report(images, student: tuple, teacher: tuple | None = None, device=None) -> dict:
    """`images`' figures of the student's (query, database) features and, with the teacher's, 'teacher' and 'cross'."""
    models = {'student': student}
    if teacher is not None:
        models.update(teacher=teacher, cross=(student[0], teacher[1]))
    return {name: revisitop_figures(queries, database, images.gnd, device) if images.gnd is not None
            else gldv2_figures(queries, database, images, device) for name, (queries, database) in models.items()}


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


def run_benchmark(images: BenchmarkImages, backbones: dict, identities: dict, loaders: dict, feature_dir: str, *,
                  device: torch.device, amp: str, rank: int, logger):
    """Score `backbones` ({'student', optionally 'teacher'}) on `loaders`' images ({'queries', 'database'}), features
    kept in `feature_dir` under what they are of (`identities`, the images); on rank 0, record.txt and results.json."""
    digests = {part: _images_digest(loader.dataset) for part, loader in loaders.items()}
    features = {name: tuple(kept_features(feature_dir, dict(identities[name], images=digests[part], part=part),
                                          backbone, loader, device=device, amp=amp, rank=rank, logger=logger)
                            for part, loader in loaders.items())
                for name, backbone in backbones.items()}
    if rank != 0:
        return
    report = benchmark_report(images, features['student'], features.get('teacher'), device)
    for line in benchmark_lines(images.name, report):
        logger.info(line)
    logger.result(images.name, report)


def kept_features(feature_dir: str, identity: dict, backbone, loader, *, device, amp: str, rank: int, logger):
    """`backbone`'s features of `loader`'s images: read on rank 0 (None elsewhere) from the store of `identity` when
    an earlier run left it whole, else extracted on every process and stored by rank 0 (all take the same branch)."""
    shape = (1, len(loader.dataset), backbone.feature_dim)
    name = utils.text_digest(json.dumps(identity, sort_keys=True))[:16]
    dataset = loader.dataset
    store = feature_store.FeatureStore(os.path.join(feature_dir, name), identity, shape,
                                       images=[dataset.paths[index] for index in range(len(dataset))] if rank == 0
                                       else None)
    if utils.on_rank_zero(rank, store.whole):
        logger.info(f'features read from {store.path} (saved by an earlier run)')
        return store.open()[0] if rank == 0 else None
    if rank == 0 and store.manifest() is not None:
        logger.info(f'features saved in {store.path} are damaged or of images changed on disk since: extracting '
                    'again')
    features = evaluation.features_of(backbone, loader, device, amp, rank, logger)
    utils.on_rank_zero(rank, lambda: store.create(features.numpy()[None]))
    return features


def _images_digest(dataset: datasets.ImageDataset) -> str:
    """The digest of a data set's image paths and boxes."""
    return utils.text_digest('\n'.join(f'{dataset.paths[index]} {dataset.boxes.get(index)}'
                                       for index in range(len(dataset))))
