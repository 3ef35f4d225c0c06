"""Images per second of a student served on the CPU: eager PyTorch fp32, PyTorch bf16 autocast (where the CPU
computes bf16 natively), ONNX Runtime fp32,
and ONNX Runtime int8, quantized both ways (dynamic; static QDQ calibrated on real images), with each int8
graph's accuracy cost: the mean cosine between its features and fp32's on real images.

    python bench/export.py [--img_size 384] [--backbones Swin_tiny Resnet12 Swin_base]

Each backbone (random weights, full width) is exported once, then the ways run side by side on the same images at
batch 1 and 8 (median of 5 timed runs after 2 warm-ups each). The real images are synthetic landmark views
rendered by demo.py (4 to calibrate, 16 to compare). Last line: `ort_speedup_b1=<x> ort_speedup_b8=<y>
int8_speedup_b8=<z>`: ONNX Runtime fp32 against eager fp32, and the suite's int8 form (static QDQ)
against eager fp32 at batch 8, for Swin_tiny.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import demo  # noqa: E402
import model as models  # noqa: E402
import precision  # noqa: E402
import serving  # noqa: E402


def images_per_second(run, images, repeats: int = 5) -> float:
    for _ in range(2):
        run(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(seconds)


def real_images(directory: str, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, comparison) batches of 16 rendered landmark views each, in the serving contract."""
    lists = demo.make_synthetic_landmarks(os.path.join(directory, 'views'), seed=1, num_train_landmarks=8,
                                          train_views=2, num_test_landmarks=4, test_views=4, image_size=img_size)

    def batch(list_path):
        samples = datasets.read_eval_samples(lists['root'], list_path)[:16]
        return np.stack([datasets.decode_eval_image(sample.path, img_size).float().div(255).numpy()
                         for sample in samples])
    return batch(lists['train_list']), batch(lists['test_list'])


def measure(backbone_name: str, img_size: int, directory: str, calibration, comparison) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    torch.manual_seed(0)
    backbone = models.create_backbone(backbone_name, img_size).eval()
    network = serving.ServingNetwork(backbone).eval()
    path = os.path.join(directory, f'{backbone_name}.onnx')
    serving.export_onnx(backbone, path, img_size, description={})
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])

    def eager(images):
        with torch.no_grad():
            return network(images)

    def bf16(images):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return network(images)

    def runtime(images):
        return session.run(None, {'images': images.numpy()})[0]

    # emulated bf16 (a CPU without avx512_bf16 or AMX) is about 8x slower than fp32: not a way to serve there
    native_bf16 = precision.native_bf16(torch.device('cpu'))[0]
    ways = {'eager_fp32': eager, **({'eager_bf16': bf16} if native_bf16 else {}), 'ort_fp32': runtime}
    reference = runtime(torch.from_numpy(comparison))
    for method in ('dynamic', 'static'):
        int8_path = os.path.join(directory, f'{backbone_name}-{method}.onnx')
        # batches of one image: calibration keeps every intermediate tensor of a batch (16 Swin images at 384 px
        # took more than 24 GB)
        images = [image[None] for image in calibration[:4]]
        if method == 'static':  # the suite's int8 form
            serving.quantize_onnx(path, int8_path, images, {})
        else:  # the alternative it was chosen against: int8 weights, activations quantized on the fly
            quantize_dynamic(path, int8_path, weight_type=QuantType.QInt8)
        int8 = onnxruntime.InferenceSession(int8_path, providers=['CPUExecutionProvider'])
        ways[f'ort_int8_{method}'] = lambda images, int8=int8: int8.run(None, {'images': images.numpy()})[0]
        cosine = float((ways[f'ort_int8_{method}'](torch.from_numpy(comparison)) * reference).sum(axis=1).mean())
        print(f'{backbone_name} int8 {method}: mean cosine to fp32 on real images {cosine:.5f}', flush=True)
    figures = {}
    for batch in (1, 8):
        images = torch.rand(batch, 3, img_size, img_size)
        for name, run in ways.items():
            figures[(name, batch)] = images_per_second(run, images)
        print(f'{backbone_name} {img_size} px batch {batch}: ' +
              ', '.join(f'{name} {figures[(name, batch)]:.2f} img/s' for name in ways), flush=True)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img_size', type=int, default=384)
    parser.add_argument('--backbones', nargs='+', default=['Swin_tiny', 'Resnet12', 'Swin_base'])
    args = parser.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; {precision.environment_line(torch.device("cpu"))}')
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        calibration, comparison = real_images(directory, args.img_size)
        for name in args.backbones:
            results[name] = measure(name, args.img_size, directory, calibration, comparison)
    if 'Swin_tiny' in results:
        tiny = results['Swin_tiny']
        int8 = 'ort_int8_static'
        print(' '.join(f'ort_speedup_b{batch}={tiny[("ort_fp32", batch)] / tiny[("eager_fp32", batch)]:.2f}'
                       for batch in (1, 8)) + f' int8_speedup_b8={tiny[(int8, 8)] / tiny[("eager_fp32", 8)]:.2f}')


if __name__ == '__main__':
    main()
