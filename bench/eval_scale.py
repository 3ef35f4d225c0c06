"""Time and peak memory of verification.tar_at_far on N random 1024-d features, 10 images per label; or, with --gldv2,
of the GLDv2 retrieval scoring (the running top-100 of retrieval.gldv2_figures, mAP@100 included) of 1,129 random
queries against 761,757 random index features.

Usage: python bench/eval_scale.py --n 37649
       python bench/eval_scale.py --gldv2
Last line: eval_s=<seconds> peak_gb=<peak resident memory of the process in GiB>, or with --gldv2
gldv2_s=<seconds> gldv2_peak_gb=<peak resident memory in GiB, the 3.1 GB of index features included>.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import precision  # noqa: E402
import retrieval  # noqa: E402
import utils  # noqa: E402
import verification  # noqa: E402

GLDV2_QUERIES, GLDV2_INDEX = 1129, 761757


def random_unit_rows(count: int, dim: int, generator: torch.Generator, chunk: int = 65536) -> torch.Tensor:
    """(count x dim) random unit rows, drawn a chunk at a time so that the array is the only large allocation."""
    rows = torch.empty(count, dim)
    for first in range(0, count, chunk):
        part = rows[first:first + chunk]
        part.normal_(generator=generator)
        part /= part.norm(dim=1, keepdim=True)
    return rows


def gldv2(arguments):
    generator = torch.Generator().manual_seed(arguments.seed)
    index = random_unit_rows(GLDV2_INDEX, arguments.dim, generator)
    queries = random_unit_rows(GLDV2_QUERIES, arguments.dim, generator)
    index_ids = [f'{number:016x}' for number in range(GLDV2_INDEX)]
    query_ids = [f'q{number:015x}' for number in range(GLDV2_QUERIES)]
    # each query's ground truth: 1 to 20 random index images, as the real solution's lengths go
    solution = {query: [index_ids[int(image)] for image in torch.randint(GLDV2_INDEX, (1 + number % 20,),
                                                                         generator=generator)]
                for number, query in enumerate(query_ids)}
    usage = {query: 'Private' if number % 3 else 'Public' for number, query in enumerate(query_ids)}
    images = retrieval.BenchmarkImages('gldv2', [], [], solution=solution, usage=usage, query_ids=query_ids,
                                       database_ids=index_ids)
    with open('/proc/self/statm') as statm:
        resident_gb = int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    print(f'resident before scoring: {resident_gb:.2f} GB, of which the index features '
          f'{index.numel() * index.element_size() / 2 ** 30:.2f} GB')
    start, start_cpu = time.perf_counter(), time.process_time()
    figures = retrieval.gldv2_figures(queries, index, images, device='cpu')
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f'queries={GLDV2_QUERIES} index={GLDV2_INDEX} dim={arguments.dim} threads={torch.get_num_threads()} '
          f'tile_rows={retrieval.BENCHMARK_TILE_ROWS}')
    print(f'cpu_s={cpu_seconds:.1f} load_average={os.getloadavg()[0]:.2f} mAP@100 of random features: {figures}')
    print(f'gldv2_s={seconds:.1f} gldv2_peak_gb={peak_gb:.2f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n', type=int, default=37649, help='number of features')
    parser.add_argument('--dim', type=int, default=1024, help='feature dimension')
    parser.add_argument('--per_label', type=int, default=10, help='images per label')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--gldv2', action='store_true', help='the GLDv2 retrieval shape instead')
    arguments = parser.parse_args()
    print(precision.environment_line(torch.device('cpu')))  # which CPU the figures come from
    if arguments.gldv2:
        return gldv2(arguments)

    generator = torch.Generator().manual_seed(arguments.seed)
    features = torch.randn(arguments.n, arguments.dim, generator=generator)
    labels = torch.arange(arguments.n) // arguments.per_label

    start, start_cpu = time.perf_counter(), time.process_time()
    tars = verification.tar_at_far(features, labels=labels)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    # ru_maxrss is in KiB on Linux.
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    pairs = arguments.n * (arguments.n - 1) // 2
    print(f'N={arguments.n} pairs={pairs} device={utils.default_device()} threads={torch.get_num_threads()}')
    # CPU seconds over the thread count tell the wall time on an otherwise idle machine.
    print(f'cpu_s={cpu_seconds:.1f} load_average={os.getloadavg()[0]:.2f}')
    print(f'TARs at {list(verification.DEFAULT_FARS)}: {tars}')
    print(f'eval_s={seconds:.1f} peak_gb={peak_gb:.2f}')


if __name__ == '__main__':
    main()
