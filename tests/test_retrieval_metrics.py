"""evaluation.py's retrieval metrics against the outputs of the field's reference implementations (revisitop's
compute_map, the GLDv2 challenge's mAP@100 and GAP) on a drawn case, and against cases computed by hand."""
import json
import os

import numpy as np
import pytest

import retrieval  # noqa: E402
from evaluation import global_average_precision
from retrieval import gldv2_map_at_k, revisitop_map

DATA = os.path.join(os.path.dirname(__file__), 'data', 'retrieval_metrics_case.npz')
PROTOCOLS = ('easy', 'medium', 'hard')


@pytest.fixture(scope='module')
def case():
    with np.load(DATA) as z:
        arrays = {name: z[name] for name in z.files}
    arrays['expected'] = json.loads(str(arrays['expected']))
    return arrays


# ----------------------------------------------------------------------------- reference case

@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_revisitop_matches_reference_from_ranks(case, protocol):
    exp = case['expected']
    got = revisitop_map(case['ranks'], exp['gnd'], exp['kappas'])[protocol]
    ref = exp['revisitop'][protocol]
    ref_aps = np.array(ref['aps'], dtype=np.float64)      # JSON NaN -> float nan
    ref_p_at = np.array(ref['p_at'], dtype=np.float64)
    assert abs(got['map'] - ref['map']) <= 1e-12
    np.testing.assert_array_equal(np.isnan(got['aps']), np.isnan(ref_aps))
    np.testing.assert_allclose(got['aps'], ref_aps, rtol=0, atol=1e-12)  # NaNs compared equal
    np.testing.assert_allclose(got['mp_at'], ref['mp_at'], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isnan(got['p_at']), np.isnan(ref_p_at))
    np.testing.assert_allclose(got['p_at'], ref_p_at, rtol=0, atol=1e-12)


def test_revisitop_query_without_easy_positive_is_left_out(case):
    exp = case['expected']
    got = revisitop_map(case['ranks'], exp['gnd'], exp['kappas'])
    assert len(exp['gnd'][4]['easy']) == 0
    assert np.isnan(got['easy']['aps'][4]) and np.isnan(got['easy']['p_at'][4]).all()
    assert not np.isnan(got['medium']['aps'][4]) and not np.isnan(got['hard']['aps'][4])
    assert got['easy']['map'] == pytest.approx(np.nanmean(got['easy']['aps']), abs=1e-15)


@pytest.mark.parametrize('protocol', PROTOCOLS)
def test_revisitop_from_features(case, protocol):
    scores = case['db'] @ case['queries'].T                      # float32 cosine
    assert scores.dtype == np.float32
    ranks = np.argsort(-scores, axis=0, kind='stable')
    exp = case['expected']
    got = revisitop_map(ranks, exp['gnd'], exp['kappas'])[protocol]
    assert abs(got['map'] - exp['revisitop'][protocol]['map']) <= 2e-3


def _nearest(queries, index):
    scores = queries @ index.T                                   # float32 cosine, queries x index
    assert scores.dtype == np.float32
    return scores, np.argsort(-scores, axis=1, kind='stable')


def test_gldv2_map_at_100_matches_reference(case):
    g = case['expected']['gldv2']
    _, order = _nearest(case['gldv2_queries'], case['index'])
    index_ids = np.array(g['index_ids'])
    predictions = {q: list(index_ids[order[i, :100]]) for i, q in enumerate(g['query_ids'])}
    got = gldv2_map_at_k(predictions, g['retrieval_solution'], k=100)
    assert abs(got - g['map_at_100']) <= 1e-12


def test_gap_matches_reference(case):
    g = case['expected']['gldv2']
    scores, _ = _nearest(case['gldv2_queries'], case['index'])
    labels = np.array(g['index_labels'])
    labelled = labels != -1
    scores, labels = scores[:, labelled], labels[labelled]
    best = np.argmax(scores, axis=1)
    predictions = {q: {'class': int(labels[best[i]]), 'score': float(scores[i, best[i]])}
                   for i, q in enumerate(g['query_ids'])}
    got = global_average_precision(predictions, g['recognition_solution'])
    assert abs(got - g['gap']) <= 1e-12


# ------------------------------------------------- the benchmarks' scoring (ranking, running top-100) on the case

def test_the_benchmark_ranking_is_the_references(case):
    ranks = retrieval.ranked_database(case['queries'], case['db'], device='cpu', queries_at_once=5)
    # the reference ranked in float32 too; only the few near-tied pairs may be swapped
    assert ranks.shape == case['ranks'].shape
    assert (ranks == case['ranks']).mean() > 0.99
    figures = retrieval.revisitop_figures(case['queries'], case['db'], case['expected']['gnd'], device='cpu')
    for protocol in PROTOCOLS:
        reference = case['expected']['revisitop'][protocol]
        assert abs(figures[protocol]['map'] - reference['map']) <= 2e-3
        np.testing.assert_allclose(figures[protocol]['mp_at'], reference['mp_at'], rtol=0, atol=2e-3)


@pytest.mark.parametrize('tile_rows', [37, 800])
def test_the_running_top_100_gives_the_references_map(case, tile_rows):
    g = case['expected']['gldv2']
    best, scores = retrieval.top_k_neighbours(case['gldv2_queries'], case['index'], k=100, device='cpu',
                                              tile_rows=tile_rows)
    full = case['gldv2_queries'] @ case['index'].T
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :100], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, best, axis=1), scores, rtol=0, atol=1e-6)
    solution = g['retrieval_solution']
    usage = {query: 'Private' if n % 2 else 'Public' for n, query in enumerate(solution)}
    images = retrieval.BenchmarkImages('gldv2', [], [], solution=solution, query_ids=g['query_ids'],
                                       database_ids=g['index_ids'], usage=usage)
    figures = retrieval.gldv2_figures(case['gldv2_queries'], case['index'], images, device='cpu')
    assert abs(figures['all'] - g['map_at_100']) <= 2e-3
    private = {query: truth for n, (query, truth) in enumerate(solution.items()) if n % 2}
    assert abs(figures['private'] * len(private) + figures['public'] * (len(solution) - len(private))
               - g['map_at_100'] * len(solution)) <= 2e-3 * len(solution)


# ----------------------------------------------------------------------------- revisitop by hand

def _hand_case():
    # query 0: ranking 3 0 5 1 2 4; easy {0, 1}, hard {2}, junk {3}
    # query 1: ranking 1 0 2 3 4 5; no easy, hard {1}, no junk
    ranks = np.array([[3, 0, 5, 1, 2, 4], [1, 0, 2, 3, 4, 5]]).T
    gnd = [{'easy': [0, 1], 'hard': [2], 'junk': [3]},
           {'easy': [], 'hard': [1], 'junk': []}]
    return ranks, gnd


def test_revisitop_hand_easy_junk_before_positive():
    ranks, gnd = _hand_case()
    r = revisitop_map(ranks, gnd)['easy']
    # ok {0, 1} at positions 1, 3; junk {3, 2} at positions 0, 4.
    # Junk 3 precedes both positives: junk-free positions 0, 2.
    # AP = 1/2 * [(1 + 1)/2 + (1/2 + 2/3)/2] = 1/2 + 7/24 = 19/24
    assert r['aps'][0] == pytest.approx(19 / 24, abs=1e-15)
    # 1-based positions 1, 3: P@1 = 1/1; P@5: kq = min(3, 5) = 3 -> 2/3; P@10 likewise.
    np.testing.assert_allclose(r['p_at'][0], [1, 2 / 3, 2 / 3], rtol=0, atol=1e-15)
    # query 1 has no easy image: NaN, left out of the means
    assert np.isnan(r['aps'][1]) and np.isnan(r['p_at'][1]).all()
    assert r['map'] == pytest.approx(19 / 24, abs=1e-15)
    np.testing.assert_allclose(r['mp_at'], [1, 2 / 3, 2 / 3], rtol=0, atol=1e-15)


def test_revisitop_hand_medium_and_hard():
    ranks, gnd = _hand_case()
    out = revisitop_map(ranks, gnd)
    med, hard = out['medium'], out['hard']
    # medium q0: ok {0, 1, 2} at 1, 3, 4, junk {3} at 0 -> junk-free 0, 2, 3.
    # AP = 1/3 * [1 + (1/2 + 2/3)/2 + (2/3 + 3/4)/2] = 24/72 + 14/72 + 17/72 = 55/72
    assert med['aps'][0] == pytest.approx(55 / 72, abs=1e-15)
    # 1-based 1, 3, 4: P@1 = 1; P@5: kq = 4 -> 3/4; P@10: kq = 4 -> 3/4
    np.testing.assert_allclose(med['p_at'][0], [1, 0.75, 0.75], rtol=0, atol=1e-15)
    # medium q1: ok {1} first -> AP 1, kq = 1 for every kappa -> precisions 1
    assert med['aps'][1] == 1.0
    assert med['map'] == pytest.approx((55 / 72 + 1) / 2, abs=1e-15)
    np.testing.assert_allclose(med['mp_at'], [1, 0.875, 0.875], rtol=0, atol=1e-15)
    # hard q0: ok {2} at 4, junk {3, 0, 1} at 0, 1, 3 -> junk-free position 1.
    # AP = (0/1 + 1/2)/2 = 1/4; 1-based 2: P@1 = 0/1, P@5 = P@10 = 1/2 (kq = 2)
    assert hard['aps'][0] == pytest.approx(0.25, abs=1e-15)
    np.testing.assert_allclose(hard['p_at'][0], [0, 0.5, 0.5], rtol=0, atol=1e-15)
    assert hard['map'] == pytest.approx((0.25 + 1) / 2, abs=1e-15)
    np.testing.assert_allclose(hard['mp_at'], [0.5, 0.75, 0.75], rtol=0, atol=1e-15)


def test_revisitop_truncated_ranking():
    # Only 2 of 6 images ranked. Query 0: easy {0, 1}; 0 at position 1, 1 not ranked.
    # AP = 1/2 * (0/1 + 1/2)/2 = 1/8 (the divisor is the 2 easy images, not the 1 found).
    # Query 1: its positive 4 is not in the ranking: AP 0, precisions 0.
    ranks = np.array([[3, 0], [3, 5]]).T
    gnd = [{'easy': [0, 1], 'hard': [], 'junk': []}, {'easy': [4], 'hard': [], 'junk': []}]
    r = revisitop_map(ranks, gnd, kappas=(1, 2))['easy']
    np.testing.assert_allclose(r['aps'], [1 / 8, 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r['p_at'], [[0, 0.5], [0, 0]], rtol=0, atol=1e-15)
    assert r['map'] == pytest.approx(1 / 16, abs=1e-15)


@pytest.mark.parametrize('bad_gnd, match', [
    ([{'easy': [0], 'hard': []}, {'easy': [], 'hard': [1], 'junk': []}], r"gnd\[0\]"),
    ([{'easy': [0], 'hard': [], 'junk': []}, [[0], [1], []]], r"gnd\[1\]"),
    ([{'easy': [0], 'hard': [], 'junk': []}], "2 query columns"),
])
def test_revisitop_rejects_bad_gnd(bad_gnd, match):
    ranks, _ = _hand_case()
    with pytest.raises(ValueError, match=match):
        revisitop_map(ranks, bad_gnd)


@pytest.mark.parametrize('bad_ranks', [np.arange(6), np.zeros((6, 2)), np.zeros((2, 6, 1), int)])
def test_revisitop_rejects_bad_ranks(bad_ranks):
    _, gnd = _hand_case()
    with pytest.raises(ValueError, match="ranks"):
        revisitop_map(bad_ranks, gnd)


def test_revisitop_rejects_bad_kappa():
    ranks, gnd = _hand_case()
    with pytest.raises(ValueError, match="kappas"):
        revisitop_map(ranks, gnd, kappas=(0, 5))


# ----------------------------------------------------------------------------- GLDv2 mAP@k by hand

SOLUTION = {'q1': ['a', 'b', 'c'], 'q2': ['x'], 'q3': ['y']}
PREDICTIONS = {'q1': ['a', 'z', 'a', 'b'], 'q2': ['w', 'x'], 'q4': ['y']}


def test_gldv2_hand_repeated_prediction_and_missing_query():
    # q1: a hit at 1 -> 1/1; z miss; a repeated at 3: not a hit but takes rank 3;
    #     b hit at 4 -> 2/4. AP = (1 + 1/2) / min(3, 100) = 1/2
    #     (counting the repeat would give (1 + 2/3 + 3/4)/3 instead).
    # q2: x at 2 -> 1/2, / min(1, 100) -> 1/2.  q3: no prediction -> 0.
    # q4 is not in the solution: ignored. mAP = (1/2 + 1/2 + 0) / 3 = 1/3
    assert gldv2_map_at_k(PREDICTIONS, SOLUTION) == pytest.approx(1 / 3, abs=1e-15)


def test_gldv2_hand_cutoff_k():
    # k = 3: q1 keeps a, z, a -> 1 / min(3, 3) = 1/3; q2 1/2; q3 0 -> (1/3 + 1/2) / 3 = 5/18
    assert gldv2_map_at_k(PREDICTIONS, SOLUTION, k=3) == pytest.approx(5 / 18, abs=1e-15)
    # 5 ground-truth images, k = 2, both predictions right: (1/1 + 2/2) / min(5, 2) = 1
    assert gldv2_map_at_k({'q': [1, 2, 9]}, {'q': [1, 2, 3, 4, 5]}, k=2) == 1.0


@pytest.mark.parametrize('args, match', [
    (([], SOLUTION), "dicts"),
    ((PREDICTIONS, {}), "empty"),
    ((PREDICTIONS, {'q1': []}), "no ground-truth"),
    ((PREDICTIONS, SOLUTION, 0), "positive integer"),
])
def test_gldv2_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        gldv2_map_at_k(*args)


# ----------------------------------------------------------------------------- GAP by hand

def test_gap_hand_non_landmark_query_counts_in_precision():
    solution = {'q1': [1], 'q2': [2], 'q3': [], 'q4': [4]}          # M = 3
    predictions = {'q1': {'class': 1, 'score': 0.9},                  # right: P = 1/1
                   'q3': {'class': 5, 'score': 0.8},                  # non-landmark: wrong
                   'q2': {'class': 2, 'score': 0.7},                  # right: P = 2/3
                   'q4': {'class': 9, 'score': 0.6}}                  # wrong
    # GAP = (1 + 2/3) / 3 = 5/9; without q3's prediction it would be (1 + 1) / 3
    assert global_average_precision(predictions, solution) == pytest.approx(5 / 9, abs=1e-15)
    del predictions['q3']
    assert global_average_precision(predictions, solution) == pytest.approx(2 / 3, abs=1e-15)


def test_gap_hand_tie_broken_by_query_id_and_unknown_query_ignored():
    solution = {'a': [1], 'b': [2]}
    # equal scores: 'a' (wrong) comes before 'b' (right) -> GAP = (1/2) / 2 = 1/4
    # ('zz' is not in the solution and is ignored despite its top score)
    predictions = {'b': {'class': 2, 'score': 0.5}, 'a': {'class': 3, 'score': 0.5},
                   'zz': {'class': 2, 'score': 1.0}}
    assert global_average_precision(predictions, solution) == pytest.approx(0.25, abs=1e-15)


def test_gap_without_landmark_queries_is_zero():
    assert global_average_precision({'q': {'class': 1, 'score': 1.0}}, {'q': []}) == 0.0


def test_gap_rejects_bad_prediction():
    with pytest.raises(ValueError, match=r"predictions\['q'\]"):
        global_average_precision({'q': {'class': 1}}, {'q': [1]})
    with pytest.raises(ValueError, match="dicts"):
        global_average_precision([('q', 1)], {'q': [1]})


# ----------------------------------------------------------------------------- GAP of the suite's test list

def test_nearest_neighbour_gap_by_hand():
    from evaluation import nearest_neighbour_gap
    # images 0..3, labels 0 0 1 1; each predicts its neighbour's label: 0 -> 1 (label 0, right, 0.9),
    # 1 -> 2 (label 1, wrong, 0.8), 2 -> 3 (label 1, right, 0.7), 3 -> 0 (label 0, wrong, 0.6).
    # In score order: right, wrong, right, wrong: GAP = (1/1 + 2/3) / 4 = 5/12
    gap = nearest_neighbour_gap(np.array([1, 2, 3, 0]), np.array([0.9, 0.8, 0.7, 0.6]), [0, 0, 1, 1])
    assert gap == pytest.approx(5 / 12, abs=1e-15)


def test_test_report_gives_the_gap_of_each_grain():
    from evaluation import evaluate_features
    # unit vectors at angles 0, 10, 100, 115 degrees: neighbours 0 <-> 1 (cos 10), 2 <-> 3 (cos 15)
    angles = np.radians([0.0, 10.0, 100.0, 115.0])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    result = evaluate_features(features, coarse_labels=[0, 0, 1, 1], fine_labels=[0, 1, 2, 2], device='cpu')
    assert result['coarse_gap'] == pytest.approx(1.0)  # every neighbour shares the coarse label
    # fine: images 0, 1 (cos 10 degrees, the highest scores) are wrong, 2, 3 (cos 15) right: (1/3 + 2/4) / 4
    assert result['fine_gap'] == pytest.approx((1 / 3 + 2 / 4) / 4, abs=1e-12)
