"""Time and peak memory of evaluation.tar_at_far on N random 1024-d features, 10 images per label.

Usage: python bench/eval_scale.py --n 37649
Last line: eval_s=<seconds> peak_gb=<peak resident memory of the process in GiB>.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n', type=int, default=37649, help='number of features')
    parser.add_argument('--dim', type=int, default=1024, help='feature dimension')
    parser.add_argument('--per_label', type=int, default=10, help='images per label')
    parser.add_argument('--seed', type=int, default=0)
    arguments = parser.parse_args()

    generator = torch.Generator().manual_seed(arguments.seed)
    features = torch.randn(arguments.n, arguments.dim, generator=generator)
    labels = torch.arange(arguments.n) // arguments.per_label

    start, start_cpu = time.perf_counter(), time.process_time()
    tars = evaluation.tar_at_far(features, labels=labels)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    # ru_maxrss is in KiB on Linux.
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    pairs = arguments.n * (arguments.n - 1) // 2
    print(f'N={arguments.n} pairs={pairs} device={evaluation.default_device()} threads={torch.get_num_threads()}')
    # CPU seconds over the thread count tell the wall time on an otherwise idle machine.
    print(f'cpu_s={cpu_seconds:.1f} load_average={os.getloadavg()[0]:.2f}')
    print(f'TARs at {list(evaluation.DEFAULT_FARS)}: {tars}')
    print(f'eval_s={seconds:.1f} peak_gb={peak_gb:.2f}')


if __name__ == '__main__':
    main()
