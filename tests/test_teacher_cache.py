"""--teacher_cache: the teacher's features stored once (the eval-mode teacher's, or K draws of the train-mode one),
exact, refused when foreign, repaired when damaged, resumed when the pre-pass was killed."""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, classifier_file, data_args, run_main
from PIL import Image

import feature_store  # noqa: E402
import model as models
import trainer

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0', '--batch_size', '4',
         '--log_interval', '1', '--warmup_epoch', '1', '--backbone_class', 'Resnet12', '--seed', '3']


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp('teachers')
    return classifier_file(folder / 'a.pth', seed=1), classifier_file(folder / 'b.pth', seed=2)


def distill_argv(tiny_data, teacher, save_dir, *extra):
    return SMALL + data_args(tiny_data)[:8] + [
        '--is_distill', '--teacher_backbone_class', 'Resnet12', '--teacher_init_weights', teacher, '--head_fixed',
        '--max_epoch', '2', '--save_dir', str(save_dir), *extra]


def cached_features(directory) -> np.ndarray:
    return np.load(os.path.join(str(directory), 'features.npy'))


def epochs_of(save_dir) -> list[dict]:
    results, = glob.glob(os.path.join(str(save_dir), '*', '*', 'results.json'))
    with open(results, encoding='utf-8') as handle:
        return json.load(handle)['epochs']


def live_teacher_features(tiny_data, teacher) -> torch.Tensor:
    """The eval-mode teacher's features of the training images."""
    backbone = models.load_backbone('Resnet12', teacher, 96, 8)
    with torch.no_grad():
        return backbone(live_teacher_images(tiny_data))


def live_teacher_images(tiny_data) -> torch.Tensor:
    """The training images in list order, decoded independently (PIL resize, BGR, normalised)."""
    mean, std = torch.tensor([0.406, 0.456, 0.485]), torch.tensor([0.225, 0.224, 0.229])
    images = []
    with open(tiny_data['train'], encoding='utf-8') as handle:
        for line in handle:
            image = Image.open(os.path.join(tiny_data['root'], line.split('\t')[0])).convert('RGB')
            pixels = np.asarray(image.resize((96, 96), Image.BILINEAR))[:, :, ::-1].copy()
            tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
            images.append((tensor - mean[:, None, None]) / std[:, None, None])
    return torch.stack(images)


def test_float32_cached_features_are_the_eval_teachers(tiny_data, teachers, tmp_path):
    cache = tmp_path / 'cache'
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_eval',
                          '--teacher_cache', str(cache), '--teacher_cache_dtype', 'float32'))
    assert cached_features(cache).shape == (1, 24, 128)
    stored = torch.from_numpy(cached_features(cache)[0])
    live = live_teacher_features(tiny_data, teachers[0])
    assert stored.shape == (24, 128)
    torch.testing.assert_close(stored, live, atol=1e-5, rtol=1e-5)
    assert F.cosine_similarity(stored, live).min() > 0.99999


def live_teacher_draw(backbone, images: torch.Tensor, seed: int) -> torch.Tensor:
    """The train-mode teacher's features (its dropout drawn, BatchNorm frozen) after seeding torch with `seed`."""
    backbone.train()
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        return backbone(images)


def test_a_float32_cache_holds_draws_of_the_train_mode_teacher_and_epoch_e_reads_draw_e_mod_k(
        tiny_data, teachers, tmp_path, monkeypatch):
    seen, step = [], trainer.training_step

    def recording_step(parts, batch, *arguments):
        seen.append(dict(zip(batch['index'].tolist(), batch['teacher_feature'])))
        return step(parts, batch, *arguments)
    monkeypatch.setattr(trainer, 'training_step', recording_step)
    monkeypatch.setattr(feature_store, 'CHUNK', 16)  # two chunks of the 24 images
    cache = tmp_path / 'cache'
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '3', '--teacher_cache',
                          str(cache), '--teacher_cache_mode', 'draws', '--teacher_cache_views', '2',
                          '--teacher_cache_dtype', 'float32'))
    stored = torch.from_numpy(cached_features(cache))
    assert stored.shape == (2, 24, 128)
    # the images decoded independently of the product, each chunk of 16 (in list order) one train-mode batch
    # under the random state the cache's chunk is seeded with (--seed 3)
    images = live_teacher_images(tiny_data)
    backbone = models.load_backbone('Resnet12', teachers[0], 96, 8)
    for view in range(2):
        for chunk, rows in enumerate((slice(0, 16), slice(16, 24))):
            live = live_teacher_draw(backbone, images[rows], feature_store.draw_seed(3, view, chunk))
            torch.testing.assert_close(stored[view, rows], live, atol=1e-5, rtol=1e-5)
    # the draws differ from each other and from the eval-mode teacher: its dropout was active
    eval_mode = backbone.eval()(images).detach()
    for view in range(2):
        assert F.cosine_similarity(stored[view], eval_mode).max() < 0.9999
    assert F.cosine_similarity(stored[0], stored[1]).max() < 0.9999
    # epochs 1 and 3 train on draw 1, epoch 2 on draw 0
    by_epoch = [{index: feature for batch in seen[epoch * 6:(epoch + 1) * 6] for index, feature in batch.items()}
                for epoch in range(3)]
    for epoch, view in zip(range(3), (1, 0, 1)):
        assert sorted(by_epoch[epoch]) == list(range(24))
        assert all(torch.equal(feature, stored[view, index]) for index, feature in by_epoch[epoch].items())


def test_a_run_from_the_cache_trains_as_the_live_eval_teacher(tiny_data, teachers, tmp_path):
    # the student starts from a file: a live teacher's construction draws on the generator a random start uses
    start = ['--init_weights', teachers[1]]
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'live', '--teacher_eval', *start))
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'cached', '--teacher_eval', '--teacher_cache',
                          str(tmp_path / 'cache'), '--teacher_cache_dtype', 'float32', *start))
    live, cached = epochs_of(tmp_path / 'live'), epochs_of(tmp_path / 'cached')
    assert len(live) == len(cached) == 2
    for live_epoch, cached_epoch in zip(live, cached):
        for figure in ('loss', 'ce', 'kd', 'train_accuracy', 'val_loss', 'val_accuracy'):
            assert cached_epoch[figure] == pytest.approx(live_epoch[figure], rel=1e-4, abs=1e-6), figure


def test_a_cache_of_another_teacher_is_refused_in_one_line(tiny_data, teachers, tmp_path):
    cache = str(tmp_path / 'cache')
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'first', '--max_epoch', '1', '--teacher_cache', cache))
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[1], tmp_path / 'second', '--max_epoch', '1', '--teacher_cache',
                              cache))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert re.search(re.escape(f'error: {cache} holds the teacher cache of another run: teacher_file ') +
                     r".*--teacher_cache_rebuild to replace it", message)
    run_main(distill_argv(tiny_data, teachers[1], tmp_path / 'second', '--max_epoch', '1', '--teacher_cache', cache,
                          '--teacher_cache_rebuild'))


def test_a_truncated_cache_is_computed_again_not_used(tiny_data, teachers, tmp_path):
    cache = tmp_path / 'cache'
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache', str(cache))
    run_main(argv)
    whole = cached_features(cache)
    path = os.path.join(str(cache), 'features.npy')
    with open(path, 'r+b') as handle:
        handle.truncate(os.path.getsize(path) // 2)
    run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'again')] + argv[argv.index('--save_dir') + 2:])
    np.testing.assert_array_equal(cached_features(cache), whole)
    record, = glob.glob(str(tmp_path / 'again' / '*' / '*' / 'record.txt'))
    assert f'teacher cache damaged: {path} does not load' in open(record, encoding='utf-8').read()


def test_a_killed_pre_pass_continues_where_it_stopped(tiny_data, teachers, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    monkeypatch.setattr(feature_store, 'CHUNK', 16)
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache', str(cache),
                        '--teacher_cache_dtype', 'float32', '--teacher_cache_mode', 'draws',
                        '--teacher_cache_views', '2')
    run_main(argv)
    whole = cached_features(cache)
    # as a kill would leave it: view 1's rows 10 onwards not yet written, the manifest not complete
    features = np.load(os.path.join(str(cache), 'features.npy'), mmap_mode='r+')
    features[1, 10:] = np.nan
    features.flush()
    del features
    manifest_path = os.path.join(str(cache), 'manifest.json')
    with open(manifest_path, encoding='utf-8') as handle:
        manifest = json.load(handle)
    manifest.pop('crc32')
    manifest['complete'] = False
    with open(manifest_path, 'w', encoding='utf-8') as handle:
        json.dump(manifest, handle)
    computed = []
    fill = feature_store.fill_teacher_cache

    def counting_fill(cache_, teacher_backbone, *arguments, **keywords):
        original_forward = teacher_backbone.forward

        def forward(images):
            computed.append(images.shape[0])
            return original_forward(images)
        teacher_backbone.forward = forward
        try:
            return fill(cache_, teacher_backbone, *arguments, **keywords)
        finally:
            teacher_backbone.forward = original_forward
    monkeypatch.setattr(feature_store, 'fill_teacher_cache', counting_fill)
    run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'again')] + argv[argv.index('--save_dir') + 2:])
    # the chunks holding an unfinished row (images 0-15 and 16-23) are computed again whole, with the same draws
    assert sum(computed) == 24
    np.testing.assert_array_equal(cached_features(cache), whole)


def test_a_cache_built_by_two_processes_equals_one_built_by_one(tiny_data, teachers, tmp_path):
    caches = {processes: tmp_path / f'cache{processes}' for processes in (1, 2)}
    for processes, cache in caches.items():
        argv = distill_argv(tiny_data, teachers[0], tmp_path / f'runs{processes}', '--max_epoch', '1',
                            '--batch_size', '8', '--teacher_cache', str(cache), '--teacher_cache_dtype', 'float32',
                            '--teacher_cache_mode', 'draws')
        command = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
                   if processes == 2 else [sys.executable])
        finished = subprocess.run(command + [os.path.join(ROOT, 'main.py')] + argv, capture_output=True, text=True,
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'), timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = cached_features(caches[1]), cached_features(caches[2])
    assert not np.isnan(two).any()
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=1e-5)


def test_a_run_from_the_cache_killed_mid_epoch_ends_as_an_uninterrupted_one(tiny_data, teachers, tmp_path):
    from test_reliability import (
        assert_same_final_weights,
        environment,
        interrupt_mid_epoch,
    )
    argv = distill_argv(tiny_data, teachers[0], 'SAVE_DIR', '--max_epoch', '3', '--teacher_cache',
                        str(tmp_path / 'cache'), '--checkpoint_minutes', '1e-9', '--drop_block', 'annealed')
    main_py = [sys.executable, os.path.join(ROOT, 'main.py')]
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    subprocess.run(main_py + [str(straight) if value == 'SAVE_DIR' else value for value in argv], check=True,
                   env=environment(), capture_output=True)
    command = main_py + [str(resumed) if value == 'SAVE_DIR' else value for value in argv]
    interrupt_mid_epoch(command, resumed, signal.SIGKILL)
    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    straight_dir, = glob.glob(str(straight / '*' / '*'))
    resumed_dir, = glob.glob(str(resumed / '*' / '*'))
    assert 'resumed from' in open(os.path.join(resumed_dir, 'record.txt'), encoding='utf-8').read()
    assert_same_final_weights(straight_dir, resumed_dir)


def test_with_augment_the_student_sees_the_very_image_of_the_stored_view(tiny_data, teachers, tmp_path,
                                                                         monkeypatch):
    import trainer
    seen, step = [], trainer.training_step

    def recording_step(parts, batch, *arguments):
        images = parts.batch_transform(batch['image'], train=True, lighting=batch.get('lighting'))
        seen.append((images, batch['teacher_feature'], batch['index'].clone()))
        return step(parts, batch, *arguments)
    monkeypatch.setattr(trainer, 'training_step', recording_step)
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '3', '--augment', '--teacher_eval',
                          '--teacher_cache', str(tmp_path / 'cache'), '--teacher_cache_views', '2',
                          '--teacher_cache_dtype', 'float32'))
    assert cached_features(tmp_path / 'cache').shape == (2, 24, 128)
    teacher = models.load_backbone('Resnet12', teachers[0], 96, 8)
    with torch.no_grad():
        for images, stored, _ in seen:
            torch.testing.assert_close(teacher(images), stored, atol=1e-5, rtol=1e-5)
    # epochs 1 and 3 train on view 1, epoch 2 on view 0: other crops of the same images
    first, second, third = ({int(index): image for images, _, indices in seen[epoch * 6:(epoch + 1) * 6]
                             for index, image in zip(indices, images)} for epoch in range(3))
    assert all(torch.equal(first[index], third[index]) for index in first)
    assert not all(torch.equal(first[index], second[index]) for index in first)


def test_a_disk_too_small_for_the_cache_stops_before_any_work(tiny_data, teachers, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    # 24 training images x 128 float16 values (width divisor 8) = 6 KiB, 10 KiB with the header: 1 KiB cannot hold it
    monkeypatch.setattr(feature_store.shutil, 'disk_usage', lambda path: feature_store.shutil._ntuple_diskusage(
        10 ** 9, 10 ** 9 - 1024, 1024))
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache',
                              str(cache)))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert re.search(re.escape(f'{cache} has 1.0 KB free, too little for the teacher cache (10.0 KB)'), message)
    assert not os.path.exists(cache / 'features.npy')


@pytest.mark.parametrize('change, differs', [
    (['--img_size', '32'], 'img_size 96 (this run: 32)'),
    (['--seed', '4'], 'seed 3 (this run: 4)'),
    (['--augment', '--teacher_cache_views', '2'], 'augment False (this run: True)'),
    (['--teacher_cache_mode', 'draws'], "teacher_mode 'eval' (this run: 'train')"),
    ('reordered list', 'training_lists '),
])
def test_a_cache_of_other_settings_is_refused_naming_what_differs(tiny_data, teachers, tmp_path, change, differs,
                                                                  monkeypatch):
    cache = str(tmp_path / 'cache')
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'first', '--max_epoch', '1', '--teacher_cache', cache))
    if change == 'reordered list':  # the same images in another order: each row would be another image's feature
        lines = open(tiny_data['train'], encoding='utf-8').read().splitlines()
        (tmp_path / 'train.txt').write_text('\n'.join(lines[::-1]) + '\n', encoding='utf-8')
        change = []
        monkeypatch.setitem(tiny_data, 'train', str(tmp_path / 'train.txt'))
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'second', '--max_epoch', '1', '--teacher_cache',
                              cache, *change))
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert f'{cache} holds the teacher cache of another run: ' in message and differs in message


def rewrite_rows(cache, rows, value, keep_checksum: bool):
    """Overwrite `rows` of every view with `value`; with keep_checksum, make the manifest's checksum match the new bytes
    (a cache that looks whole but holds other features)."""
    path = os.path.join(str(cache), 'features.npy')
    features = np.load(path, mmap_mode='r+')
    features[:, rows] = value
    features.flush()
    del features
    if keep_checksum:
        manifest_path = os.path.join(str(cache), 'manifest.json')
        manifest = json.load(open(manifest_path, encoding='utf-8'))
        manifest['crc32'] = feature_store.checksum(path)
        with open(manifest_path, 'w', encoding='utf-8') as handle:
            json.dump(manifest, handle)


def test_a_cache_failing_its_checksum_is_computed_again(tiny_data, teachers, tmp_path):
    cache = tmp_path / 'cache'
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache', str(cache))
    run_main(argv)
    whole = cached_features(cache)
    rewrite_rows(cache, [5], 0.5, keep_checksum=False)  # the file still loads, with its shape and dtype
    run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'again')] + argv[argv.index('--save_dir') + 2:])
    np.testing.assert_array_equal(cached_features(cache), whole)
    record, = glob.glob(str(tmp_path / 'again' / '*' / '*' / 'record.txt'))
    assert 'features.npy fails its checksum; computing it again' in open(record, encoding='utf-8').read()


def test_a_whole_looking_cache_of_other_features_fails_the_check_against_the_teacher(tiny_data, teachers, tmp_path):
    cache = tmp_path / 'cache'
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache', str(cache))
    run_main(argv)
    # every row, so that the random rows checked hit one: the real features moved by 20% of their norm, 4 times the
    # check's tolerance for a float16 cache (a gross forgery, a constant, would pass a far looser check)
    stored = cached_features(cache).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal(stored.shape).astype(np.float32)
    noise *= 0.2 * np.linalg.norm(stored, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1, keepdims=True)
    rewrite_rows(cache, slice(None), stored + noise, keep_checksum=True)
    with pytest.raises(SystemExit) as stopped:
        run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'again')] +
                 argv[argv.index('--save_dir') + 2:])
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1
    assert re.search(r"features\.npy: the stored teacher features of view \d, rows \d+ to \d+ differ from the "
                     r"teacher's \(relative error .*\): the cache is stale or another teacher's; rerun with "
                     r'--teacher_cache_rebuild', message)


def test_training_from_the_cache_holds_no_teacher_and_reads_its_features(tiny_data, teachers, tmp_path, monkeypatch):
    seen = []
    step = trainer.training_step

    def recording(parts, batch, *arguments):
        seen.append((parts.distiller.teacher is None, 'teacher_feature' in batch))
        return step(parts, batch, *arguments)
    monkeypatch.setattr(trainer, 'training_step', recording)
    run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache',
                          str(tmp_path / 'cache')))
    assert seen == [(True, True)] * 6
    record, = glob.glob(str(tmp_path / 'runs' / '*' / '*' / 'record.txt'))
    assert 'teacher para trainable/sum 0/512\n' in open(record, encoding='utf-8').read()  # its head: 4 x 128


SEPARATE_CACHE_RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import flags, main
argv = sys.argv[1:]
if os.environ['RANK'] == '1':  # this process's --teacher_cache is another disk, as on a host without shared storage
    argv[argv.index('--teacher_cache') + 1] += '_elsewhere'
main.main(flags.parse_args(argv))
"""


def test_a_cache_directory_that_processes_do_not_share_is_refused(tiny_data, teachers, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(SEPARATE_CACHE_RUNNER.format(root=ROOT))
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--batch_size', '8',
                        '--teacher_cache', str(tmp_path / 'cache'))
    finished = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                               str(runner)] + argv, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))
    assert finished.returncode != 0
    messages = re.findall(r'^error: .*$', finished.stderr, re.M)
    assert len(messages) == 1, finished.stderr[-3000:]
    assert 'process 1 on host' in messages[0]
    assert '--teacher_cache must be storage that every host shares' in messages[0]


SIGNAL_IN_PRE_PASS_RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import feature_store, flags, main
fill = feature_store.fill_teacher_cache
def signal_then_fill(*arguments, **keywords):
    os.kill(os.getpid(), signal.SIGTERM)  # the pre-pass is under way: an eviction
    return fill(*arguments, **keywords)
feature_store.fill_teacher_cache = signal_then_fill
main.main(flags.parse_args(sys.argv[1:]))
"""


def test_sigterm_during_the_pre_pass_stops_at_once_and_the_rerun_completes_the_cache(tiny_data, teachers, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(SIGNAL_IN_PRE_PASS_RUNNER.format(root=ROOT))
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache',
                        str(tmp_path / 'cache'))
    finished = subprocess.run([sys.executable, str(runner)] + argv, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert finished.returncode == 128 + signal.SIGTERM, finished.stderr[-2000:]
    assert finished.stdout.splitlines()[-1] == ('stopped by SIGTERM during start-up: the teacher cache keeps the rows '
                                                'computed so far; the same command starts again')
    assert 'epoch 1' not in finished.stdout  # it did not go on to train
    run_main(argv)
    assert not np.isnan(cached_features(tmp_path / 'cache')).any()


def copied_data(tiny_data, tmp_path) -> dict:
    """A copy of the tiny data set whose images a test may change (lists and images under one root)."""
    root = str(tmp_path / 'data')
    shutil.copytree(tiny_data['root'], root)
    return {key: os.path.join(root, os.path.basename(value)) if key != 'root' else root
            for key, value in tiny_data.items()}


def image_path(data, row: int) -> str:
    with open(data['train'], encoding='utf-8') as handle:
        return os.path.join(data['root'], handle.read().splitlines()[row].split('\t')[0])


def test_rows_of_images_changed_on_disk_or_repaired_since_the_pre_pass_are_computed_again(tiny_data, teachers,
                                                                                          tmp_path):
    data = copied_data(tiny_data, tmp_path)
    changed, repaired = image_path(data, 3), image_path(data, 7)
    with open(repaired, 'rb') as handle:
        good_bytes = handle.read()
    with open(repaired, 'wb') as handle:
        handle.write(b'not an image')  # unreadable during the pre-pass: its row holds the next image's feature
    cache = tmp_path / 'cache'
    argv = distill_argv(data, teachers[0], tmp_path / 'first', '--max_epoch', '1', '--teacher_eval',
                        '--teacher_cache', str(cache), '--teacher_cache_dtype', 'float32', '--max_bad_images', '0.5')
    run_main(argv)
    before = cached_features(cache)
    with open(repaired, 'wb') as handle:
        handle.write(good_bytes)
    Image.open(image_path(data, 11)).save(changed)  # another image's content at the same path
    for path in (changed, repaired):  # later than the pre-pass, even on a file system of coarse times
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10 ** 10,) * 2)
    run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'second')] + argv[argv.index('--save_dir') + 2:])
    after, live = cached_features(cache)[0], live_teacher_features(data, teachers[0]).numpy()
    np.testing.assert_allclose(after[[3, 7]], live[[3, 7]], atol=1e-5, rtol=1e-5)
    assert np.abs(before[0, [3, 7]] - live[[3, 7]]).max() > 0.01  # the rows were stale
    np.testing.assert_array_equal(np.delete(after, [3, 7], axis=0), np.delete(before[0], [3, 7], axis=0))
    record, = glob.glob(str(tmp_path / 'second' / '*' / '*' / 'record.txt'))
    assert (f'teacher cache: 2 images changed on disk since their features were computed (the first: {changed}); '
            'computing their rows again') in open(record, encoding='utf-8').read()


def test_a_rebuild_while_another_run_trains_from_the_cache_is_refused_in_one_line(tiny_data, teachers, tmp_path):
    cache = tmp_path / 'cache'
    training = distill_argv(tiny_data, teachers[0], tmp_path / 'long', '--max_epoch', '500', '--teacher_cache',
                            str(cache))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + training, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    try:
        for line in process.stdout:  # until the cache is complete and the run trains from it
            if line.startswith('epoch 1 '):
                break
        assert process.poll() is None
        before = cached_features(cache)
        with pytest.raises(SystemExit) as stopped:
            run_main(distill_argv(tiny_data, teachers[1], tmp_path / 'other', '--max_epoch', '1', '--teacher_cache',
                                  str(cache), '--teacher_cache_rebuild'))
        assert str(stopped.value.code) == (
            f'error: {cache} is in use by another run that trains from it, which would read features being '
            'rewritten: wait for that run to end, or give another --teacher_cache directory')
        np.testing.assert_array_equal(cached_features(cache), before)
    finally:
        process.kill()
        process.wait()
    # once that run has ended, the rebuild goes ahead
    run_main(distill_argv(tiny_data, teachers[1], tmp_path / 'other', '--max_epoch', '1', '--teacher_cache',
                          str(cache), '--teacher_cache_rebuild'))


@pytest.mark.parametrize('free', ['data_only', 'none'])
def test_free_space_for_the_features_but_not_the_file_header_is_refused_before_any_work(
        tiny_data, teachers, tmp_path, monkeypatch, free):
    cache = tmp_path / 'cache'
    data_bytes = 24 * 128 * 2  # 24 images x 128 float16 values, the .npy header besides
    available = data_bytes if free == 'data_only' else 0
    monkeypatch.setattr(feature_store.shutil, 'disk_usage', lambda path: feature_store.shutil._ntuple_diskusage(
        10 ** 9, 10 ** 9 - available, available))
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache',
                              str(cache)))
    shown = '6.0 KB' if free == 'data_only' else '0 B'
    assert str(stopped.value.code) == (f'error: {cache} has {shown} free, too little for the teacher cache (10.0 KB): '
                                       'free space or give another --teacher_cache')
    assert not os.path.exists(cache / 'features.npy')


@pytest.mark.parametrize('where, code', [('posix_fallocate', errno.ENOSPC), ('open_memmap', errno.EROFS)])
def test_a_full_disk_or_a_read_only_one_while_the_features_file_is_made_is_one_line_and_leaves_no_file(
        tiny_data, teachers, tmp_path, monkeypatch, where, code):
    def failing(*arguments, **keywords):
        raise OSError(code, os.strerror(code))
    # the space reservation of a full disk, or the first write on a read-only mount
    monkeypatch.setattr(feature_store.os if where == 'posix_fallocate' else np.lib.format, where, failing)
    cache = tmp_path / 'cache'
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache',
                              str(cache)))
    assert str(stopped.value.code) == (f'error: --teacher_cache {cache}: {os.strerror(code)}: give a writable '
                                       'directory with room for the cache')
    assert not os.path.exists(cache / 'features.npy')


def test_an_empty_features_file_is_computed_again_and_a_file_given_as_the_directory_is_one_line(tiny_data, teachers,
                                                                                              tmp_path):
    cache = tmp_path / 'cache'
    argv = distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--max_epoch', '1', '--teacher_cache', str(cache))
    run_main(argv)
    whole = cached_features(cache)
    open(cache / 'features.npy', 'wb').close()
    run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'again')] + argv[argv.index('--save_dir') + 2:])
    np.testing.assert_array_equal(cached_features(cache), whole)
    with pytest.raises(SystemExit) as stopped:  # in a new run directory: the first run is finished
        run_main(argv[:argv.index('--save_dir') + 1] + [str(tmp_path / 'third')] +
                 argv[argv.index('--save_dir') + 2:argv.index('--teacher_cache') + 1] + [str(cache / 'features.npy')] +
                 argv[argv.index('--teacher_cache') + 2:])
    assert str(stopped.value.code) == f"error: --teacher_cache {cache / 'features.npy'} is a file: give a directory"


def test_draws_of_the_train_mode_teacher_with_an_eval_mode_teacher_is_refused_in_one_line(tiny_data, teachers,
                                                                                        tmp_path):
    with pytest.raises(SystemExit) as stopped:
        run_main(distill_argv(tiny_data, teachers[0], tmp_path / 'runs', '--teacher_eval', '--teacher_cache',
                              str(tmp_path / 'cache'), '--teacher_cache_mode', 'draws'))
    assert str(stopped.value.code) == ('error: --teacher_eval runs the teacher in eval mode; --teacher_cache_mode '
                                       'draws stores the train-mode teacher: choose one')

