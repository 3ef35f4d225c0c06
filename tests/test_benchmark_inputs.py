"""--benchmark given files that would give a silent wrong figure, or a traceback: each refused in one line that names
the file and the entry, or, for saved features whose images changed on disk, extracted again."""
import os
import pickle
import shutil

import pytest
from conftest import run_main
from test_benchmarks import benchmark_argv, gldv2_set, record_of, results_of, revisitop_set, weights  # noqa: F401


def test_saved_features_of_images_changed_on_disk_are_extracted_again(weights, tmp_path):  # noqa: F811
    gldv2_set(tmp_path / 'gldv2')
    argv = benchmark_argv(weights, tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2')
    run_main(argv)
    assert results_of(tmp_path / 'runs', 'gldv2')['student'] == {'all': 1.0, 'private': 1.0, 'public': 1.0}
    # an index image of landmark 0 and one of landmark 1 exchange their contents at the same paths
    first, second = (tmp_path / 'gldv2' / 'index' / image[0] / image[1] / image[2] / f'{image}.jpg'
                     for image in ('00a0ff000', '10a1ff000'))
    shutil.move(first, tmp_path / 'swap.jpg')
    shutil.move(second, first)
    shutil.move(tmp_path / 'swap.jpg', second)
    for path in (first, second):  # later than the saved features, even on a file system of coarse times
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10 ** 10,) * 2)
    run_main(argv)
    run_main(benchmark_argv(weights, tmp_path / 'fresh', 'gldv2', tmp_path / 'gldv2'))
    fresh = results_of(tmp_path / 'fresh', 'gldv2')
    assert fresh['student']['all'] < 1.0
    assert results_of(tmp_path / 'runs', 'gldv2') == fresh
    assert record_of(tmp_path / 'runs', 'gldv2').count('of images changed on disk since: extracting again') == 2


def edit_line(path, number: int, edit):
    lines = path.read_text(encoding='utf-8').splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


@pytest.mark.parametrize('case', ['index id again', 'query again', 'short row', 'not utf-8', 'no query'])
def test_a_gldv2_file_with_repeated_ids_short_rows_or_no_query_is_refused_in_one_line(weights, tmp_path,  # noqa: F811
                                                                                      case):
    root = tmp_path / 'gldv2'
    gldv2_set(root)
    index, solution = root / 'index.csv', root / 'retrieval_solution_v2.1.csv'
    if case == 'index id again':
        edit_line(index, 5, lambda line: '00a0ff000')  # the first index image's id, again on line 5
        expected = f'{index}:5: id 00a0ff000 again (first at line 2)'
    elif case == 'query again':
        edit_line(solution, 4, lambda line: solution.read_text().splitlines()[1])
        expected = f'{solution}:4: query e0c900b again (first at line 2)'
    elif case == 'short row':
        edit_line(solution, 3, lambda line: line.split(',')[0])
        expected = f'{solution}:3: 1 fields, fewer than its header names (3)'
    elif case == 'not utf-8':
        solution.write_bytes(solution.read_bytes().replace(b'Public', b'Publ\xe9c', 1))
        expected = f'{solution}: near line '
    else:
        edit_line(solution, 2, lambda line: line.rsplit(',', 1)[0] + ',Ignored')
        edit_line(solution, 3, lambda line: line.rsplit(',', 1)[0] + ',Ignored')
        edit_line(solution, 4, lambda line: line.rsplit(',', 1)[0] + ',Ignored')
        edit_line(solution, 5, lambda line: line.rsplit(',', 1)[0] + ',Ignored')
        expected = f'{solution}: no Private or Public query'
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'gldv2', root))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith(f'error: {expected}'), message
    assert not list((tmp_path / 'runs').glob('benchmark_features'))  # refused before any extraction


def rewrite_gnd(root, change):
    path = root / 'gnd_roxford5k.pkl'
    with open(path, 'rb') as handle:
        content = pickle.load(handle)
    change(content)
    with open(path, 'wb') as handle:
        pickle.dump(content, handle)
    return path


@pytest.mark.parametrize('case', ['easy and junk', 'infinite bbx', 'bbx outside', 'no query'])
def test_a_revisitop_gnd_with_overlapping_sets_an_impossible_bbx_or_no_query_is_refused_in_one_line(
        weights, tmp_path, case):  # noqa: F811
    root = tmp_path / 'roxford5k'
    revisitop_set(root)
    if case == 'easy and junk':
        path = rewrite_gnd(root, lambda content: content['gnd'][1]['junk'].append(content['gnd'][1]['easy'][0]))
        expected = f"{path}: gnd[1] lists database image 3 in both 'easy' and 'junk'"
    elif case == 'infinite bbx':
        path = rewrite_gnd(root, lambda content: content['gnd'][2].update(bbx=[0.0, 0.0, float('inf'), 72.0]))
        expected = f'{path}: gnd[2] bbx [0.0, 0.0, inf, 72.0] is not four finite numbers'
    elif case == 'bbx outside':
        rewrite_gnd(root, lambda content: content['gnd'][2].update(bbx=[200.0, 24.0, 300.0, 72.0]))
        expected = (f"{root / 'jpg' / 'query_2.jpg'}: its bbx (200.0, 24.0, 300.0, 72.0) lies wholly outside the "
                    '96x96 image')
    else:
        path = rewrite_gnd(root, lambda content: content.update(qimlist=[], gnd=[]))
        expected = f'{path}: no queries'
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', root))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith(f'error: {expected}'), message


def test_a_gnd_saved_by_torch_with_arrays_is_refused_in_one_line(weights, tmp_path):  # noqa: F811
    import numpy as np
    import torch
    root = tmp_path / 'roxford5k'
    revisitop_set(root)
    path = rewrite_gnd(root, lambda content: content['gnd'][0].update(bbx=np.array([24.0, 24.0, 72.0, 72.0])))
    with open(path, 'rb') as handle:
        content = pickle.load(handle)
    torch.save(content, path)
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', root))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f'error: {path}: not a revisitop ground-truth file ('), message


@pytest.mark.parametrize('damage', ['empty file', 'NaN rows'])
def test_saved_features_that_are_empty_or_not_finite_are_extracted_again(weights, tmp_path, damage):  # noqa: F811
    import glob
    import json

    import numpy as np

    import feature_store
    gldv2_set(tmp_path / 'gldv2')
    argv = benchmark_argv(weights, tmp_path / 'runs', 'gldv2', tmp_path / 'gldv2')
    run_main(argv)
    report = results_of(tmp_path / 'runs', 'gldv2')
    saved = sorted(glob.glob(str(tmp_path / 'runs' / 'benchmark_features' / '*' / 'features.npy')))[0]
    if damage == 'empty file':
        open(saved, 'wb').close()
    else:  # NaN written as a bad extraction would leave it, the checksum made to match
        features = np.load(saved)
        features[0, 0] = np.nan
        np.save(saved, features)
        manifest_path = os.path.join(os.path.dirname(saved), 'manifest.json')
        manifest = json.load(open(manifest_path, encoding='utf-8'))
        manifest['crc32'] = feature_store.checksum(saved)
        with open(manifest_path, 'w', encoding='utf-8') as handle:
            json.dump(manifest, handle)
    run_main(argv)
    assert results_of(tmp_path / 'runs', 'gldv2') == report
    assert f'features saved in {saved} are damaged' in record_of(tmp_path / 'runs', 'gldv2')
    assert np.isfinite(np.load(saved)).all()


def test_a_missing_distractor_is_named_with_the_distractor_flag(weights, tmp_path):  # noqa: F811
    root = tmp_path / 'roxford5k'
    revisitop_set(root)
    distractors = tmp_path / 'distractors'
    os.makedirs(distractors)
    (distractors / 'list.txt').write_text('jpg/nowhere.jpg\n', encoding='utf-8')
    with pytest.raises(SystemExit) as stopped:
        run_main(benchmark_argv(weights, tmp_path / 'runs', 'roxford5k', root, '--benchmark_distractors',
                                str(distractors), str(distractors / 'list.txt')))
    assert str(stopped.value.code) == (f"error: {distractors / 'list.txt'}:1: {distractors / 'jpg' / 'nowhere.jpg'}: "
                                       'no such image; fix the list or --benchmark_distractors')
