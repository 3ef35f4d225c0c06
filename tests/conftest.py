"""Shared fixtures: tiny image lists in the real format, teacher files, and a way to run main.py in-process."""
import os
import socket
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

# the README's command runs two test workers on the two cores: one thread each
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, torch.get_num_threads()))


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


def classifier_file(path, backbone: str = 'Resnet12', num_classes: int = 4, seed: int = 0) -> str:
    """A classifier (backbone at 96 px, widths / 8, and cosine head) saved in this project's own format: a teacher
    or a student file for the tests."""
    import model
    torch.manual_seed(seed)
    network = model.create_backbone(backbone, 96, 8)
    classifier = model.Classifier(network, model.CosFaceHead(num_classes, network.feature_dim))
    torch.save(model.student_weights(classifier, include_head=True), path)
    return str(path)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The suite never downloads (weights, data): a connection to anything but this machine fails the test."""
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ('127.0.0.1', 'localhost', '::1'):
            raise AssertionError(f'a test tried to reach {address}: the suite never downloads')
        return connect(self, address)
    monkeypatch.setattr(socket.socket, 'connect', local_only)


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
    import flags
    import main
    return main.main(flags.parse_args(argv))


# A main.py run with dropout and drop-path off, so that one process and several take the same steps; with
# WRONG_REDUCTION set, DDP sums the gradients over the processes instead of averaging them (a deliberate bug that the
# comparison of several processes with one must catch).
DDP_RUNNER = '''
import os
import sys
import torch
import torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, 'tests')]
import flags, helpers, main, model
from regularisers import regularisers_off

create_backbone = model.create_backbone


def summing(bucket_state, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda future: future.value()[0])


distributed_student = helpers.distributed_student


def with_summed_gradients(classifier, device):
    wrapped = distributed_student(classifier, device)
    network = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped.backbone
    network.register_comm_hook(None, summing)
    return wrapped


model.create_backbone = lambda *arguments, **keywords: regularisers_off(create_backbone(*arguments, **keywords))
if os.environ.get('WRONG_REDUCTION'):
    helpers.distributed_student = with_summed_gradients
main.main(flags.parse_args(sys.argv[1:]))
'''

# Two runs take the same steps when their updates (trained - initial weights) differ by less than this fraction of
# the update's norm: a GPU's reductions reorder sums (about 1e-6 of it), a wrong reduction is off by the whole update.
UPDATE_TOLERANCE = 1e-2


def update_difference(initial: dict, one: dict, two: dict) -> float:
    """||update_two - update_one|| / ||update_one|| over every floating-point tensor of `initial`; the updates are
    `one - initial` and `two - initial`. Fails when run one did not move the weights at all."""
    keys = [key for key, value in initial.items() if value.is_floating_point()]
    first = torch.cat([(one[key].float().cpu() - initial[key].float().cpu()).reshape(-1) for key in keys])
    second = torch.cat([(two[key].float().cpu() - initial[key].float().cpu()).reshape(-1) for key in keys])
    assert first.norm() > 0, 'the first run did not change the weights'
    return float((second - first).norm() / first.norm())
