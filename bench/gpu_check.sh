#!/bin/sh
# Every GPU check in one go, under 10 minutes on one GPU: the GPU tests, the training step on cuda at 32 images
# per GPU in bf16 and fp16 (images/s, peak memory, model FLOP utilisation against a bf16 matmul measured in the same
# run), Swin's fused attention, the original's step for comparison, the step from the teacher cache against the
# live teacher, and a 2-process NCCL run where there are two GPUs. Last line: img_s=<x> peak_gb=<y> mfu=<z> of the Swin-tiny bf16 step.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "bf16 native:",
torch.cuda.get_device_capability()[0] >= 8)'
"$PYTHON" -m pytest -q tests/test_cuda.py
step="$PYTHON bench/train_step.py --device cuda --batch 32 --img_size 384 --num_classes 252903"
$step --backbone_class Resnet12 --amp bf16 --mfu | tail -1
$step --backbone_class Swin_tiny --amp fp16 --mfu | tail -1
$step --backbone_class Swin_tiny --amp bf16 --fused_attention --mfu | tail -1
$step --backbone_class Swin_tiny --amp none --original | tail -1
$step --amp bf16 --teacher_cache | tail -2
$step --backbone_class Swin_tiny --amp bf16 --mfu | tail -1
