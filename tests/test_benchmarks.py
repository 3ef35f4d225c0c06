"""--benchmark end to end: small data sets in revisitop's and GLDv2's own layouts, scored through main.py.

The images are solid colours, one colour a landmark, so that every model gives the images of one landmark the very
same feature: each query's own landmark ranks first, and every figure is exactly 1.0 whatever the weights, unless
the suite reads the layout, the crop or the ground truth wrongly."""
import glob
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, classifier_file, run_main
from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4',
         '--backbone_class', 'Resnet12']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp('weights')
    return classifier_file(folder / 'student.pth', seed=1), classifier_file(folder / 'teacher.pth', seed=2)


def solid_jpeg(path, colour, size=(64, 48), region=None, region_colour=None):
    """A JPEG of one colour, or of `region_colour` inside `region` (8-pixel aligned, so that its blocks stay solid)
    and `colour` around it."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = colour
    if region:
        left, top, right, bottom = region
        pixels[top:bottom, left:right] = region_colour
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)


def revisitop_set(root) -> list[dict]:
    """roxford5k with 12 database images (3 of each colour) and 4 queries whose bbx holds their landmark's colour
    while the rest of the image is another landmark's: a model that ignores the bbx ranks the wrong images first."""
    images = [f'db_{landmark}_{view}' for landmark in range(4) for view in range(3)]
    for index, name in enumerate(images):
        solid_jpeg(os.path.join(root, 'jpg', f'{name}.jpg'), COLOURS[index // 3], size=(48 + 8 * (index % 3), 56))
    gnd, queries = [], []
    for landmark in range(4):
        queries.append(f'query_{landmark}')
        solid_jpeg(os.path.join(root, 'jpg', f'query_{landmark}.jpg'), COLOURS[(landmark + 1) % 4], size=(96, 96),
                   region=(16, 16, 80, 80), region_colour=COLOURS[landmark])
        own = [3 * landmark, 3 * landmark + 1, 3 * landmark + 2]
        gnd.append({'bbx': [24.0, 24.0, 72.0, 72.0], 'easy': own[:2], 'hard': own[2:],
                    'junk': [3 * ((landmark + 2) % 4)]})
    with open(os.path.join(root, 'gnd_roxford5k.pkl'), 'wb') as handle:
        pickle.dump({'imlist': images, 'qimlist': queries, 'gnd': gnd}, handle)
    return gnd


def gldv2_set(root):
    """12 index images (3 of each colour), 4 landmark queries (2 Private, 2 Public) and 2 Ignored test images."""
    index_ids = [f'{landmark}{view}a{landmark}ff00{view}' for landmark in range(4) for view in range(3)]
    for number, image in enumerate(index_ids):
        solid_jpeg(os.path.join(root, 'index', *image[:3], f'{image}.jpg'), COLOURS[number // 3])
    test_ids = [f'e{landmark}c9{landmark}0b' for landmark in range(6)]
    for landmark, image in enumerate(test_ids):
        solid_jpeg(os.path.join(root, 'test', *image[:3], f'{image}.jpg'), COLOURS[landmark % 4], size=(40, 40))
    rows = [f'{image},{" ".join(index_ids[3 * landmark:3 * landmark + 3])},{"Private" if landmark < 2 else "Public"}'
            for landmark, image in enumerate(test_ids[:4])]
    rows += [f'{image},None,Ignored' for image in test_ids[4:]]
    write_text(os.path.join(root, 'index.csv'), 'id\n' + '\n'.join(index_ids) + '\n')
    write_text(os.path.join(root, 'test.csv'), 'id\n' + '\n'.join(test_ids) + '\n')
    write_text(os.path.join(root, 'retrieval_solution_v2.1.csv'), 'id,images,Usage\n' + '\n'.join(rows) + '\n')


def write_text(path, text):
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write(text)


def benchmark_argv(weights, save_dir, benchmark, root, *extra):
    return SMALL + ['--test_only', '--init_weights', weights[0], '--teacher_backbone_class', 'Resnet12',
                    '--teacher_init_weights', weights[1], '--benchmark', benchmark, '--benchmark_root', str(root),
                    '--save_dir', str(save_dir), *extra]


def results_of(save_dir, benchmark) -> dict:
    path, = glob.glob(os.path.join(str(save_dir), f'{benchmark}-student-*', 'results.json'))
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)[benchmark]


def record_of(save_dir, benchmark) -> str:
    path, = glob.glob(os.path.join(str(save_dir), f'{benchmark}-student-*', 'record.txt'))
    with open(path, encoding='utf-8') as handle:
        return handle.read()


def test_revisitop_queries_are_cropped_to_their_bbx_and_score_one(weights, tmp_path):
    revisitop_set(tmp_path / 'roxford5k')
    run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k'))
    report = results_of(tmp_path / 'runs', 'roxford5k')
    assert set(report) == {'student', 'teacher', 'cross'}
    for model in ('student', 'teacher'):
        for protocol in ('easy', 'medium', 'hard'):
            assert report[model][protocol]['map'] == 1.0
            assert report[model][protocol]['mp_at'] == [1.0, 1.0, 1.0]
    # the student's queries against the teacher's database: other weights, so other features; a figure all the same
    assert 0.0 <= report['cross']['medium']['map'] <= 1.0
    record = record_of(tmp_path / 'runs', 'roxford5k')
    assert 'roxford5k: 4 queries, 12 database images' in record
    assert 'roxford5k student: mAP E 100.00, M 100.00, H 100.00; mP@1/5/10 E 100.00/100.00/100.00' in record


def test_without_the_bbx_crop_the_figures_fall(weights, tmp_path):
    gnd = revisitop_set(tmp_path / 'roxford5k')
    for entry in gnd:
        entry['bbx'] = [0.0, 0.0, 96.0, 96.0]  # the whole query image: mostly the colour of another landmark
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'rb') as handle:
        content = pickle.load(handle)
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'wb') as handle:
        pickle.dump(dict(content, gnd=gnd), handle)
    run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k'))
    assert results_of(tmp_path / 'runs', 'roxford5k')['student']['medium']['map'] < 1.0


def test_distractors_join_the_database(weights, tmp_path):
    revisitop_set(tmp_path / 'roxford5k')
    distractors = tmp_path / 'distractors'
    for number in range(3):
        solid_jpeg(str(distractors / 'jpg' / f'd{number}.jpg'), (90 * number, 255 - 90 * number, 128))
    write_text(str(distractors / 'list.txt'), 'jpg/d0.jpg\njpg/d1.jpg\n\njpg/d2.jpg\n')
    run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k',
                            '--benchmark_distractors', str(distractors), str(distractors / 'list.txt')))
    record, = glob.glob(str(tmp_path / 'runs' / 'roxford5k+list-*' / 'record.txt'))
    assert 'roxford5k: 4 queries, 15 database images' in open(record, encoding='utf-8').read()


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_pickle_that_would_construct_anything_else_is_refused(weights, tmp_path):
    revisitop_set(tmp_path / 'roxford5k')
    marker = tmp_path / 'ran'
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'wb') as handle:
        pickle.dump({'imlist': [], 'qimlist': [], 'gnd': [Exploit(marker)]}, handle)
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k'))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert re.search(r'gnd_roxford5k\.pkl: not a revisitop ground-truth file \(refusing to load posix\.system',
                     message)
    assert not marker.exists()


def test_a_missing_image_is_named_with_its_gnd_entry(weights, tmp_path):
    revisitop_set(tmp_path / 'roxford5k')
    os.remove(tmp_path / 'roxford5k' / 'jpg' / 'db_1_2.jpg')
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k'))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert f"gnd_roxford5k.pkl: imlist[5] 'db_1_2': {tmp_path}/roxford5k/jpg/db_1_2.jpg: no such image" in message


@pytest.mark.parametrize('junk, message', [
    ([12], 'gnd_roxford5k.pkl: gnd[2] names database image 12, outside imlist (12 images)'),
    (['db_0_0'], "gnd_roxford5k.pkl: gnd[2]['junk'] holds <U6 values, not database indices"),
])
def test_a_gnd_naming_a_database_image_that_does_not_exist_is_refused(weights, tmp_path, junk, message):
    gnd = revisitop_set(tmp_path / 'roxford5k')
    gnd[2]['junk'] = junk
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'rb') as handle:
        content = pickle.load(handle)
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'wb') as handle:
        pickle.dump(dict(content, gnd=gnd), handle)
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', tmp_path / 'roxford5k'))
    assert message in str(stopped.value.code) and len(str(stopped.value.code).splitlines()) == 1


def test_gldv2_scores_each_usage_and_a_rerun_reads_the_saved_features(weights, tmp_path):
    gldv2_set(tmp_path / 'gldv2')
    argv = benchmark_argv(weights, tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2')
    run_main(argv)
    report = results_of(tmp_path / 'runs', 'gldv2')
    for model in ('student', 'teacher'):
        assert report[model] == {'all': 1.0, 'private': 1.0, 'public': 1.0}
    assert 'gldv2: 4 queries, 12 database images' in record_of(tmp_path / 'runs', 'gldv2')
    saved = sorted(glob.glob(str(tmp_path / 'runs' / 'benchmark_features' / '*' / 'features.npy')))
    assert len(saved) == 4  # student and teacher, queries and index
    assert {np.load(path).shape for path in saved} == {(1, 4, 128), (1, 12, 128)}
    run_main(argv)
    assert results_of(tmp_path / 'runs', 'gldv2') == report
    assert record_of(tmp_path / 'runs', 'gldv2').count('(saved by an earlier run)') == 4
    # another student against the same teacher: the teacher's features are read, the student's extracted
    other = classifier_file(tmp_path / 'other.pth', seed=3)
    run_main(benchmark_argv((other, weights[1]), tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2'))
    record, = glob.glob(str(tmp_path / 'runs' / 'gldv2-other-*' / 'record.txt'))
    assert open(record, encoding='utf-8').read().count('(saved by an earlier run)') == 2
    assert len(glob.glob(str(tmp_path / 'runs' / 'benchmark_features' / '*' / 'features.npy'))) == 6
    # the same models on other images (a copy elsewhere): nothing is read, four more stores are made
    shutil.copytree(tmp_path / 'gldv2', tmp_path / 'gldv2_copy')
    run_main(benchmark_argv(weights, tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2_copy'))
    assert record_of(tmp_path / 'runs', 'gldv2').count('(saved by an earlier run)') == 4
    assert len(glob.glob(str(tmp_path / 'runs' / 'benchmark_features' / '*' / 'features.npy'))) == 10


def test_two_processes_score_gldv2_as_one_and_a_rerun_of_two_reads_the_saved_features(weights, tmp_path):
    gldv2_set(tmp_path / 'gldv2')
    # a Public query whose ground truth is another landmark's: a figure below 1 that a wrong gather would change
    path = tmp_path / 'gldv2' / 'retrieval_solution_v2.1.csv'
    lines = path.read_text(encoding='utf-8').splitlines()
    other = lines[1].split(',')[1]
    lines[4] = ','.join([lines[4].split(',')[0], other, 'Public'])
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    reports = {}
    for processes in (1, 2, 2):
        command = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
                   if processes == 2 else [sys.executable])
        argv = benchmark_argv(weights, tmp_path / f'runs{processes}', 'gldv2', tmp_path / 'gldv2')
        finished = subprocess.run(command + [os.path.join(ROOT, 'main.py')] + argv, capture_output=True, text=True,
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'), timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
        reports.setdefault(processes, []).append(results_of(tmp_path / f'runs{processes}', 'gldv2'))
    assert reports[1][0]['student']['private'] == 1.0 and reports[1][0]['student']['public'] < 1.0
    assert reports[2][0] == reports[1][0] and reports[2][1] == reports[1][0]
    assert record_of(tmp_path / 'runs2', 'gldv2').count('(saved by an earlier run)') == 4


def test_a_gldv2_solution_naming_an_unknown_index_image_is_refused(weights, tmp_path):
    gldv2_set(tmp_path / 'gldv2')
    path = tmp_path / 'gldv2' / 'retrieval_solution_v2.1.csv'
    lines = path.read_text(encoding='utf-8').splitlines()
    lines[2] = lines[2].replace('Private', 'Public').replace(lines[2].split(',')[1].split()[0], 'ffff0000')
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2'))
    assert f'{path}:3: index image ffff0000 is not in index.csv' in str(stopped.value.code)


@pytest.mark.parametrize('extra, message', [
    (['--benchmark', 'gldv2'], '--benchmark gldv2 needs --benchmark_root'),
    (['--benchmark_root', '.'], '--benchmark_root goes with --benchmark'),
    (['--benchmark', 'gldv2', '--benchmark_root', '.', '--benchmark_distractors', '.', 'start.sh'],
     '--benchmark_distractors adds database images to roxford5k or rparis6k only'),
])
def test_benchmark_flags_that_do_not_fit_stop_in_one_line(weights, tmp_path, extra, message):
    with pytest.raises(SystemExit) as stopped:
        run_main(SMALL + ['--test_only', '--init_weights', weights[0], '--save_dir', str(tmp_path), *extra])
    assert message in str(stopped.value.code)
