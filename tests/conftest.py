"""Shared fixtures: tiny image lists in the real format, teacher files, and a way to run main.py in-process."""
import os
import sys

# The suite runs on the CPU, where exactness tests can be exact: a GPU stays hidden (before torch first looks), and
# tests/test_cuda.py gives the original visibility back to the processes it starts.
ORIGINAL_CUDA_VISIBLE_DEVICES = os.environ.get('CUDA_VISIBLE_DEVICES')
os.environ['CUDA_VISIBLE_DEVICES'] = ''

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_image_list(root: str, list_name: str, labels: list[int], size: int = 48, seed: int = 0,
                     fine_labels: list[int] | None = None) -> str:
    """JPEGs whose colour pattern depends on the label, and a tab-separated list; returns the list path."""
    generator = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    lines = []
    for index, label in enumerate(labels):
        base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], dtype=np.float32)
        pixels = base + generator.normal(0, 25, size=(size, size, 3))
        name = f'{os.path.splitext(list_name)[0]}_{index:04d}.jpg'
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, name), quality=90)
        fields = [name, f'img{index}', str(label)]
        if fine_labels is not None:
            fields.append(str(fine_labels[index]))
        lines.append('\t'.join(fields))
    list_path = os.path.join(root, list_name)
    with open(list_path, 'w', encoding='utf-8') as handle:
        handle.write('\n'.join(lines) + '\n')
    return list_path


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """4 training classes (6 views each), a val list in their label space, 3 unseen test landmarks x 4 views."""
    root = str(tmp_path_factory.mktemp('tiny_data'))
    train = write_image_list(root, 'train.txt', [label for label in range(4) for _ in range(6)], seed=1)
    val = write_image_list(root, 'val.txt', [label for label in range(4) for _ in range(2)], seed=2)
    test_labels = [label for label in range(3) for _ in range(4)]
    test = write_image_list(root, 'test.txt', [10 + label for label in test_labels], seed=3,
                            fine_labels=[20 + 2 * label + view % 2 for label, view in
                                         zip(test_labels, range(len(test_labels)))])
    return {'root': root, 'train': train, 'val': val, 'test': test}


def data_args(tiny_data) -> list[str]:
    return ['--train_root', tiny_data['root'], '--train_list', tiny_data['train'],
            '--val_root', tiny_data['root'], '--val_list', tiny_data['val'],
            '--test_root', tiny_data['root'], '--test_list', tiny_data['test']]


def run_main(argv: list[str]):
    """Parse `argv` as main.py would and run it in this process."""
    import main
    return main.main(main.get_parser().parse_args(argv))
