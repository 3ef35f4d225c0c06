"""Seconds per distillation step and peak memory: this project's step, or the original's way of doing it.

    python bench/train_step.py --backbone_class Swin_tiny --batch 2 --img_size 384 --num_classes 252903 --amp bf16
    python bench/train_step.py ... --original      # fp32, two copies of the head, a dense one-hot margin matrix
    python bench/train_step.py ... --compare       # both, each in its own process, and their ratios
    python bench/train_step.py --device cuda --batch 32 --amp bf16 --mfu   # on a GPU, with model FLOP utilisation
    python bench/train_step.py --teacher_cache   # live teacher against its cache, Swin_tiny and Resnet12, and the
                                                 # cache pre-pass's images/s (each in its own process)

Last line: `step_s=<x> peak_gb=<y>` (median of 3 steps after a warm-up step; on the CPU the peak resident memory
above the process's resident memory before the models are built, the interpreter's and torch's own share left out as
cuda's peak allocated GPU memory leaves it out); with --mfu `img_s=<x> peak_gb=<y> mfu=<z>`, where mfu is the step's
achieved FLOP/s (counted by torch's FlopCounterMode) over a large bf16 matmul's FLOP/s on the same device.
"""
import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import helpers  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402
import precision  # noqa: E402
import trainer  # noqa: E402


class OriginalCosFace(nn.Module):
    """The original head: normalises its weight every call and subtracts the margin through a dense one-hot."""

    def __init__(self, num_classes: int, feature_dim: int, scale: float = 32.0, margin: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, features, labels):
        cosine = F.linear(F.normalize(features), F.normalize(self.weight))
        one_hot = torch.zeros_like(cosine).scatter_(1, labels.view(-1, 1), 1.0)
        return self.scale * (cosine - one_hot * self.margin)


def original_step_function(args):
    device = torch.device(args.device)
    teacher = model.create_backbone('Swin_base', args.img_size).to(device).eval().requires_grad_(False)
    student = model.create_backbone(args.backbone_class, args.img_size).to(device).train()
    teacher_head = OriginalCosFace(args.num_classes, 1024).to(device).requires_grad_(False)
    student_head = copy.deepcopy(teacher_head)
    transform = datasets.BatchTransform(augment=False)  # the original normalised in its loader workers
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=5e-4)

    def step(images, labels):
        images = transform(images, train=False)
        with torch.no_grad():
            teacher_logits = teacher_head(teacher(images), labels)
        student_logits = student_head(student(images), labels)
        teacher_probs = F.softmax(teacher_logits, dim=1)
        kd = (teacher_probs * (torch.log(teacher_probs + 1e-12) - F.log_softmax(student_logits / 4, dim=1))).sum()
        loss = F.cross_entropy(student_logits, labels) + kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def project_step_function(args):
    """The suite's own step (trainer.training_step) on the model helpers builds: the teacher live, or its features
    coming with the batch as from --teacher_cache."""
    device = torch.device(args.device)
    head = model.CosFaceHead(args.num_classes, model.FEATURE_DIM)
    student = model.Classifier(model.create_backbone(args.backbone_class, args.img_size), head)
    teacher = None if args.cached_teacher else model.Classifier(model.create_backbone('Swin_base', args.img_size), head)
    distiller = model.DistillationModel(student, teacher, stochastic_teacher=True,
                                        teacher_head=head if args.cached_teacher else None).to(device).train()
    parts = trainer.TrainingParts(
        distiller=distiller, student=helpers.prepare_student(distiller, fused_attention=args.fused_attention,
                                                             compile_backbone=False, world_size=1, device=device),
        criterion=losses.DistillationLoss('KD'),
        optimizer=torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-4, weight_decay=5e-4),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'), train_loader=None, val_loader=None,
        batch_transform=datasets.BatchTransform(augment=True), schedule=None)
    cached = torch.randn(args.batch, model.FEATURE_DIM, device=device) if args.cached_teacher else None

    def step(images, labels):
        batch = {'image': images, 'label': labels}
        if cached is not None:
            batch['teacher_feature'] = cached
        trainer.training_step(parts, batch, device, args.amp)
    return step


def prepass_step_function(args):
    """The cache pre-pass: the eval-mode Swin_base teacher's features, no gradients."""
    device = torch.device(args.device)
    teacher = model.create_backbone('Swin_base', args.img_size).to(device).eval()

    @torch.no_grad()
    def step(images, labels):
        with precision.autocast_context(device, args.amp):
            teacher(images)
    return step


def matmul_flops_per_second(device: torch.device, size: int = 8192) -> float:
    """FLOP/s of a large bf16 matmul on `device`: the peak the step is measured against."""
    left = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    right = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        left @ right
    synchronize(device)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        left @ right
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def step_flops(step, images, labels) -> float:
    """FLOPs of one step (forward and backward), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(images, labels)
    return float(counter.get_total_flops())


def resident_gb() -> float:
    """The process's resident memory now (Linux)."""
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1024 ** 3


def measure(args):
    torch.manual_seed(0)
    baseline_gb = resident_gb() if args.device == 'cpu' else 0.0
    device = torch.device(args.device)
    args.amp, precision_line = precision.choose_amp(args.amp, device)
    print(precision.environment_line(device))
    print(precision_line)
    step = (original_step_function(args) if args.original else prepass_step_function(args) if args.prepass
            else project_step_function(args))
    images = torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    step(images, labels)
    seconds = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        step(images, labels)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak_gb = torch.cuda.max_memory_allocated(device) / 1024 ** 3
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2 - baseline_gb
    mode = ('original' if args.original else f'cache pre-pass amp={args.amp}' if args.prepass else
            f'project{" from the teacher cache" if args.cached_teacher else ""} amp={args.amp}')
    step_s = statistics.median(seconds)
    network = 'Swin_base teacher' if args.prepass else args.backbone_class
    print(f'{mode}: {network} batch {args.batch} img {args.img_size} classes {args.num_classes} '
          f'{device} threads {torch.get_num_threads()}: steps {", ".join(f"{s:.3f}" for s in seconds)} s, '
          f'{args.batch / step_s:.1f} img/s')
    if args.mfu:
        flops = step_flops(step, images, labels)
        peak = matmul_flops_per_second(device)
        print(f'step {flops / 1e12:.2f} TFLOP, {flops / step_s / 1e12:.1f} TFLOP/s; bf16 matmul peak '
              f'{peak / 1e12:.1f} TFLOP/s')
        print(f'img_s={args.batch / step_s:.1f} peak_gb={peak_gb:.2f} mfu={flops / step_s / peak:.3f}')
        return
    print(f'step_s={step_s:.3f} peak_gb={peak_gb:.2f}')


def compare(args):
    """Each mode in its own process, so that each peak memory is its own."""
    results = {name: run_alone(args, ['--backbone_class', args.backbone_class] + extra)
               for name, extra in (('original', ['--original']), ('project', []))}
    speedup = results['original']['step_s'] / results['project']['step_s']
    memory_ratio = results['project']['peak_gb'] / results['original']['peak_gb']
    print(f'speedup={speedup:.2f} memory_ratio={memory_ratio:.2f}')
    print(f'step_s={results["project"]["step_s"]:.3f} peak_gb={results["project"]["peak_gb"]:.2f}')


def teacher_cache(args, rounds: int = 2):
    """The step with a live teacher against the step from its cache, for both students, and the pre-pass.

    The modes alternate for `rounds` rounds and each keeps its fastest median: this machine's step times drift by
    a third from one minute to the next, which a single live-then-cached pass reads as a speedup or a loss."""
    results = {}
    for _ in range(rounds):
        for backbone in ('Swin_tiny', 'Resnet12'):
            for name, extra in (('live', []), ('cached', ['--cached_teacher'])):
                figures = run_alone(args, ['--backbone_class', backbone] + extra)
                best = results.setdefault((backbone, name), figures)
                best['step_s'] = min(best['step_s'], figures['step_s'])
    prepass = run_alone(args, ['--prepass', '--batch', str(4 * args.batch)])
    print(f'pre-pass: {4 * args.batch / prepass["step_s"]:.1f} img/s')
    speedups = {backbone: results[backbone, 'live']['step_s'] / results[backbone, 'cached']['step_s']
                for backbone in ('Swin_tiny', 'Resnet12')}
    peak_ratio = results['Swin_tiny', 'cached']['peak_gb'] / results['Swin_tiny', 'live']['peak_gb']
    print(f'cache_speedup_swin_tiny={speedups["Swin_tiny"]:.2f} cache_speedup_resnet12={speedups["Resnet12"]:.2f} '
          f'cache_peak_ratio_swin_tiny={peak_ratio:.2f}')


def run_alone(args, extra: list[str]) -> dict:
    """One measurement in its own process (its own peak memory); its last line's figures."""
    command = [sys.executable, os.path.abspath(__file__), '--batch', str(args.batch), '--img_size', str(args.img_size),
               '--num_classes', str(args.num_classes), '--device', args.device, '--amp', args.amp]
    output = subprocess.run(command + extra, check=True, capture_output=True, text=True).stdout
    print(output, end='')
    return {key: float(value) for key, value in (field.split('=') for field in output.strip().splitlines()[-1].split())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbone_class', default='Swin_tiny', choices=('Swin_tiny', 'Resnet12'))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--img_size', type=int, default=384)
    parser.add_argument('--num_classes', type=int, default=252903)
    parser.add_argument('--amp', default='auto', choices=precision.AMP_CHOICES,
                        help="auto: bf16 where the device computes it natively, else fp16 (GPU) or float32 (CPU)")
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--fused_attention', action='store_true', help="Swin: torch's fused attention kernels")
    parser.add_argument('--mfu', action='store_true', help='also count the step\'s FLOPs against a bf16 matmul')
    parser.add_argument('--original', action='store_true', help="the original's fp32 step with two heads")
    parser.add_argument('--compare', action='store_true', help='run both, each in its own process')
    parser.add_argument('--cached_teacher', action='store_true', help='the step from the teacher cache')
    parser.add_argument('--prepass', action='store_true', help="the cache pre-pass: the teacher's forward alone")
    parser.add_argument('--teacher_cache', action='store_true', help='live teacher against its cache, both students')
    args = parser.parse_args()
    teacher_cache(args) if args.teacher_cache else compare(args) if args.compare else measure(args)


if __name__ == '__main__':
    main()
