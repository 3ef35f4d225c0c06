"""Cases built so that a wrong reading gives a known other answer: benchmarks whose easy, hard, junk and distractor
images rank in a designed order (by a stand-in backbone whose feature is the image's mean colour), a database spread
over several tiles, a student whose cross figures differ from its own, pickles that reduce to builtins, a checksum
over several blocks. Every expected figure is worked out by hand in the comments."""
import json
import os
import pickle
import zlib

import numpy as np
import pytest
import torch
from conftest import classifier_file, run_main
from PIL import Image

import datasets  # noqa: E402
import evaluation  # noqa: E402
import feature_store  # noqa: E402
import helpers  # noqa: E402
import retrieval  # noqa: E402
import utils  # noqa: E402

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4',
         '--backbone_class', 'Resnet12']


class MeanColour(torch.nn.Module):
    """A stand-in backbone: the (normalised BGR) image's mean colour, its channels permuted by `order`."""
    feature_dim = 3

    def __init__(self, order=(0, 1, 2)):
        super().__init__()
        self.order = list(order)

    def forward(self, images):
        return images.float().mean(dim=(2, 3))[:, self.order]


def coloured_jpeg(path, feature, size=(64, 64), box=None, box_feature=None):
    """A JPEG whose normalised BGR mean is `feature` (inside `box`: `box_feature`, the rest `feature`)."""
    def pixels_of(target):
        bgr = np.asarray(target) * np.asarray(datasets.PIXEL_STD_BGR) + np.asarray(datasets.PIXEL_MEAN_BGR)
        return np.round(bgr[::-1] * 255).astype(np.uint8)  # RGB for PIL
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = pixels_of(feature)
    if box:
        left, top, right, bottom = box
        pixels[top:bottom, left:right] = pixels_of(box_feature)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)


@pytest.fixture
def mean_colour_models(monkeypatch, tmp_path):
    """Student and teacher files whose backbones are MeanColour: the student's as it is, the teacher's with its first
    two channels swapped."""
    student, teacher = (classifier_file(tmp_path / f'{name}.pth', seed=seed) for seed, name in ((1, 's'), (2, 't')))
    orders = {student: (0, 1, 2), teacher: (1, 0, 2)}
    monkeypatch.setattr(helpers, 'backbone_of', lambda args, path, name=None: MeanColour(orders[path]))
    return student, teacher


# The query's box holds Q; the database: J (junk), E (easy), D (in no list), H (hard). Cosines to Q: J 1, E 0.958,
# D 0.819, H 0.640: the ranking J, E, D, H. Outside its box the query is blue (0, 0, 1): ignoring the box moves it.
Q, J, E, D, H = (1, 0, 0), (1, 0, 0), (1, 0.3, 0), (1, 0.7, 0), (1, 1.2, 0)


def designed_revisitop(root):
    for name, feature in (('junk', J), ('easy', E), ('distractor', D), ('hard', H)):
        coloured_jpeg(os.path.join(root, 'jpg', f'{name}.jpg'), feature)
    coloured_jpeg(os.path.join(root, 'jpg', 'query.jpg'), (0, 0, 1), size=(96, 96), box=(16, 16, 80, 80),
                  box_feature=Q)
    gnd = [{'bbx': [24.0, 24.0, 72.0, 72.0], 'easy': [1], 'hard': [3], 'junk': [0]}]
    with open(os.path.join(root, 'gnd_roxford5k.pkl'), 'wb') as handle:
        pickle.dump({'imlist': ['junk', 'easy', 'distractor', 'hard'], 'qimlist': ['query'], 'gnd': gnd}, handle)


def benchmark_results(save_dir, name):
    directory, = [entry for entry in os.listdir(save_dir) if entry.startswith(f'{name}-')]
    with open(os.path.join(save_dir, directory, 'results.json'), encoding='utf-8') as handle:
        return json.load(handle)[name]


def test_revisitop_protocols_use_easy_hard_and_junk_as_given_and_cross_uses_the_teachers_database(
        mean_colour_models, tmp_path):
    designed_revisitop(tmp_path / 'roxford5k')
    student, teacher = mean_colour_models
    run_main(SMALL + ['--test_only', '--init_weights', student, '--teacher_init_weights', teacher,
                      '--teacher_backbone_class', 'Resnet12', '--benchmark', 'roxford5k', '--benchmark_root',
                      str(tmp_path / 'roxford5k'), '--save_dir', str(tmp_path / 'runs')])
    figures = benchmark_results(tmp_path / 'runs', 'roxford5k')
    # Easy: positives E, junk J and H -> E first: AP 1. Medium: positives E and H, junk J -> E, D, H: the k-th positive
    # at 0-based rank r adds (k / r + (k + 1) / (r + 1)) / 2 / 2: (1 + 1) / 4 + (1/2 + 2/3) / 4 = 0.791667. Hard:
    # positive H, junk J and E -> D, H: (0 + 1/2) / 2 = 0.25. mP@1 on Hard: D comes first, 0.
    # (Easy and hard swapped would give 0.25 and 1.0; junk dropped, 0.25, 0.3333 and 0.1667.)
    for model in ('student', 'teacher'):  # the teacher's swap is applied to its queries and database alike
        assert [figures[model][protocol]['map'] for protocol in ('easy', 'medium', 'hard')] == pytest.approx(
            [1.0, 0.791667, 0.25], abs=1e-5)
    assert figures['student']['hard']['mp_at'] == pytest.approx([0.0, 0.5, 0.5])
    # cross: the student's query Q against the teacher's database, whose first two channels are swapped: cosines
    # J 0, E 0.287, D 0.573, H 0.768 -> H, D, E, J. Easy: E after D (H junk) -> 0.25; medium: H, D, E -> (1 + 1) / 4
    # + (1/2 + 2/3) / 4 = 0.791667; hard: H first -> 1.0
    assert [figures['cross'][protocol]['map'] for protocol in ('easy', 'medium', 'hard')] == pytest.approx(
        [0.25, 0.791667, 1.0], abs=1e-5)


def designed_gldv2(root):
    """Two queries, six index images; cosines to q1 (1, 0, 0): i4 1, i3 0.90, i1 0.80, the rest 0; to q2 (0, 0.3, 1):
    i5 1, i2 0.958, then the rest."""
    index = {'i0': (0, 1, 0), 'i1': (1, 0.75, 0), 'i2': (0, 0, 1), 'i3': (1, 0.48, 0), 'i4': (1, 0, 0),
             'i5': (0, 0.3, 1)}
    ids = {name: f'{number}ab{number}0000{name}' for number, name in enumerate(index)}
    for name, feature in index.items():
        coloured_jpeg(os.path.join(root, 'index', *ids[name][:3], f'{ids[name]}.jpg'), feature)
    queries = {'q1': ('aa1q1', (1, 0, 0)), 'q2': ('bb2q2', (0, 0.3, 1))}
    for image, feature in queries.values():
        coloured_jpeg(os.path.join(root, 'test', *image[:3], f'{image}.jpg'), feature)
    with open(os.path.join(root, 'index.csv'), 'w', encoding='utf-8') as handle:
        handle.write('id\n' + '\n'.join(ids.values()) + '\n')
    with open(os.path.join(root, 'test.csv'), 'w', encoding='utf-8') as handle:
        handle.write('id\naa1q1\nbb2q2\n')
    with open(os.path.join(root, 'retrieval_solution_v2.1.csv'), 'w', encoding='utf-8') as handle:
        handle.write(f"id,images,Usage\naa1q1,{ids['i1']} {ids['i4']},Private\nbb2q2,{ids['i2']},Public\n")


def test_gldv2_over_several_tiles_ranks_as_one_tile_would(mean_colour_models, tmp_path, monkeypatch):
    designed_gldv2(tmp_path / 'gldv2')
    monkeypatch.setattr(retrieval, 'BENCHMARK_TILE_ROWS', 2)  # three tiles of the six index images
    run_main(SMALL + ['--test_only', '--init_weights', mean_colour_models[0], '--benchmark', 'gldv2',
                      '--benchmark_root', str(tmp_path / 'gldv2'), '--save_dir', str(tmp_path / 'runs')])
    figures = benchmark_results(tmp_path / 'runs', 'gldv2')['student']
    # q1 (Private), truth i1 and i4: hits at ranks 1 (i4) and 3 (i1): (1/1 + 2/3) / 2 = 0.83333; q2 (Public), truth
    # i2: hit at rank 2: 1/2
    assert figures == pytest.approx({'private': 0.833333, 'public': 0.5, 'all': 0.666667}, abs=1e-5)


def test_saved_benchmark_features_are_not_reused_at_another_size_or_precision(mean_colour_models, tmp_path, capsys):
    designed_revisitop(tmp_path / 'roxford5k')
    argv = SMALL + ['--test_only', '--init_weights', mean_colour_models[0], '--benchmark', 'roxford5k',
                    '--benchmark_root', str(tmp_path / 'roxford5k'), '--save_dir', str(tmp_path / 'runs')]
    run_main(argv)
    for again, reused in (([], True), (['--img_size', '64'], False), (['--amp', 'bf16'], False)):
        capsys.readouterr()
        run_main(argv + again)
        assert ('(saved by an earlier run)' in capsys.readouterr().out) == reused, again


def test_the_cross_figures_score_the_students_queries_against_the_teachers_gallery():
    # four images of two landmarks; the student separates them, the teacher's gallery holds each landmark's images
    # where the student puts the other's: every cross positive pair scores 0, every negative 1
    student = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    teacher = torch.tensor([[0.0, 1], [0, 1], [1, 0], [1, 0]])
    labels = np.array([0, 0, 1, 1])
    report = evaluation.test_report(student, labels, None, teacher)
    assert report['student']['coarse'][0] == 1.0 and report['student']['coarse_nn_accuracy'] == 1.0
    assert report['cross']['coarse'][0] == 0.0 and report['cross']['coarse_nn_accuracy'] == 0.0
    assert report['teacher']['coarse'][0] == 1.0


class BuiltinCall:
    """Unpickling this calls a builtin (`eval` of an expression that writes a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize('save', ['pickle', 'numpy'])
def test_a_pickle_reducing_to_a_builtin_is_refused_and_never_run(tmp_path, save):
    marker, path = tmp_path / 'ran', tmp_path / 'map.pkl'
    if save == 'pickle':
        with open(path, 'wb') as handle:
            pickle.dump({0: BuiltinCall(marker)}, handle)
    else:
        with open(path, 'wb') as handle:
            np.save(handle, np.array([BuiltinCall(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match='refusing to load builtins.eval'):
        utils.load_plain_data(str(path))
    assert not marker.exists()


def test_the_checksum_covers_every_block():
    data = np.random.default_rng(0).integers(0, 256, 3500, dtype=np.uint8).tobytes()
    import tempfile
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        assert feature_store.checksum(handle.name, block_size=1000) == zlib.crc32(data)
