"""Distillation quality over seeds: the demo's data and teacher, then the Swin-tiny and ResNet12 students of each
configuration, each seed its own data, teacher and students (the demo's sizes and epochs, as `sh start.sh` runs
them).

    python bench/distill_quality.py [--seeds 0 1 2] [--configurations live cache ...] [--work DIR]

Configurations: `live` (the teacher run in every step as published, stochastic depth active), `live_eval`
(--teacher_eval), `cache` (the teacher cache as it is by default: the eval-mode teacher), `cache_draws`
(--teacher_cache_mode draws: K = 8 draws of the train-mode teacher, epoch e reading draw e mod K), and `feature`:
the better of the two caches (by the mean of the four figures below over the seeds) with --feature_kd_weight 1.
Per configuration and student: student / teacher and cross / teacher (coarse TAR at FAR 1e-2; cross = the
student's queries against the teacher's gallery) and the nearest-neighbour top-1 (coarse), mean and standard
deviation over the seeds; the run's seconds (the first student's include the cache's pre-pass). Last line, for the
configuration the demo uses (means over seeds):
`swin_ratio=<a> swin_cross=<b> resnet_ratio=<c> resnet_cross=<d> cache_minus_live=<e>`, e = the default cache's
(`cache`) mean Swin-tiny ratio minus the live published teacher's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import precision  # noqa: E402
# the demo's epochs and the flags every run shares (start.sh); its data sizes are the script's defaults
TEACHER_EPOCHS, STUDENT_EPOCHS = 7, {'Swin_tiny': 3, 'Resnet12': 4}
STUDENT_LR = {'Swin_tiny': '0.001', 'Resnet12': '0.002'}
COMMON = ('--dataset Synthetic --img_size 32 --demo_width_divisor 4 --amp auto --num_workers 1 --batch_size 128 '
          '--optim AdamW --weight_decay 0.05 --warmup_epoch 1 --eval_interval 1 --log_interval 10').split()
DISTILL = '--is_distill --teacher_backbone_class Swin_base --head_fixed --kd_loss KD --kd_weight 1.0'.split()
CONFIGURATIONS = {
    'live': [],
    'live_eval': ['--teacher_eval'],
    'cache': ['--teacher_cache', '{work}/cache{seed}'],
    'cache_draws': ['--teacher_cache', '{work}/cache_draws{seed}', '--teacher_cache_mode', 'draws'],
}
FEATURE = ['--feature_kd_weight', '1.0']
DEMO_CONFIGURATION = 'feature'


def run(command: list[str], log) -> float:
    """Run a command, its output to `log`; its seconds."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def test_figures(run_dir: str) -> dict:
    with open(os.path.join(run_dir, 'results.json'), encoding='utf-8') as handle:
        return json.load(handle)['test']


def only_run(save_dir: str) -> str | None:
    """The finished run directory under `save_dir`, if any."""
    if not os.path.isdir(save_dir):
        return None
    runs = [os.path.join(save_dir, first, second) for first in os.listdir(save_dir)
            if os.path.isdir(os.path.join(save_dir, first)) for second in os.listdir(os.path.join(save_dir, first))]
    return next((run_dir for run_dir in runs if os.path.isfile(os.path.join(run_dir, 'results.json'))), None)


def seed_figures(seed: int, configurations: dict, work: str, log, landmarks: int, views: int,
                 epochs: int | None) -> dict:
    """{(configuration, student): {'ratio', 'cross', 'nn', 'cross_nn', 'seconds'}} for one seed, `configurations`
    naming their flags; `epochs` (every run's, for a quick check of the script) replaces the demo's. What `work`
    already holds (data, teacher, finished runs) is reused."""
    data = os.path.join(work, f'data{seed}')
    if not os.path.isfile(os.path.join(data, 'test.txt')):
        run([sys.executable, os.path.join(ROOT, 'demo.py'), 'data', data, '--seed', str(seed),
             '--num_train_landmarks', str(landmarks), '--train_views', str(views), '--num_test_landmarks', '50'], log)
    lists = ['--train_root', data, '--train_list', f'{data}/train.txt', '--val_root', data, '--val_list',
             f'{data}/val.txt', '--test_root', data, '--test_list', f'{data}/test.txt', '--seed', str(seed)]
    main = [sys.executable, os.path.join(ROOT, 'main.py')] + COMMON + lists
    teacher_dir = os.path.join(work, f'teacher{seed}')
    if only_run(teacher_dir) is None:
        run(main + ['--backbone_class', 'Swin_base', '--num_classes', str(landmarks), '--max_epoch',
                    str(epochs or TEACHER_EPOCHS), '--lr', '0.001', '--save_dir', teacher_dir], log)
    teacher_run = only_run(teacher_dir)
    teacher_tar = test_figures(teacher_run)['student']['coarse'][1]
    figures = {}
    for configuration, configuration_flags in configurations.items():
        flags = [flag.format(work=work, seed=seed) for flag in configuration_flags]
        for student in ('Swin_tiny', 'Resnet12'):
            save_dir = os.path.join(work, f'{configuration}-{student}-{seed}')
            seconds = float('nan')
            if only_run(save_dir) is None:
                seconds = run(main + DISTILL + flags + [
                    '--teacher_init_weights', os.path.join(teacher_run, 'max_acc.pth'), '--backbone_class', student,
                    '--lr', STUDENT_LR[student], '--max_epoch', str(epochs or STUDENT_EPOCHS[student]),
                    '--save_dir', save_dir], log)
            test = test_figures(only_run(save_dir))
            figures[configuration, student] = {
                'ratio': test['student']['coarse'][1] / teacher_tar, 'cross': test['cross']['coarse'][1] / teacher_tar,
                'nn': test['student']['coarse_nn_accuracy'], 'cross_nn': test['cross']['coarse_nn_accuracy'],
                'seconds': seconds}
            print(f'seed {seed} {configuration} {student}: ' +
                  ', '.join(f'{key} {value:.3f}' for key, value in figures[configuration, student].items()),
                  flush=True)
    return figures


def better_cache(by_seed: list[dict]) -> str:
    """The cache configuration with the higher mean of its four figures (both students' ratio and cross)."""
    def score(configuration):
        return statistics.mean(figures[configuration, student][key] for figures in by_seed
                               for student in ('Swin_tiny', 'Resnet12') for key in ('ratio', 'cross'))
    return max(('cache', 'cache_draws'), key=score)


def seconds_text(values: list[float]) -> str:
    """The mean of the runs' seconds, '-' where runs were reused from an earlier invocation (not timed)."""
    timed = [value for value in values if value == value]
    return f'{statistics.mean(timed):.0f}' if len(timed) == len(values) else '-'


def mean_and_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float('nan')
    return f'{statistics.mean(values):.3f} ± {spread:.3f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--configurations', nargs='+', default=list(CONFIGURATIONS) + ['feature'],
                        choices=list(CONFIGURATIONS) + ['feature'])
    parser.add_argument('--work', default=None, help='keep the runs here and reuse them (default: a temporary '
                                                     'directory)')
    parser.add_argument('--landmarks', type=int, default=300, help='training landmarks (the demo: 300)')
    parser.add_argument('--train_views', type=int, default=40, help='views of each (the demo: 40)')
    parser.add_argument('--epochs', type=int, default=None, help="every run's epochs (default: the demo's)")
    args = parser.parse_args()
    print(precision.environment_line(torch.device('cpu')))  # which CPU the figures come from
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or temporary
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, 'runs.log'), 'a', encoding='utf-8') as log:
            def measure(configurations):
                return [seed_figures(seed, configurations, work, log, args.landmarks, args.train_views, args.epochs)
                        for seed in args.seeds]
            chosen = {name: CONFIGURATIONS[name] for name in args.configurations if name in CONFIGURATIONS}
            by_seed = measure(chosen)
            if 'feature' in args.configurations:
                base = better_cache(by_seed) if {'cache', 'cache_draws'} <= set(chosen) else 'cache'
                print(f'feature: {base} with {" ".join(FEATURE)}', flush=True)
                for figures, feature in zip(by_seed, measure({'feature': CONFIGURATIONS[base] + FEATURE})):
                    figures.update(feature)
    print('| configuration | student | student / teacher | cross / teacher | NN top-1 | cross NN top-1 | run s |')
    print('|---|---|---|---|---|---|---|')
    means = {}
    for configuration in args.configurations:
        for student in ('Swin_tiny', 'Resnet12'):
            values = {key: [figures[configuration, student][key] for figures in by_seed]
                      for key in ('ratio', 'cross', 'nn', 'cross_nn', 'seconds')}
            means[configuration, student] = {key: statistics.mean(value) for key, value in values.items()}
            print(f'| {configuration} | {student} | ' + ' | '.join(mean_and_spread(values[key]) for key in
                                                                     ('ratio', 'cross', 'nn', 'cross_nn')) +
                  f' | {seconds_text(values["seconds"])} |')
    demo = DEMO_CONFIGURATION if DEMO_CONFIGURATION in args.configurations else args.configurations[0]
    live = means.get(('live', 'Swin_tiny'), {'ratio': float('nan')})['ratio']
    cached = means.get(('cache', 'Swin_tiny'), {'ratio': float('nan')})['ratio']
    print(f'swin_ratio={means[demo, "Swin_tiny"]["ratio"]:.3f} swin_cross={means[demo, "Swin_tiny"]["cross"]:.3f} '
          f'resnet_ratio={means[demo, "Resnet12"]["ratio"]:.3f} resnet_cross={means[demo, "Resnet12"]["cross"]:.3f} '
          f'cache_minus_live={cached - live:.3f}')


if __name__ == '__main__':
    main()
