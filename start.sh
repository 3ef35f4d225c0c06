#!/bin/sh
# Run a published recipe with torchrun on all local GPUs, or, given no data and no teacher, the CPU demo.
#
#   TEACHER=/path/teacher.pyth TRAIN_ROOT=/data/train TRAIN_LIST=/data/train.txt \
#   VAL_ROOT=/data/val VAL_LIST=/data/val.txt TEST_ROOT=/data/test TEST_LIST=/data/test.txt sh start.sh
#
#   STUDENT=Resnet12   the ResNet12 recipe (40 epochs, SGD 0.01) instead of Swin_tiny (200, AdamW 0.001)
#   NPROC=4            processes on this host (default: every visible GPU, else 1)
#   SAVE_DIR=...       where run directories go (default ./checkpoints)
#   AMP=none           fp32 instead of bf16 autocast (default bf16 on GPUs, none on a CPU)
#   Cluster: HOST_NUM, HOST_GPU_NUM, INDEX and CHIEF_IP (set by the scheduler) make a multi-host run.
#   Further arguments go to main.py as they are, e.g. `sh start.sh --num_workers 12`.
#
#   With neither TEACHER nor TRAIN_LIST: the demo (synthetic landmarks, CPU, about 10 minutes), written to
#   DEMO_DIR (default ./demo_output); its table is DEMO_DIR/results.md.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

run_demo() {
    demo_dir=${DEMO_DIR:-./demo_output}
    size=${DEMO_IMG_SIZE:-64}
    width=${DEMO_WIDTH_DIVISOR:-4}
    data="$demo_dir/data"
    runs="$demo_dir/runs"
    echo "demo: synthetic landmarks in $data, runs in $runs"
    "$PYTHON" helpers.py "$data" --seed 0
    common="--dataset Synthetic --img_size $size --demo_width_divisor $width --num_workers 1 --amp bf16
            --save_dir $runs --augment --eval_interval 100 --log_interval 10
            --train_root $data --train_list $data/train.txt --val_root $data --val_list $data/val.txt
            --test_root $data --test_list $data/test.txt"
    # shellcheck disable=SC2086
    "$PYTHON" main.py $common --backbone_class Swin_base --max_epoch "${DEMO_TEACHER_EPOCHS:-12}" \
        --warmup_epoch 1 --batch_size 32 --lr 0.002 --optim AdamW --weight_decay 0.05
    teacher=$(ls "$runs"/Synthetic-Swin_base-no_distill/*/max_acc.pth)
    distill="--is_distill --teacher_backbone_class Swin_base --teacher_init_weights $teacher --head_fixed
             --kd_loss KD --kd_weight 1.0 --batch_size 32"
    # shellcheck disable=SC2086
    "$PYTHON" main.py $common $distill --backbone_class Swin_tiny --max_epoch "${DEMO_STUDENT_EPOCHS:-8}" \
        --warmup_epoch 1 --lr 0.002 --optim AdamW --weight_decay 0.05
    # shellcheck disable=SC2086
    "$PYTHON" main.py $common $distill --backbone_class Resnet12 --max_epoch "${DEMO_STUDENT_EPOCHS:-8}" \
        --warmup_epoch 0 --lr 0.05 --optim SGD --momentum 0.9
    # shellcheck disable=SC2086
    "$PYTHON" main.py $common $distill --backbone_class Swin_tiny --max_epoch 0 --warmup_epoch 0 \
        --suffix -untrained
    "$PYTHON" utils.py --demo_results "$runs" --output "$demo_dir/results.md"
}

if [ -z "${TEACHER:-}" ] && [ -z "${TRAIN_LIST:-}" ]; then
    run_demo
    exit 0
fi

: "${TEACHER:?set TEACHER to the teacher checkpoint}"
: "${TRAIN_ROOT:?set TRAIN_ROOT to the training image root}"
: "${TRAIN_LIST:?set TRAIN_LIST to the training list}"
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-${HOST_GPU_NUM:-$gpus}}
[ "$NPROC" -ge 1 ] || NPROC=1
if [ "$gpus" -ge 1 ]; then AMP=${AMP:-bf16}; else AMP=${AMP:-none}; fi

case "${STUDENT:-Swin_tiny}" in
    Swin_tiny) recipe="--backbone_class Swin_tiny --max_epoch 200 --warmup_epoch 10 --lr 0.001 --optim AdamW" ;;
    Resnet12) recipe="--backbone_class Resnet12 --max_epoch 40 --warmup_epoch 0 --lr 0.01 --optim SGD" ;;
    *) echo "STUDENT must be Swin_tiny or Resnet12, not ${STUDENT}" >&2; exit 2 ;;
esac

data="--train_root $TRAIN_ROOT --train_list $TRAIN_LIST"
[ -z "${VAL_LIST:-}" ] || data="$data --val_root ${VAL_ROOT:?set VAL_ROOT too} --val_list $VAL_LIST"
[ -z "${TEST_LIST:-}" ] || data="$data --test_root ${TEST_ROOT:?set TEST_ROOT too} --test_list $TEST_LIST"

if [ "${HOST_NUM:-1}" -gt 1 ]; then
    launcher="--nnodes $HOST_NUM --node_rank ${INDEX:?INDEX is this host's rank} --master_addr ${CHIEF_IP:?CHIEF_IP}
              --master_port ${MASTER_PORT:-29500} --nproc_per_node $NPROC"
else
    launcher="--standalone --nproc_per_node $NPROC"
fi

# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run $launcher main.py $recipe $data \
    --batch_size 256 --lr_scheduler cosine --augment --is_distill --teacher_backbone_class Swin_base \
    --teacher_init_weights "$TEACHER" --kd_loss KD --kd_weight 1.0 --head_fixed --amp "$AMP" \
    --save_dir "${SAVE_DIR:-./checkpoints}" "$@"
