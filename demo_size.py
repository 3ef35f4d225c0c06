"""The CPU demo's size: a few training steps of each of its models, measured on this machine in the precision the
demo will run in, and the largest demo predicted to finish within the time budget.

    python demo_size.py [--budget_minutes 8] [--amp auto] [--size NAME]

Prints what it measured and chose on stderr, and on stdout one line for start.sh:
`NAME LANDMARKS VIEWS WIDTH_DIVISOR BATCH_SIZE TEACHER_EPOCHS SWIN_EPOCHS RESNET_EPOCHS AMP`.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

import demo
import model
import precision

IMAGE_SIZE, RENDER_SIZE = 32, 96  # start.sh's demo training size; demo.py's image size
VALIDATION_VIEWS, TEST_LANDMARKS, TEST_VIEWS = 2, 50, 10
# Measured against whole demos on a 2-core machine: the loader's JPEG decoding shares the cores with the step
# (1.4x the step alone), and each of the five processes starts, builds its models and writes its files.
LOADING_FACTOR, SECONDS_PER_PROCESS, SECONDS_PER_EPOCH = 1.4, 6.0, 1.5
MEASURED_STEPS = 2


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """One size of the demo: its training landmarks and views, the models' width divisor, the batch and each run's
    epochs."""
    name: str
    landmarks: int
    views: int
    width_divisor: int
    batch_size: int
    teacher_epochs: int
    swin_epochs: int
    resnet_epochs: int

    def line(self, amp: str) -> str:
        return (f'{self.name} {self.landmarks} {self.views} {self.width_divisor} {self.batch_size} '
                f'{self.teacher_epochs} {self.swin_epochs} {self.resnet_epochs} {amp}')

    def describe(self) -> str:
        return (f"'{self.name}' ({self.landmarks} landmarks x {self.views} views, widths / {self.width_divisor}, "
                f'batch {self.batch_size}, epochs {self.teacher_epochs} / {self.swin_epochs} / {self.resnet_epochs})')


# Largest first. Quality follows the teacher's steps: fewer images at batch 128 (fewer steps) missed the targets (an
# eighth over seeds 0-2, a quarter on seed 0), and so did widths / 8 at the full size with 3 and 4 student epochs;
# half the images at batch 64 (the teacher's steps kept), widths / 8 and more student epochs (cheap at that width)
# meet them (bench/demo_sizes.py, README), at about half the full size's time.
DEMO_SIZES = (DemoSize('full', 300, 40, 4, 128, 7, 3, 4),
              DemoSize('small', 150, 40, 8, 64, 7, 5, 6))
SIZES_BY_NAME = {size.name: size for size in DEMO_SIZES}


def step_seconds(backbone_name: str, width_divisor: int, batch_size: int, amp: str) -> float:
    """The median seconds of a training step of `backbone_name` at the demo's image size, these widths and batch."""
    torch.manual_seed(0)
    backbone = model.create_backbone(backbone_name, IMAGE_SIZE, width_divisor).train()
    head = torch.nn.Linear(backbone.feature_dim, DEMO_SIZES[0].landmarks)
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()))
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, DEMO_SIZES[0].landmarks, (batch_size,))
    seconds = []
    for _ in range(MEASURED_STEPS + 1):  # the first step builds the kernels and is not counted
        started = time.perf_counter()
        with precision.autocast_context(torch.device('cpu'), amp):
            loss = torch.nn.functional.cross_entropy(head(backbone(images)).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def render_seconds(views: int = 6) -> float:
    """Seconds to render and write one view of the synthetic data set, in one process."""
    started = time.perf_counter()
    landmark = demo.render_landmark(demo.random_landmark(np.random.default_rng(0)), demo.CANVAS_SCALE * RENDER_SIZE)
    for view in range(views):
        demo.render_view(landmark, np.random.default_rng(view), RENDER_SIZE)
    return (time.perf_counter() - started) / views


def predicted_seconds(size: DemoSize, steps: dict, render: float, processes: int) -> float:
    """The demo's predicted seconds at `size`: data, teacher, the cache's pre-pass, both students, the floor's test;
    `steps` maps (backbone, width divisor, batch) to its step's seconds (a forward pass costs a third of a step)."""
    train, validation = size.landmarks * size.views, size.landmarks * VALIDATION_VIEWS
    test = TEST_LANDMARKS * TEST_VIEWS
    teacher, swin, resnet = (steps[name, size.width_divisor, size.batch_size]
                             for name in ('Swin_base', 'Swin_tiny', 'Resnet12'))

    def batches(images: int) -> float:
        return images / size.batch_size

    def training(step: float, epochs: int) -> float:
        per_epoch = (train // size.batch_size) * step + batches(validation) * step / 3 + SECONDS_PER_EPOCH
        return epochs * per_epoch + batches(test) * step / 3
    compute = (training(teacher, size.teacher_epochs) + batches(train) * teacher / 3
               + training(swin, size.swin_epochs) + training(resnet, size.resnet_epochs)
               + batches(test) * (swin + 2 * teacher) / 3)
    data = (train + validation + test) * render / processes
    return data + LOADING_FACTOR * compute + 5 * SECONDS_PER_PROCESS


def choose_size(budget_seconds: float, steps: dict, render: float, processes: int) -> tuple[DemoSize, float]:
    """The largest size predicted to fit the budget (else the smallest), and its predicted seconds."""
    for size in DEMO_SIZES:
        seconds = predicted_seconds(size, steps, render, processes)
        if seconds <= budget_seconds:
            return size, seconds
    return DEMO_SIZES[-1], predicted_seconds(DEMO_SIZES[-1], steps, render, processes)


def measure(amp: str) -> tuple[dict, float]:
    """Step seconds of each model at each width divisor and batch the sizes use, and a view's rendering seconds."""
    steps = {(name, divisor, batch): step_seconds(name, divisor, batch, amp)
             for divisor, batch in sorted({(size.width_divisor, size.batch_size) for size in DEMO_SIZES})
             for name in ('Swin_base', 'Swin_tiny', 'Resnet12')}
    return steps, render_seconds()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--budget_minutes', type=float, default=8.0)
    parser.add_argument('--amp', default='auto', choices=('auto', 'none', 'bf16'))
    parser.add_argument('--size', default=None, choices=tuple(SIZES_BY_NAME), help='take this size, measure nothing')
    arguments = parser.parse_args(argv)
    cpu = torch.device('cpu')
    amp, precision_line = precision.choose_amp(arguments.amp, cpu)
    if arguments.size:
        print(SIZES_BY_NAME[arguments.size].line(amp))
        return
    print(f'demo: {precision.environment_line(cpu)}; {precision_line}', file=sys.stderr)
    started = time.perf_counter()
    steps, render = measure(amp)
    budget = arguments.budget_minutes * 60 - (time.perf_counter() - started)
    size, seconds = choose_size(budget, steps, render, min(4, os.cpu_count() or 1))
    teacher = steps['Swin_base', size.width_divisor, size.batch_size]
    fits = 'fits' if seconds <= budget else 'is the smallest; it does not fit'
    print(f'demo: a teacher step takes {teacher:.2f} s here; the size {size.describe()} {fits} '
          f'{arguments.budget_minutes:g} minutes (about {seconds / 60:.1f} predicted)', file=sys.stderr)
    print(size.line(amp))


if __name__ == '__main__':
    main()
