#!/bin/sh
# Run a published recipe with torchrun on all local GPUs (one process: main.py itself, so that an error is the last
# line printed), or, given no data and no teacher, the CPU demo.
#
#   TEACHER=/path/teacher.pyth TRAIN_ROOT=/data/train TRAIN_LIST=/data/train.txt \
#   VAL_ROOT=/data/val VAL_LIST=/data/val.txt TEST_ROOT=/data/test TEST_LIST=/data/test.txt sh start.sh
#
#   STUDENT=Resnet12   the ResNet12 recipe (40 epochs, SGD 0.01) instead of Swin_tiny (200, AdamW 0.001)
#   NPROC=4            processes on this host (default: HOST_GPU_NUM when set, else every visible GPU, else 1)
#   SAVE_DIR=...       where run directories go (default ./checkpoints)
#   AMP=none           fp32 instead of autocast (default auto: bf16 where the device computes it natively, i.e.
#                      Ampere and newer GPUs or a CPU with avx512_bf16 or AMX; else fp16 on a GPU, fp32 on a CPU)
#   PYTHON=...         the interpreter (default python3, else python)
#   Several training lists: TRAIN_ROOT="R1 R2" TRAIN_LIST="L1 L2" (paths without spaces). Google Landmarks v2 as it
#   ships: TRAIN_ROOT=/data/gldv2 (no TRAIN_LIST) and `sh start.sh --train_format gldv2`.
#   Cluster: HOST_NUM, HOST_GPU_NUM, INDEX and CHIEF_IP (set by the scheduler) make a multi-host run;
#   MASTER_PORT (default 29500). SAVE_DIR must then be storage that every host sees.
#   Further arguments go to main.py as they are, e.g. `sh start.sh --num_workers 12` (recipe and test runs; the
#   demo takes none).
#
#   Test existing weights (ours or the original's max_acc.pth) on every local GPU: the test list and the weights
#   are enough; TEACHER adds the teacher's and the cross (student query vs teacher gallery) figures.
#
#   TEST_ROOT=/data/test TEST_LIST=/data/test.txt [TEACHER=...] [STUDENT=Resnet12] \
#   sh start.sh --test_only --init_weights /path/max_acc.pth
#
#   With none of TEACHER, TRAIN_LIST, TEST_LIST and --test_only: the demo (synthetic landmarks, CPU, sized to finish
#   within 8 minutes on this machine), written to DEMO_DIR (default ./demo_output); its table is DEMO_DIR/results.md,
#   its figure DEMO_DIR/summary.png. It first times a few training steps of each model and takes the largest size
#   predicted to fit (demo_size.py: full, small), said in a line and kept in DEMO_DIR/size.txt for
#   reruns, which reuse the data set (checked) and the finished runs.
#   DEMO_SIZE (a size by name, nothing measured), DEMO_MINUTES (8), DEMO_AMP (auto: bf16 where the CPU computes it
#   natively, else float32), DEMO_SEED (0: the seed of the demo's data and of every run in it, so that other seeds
#   show how much of the table is the seed). One setting of the size: DEMO_LANDMARKS, DEMO_VIEWS (per training
#   landmark), DEMO_TEST_LANDMARKS (50), DEMO_IMG_SIZE (32), DEMO_WIDTH_DIVISOR, DEMO_BATCH, DEMO_TEACHER_EPOCHS,
#   DEMO_STUDENT_EPOCHS (Swin-tiny), DEMO_RESNET12_EPOCHS.
set -eu
# paths stay relative to the caller's directory; the project's scripts are found beside this file
here=$(dirname "$0")
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python)}

run_demo() {
    demo_dir=${DEMO_DIR:-./demo_output}
    seed=${DEMO_SEED:-0}
    mkdir -p "$demo_dir"
    # the size: DEMO_SIZE, else the one chosen on the first run in DEMO_DIR (a rerun reuses its data and runs), else
    # measured: a few steps of each model, then the largest demo predicted to finish within DEMO_MINUTES
    size_file="$demo_dir/size.txt"
    if [ -n "${DEMO_SIZE:-}" ]; then
        plan=$("$PYTHON" "$here/demo_size.py" --size "$DEMO_SIZE" --amp "${DEMO_AMP:-auto}")
    elif [ -s "$size_file" ]; then
        plan=$(cat "$size_file")
        echo "demo: the size chosen on this directory's first run ($size_file; DEMO_SIZE or removing it chooses again)"
    else
        plan=$("$PYTHON" "$here/demo_size.py" --budget_minutes "${DEMO_MINUTES:-8}" --amp "${DEMO_AMP:-auto}")
        echo "$plan" > "$size_file"
    fi
    # shellcheck disable=SC2086
    set -- $plan
    [ "$#" = 9 ] || { echo "demo: demo_size.py gave no size ('$plan')" >&2; exit 1; }
    landmarks=${DEMO_LANDMARKS:-$2} views=${DEMO_VIEWS:-$3} divisor=${DEMO_WIDTH_DIVISOR:-$4} batch=${DEMO_BATCH:-$5}
    teacher_epochs=${DEMO_TEACHER_EPOCHS:-$6} swin_epochs=${DEMO_STUDENT_EPOCHS:-$7}
    resnet_epochs=${DEMO_RESNET12_EPOCHS:-$8} amp=$9 size=${DEMO_IMG_SIZE:-32} test_landmarks=${DEMO_TEST_LANDMARKS:-50}
    echo "demo: size $1: $landmarks landmarks x $views views, widths / $divisor, batch $batch, epochs" \
         "$teacher_epochs (teacher), $swin_epochs (Swin-tiny), $resnet_epochs (ResNet12), --amp $amp, seed $seed"
    # one data set per seed and size, made once; one set of runs per seed, size and widths
    key="seed$seed-${landmarks}x$views-test$test_landmarks"
    data="$demo_dir/data/$key"
    runs="$demo_dir/runs/$key-w$divisor-b$batch-e$teacher_epochs.$swin_epochs.$resnet_epochs-$size"px
    echo "demo: synthetic landmarks in $data, runs in $runs"
    "$PYTHON" "$here/demo.py" data "$data" --seed "$seed" --num_train_landmarks "$landmarks" \
        --train_views "$views" --num_test_landmarks "$test_landmarks" > /dev/null
    # the CPU demo narrows every width by the divisor; the architectures are otherwise the real ones.
    # Batches of 128 keep two CPU cores busy (tiny widths leave small batches to per-operation overheads); the
    # smallest size takes 64 for as many steps on half the images.
    common="--dataset Synthetic --img_size $size --demo_width_divisor $divisor --amp $amp
            --num_workers 1 --batch_size $batch --optim AdamW --weight_decay 0.05 --warmup_epoch 1 --eval_interval 1
            --log_interval 10 --seed $seed
            --save_dir $runs --train_root $data --train_list $data/train.txt --val_root $data
            --val_list $data/val.txt --test_root $data --test_list $data/test.txt"
    echo "demo: Swin_base teacher trained with cross-entropy on its cosine head"
    # shellcheck disable=SC2086
    "$PYTHON" "$here/main.py" $common --backbone_class Swin_base --num_classes "$landmarks" \
        --max_epoch "$teacher_epochs" --lr 0.001
    teacher="$runs/Synthetic-Swin_base-no_distill-NoAug/lr0.001_AdamW_cosine_epoch${teacher_epochs}_warmup1_bs$batch/max_acc.pth"
    distill="--is_distill --teacher_backbone_class Swin_base --teacher_init_weights $teacher --head_fixed
             --kd_loss KD --kd_weight 1.0"
    # both students read the teacher's features from one cache (the eval-mode teacher's, computed by the first: no
    # teacher while training) and add the feature term: the configuration bench/distill_quality.py chose (README)
    cached="--teacher_cache $runs/teacher_cache --feature_kd_weight 1"
    echo "demo: Swin_tiny student distilled with the teacher's frozen head"
    # shellcheck disable=SC2086
    "$PYTHON" "$here/main.py" $common $distill $cached --backbone_class Swin_tiny --lr 0.001 \
        --max_epoch "$swin_epochs"
    echo "demo: Resnet12 student distilled with the teacher's frozen head"
    # shellcheck disable=SC2086
    "$PYTHON" "$here/main.py" $common $distill $cached --backbone_class Resnet12 --lr 0.002 \
        --max_epoch "$resnet_epochs"
    echo "demo: untrained Swin_tiny student (the floor)"
    # shellcheck disable=SC2086
    "$PYTHON" "$here/main.py" $common $distill --backbone_class Swin_tiny --lr 0.001 --max_epoch 0 --suffix=-untrained
    "$PYTHON" "$here/demo.py" report "$runs" "$demo_dir"
}

test_only=0 gldv2=0 previous=""
for argument in "$@"; do
    [ "$argument" != --test_only ] || test_only=1
    [ "$previous $argument" != "--train_format gldv2" ] && [ "$argument" != --train_format=gldv2 ] || gldv2=1
    previous=$argument
done

if [ "$test_only" = 0 ] && [ -z "${TEACHER:-}" ] && [ -z "${TRAIN_LIST:-}" ] && [ -z "${TEST_LIST:-}" ]; then
    if [ "$#" -gt 0 ]; then
        echo "arguments go to main.py with a recipe run: set TEACHER and TRAIN_ROOT/TRAIN_LIST (see the top of start.sh)" >&2
        exit 2
    fi
    run_demo
    exit 0
fi

if [ "$test_only" = 1 ]; then
    : "${TEST_ROOT:?set TEST_ROOT to the test image root}"
    : "${TEST_LIST:?set TEST_LIST to the test list}"
else
    : "${TEACHER:?set TEACHER to the teacher checkpoint}"
    : "${TRAIN_ROOT:?set TRAIN_ROOT to the training image root (with --train_format gldv2: the GLDv2 directory)}"
    [ "$gldv2" = 1 ] || : "${TRAIN_LIST:?set TRAIN_LIST to the training list}"
fi
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-${HOST_GPU_NUM:-$gpus}}
case "$NPROC" in
    ''|*[!0-9]*) echo "NPROC must be a number of processes, not '$NPROC'" >&2; exit 2 ;;
esac
[ "$NPROC" -ge 1 ] || NPROC=1
AMP=${AMP:-auto}  # main.py says what it chose and why

case "${STUDENT:-Swin_tiny}" in
    Swin_tiny) recipe="--backbone_class Swin_tiny --max_epoch 200 --warmup_epoch 10 --lr 0.001 --optim AdamW" ;;
    Resnet12) recipe="--backbone_class Resnet12 --max_epoch 40 --warmup_epoch 0 --lr 0.01 --optim SGD" ;;
    *) echo "STUDENT must be Swin_tiny or Resnet12, not ${STUDENT}" >&2; exit 2 ;;
esac

data=""
[ -z "${TRAIN_LIST:-}" ] || [ "$test_only" = 1 ] || data="--train_root ${TRAIN_ROOT:?set TRAIN_ROOT too} --train_list $TRAIN_LIST"
[ "$gldv2" = 0 ] || data="--train_root $TRAIN_ROOT"
[ -z "${VAL_LIST:-}" ] || [ "$test_only" = 1 ] || data="$data --val_root ${VAL_ROOT:?set VAL_ROOT too} --val_list $VAL_LIST"
[ -z "${TEST_LIST:-}" ] || data="$data --test_root ${TEST_ROOT:?set TEST_ROOT too} --test_list $TEST_LIST"

if [ "${HOST_NUM:-1}" -gt 1 ]; then
    launcher="--nnodes $HOST_NUM --node_rank ${INDEX:?INDEX is this host's rank} --master_addr ${CHIEF_IP:?CHIEF_IP}
              --master_port ${MASTER_PORT:-29500} --nproc_per_node $NPROC"
else
    launcher="--standalone --nproc_per_node $NPROC"
fi

# one process on one host runs main.py itself; several go through launch.py (torchrun without its traceback): the
# run's one-line error or stop message is the last line printed either way
if [ "$NPROC" = 1 ] && [ "${HOST_NUM:-1}" -le 1 ]; then launch=""; else launch="$here/launch.py $launcher"; fi

if [ "$test_only" = 1 ]; then
    # the weights file says how to build its model (the original's files: STUDENT names their backbone) and the
    # results go beside it (or in SAVE_DIR); TEACHER adds its own and the cross figures
    extra=""
    [ -z "${STUDENT:-}" ] || extra="--backbone_class $STUDENT"
    [ -z "${TEACHER:-}" ] || extra="$extra --teacher_init_weights $TEACHER"
    [ -z "${SAVE_DIR:-}" ] || extra="$extra --save_dir $SAVE_DIR"
    # shellcheck disable=SC2086
    exec "$PYTHON" $launch "$here/main.py" $data $extra --batch_size 256 --amp "$AMP" "$@"
fi

# shellcheck disable=SC2086
exec "$PYTHON" $launch "$here/main.py" $recipe $data \
    --batch_size 256 --lr_scheduler cosine --augment --is_distill --teacher_backbone_class Swin_base \
    --teacher_init_weights "$TEACHER" --kd_loss KD --kd_weight 1.0 --head_fixed --amp "$AMP" \
    --save_dir "${SAVE_DIR:-./checkpoints}" "$@"
