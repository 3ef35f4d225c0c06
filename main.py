"""Distil a landmark teacher into a student that shares its frozen classifier; train, resume, test.

Single process:  python main.py --backbone_class Swin_tiny --is_distill --teacher_init_weights T.pth ...
Several GPUs:    torchrun --nproc_per_node 8 main.py ...   (DDP; --batch_size is the global batch)
"""
import argparse
import dataclasses
import hashlib
import math
import os

import torch
import torch.distributed as dist

import checkpoints
import evaluation
import helpers
import model as models
import resnet12
import swin_transformer
import trainer
import utils


def get_parser() -> argparse.ArgumentParser:
    """The original's flags, under their names, plus this project's, in groups."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_flags(parser.add_argument_group('model and schedule'))
    add_distillation_flags(parser.add_argument_group('distillation'))
    add_data_flags(parser.add_argument_group('data'))
    add_run_flags(parser.add_argument_group('the run'))
    return parser


def add_recipe_flags(group):
    """The model, its schedule and optimizer."""
    add = group.add_argument
    add('--backbone_class', default='Swin_tiny', choices=models.BACKBONE_NAMES)
    add('--init_weights', default=None, help='student weights to start from (or to test with --test_only)')
    add('--img_size', type=int, default=384)
    add('--num_classes', type=int, default=None, help="default: the teacher's classifier, else 252903")
    add('--max_epoch', type=int, default=200)
    add('--warmup_epoch', type=int, default=10)
    add('--batch_size', type=int, default=256, help='global batch over all processes')
    add('--lr', type=float, default=0.001)
    add('--min_lr', type=float, default=1e-6, help='floor of the cosine schedule (the original\'s 1e-6)')
    add('--optim', default='AdamW', choices=('SGD', 'Adam', 'AdamW'))
    add('--momentum', type=float, default=0.0, help='SGD momentum (the original used none)')
    add('--weight_decay', type=float, default=5e-4)
    add('--lr_scheduler', default='cosine', choices=('cosine', 'step', 'multistep'))
    add('--step_size', default='30', help='epochs between decays (step) or comma-separated epochs (multistep)')
    add('--gamma', type=float, default=0.1)
    add('--drop_block', default='published', choices=resnet12.DROP_BLOCK_SCHEDULES,
        help="Resnet12: 'published' keeps the keep rate of the published multi-GPU run (1 - 0.1/40000: DropBlock "
             "in effect off); 'annealed' lowers it from 1 to 0.9 over the first 40,000 batches")
    add('--seed', type=int, default=0)
    add('--demo_width_divisor', type=int, default=1,
        help='CPU demo only: divide every channel width (and the 1024-d feature) by this')


def add_distillation_flags(group):
    """The teacher and the distillation loss."""
    add = group.add_argument
    add('--is_distill', action='store_true')
    add('--teacher_backbone_class', default='Swin_base', choices=models.BACKBONE_NAMES)
    add('--teacher_init_weights', default=None, help='teacher file with its cosine classifier')
    add('--kd_loss', default='KD', choices=trainer.KD_LOSSES)
    add('--kd_weight', type=float, default=1.0)
    add('--head_fixed', action='store_true', help="the student uses the teacher's classifier, frozen")
    add('--init_head_from_teacher', action='store_true',
        help="without --head_fixed, start the student's own head as a trainable copy of the teacher's "
             '(default: a fresh Xavier-initialised head, as the original)')
    add('--teacher_eval', action='store_true',
        help="run the teacher deterministically (eval mode) while distilling; default: as the published runs, "
             'with its stochastic depth active (never any gradient)')
    add('--teacher_cache', default=None, metavar='DIR',
        help="store the eval-mode teacher's feature of every training image once in DIR (computed before training "
             'if DIR holds none for this run) and train from it: the teacher is not run while training')
    add('--teacher_cache_views', type=int, default=8,
        help='with --augment: views of each image stored; epoch e trains on view e mod K as the teacher saw it')
    add('--teacher_cache_rebuild', action='store_true',
        help="replace a cache in DIR that was built for another teacher, list, size, seed or view count")
    add('--teacher_cache_dtype', default='float16', choices=('float16', 'float32'),
        help='how the cached features are stored (float32 for exactness checks)')


def add_data_flags(group):
    """Lists, image roots and loading."""
    add = group.add_argument
    add('--dataset', default='TLD', help='only names the run directory')
    add('--train_root', nargs='+', default=[], help='image roots, one per --train_list')
    add('--train_list', nargs='+', default=[], help='tab-separated lists: path, name, label')
    add('--label_map', default=None, help='saved dict label -> (final_label, score)')
    add('--val_root', default=None)
    add('--val_list', default=None)
    add('--test_root', default=None)
    add('--test_list', default=None, help='open-set list: path, name, coarse label[, fine label]')
    add('--test_mask_coarse', default=None, help="the original's upper-triangle pair mask (.npy)")
    add('--test_mask_fine', default=None)
    add('--benchmark', default=None, choices=helpers.REVISITOP_SETS + ('gldv2',),
        help='with --test_only: score on a retrieval benchmark instead of --test_list')
    add('--benchmark_root', default=None, metavar='DIR',
        help="the benchmark's files as it lays them out: gnd_<name>.pkl and jpg/ (roxford5k, rparis6k), or "
             'index.csv, test.csv, retrieval_solution_v2.1.csv, index/ and test/ (gldv2)')
    add('--benchmark_distractors', nargs=2, default=None, metavar=('ROOT', 'LIST'),
        help='roxford5k, rparis6k: extra database images (the 1M distractors), LIST one path under ROOT a line')
    add('--augment', action='store_true', help='random resized crop, flip and PCA lighting')
    add('--num_workers', type=int, default=8, help='data loading processes per training process')
    add('--max_bad_images', type=float, default=0.01, help='fraction of an epoch that may be unreadable')


def add_run_flags(group):
    """Where the run goes, how it checkpoints and logs, what it does, and how fast."""
    add = group.add_argument
    add('--save_dir', default='./checkpoints')
    add('--suffix', default='', help='appended to the run directory name')
    add('--eval_interval', type=int, default=1, help='epochs between validations')
    add('--log_interval', type=int, default=50, help='iterations between tensorboard points')
    add('--checkpoint_minutes', type=float, default=30.0,
        help='also write the resumable checkpoint within an epoch every this many minutes (0: at epoch ends only)')
    # the original's switches, accepted for old scripts: a run with a checkpoint always resumes, torchrun gives DDP
    add('--resume', nargs='?', const=True, default=False, type=parse_bool, help=argparse.SUPPRESS)
    add('--multi_gpu', action='store_true', help=argparse.SUPPRESS)
    add('--test_only', action='store_true',
        help="evaluate --init_weights (weights of any supported format, or an exported .onnx) or the run's max_acc.pth")
    add('--export_onnx', default=None, metavar='OUT.onnx',
        help="write --init_weights (or the run's max_acc.pth) as an ONNX serving graph: BGR images in [0, 1] -> "
             'L2-normalised features')
    add('--quantize', default='none', choices=('none', 'int8'),
        help='with --export_onnx: an int8 graph for CPU serving, its activations calibrated on --calibration_list')
    add('--calibration_root', default=None, help='with --quantize int8: the calibration images')
    add('--calibration_list', default=None, help="a list in the suite's format; up to 256 of its images are used")
    add('--amp', default='none', choices=('none', 'bf16', 'fp16'), help='mixed precision')
    add('--channels_last', action='store_true', help='channels-last memory format (Resnet12)')
    add('--compile', action='store_true', help='torch.compile the student backbone')
    add('--grad_checkpointing', action='store_true', help='recompute Swin blocks in backward to save memory')
    add('--fused_attention', action='store_true',
        help="Swin: torch's scaled_dot_product_attention for the window attention (same features; for GPUs)")


def check_args(args, world_size: int):
    """Refuse inconsistent settings before any work, with the fix in the message."""
    problems = combination_problems(args, world_size) + path_problems(args) + number_problems(args)
    if problems:
        raise utils.RunError('\nerror: '.join(problems))


def combination_problems(args, world_size: int) -> list[str]:
    """Flags that need or exclude each other."""
    problems = []
    if args.batch_size % world_size:
        problems.append(f'--batch_size {args.batch_size} is the global batch and must be divisible by the '
                        f'{world_size} processes')
    if args.is_distill and not args.teacher_init_weights:
        problems.append('--is_distill needs --teacher_init_weights (the teacher file)')
    if args.teacher_cache and not args.is_distill:
        problems.append('--teacher_cache stores the teacher\'s features: add --is_distill and a teacher')
    if args.head_fixed and not args.is_distill:
        problems.append("--head_fixed shares the teacher's classifier: add --is_distill and a teacher")
    if len(args.train_root) != len(args.train_list):
        problems.append(f'--train_root has {len(args.train_root)} entries, --train_list {len(args.train_list)}: '
                        'give one root per list')
    if not (args.test_only or args.export_onnx) and not args.train_list:
        problems.append('training needs --train_root and --train_list (or use --test_only or --export_onnx)')
    if args.export_onnx and args.test_only:
        problems.append('--export_onnx and --test_only are two runs: export first, then test the .onnx file')
    if args.quantize != 'none' and not args.export_onnx:
        problems.append('--quantize applies to --export_onnx: give the .onnx path to write')
    if (args.quantize == 'int8' and models.INT8_METHODS.get(args.backbone_class) == 'static'
            and not args.calibration_list):
        problems.append(f'--quantize int8 of a {args.backbone_class} calibrates its activations on real images: give '
                        "--calibration_root and --calibration_list (a list in the suite's format)")
    if bool(args.calibration_root) != bool(args.calibration_list):
        problems.append('give --calibration_root with --calibration_list')
    if args.test_only and not args.test_list and not args.benchmark:
        problems.append('--test_only needs --test_root and --test_list, or a --benchmark')
    problems += benchmark_combination_problems(args)
    if bool(args.val_root) != bool(args.val_list) or bool(args.test_root) != bool(args.test_list):
        problems.append('give --val_root with --val_list and --test_root with --test_list')
    if args.init_weights and args.init_weights.endswith('.onnx') and not args.test_only:
        problems.append(f'--init_weights {args.init_weights} is an exported ONNX serving graph, which only --test_only '
                        'scores: training and export start from PyTorch weights (a max_acc.pth, a teacher .pyth)')
    if not args.test_only and not args.export_onnx and args.warmup_epoch > args.max_epoch > 0:
        problems.append(f'--warmup_epoch {args.warmup_epoch} is longer than --max_epoch {args.max_epoch}: the rate '
                        'would never reach --lr; give a --warmup_epoch of at most --max_epoch')
    return problems


def benchmark_combination_problems(args) -> list[str]:
    """--benchmark and its companions."""
    if not args.benchmark:
        given = [flag for flag in ('benchmark_root', 'benchmark_distractors') if getattr(args, flag)]
        return [f'--{given[0]} goes with --benchmark: name the benchmark'] if given else []
    problems = []
    if not args.test_only:
        problems.append(f'--benchmark {args.benchmark} scores a model: add --test_only (and --init_weights)')
    if args.test_list:
        problems.append(f'--benchmark {args.benchmark} and --test_list are two tests: run them one at a time')
    if not args.benchmark_root:
        problems.append(f'--benchmark {args.benchmark} needs --benchmark_root, the directory of its files')
    if args.benchmark_distractors and args.benchmark not in helpers.REVISITOP_SETS:
        problems.append('--benchmark_distractors adds database images to roxford5k or rparis6k only')
    return problems


def path_problems(args) -> list[str]:
    """Files and directories that do not exist, and an --export_onnx path that cannot be written."""
    problems = []
    if args.export_onnx:
        parent = os.path.dirname(os.path.abspath(args.export_onnx))
        if os.path.isdir(args.export_onnx) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            problems.append(f'--export_onnx {args.export_onnx}: cannot write a file there (a directory, or a folder '
                            'that does not exist or is not writable); give the path of the .onnx file to write')
    for names, exists, kind in (
            (('train_list', 'val_list', 'test_list', 'label_map', 'init_weights', 'teacher_init_weights',
              'test_mask_coarse', 'test_mask_fine', 'calibration_list'), os.path.isfile, 'file'),
            (('train_root', 'val_root', 'test_root', 'calibration_root', 'benchmark_root'), os.path.isdir,
             'directory')):
        for name in names:
            values = getattr(args, name)
            for path in values if isinstance(values, list) else [values]:
                if path and os.path.isdir(path) and kind == 'file':
                    problems.append(f'--{name} {path} is a directory; give the file itself')
                elif path and not exists(path):
                    problems.append(f'--{name} {path}: no such {kind}')
    if args.benchmark_distractors:
        root, listed = args.benchmark_distractors
        if not os.path.isdir(root) or not os.path.isfile(listed):
            problems.append(f'--benchmark_distractors {root} {listed}: give the images\' directory, then the file '
                            'listing them')
    return problems


def number_problems(args) -> list[str]:
    """Counts and rates out of range, an image size the Swin windows do not take, a --step_size the schedule
    cannot use, and a run with nothing to do."""
    problems = [f'--{name} must be at least 1, not {getattr(args, name)}'
                for name in ('eval_interval', 'log_interval', 'img_size', 'batch_size', 'demo_width_divisor',
                             'teacher_cache_views')
                if getattr(args, name) < 1]
    problems += [f'--{name} must not be negative, not {getattr(args, name)}'
                 for name in ('max_epoch', 'warmup_epoch', 'min_lr', 'weight_decay', 'momentum', 'kd_weight',
                              'num_workers', 'max_bad_images', 'checkpoint_minutes')
                 if getattr(args, name) < 0]
    problems += [f'--{name} must be a finite number, not {getattr(args, name)}'
                 for name in ('lr', 'min_lr', 'weight_decay', 'momentum', 'gamma', 'kd_weight', 'max_bad_images',
                              'checkpoint_minutes') if not math.isfinite(getattr(args, name))]
    problems += [f'--{name} must be positive, not {getattr(args, name)}'
                 for name in ('lr', 'gamma') if getattr(args, name) <= 0]
    swin_backbones = {args.backbone_class, args.teacher_backbone_class if args.is_distill else None}
    if args.img_size >= 1 and swin_backbones & set(swin_transformer.SWIN_CONFIGS):
        message = swin_transformer.image_size_message(args.img_size)
        if message:
            problems.append(f'--img_size {args.img_size}: {message}')
    if not args.test_only and args.max_epoch == 0 and not args.test_list:
        problems.append('--max_epoch 0 trains nothing and there is no --test_list to evaluate: nothing to do')
    if args.num_classes is not None and args.num_classes < 1:
        problems.append(f'--num_classes must be at least 1, not {args.num_classes}')
    try:
        sizes = step_sizes(args.step_size)
    except ValueError:
        sizes = []
    if args.lr_scheduler != 'cosine' and (not sizes or min(sizes) < 1):
        problems.append(f'--step_size {args.step_size!r}: give a positive integer (step) or comma-separated '
                        'positive integers (multistep)')
    elif args.lr_scheduler == 'step' and len(sizes) > 1:
        problems.append(f'--step_size {args.step_size}: `step` decays every N epochs; give one N, or use '
                        '--lr_scheduler multistep for a list of epochs')
    return problems


def parse_bool(text) -> bool:
    """'True'/'1'/'yes' -> True, 'False'/'0'/'no' -> False (the original's `--resume True`)."""
    value = str(text).strip().lower()
    if value in ('true', '1', 'yes', 'y'):
        return True
    if value in ('false', '0', 'no', 'n'):
        return False
    raise argparse.ArgumentTypeError(f'{text!r} is not a boolean; give True or False')


def step_sizes(text: str) -> list[int]:
    """'30' -> [30]; '30,60' -> [30, 60]."""
    return [int(part) for part in str(text).split(',') if part.strip()]


def init_distributed():
    """(rank, world_size, device) under torchrun (nccl on GPUs, gloo on the CPU), or a single process."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if world_size == 1:
        return 0, 1, device
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world_size, device


def run_directory(args) -> str:
    """save_dir/<first>/<second>, named from the flags as the original named it (see utils.RunName)."""
    naming = {field.name: getattr(args, field.name) for field in dataclasses.fields(utils.RunName)}
    return utils.RunName(**naming).directory(args.save_dir)


def test_directory(run_dir: str, weights: str, img_size: int, test_name: str = 'test') -> str:
    """Where a --test_only run writes: `<test name>-<weights name>-<digest of its path>-<img_size>px` in the run
    directory, so that its figures are never taken for (or written over) the training run's or another test's."""
    digest = hashlib.sha1(os.path.abspath(weights).encode('utf-8')).hexdigest()[:8]
    name = os.path.splitext(os.path.basename(weights))[0]
    return os.path.join(run_dir, f'{test_name}-{name}-{digest}-{img_size}px')


def test_name(args) -> str:
    """'test', or the benchmark's name (+ the distractor list's name)."""
    if not args.benchmark:
        return 'test'
    distractors = args.benchmark_distractors
    return args.benchmark + (f'+{os.path.splitext(os.path.basename(distractors[1]))[0]}' if distractors else '')


# Settings that change a run's trajectory without naming its directory: a resume with other values is refused.
TRAJECTORY_FLAGS = ('seed', 'min_lr', 'weight_decay', 'momentum', 'amp', 'img_size', 'num_classes', 'drop_block',
                    'demo_width_divisor', 'teacher_backbone_class', 'teacher_init_weights', 'teacher_eval',
                    'init_head_from_teacher', 'label_map', 'train_root', 'train_list', 'teacher_cache_dtype',
                    'teacher_cache_views')


def main(args):
    rank, world_size, device = init_distributed()
    lock = logger = None
    signals = trainer.StopSignals()
    try:
        check_args(args, world_size)
        run_dir = run_directory(args)
        weights = weights_to_use(args, run_dir) if args.test_only or args.export_onnx else None
        output_dir = test_directory(run_dir, weights, args.img_size, test_name(args)) if args.test_only else run_dir
        lock = checkpoints.hold_run_directory(output_dir, rank, world_size)
        logger = utils.Logger(output_dir, rank=rank)
        signals.install()
        logger.info('args: ' + ' '.join(f'{key}={value}' for key, value in sorted(vars(args).items())))
        if args.amp == 'fp16' and device.type == 'cpu':
            logger.info('note: --amp fp16 on a CPU runs many times slower than fp32 (it has no fp16 kernels); '
                        '--amp bf16 is the fast choice here')
        args.num_workers = helpers.loader_workers_that_fit(args.num_workers, args.batch_size // world_size,
                                                           args.img_size, logger)
        place = trainer.RunPlace(output_dir, logger, rank, world_size, device)
        if args.export_onnx:
            signals.at_once = 'during the export: nothing was written; the same command exports again'
            export(args, place, weights)
        elif args.test_only:
            signals.at_once = 'during the test: the files of the earlier tests are whole; the same command tests again'
            test_only(args, place, weights, feature_dir=os.path.join(run_dir, 'benchmark_features'))
        else:
            train_and_test(args, place, signals)
    except utils.RunError as error:
        # bad lists, labels, weights files, images or a diverged loss: the message says what to fix, said once
        raise SystemExit(f'error: {error}' if rank == 0 else 1) from None
    except trainer.RunInterrupted as interrupted:
        if interrupted.message and logger is not None:
            logger.info(interrupted.message)
        raise SystemExit(interrupted.exit_status) from None
    except KeyboardInterrupt:
        raise SystemExit('interrupted: the checkpoint files on disk are whole (a save under way was discarded); '
                         'the same command resumes from the last one' if rank == 0 else 130) from None
    finally:
        signals.restore()
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train_and_test(args, place: trainer.RunPlace, signals: trainer.StopSignals):
    """Train (resuming where the run directory left off), then test the best epoch's student."""
    signals.at_once = ('during start-up: the teacher cache keeps the rows computed so far; the same command starts '
                       'again')
    run, test_samples = build_training(args, place, signals)
    signals.at_once = None  # training: a signal stops after the next iteration, with a checkpoint
    run.fit()
    if test_samples:
        signals.at_once = ("during the final test: the run's checkpoints and max_acc.pth are whole; the same command "
                           'tests again')
        best, distiller = run.best_weights(), run.parts.distiller
        student_backbone = backbone_of(args, best).to(place.device) if best else distiller.student.backbone
        teacher_backbone = distiller.teacher.backbone if distiller.teacher else None
        if args.teacher_cache:  # the teacher is built for its own and the cross figures only
            teacher_backbone = backbone_of(args, args.teacher_init_weights, args.teacher_backbone_class)
            teacher_backbone = teacher_backbone.to(place.device)
        test(args, place, test_samples, student_backbone, teacher_backbone)


def build_training(args, place: trainer.RunPlace, signals: trainer.StopSignals) -> tuple[trainer.Trainer, list]:
    """Wire a training run: lists, model, loaders, optimizer and schedule; (the Trainer, the test list's samples)."""
    logger, rank, world_size, device = place.logger, place.rank, place.world_size, place.device
    trainer.seed_epoch(args.seed, 0, rank)
    train_samples, _ = helpers.read_train_samples(args.train_root, args.train_list, args.label_map)
    helpers.check_training_roots(train_samples)
    # what would only fail after the last epoch (or after the teacher cache's pre-pass) is found now
    val_samples = helpers.read_checked_list(args.val_root, args.val_list, '--val_root', rank=rank,
                                            world_size=world_size)
    test_samples = helpers.read_checked_list(args.test_root, args.test_list, '--test_root', rank=rank,
                                             world_size=world_size)
    evaluation.check_test_list(test_samples, args.test_mask_coarse, args.test_mask_fine, logger)
    distiller = helpers.build_model(
        args.backbone_class, args.img_size, args.num_classes, args.init_weights,
        teacher_name=args.teacher_backbone_class if args.is_distill else None,
        teacher_weights=args.teacher_init_weights, head_fixed=args.head_fixed,
        width_divisor=args.demo_width_divisor, grad_checkpointing=args.grad_checkpointing,
        channels_last=args.channels_last, init_head_from_teacher=args.init_head_from_teacher,
        stochastic_teacher=not args.teacher_eval, drop_block_schedule=args.drop_block,
        cached_teacher=bool(args.teacher_cache)).to(device)
    cache = teacher_cache_of(args, train_samples, rank) if args.teacher_cache else None
    train_loader, val_loader = helpers.build_training_loaders(
        train_samples, val_samples, val_list=args.val_list, num_classes=distiller.student.head.num_classes,
        img_size=args.img_size, batch_size=args.batch_size, num_workers=args.num_workers, augment=args.augment,
        seed=args.seed, rank=rank, world_size=world_size, teacher_features=cache.path if cache else None,
        views=teacher_views(args) if cache else 0)
    logger.start()  # every start-up check has passed: from here on the run writes in its directory
    counts = helpers.parameter_counts(distiller)
    logger.info(f'student para trainable/sum {counts["student_trainable"]}/{counts["student_total"]}; '
                f'teacher para trainable/sum {counts["teacher_trainable"]}/{counts["teacher_total"]}')
    logger.result('parameters', counts)
    if cache is not None:
        generators = checkpoints.random_state()
        ready_teacher_cache(args, place, cache, train_samples)
        checkpoints.set_random_state(generators)  # the run goes on as it would without the pre-pass
    milestones = step_sizes(args.step_size)

    def schedule(epoch_position, epoch):
        return trainer.learning_rate(epoch_position, epoch, base_lr=args.lr, min_lr=args.min_lr,
                                     warmup_epochs=args.warmup_epoch, max_epoch=args.max_epoch,
                                     scheduler=args.lr_scheduler, step_size=milestones, gamma=args.gamma)

    parts = trainer.TrainingParts(
        distiller=distiller,
        student=helpers.prepare_student(distiller, fused_attention=args.fused_attention, compile_backbone=args.compile,
                                        world_size=world_size, device=device),
        criterion=trainer.DistillationLoss(args.kd_loss if args.is_distill else None, args.kd_weight,
                                           world_size=world_size),
        optimizer=helpers.build_optimizer(args.optim, distiller.trainable_parameters(), args.lr, args.weight_decay,
                                          args.momentum),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'),
        train_loader=train_loader, val_loader=val_loader, schedule=schedule,
        batch_transform=helpers.BatchTransform(args.augment, memory_format=torch.channels_last if args.channels_last
                                               else torch.contiguous_format))
    flags = dict({name: getattr(args, name) for name in TRAJECTORY_FLAGS}, teacher_cache=cache is not None)
    return trainer.Trainer(args, parts, place, flags, signals), test_samples


def teacher_cache_of(args, samples, rank: int) -> checkpoints.TeacherCache:
    """The teacher cache this run needs in --teacher_cache: its shape, and on rank 0 (which alone checks and writes
    the manifest) what it is valid for, the teacher file's digest included (one read of it, not one a process)."""
    identity = {} if rank else {'teacher': args.teacher_backbone_class,
                'teacher_file': checkpoints.file_digest([args.teacher_init_weights]),
                'training_lists': checkpoints.file_digest(args.train_list + [args.label_map]),
                'train_root': list(args.train_root), 'images': len(samples), 'img_size': args.img_size,
                'width_divisor': args.demo_width_divisor, 'augment': args.augment, 'views': teacher_views(args),
                'seed': args.seed, 'dtype': args.teacher_cache_dtype}
    shape = (teacher_views(args), len(samples), models.FEATURE_DIM // args.demo_width_divisor)
    return checkpoints.TeacherCache(args.teacher_cache, identity, shape, args.teacher_cache_dtype)


def ready_teacher_cache(args, place: trainer.RunPlace, cache: checkpoints.TeacherCache, samples):
    """Make `cache` ready: refused if it belongs to another run, computed where rows are missing or damaged, and
    checked against the teacher on a few random rows."""
    if place.world_size > 1:
        if place.rank == 0:
            os.makedirs(args.teacher_cache, exist_ok=True)
        checkpoints.check_shared_storage(args.teacher_cache, place.rank, '--teacher_cache')
    teacher = backbone_of(args, args.teacher_init_weights, args.teacher_backbone_class).to(place.device)
    dataset = helpers.ImageDataset(samples, args.img_size, train=True, augment=args.augment, seed=args.seed,
                                   views=teacher_views(args))
    transform = helpers.BatchTransform(augment=args.augment)
    if checkpoints.prepare_teacher_cache(cache, rebuild=args.teacher_cache_rebuild, rank=place.rank,
                                         logger=place.logger):
        checkpoints.fill_teacher_cache(cache, teacher, dataset, transform, device=place.device, amp=args.amp,
                                       batch_size=max(1, 2 * args.batch_size // place.world_size),
                                       num_workers=args.num_workers, rank=place.rank, world_size=place.world_size,
                                       logger=place.logger)
    checkpoints.check_teacher_cache(cache, teacher, dataset, transform, device=place.device, amp=args.amp,
                                    seed=args.seed)
    place.logger.info(f'teacher cache {cache.path}: the teacher is in eval mode (no stochastic depth), its features '
                      'read from the cache')


def teacher_views(args) -> int:
    """Views of each image in the teacher cache: --teacher_cache_views with --augment, else the one image."""
    return args.teacher_cache_views if args.augment else 1


def test(args, place: trainer.RunPlace, samples, student_backbone, teacher_backbone):
    """The final test of `student_backbone` (and of the teacher's backbone, with the cross figures) on the test list."""
    loader = helpers.build_test_loader(samples, args.img_size, args.batch_size, args.num_workers, rank=place.rank,
                                       world_size=place.world_size)
    evaluation.run_test(loader, helpers.BatchTransform(augment=False), student_backbone, teacher_backbone,
                        device=place.device, amp=args.amp,
                        rank=place.rank, logger=place.logger, output_dir=place.run_dir,
                        coarse_mask=args.test_mask_coarse, fine_mask=args.test_mask_fine)


def test_only(args, place: trainer.RunPlace, weights: str, feature_dir: str):
    """Evaluate `weights` (original or own format, or an exported .onnx) on the test list or a --benchmark (whose
    features are kept in `feature_dir`); no teacher needed."""
    logger, device = place.logger, place.device
    if args.benchmark:
        images = benchmark_images(args, place)
    else:
        samples = helpers.read_checked_list(args.test_root, args.test_list, '--test_root', rank=place.rank,
                                            world_size=place.world_size)
        evaluation.check_test_list(samples, args.test_mask_coarse, args.test_mask_fine, logger)
    if weights.endswith('.onnx'):
        student_backbone = models.OnnxBackbone(weights, args.img_size, helpers.PIXEL_MEAN_BGR, helpers.PIXEL_STD_BGR)
    else:
        student_backbone = backbone_of(args, weights).to(device)
    logger.info(f'test only: {weights}')
    teacher_backbone = None
    if args.teacher_init_weights:
        teacher_backbone = backbone_of(args, args.teacher_init_weights, args.teacher_backbone_class).to(device)
    logger.start()
    if args.benchmark:
        benchmark(args, place, images, weights, student_backbone, teacher_backbone, feature_dir)
    else:
        test(args, place, samples, student_backbone, teacher_backbone)


def benchmark(args, place: trainer.RunPlace, images: helpers.BenchmarkImages, weights: str, student_backbone,
              teacher_backbone, feature_dir: str):
    """Score the student of `weights` (and the teacher, with the cross figures) on the --benchmark's images, each
    model's features kept in `feature_dir` under what they depend on."""
    backbones, names = {'student': student_backbone}, {'student': (weights, args.backbone_class)}
    if teacher_backbone is not None:
        backbones['teacher'] = teacher_backbone
        names['teacher'] = (args.teacher_init_weights, args.teacher_backbone_class)
    # rank 0 alone decides whether saved features are reused, and writes them: only it reads the weights' bytes
    keys = {model: model_key(args, *names[model]) if place.rank == 0 else '' for model in backbones}
    evaluation.run_benchmark(images, backbones, keys, feature_dir=feature_dir, img_size=args.img_size,
                             batch_size=args.batch_size, num_workers=args.num_workers, device=place.device,
                             amp=args.amp, rank=place.rank, world_size=place.world_size, logger=place.logger)


def benchmark_images(args, place: trainer.RunPlace) -> helpers.BenchmarkImages:
    """The --benchmark's queries and database, every image checked to exist (each process its part)."""
    if args.benchmark == 'gldv2':
        images = helpers.read_gldv2(args.benchmark_root)
    else:
        images = helpers.read_revisitop(args.benchmark_root, args.benchmark, args.benchmark_distractors)
    helpers.check_images_exist(images.queries + images.database, '--benchmark_root', place.rank, place.world_size)
    place.logger.info(f'{args.benchmark}: {len(images.queries)} queries, {len(images.database)} database images')
    return images


def model_key(args, weights: str, backbone_name: str) -> str:
    """What a model's features depend on: its weights' bytes, its backbone, the image size, widths and precision."""
    return (f'{checkpoints.file_digest([weights])} {backbone_name} {args.img_size}px '
            f'width/{args.demo_width_divisor} amp={args.amp}')


def calibration_batches(args, most: int = 256) -> list:
    """Up to `most` images of --calibration_list in the serving graph's input contract (BGR in [0, 1], float32),
    one a batch: calibration holds every intermediate tensor of a batch at once."""
    samples = helpers.read_checked_list(args.calibration_root, args.calibration_list, '--calibration_root')[:most]
    dataset = helpers.ImageDataset(samples, args.img_size, train=False, augment=False)
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item['bad']:
            raise utils.RunError(item['bad'])
        images.append(item['image'].float().div(255).numpy())
    return [image[None] for image in images]


def backbone_of(args, weights: str, name: str | None = None):
    """The backbone `name` (default: the student's) of a weights file, at this run's image size and widths."""
    return models.load_backbone(name or args.backbone_class, weights, args.img_size, args.demo_width_divisor,
                                args.drop_block)


def weights_to_use(args, run_dir: str) -> str:
    """The weights to test or export: --init_weights, else the run's max_acc.pth; stops when neither exists."""
    weights = args.init_weights or os.path.join(run_dir, checkpoints.BEST_NAME)
    if not os.path.isfile(weights):
        flag = '--test_only' if args.test_only else '--export_onnx'
        raise utils.RunError(f'{flag} found no {weights}; give --init_weights or train this run first')
    return weights


def export(args, place: trainer.RunPlace, weights: str):
    """Write `weights` as an ONNX serving graph (int8 with --quantize) and say its input contract."""
    backbone = backbone_of(args, weights)
    place.logger.start()
    description = {'backbone': args.backbone_class, 'weights': weights}
    float_path = args.export_onnx if args.quantize == 'none' else f'{args.export_onnx}.float32.tmp'
    contract = models.export_onnx(backbone, float_path, args.img_size, helpers.PIXEL_MEAN_BGR,
                                  helpers.PIXEL_STD_BGR, description=description)
    if args.quantize == 'int8':
        method = models.INT8_METHODS[args.backbone_class]
        batches = calibration_batches(args) if method == 'static' else None
        if batches:
            description['calibration'] = f'{sum(len(batch) for batch in batches)} images of {args.calibration_list}'
        try:
            contract = models.quantize_onnx(float_path, args.export_onnx, method, batches, description)
        finally:
            os.remove(float_path)
    place.logger.info(f'exported {weights} to {args.export_onnx}: ' +
                      '; '.join(f'{key}: {value}' for key, value in contract.items()))


if __name__ == '__main__':
    main(get_parser().parse_args())
