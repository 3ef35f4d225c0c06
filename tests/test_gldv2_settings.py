"""The newest GLDv2 settings and the exclusions, each through main.py as a user runs it: --gldv2_val_share reaching
the reader, --gldv2_csv full, the split drawn by --seed, a resumed run keeping its classes, list exclusions leaving
validation too, and a head as large as every landmark, excluded ones included. Each expectation is worked out here,
from the files the test writes, never by the product's own functions."""
import collections
import csv
import glob
import hashlib
import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image

import trainer  # noqa: E402

IMAGES = {1: 8, 3: 2, 5: 8, 12: 8, 40: 8, 77: 8, 90: 2}  # every landmark's images on disk: GLDv2 ids, not contiguous
CLEAN = (5, 12, 40, 77)  # train_clean.csv's landmarks
FULL = (3, 5, 12, 40, 90)  # train.csv's: another set (77 left out, 3 and 90 added)
SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--backbone_class', 'Resnet12',
         '--num_workers', '0', '--max_epoch', '1', '--warmup_epoch', '0', '--train_format', 'gldv2']


def image_id(landmark: int, view: int) -> str:
    return hashlib.sha256(f'settings-{landmark}-{view}'.encode()).hexdigest()[:16]


def write_clean_csv(root, landmarks):
    with open(os.path.join(root, 'train_clean.csv'), 'w', encoding='utf-8') as handle:
        handle.write('landmark_id,images\n' + ''.join(
            f'{landmark},{" ".join(image_id(landmark, view) for view in range(IMAGES[landmark]))}\n'
            for landmark in landmarks))


def gldv2_root(root, train_dir=None) -> str:
    """GLDv2's files: train_clean.csv (CLEAN), train.csv (FULL) and train/ with every image of IMAGES extracted
    (a/b/c/<id>.jpg), or a link to `train_dir`'s."""
    os.makedirs(root, exist_ok=True)
    if train_dir:
        os.symlink(train_dir, os.path.join(root, 'train'))
    else:
        generator = np.random.default_rng(0)
        for landmark, views in IMAGES.items():
            for view in range(views):
                image = image_id(landmark, view)
                base = np.array([(landmark * 67) % 256, (landmark * 131) % 256, (landmark * 29) % 256], np.float32)
                pixels = np.clip(base + generator.normal(0, 25, size=(32, 40, 3)), 0, 255).astype(np.uint8)
                path = os.path.join(root, 'train', image[0], image[1], image[2], f'{image}.jpg')
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(pixels).save(path, quality=90)
    write_clean_csv(root, CLEAN)
    with open(os.path.join(root, 'train.csv'), 'w', encoding='utf-8') as handle:
        handle.write('id,url,landmark_id\n' + ''.join(
            f'{image_id(landmark, view)},http://example.invalid/{landmark}/{view},{landmark}\n'
            for landmark in FULL for view in range(IMAGES[landmark])))
    return root


def csv_landmarks(root, csv_name) -> dict[str, int]:
    """{image id: landmark} read from a CSV file here, with the csv module's plain reading."""
    with open(os.path.join(root, csv_name), encoding='utf-8', newline='') as handle:
        rows = list(csv.DictReader(handle))
    if csv_name == 'train_clean.csv':
        return {image: int(row['landmark_id']) for row in rows for image in row['images'].split()}
    return {row['id']: int(row['landmark_id']) for row in rows}


def expected_held_out(count: int, share: float) -> int:
    """README / gldv2.held_out's rule, written out: none at share 0; of a landmark with two images or more,
    round(share x its images), at least one, never all of them."""
    if share <= 0 or count < 2:
        return 0
    return min(count - 1, max(1, round(share * count)))


class Seen:
    """What a run in this process trains on and validates: the image paths of every training batch and of every
    validation pass (observed in the batches the trainer hands over, not computed)."""

    def __init__(self, monkeypatch):
        self.trained, self.validations = [], []
        validate, step = trainer.validate, trainer.training_step

        def observed_validate(classifier, loader, *arguments, **keywords):
            seen = []
            self.validations.append(seen)

            class Observed:
                def __iter__(inner):
                    for batch in loader:
                        seen.extend(loader.dataset.paths[index] for index in batch['index'].tolist())
                        yield batch

                def __len__(inner):
                    return len(loader)
            return validate(classifier, Observed(), *arguments, **keywords)

        def observed_step(parts, batch, *arguments, **keywords):
            self.trained.extend(parts.train_loader.dataset.paths[index] for index in batch['index'].tolist())
            return step(parts, batch, *arguments, **keywords)
        monkeypatch.setattr(trainer, 'validate', observed_validate)
        monkeypatch.setattr(trainer, 'training_step', observed_step)

    @property
    def validated(self) -> list[str]:
        assert len(self.validations) == 1, f'{len(self.validations)} validation passes, not one'
        return self.validations[0]


def ids_of(paths) -> list[str]:
    return [os.path.basename(path)[:-len('.jpg')] for path in paths]


def only_run_dir(save_dir) -> str:
    records = glob.glob(os.path.join(str(save_dir), '*', '*', 'record.txt'))
    assert len(records) == 1, records
    return os.path.dirname(records[0])


def read_text(path) -> str:
    with open(path, encoding='utf-8') as handle:
        return handle.read()


def read_json(path):
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)


def gldv2_run(root, save_dir, *extra) -> dict:
    """Run main.py on GLDv2 at `root` in this process; what it trained on and validated, and its run directory."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = Seen(monkeypatch)
        run_main(SMALL + ['--train_root', root, '--save_dir', str(save_dir), *extra])
    return {'trained': ids_of(seen.trained), 'validations': [ids_of(paths) for paths in seen.validations],
            'run_dir': only_run_dir(save_dir)}


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
    return gldv2_root(str(tmp_path_factory.mktemp('gldv2')))


@pytest.fixture(scope='module')
def split_runs(layout, tmp_path_factory):
    """Runs at --gldv2_val_share 0.5: seed 0, seed 1, and seed 0 again in another directory."""
    runs = {}
    for name, seed in (('seed0', 0), ('seed1', 1), ('seed0_again', 0)):
        runs[name] = gldv2_run(layout, tmp_path_factory.mktemp(name), '--gldv2_val_share', '0.5', '--seed', str(seed))
    return runs


# ------------------------------------------------------------------------------------------ --gldv2_val_share
def check_split(run: dict, root: str, share: float, csv_name: str = 'train_clean.csv'):
    """The run validated, per landmark, the documented count of that landmark's images, trained on the others, and
    each image sits in exactly one of the two."""
    landmark_of = csv_landmarks(root, csv_name)
    per_landmark = collections.Counter(landmark_of.values())
    validated = run['validations'][0] if run['validations'] else []
    assert len(set(validated)) == len(validated)
    assert collections.Counter(landmark_of[image] for image in validated) == collections.Counter(
        {landmark: expected_held_out(count, share) for landmark, count in per_landmark.items()
         if expected_held_out(count, share)})
    # the epoch trains on the other images, each once (whole batches of 4: the test's counts make them all)
    kept = set(landmark_of) - set(validated)
    assert len(set(run['trained'])) == len(run['trained']) == len(kept) // 4 * 4 and set(run['trained']) <= kept


def test_a_val_share_of_one_half_holds_out_half_of_each_landmark(split_runs, layout):
    run = split_runs['seed0']
    check_split(run, layout, 0.5)
    assert len(run['validations'][0]) == 16  # 4 of each landmark's 8
    record = read_text(os.path.join(run['run_dir'], 'record.txt'))
    assert re.search(r'^epoch 1 .*eval_acc=', record, re.M)


@pytest.mark.parametrize('share', [0.02, 0.0])
def test_a_small_share_still_holds_out_one_image_per_landmark_and_share_zero_none(layout, tmp_path, share):
    run = gldv2_run(layout, tmp_path, '--gldv2_val_share', str(share))
    check_split(run, layout, share)
    record = read_text(os.path.join(run['run_dir'], 'record.txt'))
    if share:  # 0.02 x 8 rounds to 0: one each all the same
        assert len(run['validations'][0]) == len(CLEAN)
        assert re.search(r'^epoch 1 .*eval_acc=', record, re.M)
    else:  # nothing held out: nothing validated, every image trained on
        assert run['validations'] == [] and len(run['trained']) == sum(IMAGES[landmark] for landmark in CLEAN)
        assert 'eval_acc' not in record


# ------------------------------------------------------------------------------------------------ --gldv2_csv
def test_gldv2_csv_full_reads_train_csv_and_its_landmarks_become_the_classes(layout, tmp_path):
    run = gldv2_run(layout, tmp_path, '--gldv2_csv', 'full', '--gldv2_val_share', '0.25')
    full = csv_landmarks(layout, 'train.csv')
    expected = {str(landmark): label for label, landmark in enumerate(sorted(set(full.values())))}
    assert read_json(os.path.join(run['run_dir'], 'landmark_classes.json')) == expected
    assert set(run['trained']) | set(run['validations'][0]) == set(full)  # train.csv's images, none of 77's
    check_split(run, layout, 0.25, 'train.csv')
    saved = torch.load(os.path.join(run['run_dir'], 'max_acc.pth'), weights_only=True)
    assert saved['architecture']['num_classes'] == len(expected) == 5
    assert f'classes: {len(expected)}, one per landmark of train.csv' in read_text(
        os.path.join(run['run_dir'], 'record.txt'))


# ---------------------------------------------------------------------------------------------------- --seed
def test_the_split_is_drawn_by_the_seed_and_the_same_seed_draws_the_same(split_runs, layout):
    held = {name: sorted(run['validations'][0]) for name, run in split_runs.items()}
    for run in split_runs.values():
        check_split(run, layout, 0.5)
    assert held['seed0'] == held['seed0_again']
    # 4 of 8 for each of 4 landmarks: 70^4 possible splits; seeds 0 and 1 (fixed) draw different ones
    assert held['seed0'] != held['seed1']
    landmark_of = csv_landmarks(layout, 'train_clean.csv')
    differing = {landmark_of[image] for image in set(held['seed0']) ^ set(held['seed1'])}
    assert differing, 'the seed changed no landmark\'s held-out images'


# ---------------------------------------------------------------------------------------------------- resume
def test_a_resumed_run_keeps_its_classes_when_the_csv_gains_a_smaller_landmark(layout, tmp_path, monkeypatch):
    root = gldv2_root(str(tmp_path / 'gldv2'), train_dir=os.path.join(layout, 'train'))
    argv = SMALL + ['--train_root', root, '--save_dir', str(tmp_path / 'runs'), '--gldv2_val_share', '0.25']
    stop_in_first_epoch = trainer.train_one_epoch

    def signalled_epoch(*arguments, **keywords):  # a preemption: SIGTERM arrives as the first epoch begins
        os.kill(os.getpid(), signal.SIGTERM)
        return stop_in_first_epoch(*arguments, **keywords)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, 'train_one_epoch', signalled_epoch)
        with pytest.raises(SystemExit) as stopped:
            run_main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    run_dir = only_run_dir(tmp_path / 'runs')
    checkpoint = os.path.join(run_dir, 'checkpoint.pth.tar')
    assert torch.load(checkpoint, weights_only=True)['progress']['iteration'] >= 1  # within the epoch: unfinished
    classes_path = os.path.join(run_dir, 'landmark_classes.json')
    before = read_json(classes_path)
    assert before == {str(landmark): label for label, landmark in enumerate(sorted(CLEAN))}
    # the CSV gains landmark 1, smaller than every other: numbered afresh, it would take class 0 and shift the rest
    write_clean_csv(root, (1,) + CLEAN)
    try:
        run_main(argv)
    except SystemExit as refused:  # stopping, it must name the landmark that is not in the run's classes
        message = str(refused.code)
        assert len(message.splitlines()) == 1 and message.startswith('error: '), message
        assert re.search(r'landmark 1\b', message) and 'landmark_classes.json' in message, message
        assert torch.load(checkpoint, weights_only=True)['progress']['iteration'] >= 1  # nothing trained
    after = read_json(classes_path)
    assert {landmark: after.get(landmark) for landmark in before} == before


# ---------------------------------------------------------------------------------------------- exclusions
@pytest.fixture(scope='module')
def excluded_lists_run(tiny_data, tmp_path_factory):
    """A list-format run (no teacher, no --num_classes) with --exclude_landmarks of labels 1 and 3 (3 the largest)
    and a --val_list."""
    folder = tmp_path_factory.mktemp('excluded_lists')
    excluded = folder / 'excluded.txt'
    excluded.write_text('# labels of the lists\n1\n3\n', encoding='utf-8')
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = Seen(monkeypatch)
        run_main(['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--backbone_class', 'Resnet12',
                  '--num_workers', '0', '--max_epoch', '1', '--warmup_epoch', '0',
                  '--train_root', tiny_data['root'], '--train_list', tiny_data['train'],
                  '--val_root', tiny_data['root'], '--val_list', tiny_data['val'],
                  '--exclude_landmarks', str(excluded), '--save_dir', str(folder / 'runs')])
    return {'seen': seen, 'run_dir': only_run_dir(folder / 'runs'), 'excluded': {1, 3}}


def list_labels(list_path) -> dict[str, int]:
    """{image file name: label} of a list, read here."""
    with open(list_path, encoding='utf-8') as handle:
        return {line.split('\t')[0]: int(line.rstrip('\n').split('\t')[2]) for line in handle if line.strip()}


def test_list_exclusions_leave_training_and_the_validation_lists_figures(excluded_lists_run, tiny_data):
    seen, excluded = excluded_lists_run['seen'], excluded_lists_run['excluded']
    val = list_labels(tiny_data['val'])
    expected_val = sorted(name for name, label in val.items() if label not in excluded)
    assert len(expected_val) == 4
    assert sorted(os.path.basename(path) for path in seen.validated) == expected_val
    train = list_labels(tiny_data['train'])
    expected_train = sorted(name for name, label in train.items() if label not in excluded)
    assert sorted(os.path.basename(path) for path in seen.trained) == expected_train  # 12: three batches of 4
    results = read_json(os.path.join(excluded_lists_run['run_dir'], 'results.json'))
    assert len(results['epochs']) == 1 and results['epochs'][0]['val_accuracy'] is not None
    # the validation accuracy is a fraction of the 4 images left: a multiple of 1/4
    assert results['epochs'][0]['val_accuracy'] * 4 == pytest.approx(round(results['epochs'][0]['val_accuracy'] * 4))


def test_with_list_exclusions_the_head_still_has_a_class_per_label(excluded_lists_run, tiny_data):
    labels = set(list_labels(tiny_data['train']).values())
    saved = torch.load(os.path.join(excluded_lists_run['run_dir'], 'max_acc.pth'), weights_only=True)
    assert saved['architecture']['num_classes'] == max(labels) + 1 == 4  # label 3, the largest, is excluded
    assert saved['params']['head.weight'].shape[0] == max(labels) + 1


def test_with_gldv2_exclusions_the_head_has_a_class_per_landmark_and_validation_none_excluded(layout, tmp_path):
    excluded = tmp_path / 'excluded.txt'
    excluded.write_text(f'{max(CLEAN)}\n', encoding='utf-8')  # the largest landmark id: the last class
    run = gldv2_run(layout, tmp_path / 'runs', '--gldv2_val_share', '0.5', '--exclude_landmarks', str(excluded))
    landmark_of = csv_landmarks(layout, 'train_clean.csv')
    every = {str(landmark): label for label, landmark in enumerate(sorted(set(landmark_of.values())))}
    assert read_json(os.path.join(run['run_dir'], 'landmark_classes.json')) == every
    saved = torch.load(os.path.join(run['run_dir'], 'max_acc.pth'), weights_only=True)
    assert saved['architecture']['num_classes'] == len(every) == 4
    assert saved['params']['head.weight'].shape[0] == len(every)
    kept = {image for image, landmark in landmark_of.items() if landmark != max(CLEAN)}
    assert set(run['trained']) | set(run['validations'][0]) == kept
    assert not set(run['trained']) & set(run['validations'][0])
    record = read_text(os.path.join(run['run_dir'], 'record.txt'))
    assert f'--exclude_landmarks: 1 landmarks, {IMAGES[max(CLEAN)]} images left out of training' in record
