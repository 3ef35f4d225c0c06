"""The demo at each size start.sh may choose, over seeds: its time, and whether its students meet the demo's targets.

    python bench/demo_sizes.py [--sizes full small] [--seeds 0 1 2] [--amp auto] [--work DIR]

Each (size, seed) is `sh start.sh` with DEMO_SIZE, DEMO_SEED and DEMO_AMP in its own DEMO_DIR under --work (a rerun
reuses what is there). Per size, over the seeds, mean and standard deviation of: coarse TAR at FAR 1e-2 of each
student over the teacher's, and of its queries against the teacher's gallery over the teacher's (cross); the demo's
seconds. Targets: Swin-tiny >= 0.95 and cross >= 0.95, ResNet12 >= 0.93 and cross >= 0.90 (the means). Last line:
`sizes_meeting_targets=<k> of <n> slowest_s=<x>`.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import precision  # noqa: E402

TARGETS = {'swin': 0.95, 'swin_cross': 0.95, 'resnet': 0.93, 'resnet_cross': 0.90}


def ratios(runs_dir: str) -> dict:
    """Each student's and its cross figure's coarse TAR@1e-2 over the teacher's, from the demo's results.json files."""
    tests = {}
    for path in glob.glob(os.path.join(runs_dir, '*', '*', 'results.json')):
        if path.split(os.sep)[-2].endswith('-untrained'):
            continue
        with open(path, encoding='utf-8') as handle:
            tests[path.split(os.sep)[-3].split('-')[1]] = json.load(handle)['test']
    teacher = tests['Swin_base']['student']['coarse'][1]
    return {'swin': tests['Swin_tiny']['student']['coarse'][1] / teacher,
            'swin_cross': tests['Swin_tiny']['cross']['coarse'][1] / teacher,
            'resnet': tests['Resnet12']['student']['coarse'][1] / teacher,
            'resnet_cross': tests['Resnet12']['cross']['coarse'][1] / teacher}


def run_demo(size: str, seed: int, amp: str, work: str) -> tuple[dict, float]:
    """(ratios, seconds) of one demo; its output in DEMO_DIR/start.log."""
    demo_dir = os.path.join(work, f'{size}-seed{seed}-{amp}')
    os.makedirs(demo_dir, exist_ok=True)
    environment = dict(os.environ, DEMO_DIR=demo_dir, DEMO_SIZE=size, DEMO_SEED=str(seed), DEMO_AMP=amp,
                       PYTHON=sys.executable)
    started = time.perf_counter()
    with open(os.path.join(demo_dir, 'start.log'), 'w', encoding='utf-8') as log:
        subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.perf_counter() - started
    runs, = glob.glob(os.path.join(demo_dir, 'runs', '*'))
    return ratios(runs), seconds


def spread(values: list[float]) -> str:
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['full', 'small'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--amp', default='auto', choices=('auto', 'none', 'bf16'))
    parser.add_argument('--work', default=os.path.join(ROOT, 'demo_sizes_work'))
    args = parser.parse_args()
    import torch
    print(precision.environment_line(torch.device('cpu')))
    print(precision.choose_amp(args.amp, torch.device('cpu'))[1])
    meeting, slowest = 0, 0.0
    for size in args.sizes:
        figures = [run_demo(size, seed, args.amp, args.work) for seed in args.seeds]
        means = {key: statistics.mean(ratio[key] for ratio, _ in figures) for key in TARGETS}
        met = all(means[key] >= target for key, target in TARGETS.items())
        meeting += met
        slowest = max(slowest, *(seconds for _, seconds in figures))
        print(f'{size}: ' + ', '.join(f'{key} {spread([ratio[key] for ratio, _ in figures])}' for key in TARGETS)
              + f'; seconds {spread([seconds for _, seconds in figures])}; targets {"met" if met else "MISSED"}',
              flush=True)
    print(f'sizes_meeting_targets={meeting} of {len(args.sizes)} slowest_s={slowest:.0f}')


if __name__ == '__main__':
    main()
