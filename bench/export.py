"""Images per second of a student served on the CPU: eager PyTorch fp32, PyTorch bf16 autocast, ONNX Runtime fp32.

    python bench/export.py [--img_size 384] [--backbones Swin_tiny Resnet12 Swin_base]

Each backbone (random weights, full width) is exported once, then the three ways run side by side on the same
images at batch 1 and 8 (median of 5 timed runs after 2 warm-ups each). Last line:
`ort_speedup_b1=<x> ort_speedup_b8=<y>`: ONNX Runtime against eager fp32, for Swin_tiny.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402
import model as models  # noqa: E402


def images_per_second(run, images, repeats: int = 5) -> float:
    for _ in range(2):
        run(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(seconds)


def measure(backbone_name: str, img_size: int, directory: str) -> dict:
    import onnxruntime
    torch.manual_seed(0)
    backbone = models.create_backbone(backbone_name, img_size).eval()
    serving = models.ServingNetwork(backbone, helpers.PIXEL_MEAN_BGR, helpers.PIXEL_STD_BGR).eval()
    path = os.path.join(directory, f'{backbone_name}.onnx')
    models.export_onnx(backbone, path, img_size, helpers.PIXEL_MEAN_BGR, helpers.PIXEL_STD_BGR, description={})
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])

    def eager(images):
        with torch.no_grad():
            return serving(images)

    def bf16(images):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return serving(images)

    def runtime(images):
        return session.run(None, {'images': images.numpy()})[0]

    figures = {}
    for batch in (1, 8):
        images = torch.rand(batch, 3, img_size, img_size)
        for name, run in (('eager_fp32', eager), ('eager_bf16', bf16), ('ort_fp32', runtime)):
            figures[(name, batch)] = images_per_second(run, images)
        print(f'{backbone_name} {img_size} px batch {batch}: ' +
              ', '.join(f'{name} {figures[(name, batch)]:.2f} img/s' for name in ('eager_fp32', 'eager_bf16',
                                                                                  'ort_fp32')), flush=True)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img_size', type=int, default=384)
    parser.add_argument('--backbones', nargs='+', default=['Swin_tiny', 'Resnet12', 'Swin_base'])
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in args.backbones:
            results[name] = measure(name, args.img_size, directory)
    if 'Swin_tiny' in results:
        tiny = results['Swin_tiny']
        print(' '.join(f'ort_speedup_b{batch}={tiny[("ort_fp32", batch)] / tiny[("eager_fp32", batch)]:.2f}'
                       for batch in (1, 8)))


if __name__ == '__main__':
    main()
