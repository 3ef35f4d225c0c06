"""Images per second on one CPU core: our train transform vs the original's per-image float pipeline.

Generates 12-megapixel (4000x3000) and ~0.5-megapixel (800x600) JPEGs of random smooth content in a
temporary folder, then times, on the same files and one thread:
  ours:     ImageDataset(train, augment) -> uint8 BGR crops (draft-mode decoding), stacked, then
            BatchTransform (float, PCA lighting, normalisation) on whole batches, amortised per image;
  baseline: as the original: PIL full decode, RGB->BGR through numpy, torchvision RandomResizedCrop,
            RandomHorizontalFlip, ToTensor, PCA lighting and Normalize per image in float, then stacked.
Then GLDv2's shards: the same 800x600 JPEGs (GLDv2's typical size) read by the training dataset from extracted
files and from a tar shard in place (the page cache warm for both, as a local disk's), images/s on one core; the
shard index's time per 1,000 members; and, in a fresh process, the time and the memory added by parsing a synthetic
4.1-million-row train.csv (the full GLDv2 list).
Last line: speedup_12mp=<x> speedup_small=<y> shard_vs_files=<a> index_s_per_1000=<b> start_s_4m=<c>
start_gb_4m=<d>.
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import gldv2  # noqa: E402
import precision  # noqa: E402

PARSE_4M = """
import resource, sys, time
sys.path.insert(0, {root!r})
import gldv2
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
begun = time.perf_counter()
path, ids, landmarks, lines = gldv2.landmark_images({folder!r}, clean=False)
print(time.perf_counter() - begun, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20, len(ids))
"""


def write_smooth_jpeg(path: str, width: int, height: int, generator: np.random.Generator):
    """Random smooth colour field (two octaves of upsampled noise), JPEG quality 90."""
    field = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in ((8, 90.0), (96, 25.0)):
        noise = generator.uniform(-1, 1, size=(max(cells * height // width, 2), cells, 3)).astype(np.float32)
        for channel in range(3):
            layer = Image.fromarray(noise[:, :, channel], mode='F').resize((width, height), Image.Resampling.BICUBIC)
            field[:, :, channel] += amplitude * np.asarray(layer)
    pixels = np.clip(field + 128, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


class OriginalLighting:
    """The original's per-image AlexNet PCA lighting on a float (3, H, W) tensor."""

    def __init__(self):
        self.eigenvalues = torch.tensor(datasets.LIGHTING_EIGENVALUES)
        self.eigenvectors = torch.tensor(datasets.LIGHTING_EIGENVECTORS)

    def __call__(self, image):
        alpha = torch.randn(3) * datasets.LIGHTING_STD
        noise = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + noise.view(3, 1, 1)


def baseline_images_per_second(paths, count, img_size, batch_size):
    pipeline = transforms.Compose([
        transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        OriginalLighting(), transforms.Normalize(datasets.PIXEL_MEAN_BGR, datasets.PIXEL_STD_BGR)])
    start = time.perf_counter()
    batch = []
    for number in range(count):
        with Image.open(paths[number % len(paths)]) as image:
            rgb = np.asarray(image.convert('RGB'))
        batch.append(pipeline(Image.fromarray(rgb[:, :, ::-1].copy())))
        if len(batch) == batch_size or number == count - 1:
            torch.stack(batch)
            batch = []
    return count / (time.perf_counter() - start)


def ours_images_per_second(paths, count, img_size, batch_size):
    samples = [datasets.Sample(path, 0, 0) for path in paths]
    dataset = datasets.ImageDataset(samples, img_size, train=True, augment=True)
    batch_transform = datasets.BatchTransform(augment=True)
    start = time.perf_counter()
    batch = []
    for number in range(count):
        batch.append(dataset[number % len(dataset)]['image'])
        if len(batch) == batch_size or number == count - 1:
            batch_transform(torch.stack(batch), train=True)
            batch = []
    return count / (time.perf_counter() - start)


def shard_figures(folder: str, paths: list[str], img_size: int, count: int, rounds: int) -> tuple[float, float]:
    """(images/s from a tar shard / from the extracted files, seconds to index 1,000 shard members)."""
    shard = os.path.join(folder, 'images_000.tar')
    with tarfile.open(shard, 'w') as archive:
        for number, path in enumerate(paths * 64):  # 1,024 members, the files repeated under other names
            archive.add(path, arcname=f'a/b/c/{number:016x}.jpg')
    begun = time.perf_counter()
    index = gldv2.shard_index([shard], os.path.join(folder, 'index'), _Silent())
    index_seconds = (time.perf_counter() - begun) * 1000 / len(index['ids'])
    members = [f'{shard}{datasets.SHARD_MEMBER}{offset}:{size}'
               for offset, size in zip(index['offsets'][:len(paths)].tolist(), index['sizes'][:len(paths)].tolist())]
    rates = {'files': [], 'shard': []}
    for _ in range(rounds):
        for name, images in (('files', paths), ('shard', members)):
            rates[name].append(ours_images_per_second(images, count // rounds, img_size, 32))
    files, in_shard = float(np.median(rates['files'])), float(np.median(rates['shard']))
    print(f'gldv2 shard: 800x600 JPEGs, files {files:.1f} img/s, tar shard in place {in_shard:.1f} img/s; '
          f'index {index_seconds:.3f} s per 1,000 members')
    return in_shard / files, index_seconds


class _Silent:
    def info(self, message):
        pass


def parse_figures(folder: str, rows: int = 4_100_000) -> tuple[float, float]:
    """(seconds, GB added) to parse a synthetic full train.csv of `rows` rows in a fresh process."""
    generator = np.random.default_rng(0)
    with open(os.path.join(folder, 'train.csv'), 'w', encoding='utf-8') as handle:
        handle.write('id,url,landmark_id\n')
        for first in range(0, rows, 100_000):
            ids = generator.integers(0, 2 ** 63, size=min(100_000, rows - first))
            landmarks = generator.integers(0, 203_094, size=len(ids))
            handle.write(''.join(f'{image:016x},https://upload.wikimedia.org/wikipedia/commons/{image % 97:x}/'
                                 f'{image:x}.jpg,{landmark}\n' for image, landmark in zip(ids.tolist(),
                                                                                        landmarks.tolist())))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    finished = subprocess.run([sys.executable, '-c', PARSE_4M.format(root=root, folder=folder)], check=True,
                              capture_output=True, text=True)
    seconds, gigabytes, parsed = finished.stdout.split()
    print(f'gldv2 train.csv: {int(parsed):,} rows parsed in {float(seconds):.1f} s, {float(gigabytes):.2f} GB added')
    return float(seconds), float(gigabytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img_size', type=int, default=384)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--count_12mp', type=int, default=48, help='images timed per method, 12 MP')
    parser.add_argument('--count_small', type=int, default=320, help='images timed per method, 0.5 MP')
    parser.add_argument('--rounds', type=int, default=3, help='alternating timing rounds (median taken)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--csv_rows', type=int, default=4_100_000, help='rows of the synthetic GLDv2 train.csv')
    arguments = parser.parse_args()
    print(precision.environment_line(torch.device('cpu')))  # which CPU the figures come from
    torch.set_num_threads(1)
    torch.manual_seed(arguments.seed)
    generator = np.random.default_rng(arguments.seed)
    speedups = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (width, height), files, count in (
                ('12mp', (4000, 3000), 4, arguments.count_12mp),
                ('small', (800, 600), 16, arguments.count_small)):
            paths = [os.path.join(folder, f"{name}_{number}.jpg") for number in range(files)]
            for path in paths:
                write_smooth_jpeg(path, width, height, generator)
            bytes_per_pixel = np.mean([os.path.getsize(path) for path in paths]) / (width * height)
            baseline_images_per_second(paths, 2, arguments.img_size, arguments.batch_size)
            ours_images_per_second(paths, 2, arguments.img_size, arguments.batch_size)
            # Alternating rounds and medians, because a shared machine's speed drifts during the run.
            baseline_rates, our_rates = [], []
            for _ in range(arguments.rounds):
                baseline_rates.append(baseline_images_per_second(paths, count // arguments.rounds,
                                                                 arguments.img_size, arguments.batch_size))
                our_rates.append(ours_images_per_second(paths, count // arguments.rounds,
                                                        arguments.img_size, arguments.batch_size))
            baseline, ours = float(np.median(baseline_rates)), float(np.median(our_rates))
            speedups[name] = ours / baseline
            print(f"{name}: {width}x{height} JPEG, {bytes_per_pixel:.2f} bytes/pixel, {count} images: "
                  f"baseline {baseline:.1f} img/s, ours {ours:.1f} img/s, speedup {speedups[name]:.2f}x")
        shard_vs_files, index_seconds = shard_figures(folder, paths, arguments.img_size, arguments.count_small,
                                                      arguments.rounds)
        start_seconds, start_gigabytes = parse_figures(folder, arguments.csv_rows)
    print(f"speedup_12mp={speedups['12mp']:.2f} speedup_small={speedups['small']:.2f} "
          f"shard_vs_files={shard_vs_files:.2f} index_s_per_1000={index_seconds:.3f} start_s_4m={start_seconds:.1f} "
          f"start_gb_4m={start_gigabytes:.2f}")


if __name__ == '__main__':
    main()
