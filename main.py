"""Distil a landmark teacher into a student that shares its frozen classifier; train, resume, test.

Single process:  python main.py --backbone_class Swin_tiny --is_distill --teacher_init_weights T.pth ...
Several GPUs:    torchrun --nproc_per_node 8 main.py ...   (DDP; --batch_size is the global batch)
"""
import argparse
import dataclasses
import math
import os
import random
import signal
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import helpers
import model as models
import resnet12
import swin_transformer
import trainer
import utils

CHECKPOINT_NAME = 'checkpoint.pth.tar'
PREVIOUS_CHECKPOINT_NAME = 'checkpoint.prev.pth.tar'
BEST_NAME = 'max_acc.pth'


def get_parser() -> argparse.ArgumentParser:
    """The original's flags (SPEC §6) plus this project's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--backbone_class', default='Swin_tiny', choices=models.BACKBONE_NAMES)
    add('--dataset', default='TLD', help='only names the run directory')
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
    add('--augment', action='store_true', help='random resized crop, flip and PCA lighting')
    add('--multi_gpu', action='store_true', help='accepted for old scripts; launch with torchrun for DDP')
    add('--init_weights', default=None, help='student weights to start from (or to test with --test_only)')
    add('--num_workers', type=int, default=8, help='data loading processes per training process')
    add('--log_interval', type=int, default=50, help='iterations between tensorboard points')
    add('--checkpoint_minutes', type=float, default=30.0,
        help='also write the resumable checkpoint within an epoch every this many minutes (0: at epoch ends only)')
    add('--eval_interval', type=int, default=1, help='epochs between validations')
    add('--save_dir', default='./checkpoints')
    add('--is_distill', action='store_true')
    add('--teacher_backbone_class', default='Swin_base', choices=models.BACKBONE_NAMES)
    add('--teacher_init_weights', default=None, help='teacher file with its cosine classifier')
    add('--kd_loss', default='KD', choices=trainer.KD_LOSSES)
    add('--kd_weight', type=float, default=1.0)
    add('--resume', nargs='?', const=True, default=False, type=parse_bool,
        help='accepted for old scripts (also as `--resume True`); a run with a checkpoint always resumes')
    add('--head_fixed', action='store_true', help="the student uses the teacher's classifier, frozen")
    add('--init_head_from_teacher', action='store_true',
        help="without --head_fixed, start the student's own head as a trainable copy of the teacher's "
             '(default: a fresh Xavier-initialised head, as the original)')
    add('--teacher_eval', action='store_true',
        help="run the teacher deterministically (eval mode) while distilling; default: as the published runs, "
             'with its stochastic depth active (never any gradient)')
    add('--drop_block', default='published', choices=resnet12.DROP_BLOCK_SCHEDULES,
        help="Resnet12: 'published' keeps the keep rate of the published multi-GPU run (1 - 0.1/40000: DropBlock "
             "in effect off); 'annealed' lowers it from 1 to 0.9 over the first 40,000 batches")
    add('--suffix', default='', help='appended to the run directory name')
    add('--train_root', nargs='+', default=[], help='image roots, one per --train_list')
    add('--train_list', nargs='+', default=[], help='tab-separated lists: path, name, label')
    add('--label_map', default=None, help='saved dict label -> (final_label, score)')
    add('--val_root', default=None)
    add('--val_list', default=None)
    add('--test_root', default=None)
    add('--test_list', default=None, help='open-set list: path, name, coarse label[, fine label]')
    add('--test_mask_coarse', default=None, help="the original's upper-triangle pair mask (.npy)")
    add('--test_mask_fine', default=None)
    add('--img_size', type=int, default=384)
    add('--num_classes', type=int, default=None, help="default: the teacher's classifier, else 252903")
    add('--seed', type=int, default=0)
    add('--test_only', action='store_true', help='evaluate --init_weights or the run\'s max_acc.pth')
    add('--max_bad_images', type=float, default=0.01, help='fraction of an epoch that may be unreadable')
    add('--amp', default='none', choices=('none', 'bf16', 'fp16'), help='mixed precision')
    add('--channels_last', action='store_true', help='channels-last memory format (Resnet12)')
    add('--compile', action='store_true', help='torch.compile the student backbone')
    add('--grad_checkpointing', action='store_true', help='recompute Swin blocks in backward to save memory')
    add('--fused_attention', action='store_true',
        help="Swin: torch's scaled_dot_product_attention for the window attention (same features; for GPUs)")
    add('--demo_width_divisor', type=int, default=1,
        help='CPU demo only: divide every channel width (and the 1024-d feature) by this')
    return parser


def check_args(args, world_size: int):
    """Refuse inconsistent settings before any work, with the fix in the message."""
    problems = combination_problems(args, world_size) + path_problems(args) + number_problems(args)
    if problems:
        raise SystemExit('error: ' + '\nerror: '.join(problems))


def combination_problems(args, world_size: int) -> list[str]:
    """Flags that need or exclude each other."""
    problems = []
    if args.batch_size % world_size:
        problems.append(f'--batch_size {args.batch_size} is the global batch and must be divisible by the '
                        f'{world_size} processes')
    if args.is_distill and not args.teacher_init_weights:
        problems.append('--is_distill needs --teacher_init_weights (the teacher file)')
    if args.head_fixed and not args.is_distill:
        problems.append("--head_fixed shares the teacher's classifier: add --is_distill and a teacher")
    if len(args.train_root) != len(args.train_list):
        problems.append(f'--train_root has {len(args.train_root)} entries, --train_list {len(args.train_list)}: '
                        'give one root per list')
    if not args.test_only and not args.train_list:
        problems.append('training needs --train_root and --train_list (or use --test_only)')
    if args.test_only and not args.test_list:
        problems.append('--test_only needs --test_root and --test_list')
    if bool(args.val_root) != bool(args.val_list) or bool(args.test_root) != bool(args.test_list):
        problems.append('give --val_root with --val_list and --test_root with --test_list')
    return problems


def path_problems(args) -> list[str]:
    """Files and directories that do not exist."""
    problems = []
    for names, exists, kind in (
            (('train_list', 'val_list', 'test_list', 'label_map', 'init_weights', 'teacher_init_weights',
              'test_mask_coarse', 'test_mask_fine'), os.path.isfile, 'file'),
            (('train_root', 'val_root', 'test_root'), os.path.isdir, 'directory')):
        for name in names:
            values = getattr(args, name)
            for path in values if isinstance(values, list) else [values]:
                if path and not exists(path):
                    problems.append(f'--{name} {path}: no such {kind}')
    return problems


def number_problems(args) -> list[str]:
    """Counts and rates out of range, an image size the Swin windows do not take, a --step_size the schedule
    cannot use, and a run with nothing to do."""
    problems = [f'--{name} must be at least 1, not {getattr(args, name)}'
                for name in ('eval_interval', 'log_interval', 'img_size', 'batch_size', 'demo_width_divisor')
                if getattr(args, name) < 1]
    problems += [f'--{name} must not be negative, not {getattr(args, name)}'
                 for name in ('max_epoch', 'warmup_epoch', 'min_lr', 'weight_decay', 'momentum', 'kd_weight',
                              'num_workers', 'max_bad_images', 'checkpoint_minutes')
                 if getattr(args, name) < 0]
    if not args.lr > 0:
        problems.append(f'--lr must be positive, not {args.lr}')
    if not 0 < args.gamma:
        problems.append(f'--gamma must be positive, not {args.gamma}')
    swin_backbones = {args.backbone_class, args.teacher_backbone_class if args.is_distill else None}
    if args.img_size >= 1 and swin_backbones & set(swin_transformer.SWIN_CONFIGS):
        problem = swin_transformer.image_size_problem(args.img_size)
        if problem:
            sizes = ', '.join(map(str, swin_transformer.fitting_image_sizes()))
            problems.append(f'--img_size {args.img_size}: {problem}; Swin takes {sizes}')
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


def seed_epoch(seed: int, epoch: int, rank: int):
    """Reseed every generator from (seed, epoch, rank): a resumed epoch draws what an uninterrupted one drew."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def run_directory(args) -> str:
    """save_dir/<first>/<second> as SPEC §6 names it."""
    return utils.run_directory(
        save_dir=args.save_dir, dataset=args.dataset, backbone_class=args.backbone_class,
        is_distill=args.is_distill, kd_loss=args.kd_loss, kd_weight=args.kd_weight, init_weights=args.init_weights,
        augment=args.augment, lr=args.lr, optim=args.optim, lr_scheduler=args.lr_scheduler,
        step_size=args.step_size, gamma=args.gamma, max_epoch=args.max_epoch, warmup_epoch=args.warmup_epoch,
        batch_size=args.batch_size, head_fixed=args.head_fixed, suffix=args.suffix)


class RunInterrupted(Exception):
    """The run stopped on a signal after writing its checkpoint; carries the exit status."""

    def __init__(self, exit_status: int):
        super().__init__(exit_status)
        self.exit_status = exit_status


def main(args):
    rank, world_size, device = init_distributed()
    lock = None
    try:
        check_args(args, world_size)
        run_dir = run_directory(args)
        lock = hold_run_directory(run_dir, rank, world_size)
        logger = utils.Logger(run_dir, rank=rank)
        logger.info('args: ' + ' '.join(f'{key}={value}' for key, value in sorted(vars(args).items())))
        args.num_workers = loader_workers_that_fit(args.num_workers, args.batch_size // world_size, args.img_size,
                                                   logger)
        if args.test_only:
            test_only(args, run_dir, logger, rank, world_size, device)
        else:
            train(args, run_dir, logger, rank, world_size, device)
        logger.close()
    except (ValueError, FileNotFoundError, helpers.ImageReadError, trainer.NonFiniteLossError,
            trainer.StopOnEveryRank) as error:
        # bad lists, labels, weights files, images or a diverged loss: the message says what to fix, said once
        raise SystemExit(f'error: {error}' if rank == 0 else 1) from None
    except RunInterrupted as interrupted:
        raise SystemExit(interrupted.exit_status) from None
    except KeyboardInterrupt:
        raise SystemExit('interrupted: the checkpoint files on disk are whole (a save under way was discarded); '
                         'the same command resumes from the last one' if rank == 0 else 130) from None
    finally:
        if lock is not None:
            lock.release()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def distributed_student(classifier, device: torch.device) -> nn.Module:
    """The student under DDP, without waste: a frozen (shared) head stays outside DDP, so its 1 GB is neither
    broadcast at start nor bucketed; constant buffers are broadcast only where BatchNorm statistics need it;
    gradients live in the communication buckets (no second copy)."""
    has_batch_norm = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in classifier.modules())
    options = dict(device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=has_batch_norm,
                   gradient_as_bucket_view=True)
    if classifier.head.weight.requires_grad:
        return DistributedDataParallel(classifier, **options)
    return models.Classifier(DistributedDataParallel(classifier.backbone, **options), classifier.head)


def hold_run_directory(run_dir: str, rank: int, world_size: int):
    """Create the run directory and take its lock (rank 0); every process stops if another run holds it, or if
    the run directory is not on storage that every process shares."""
    lock, problems = None, []
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        try:
            lock = utils.RunLock(run_dir).acquire()
        except utils.RunDirectoryBusy as error:
            problems.append(str(error))
    trainer.stop_if_any_process_failed(problems)
    try:
        if world_size > 1:
            check_shared_storage(run_dir, rank)
    except trainer.StopOnEveryRank:
        if lock is not None:
            lock.release()
        raise
    return lock


def check_shared_storage(run_dir: str, rank: int):
    """Every process must read the token that rank 0 wrote into the run directory: checkpoints, max_acc.pth and
    the resume decision are written by rank 0 and read by all."""
    token_path = os.path.join(run_dir, '.shared_storage_check')
    token = []
    if rank == 0:
        token = [f'{socket.gethostname()}:{os.getpid()}:{time.time()}']
        with open(token_path, 'w', encoding='utf-8') as handle:
            handle.write(token[0])
    token = trainer.gather_messages(token)[0]  # every process waits here until the token is written
    try:
        with open(token_path, encoding='utf-8') as handle:
            seen = handle.read()
    except OSError:
        seen = None
    problems = [] if seen == token else [
        f'process {rank} on host {socket.gethostname()} does not see {run_dir} as rank 0 wrote it: --save_dir must '
        'be storage that every host shares (SAVE_DIR in start.sh)']
    problems = trainer.gather_messages(problems)
    if rank == 0:
        os.remove(token_path)
    if problems:
        raise trainer.StopOnEveryRank(problems[0])


def shared_memory_free_bytes() -> int | None:
    """Free bytes of /dev/shm, through which loader workers hand batches over; None where there is none."""
    try:
        status = os.statvfs('/dev/shm')
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


def loader_workers_that_fit(requested: int, batch_size: int, img_size: int, logger) -> int:
    """As many loader workers as asked, unless their batches in flight (two per worker, for every process of this
    host, with room to spare) would not fit in /dev/shm: then fewer, said in one line."""
    free = shared_memory_free_bytes()
    if requested == 0 or free is None:
        return requested
    processes = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    per_worker = 2 * 2 * processes * batch_size * 3 * img_size * img_size
    fitting = min(requested, int(free // per_worker))
    if fitting < requested:
        logger.info(f'/dev/shm has {free / 2 ** 20:.0f} MB free, too little for {requested} loader workers in each of '
                    f'{processes} processes (about {requested * per_worker / 2 ** 20:.0f} MB): using {fitting}; give '
                    'the container more shared memory (e.g. docker run --shm-size 16g) for full speed')
    return fitting


def train(args, run_dir, logger, rank, world_size, device):
    """Data, model, optimizer, resume, the epoch loop with validation and checkpoints, then the test."""
    seed_epoch(args.seed, 0, rank)
    train_samples, _ = helpers.read_train_samples(args.train_root, args.train_list, args.label_map)
    # what would only fail after the last epoch is found now
    val_samples = read_checked_list(args.val_root, args.val_list, '--val_root')
    test_samples = read_checked_list(args.test_root, args.test_list, '--test_root')
    announce_undefined_figures(test_samples, args.test_mask_coarse, args.test_mask_fine, logger)
    distiller = helpers.build_model(
        args.backbone_class, args.img_size, args.num_classes, args.init_weights,
        teacher_name=args.teacher_backbone_class if args.is_distill else None,
        teacher_weights=args.teacher_init_weights, head_fixed=args.head_fixed,
        width_divisor=args.demo_width_divisor, grad_checkpointing=args.grad_checkpointing,
        channels_last=args.channels_last, init_head_from_teacher=args.init_head_from_teacher,
        stochastic_teacher=not args.teacher_eval, drop_block_schedule=args.drop_block).to(device)
    counts = helpers.parameter_counts(distiller)
    logger.info(helpers.parameter_report(counts))
    logger.result('parameters', counts)
    train_loader, val_loader, batch_transform = build_data(args, train_samples, val_samples,
                                                           distiller.student.head.num_classes, rank, world_size)

    optimizer = helpers.build_optimizer(args.optim, distiller.trainable_parameters(), args.lr,
                                        args.weight_decay, args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    student = distiller.student
    if args.fused_attention:
        for network in (distiller.student.backbone, distiller.teacher.backbone if distiller.teacher else None):
            if isinstance(network, swin_transformer.SwinBackbone):
                swin_transformer.use_fused_attention(network)
    if args.compile:
        student.backbone.compile()  # in place, so that state_dict keys keep their names
    if device.type == 'cuda':
        # ResNet12's shapes never change: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = args.backbone_class == 'Resnet12'
    if world_size > 1:
        student = distributed_student(distiller.student, device)
    criterion = trainer.DistillationLoss(args.kd_loss if args.is_distill else None, args.kd_weight,
                                         world_size=world_size)
    milestones = step_sizes(args.step_size)

    def schedule(epoch_progress, epoch):
        return trainer.learning_rate(epoch_progress, epoch, args.lr, args.min_lr, args.warmup_epoch,
                                     args.max_epoch, args.lr_scheduler, milestones, args.gamma)

    checkpoint_path = os.path.join(run_dir, CHECKPOINT_NAME)
    best_path = os.path.join(run_dir, BEST_NAME)
    progress = {'epoch': 0, 'iteration': 0, 'best_accuracy': -1.0, 'best_epoch': 0}
    epoch_progress = trainer.EpochProgress()
    chosen = choose_checkpoint(run_dir, rank, logger)
    if chosen:
        progress, epoch_progress = resume(chosen, distiller, optimizer, scaler, args.seed, args.head_fixed, rank,
                                          world_size)
        where = f'epoch {progress["epoch"] + 1} iteration {epoch_progress.iteration}' if epoch_progress.iteration \
            else f'the end of epoch {progress["epoch"]}'
        logger.info(f'resumed from {chosen} at {where}')

    def write_checkpoint(epoch, current):
        every_process = trainer.gather_objects(checkpoint_epoch_state(current))
        if rank == 0:
            state = training_state(distiller, optimizer, scaler, dict(progress, epoch=epoch - 1,
                                                                       iteration=current.iteration), args)
            state['epoch_progress'] = every_process
            utils.save_checkpoint(state, checkpoint_path, os.path.join(run_dir, PREVIOUS_CHECKPOINT_NAME))
        if world_size > 1:
            dist.barrier()

    control = trainer.RunControl(args.checkpoint_minutes * 60, device, write_checkpoint)
    logged_images = set()
    control.install_signal_handlers()
    try:
        epochs(args, distiller, student, criterion, optimizer, scaler, train_loader, val_loader, batch_transform,
               schedule, control, progress, epoch_progress, run_dir, logger, logged_images, rank, world_size, device)
    finally:
        control.restore_signal_handlers()
    if val_loader is not None and progress['best_epoch']:
        logger.info(f'best epoch {progress["best_epoch"]}: eval_acc={progress["best_accuracy"]:.4f}')
        logger.result('best_epoch', progress['best_epoch'])
        logger.result('best_accuracy', progress['best_accuracy'])

    if test_samples:
        # --max_epoch 0 tests the untrained student (the demo's floor)
        student_backbone = (models.load_backbone(args.backbone_class, best_path, args.img_size,
                                                 args.demo_width_divisor, args.drop_block).to(device)
                            if os.path.exists(best_path) else distiller.student.backbone)
        teacher_backbone = distiller.teacher.backbone if distiller.teacher is not None else None
        run_test(args, test_samples, run_dir, logger, student_backbone, teacher_backbone, rank, world_size, device,
                 logged_images)


def epochs(args, distiller, student, criterion, optimizer, scaler, train_loader, val_loader, batch_transform,
           schedule, control, progress, epoch_progress, run_dir, logger, logged_images, rank, world_size, device):
    """The epoch loop: train, validate, keep the best student, write the checkpoint; stop on a signal.

    `progress` (epochs done, best accuracy and epoch) is updated in place."""
    checkpoint_path = os.path.join(run_dir, CHECKPOINT_NAME)
    best_path = os.path.join(run_dir, BEST_NAME)
    for epoch in range(progress['epoch'] + 1, args.max_epoch + 1):
        seed_epoch(args.seed, epoch, rank)
        helpers.start_epoch(train_loader, epoch, skip_batches=epoch_progress.iteration)
        stats = trainer.train_one_epoch(distiller, student, criterion, optimizer, scaler, train_loader,
                                        batch_transform, epoch, schedule, device, args.amp, logger,
                                        args.log_interval, world_size, show_progress=rank == 0,
                                        progress=epoch_progress, control=control)
        epoch_progress = trainer.EpochProgress()
        if stats['stopped']:
            logger.info(f'stopped by {stats["stopped"]} in epoch {epoch} after iteration {stats["iteration"]}: '
                        f'checkpoint written to {checkpoint_path}; the same command resumes from there')
            raise RunInterrupted(128 + getattr(signal, stats['stopped'], signal.SIGTERM))
        check_bad_images(stats, args.max_bad_images, epoch, logger, logged_images)
        trainer.broadcast_batch_norm_statistics(distiller.student)
        validation = None
        if val_loader is not None and (epoch % args.eval_interval == 0 or epoch == args.max_epoch):
            validation = trainer.validate(distiller.student, val_loader, batch_transform, device, args.amp)
            log_truncated(validation['truncated_images'], logger, logged_images)
        log_epoch(logger, epoch, stats, validation)
        # without a validation list the latest epoch is the one kept; ties go to the later epoch, as the original
        improved = val_loader is None or (validation is not None and
                                          validation['accuracy'] >= progress['best_accuracy'])
        if improved:
            progress.update(best_accuracy=validation['accuracy'] if validation else -1.0, best_epoch=epoch)
        progress.update(epoch=epoch, iteration=0)
        if rank == 0:
            if improved:
                utils.save_atomically(models.student_weights(distiller.student, include_head=not args.head_fixed),
                                      best_path)
            utils.save_checkpoint(training_state(distiller, optimizer, scaler, progress, args), checkpoint_path,
                                  os.path.join(run_dir, PREVIOUS_CHECKPOINT_NAME))
        if world_size > 1:
            dist.barrier()
        stopped = control.stop_requested()
        if stopped:
            logger.info(f'stopped by {stopped} after epoch {epoch}: checkpoint written to {checkpoint_path}; '
                        'the same command resumes from there')
            raise RunInterrupted(128 + getattr(signal, stopped, signal.SIGTERM))


def announce_undefined_figures(samples, coarse_mask: str | None, fine_mask: str | None, logger):
    """Say before any work which test figures the test list cannot give (they are reported as nan at the end)."""
    for grain, labels, mask in (('coarse', [sample.label for sample in samples], coarse_mask),
                                ('fine', [sample.fine_label for sample in samples], fine_mask)):
        problem = utils.labels_problem(labels) if samples and not mask else None
        if problem:
            logger.info(f'note: the test list gives no {grain} TARs: {problem}; they will be reported as nan')


def read_checked_list(root: str | None, list_path: str | None, root_flag: str) -> list:
    """The samples of a validation or test list (none without one), every listed image checked to exist."""
    if not list_path:
        return []
    samples = helpers.read_eval_samples(root, list_path)
    helpers.check_images_exist(samples, root_flag)
    return samples


def build_data(args, train_samples, val_samples, num_classes: int, rank: int, world_size: int):
    """(train loader, validation loader or None, batch transform), every label checked against the head."""
    helpers.check_labels(train_samples, num_classes, 'the training lists')
    per_process_batch = args.batch_size // world_size
    train_loader = helpers.build_train_loader(
        helpers.ImageDataset(train_samples, args.img_size, train=True, augment=args.augment, seed=args.seed),
        per_process_batch, args.num_workers, args.seed, rank, world_size)
    if len(train_loader) == 0:
        raise SystemExit(f'error: the training lists hold {len(train_samples)} images, fewer than one batch of '
                         f'--batch_size {args.batch_size}; lower --batch_size')
    val_loader = None
    if val_samples:
        helpers.check_labels(val_samples, num_classes, args.val_list)
        val_loader = helpers.build_eval_loader(
            helpers.ImageDataset(val_samples, args.img_size, train=False, augment=False),
            per_process_batch, args.num_workers, rank, world_size)
    batch_transform = helpers.BatchTransform(
        augment=args.augment, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return train_loader, val_loader, batch_transform


def test_only(args, run_dir, logger, rank, world_size, device):
    """Evaluate --init_weights (original or own format) or the run's max_acc.pth; no teacher needed."""
    weights = args.init_weights or os.path.join(run_dir, BEST_NAME)
    if not os.path.isfile(weights):
        raise SystemExit(f'error: --test_only found no {weights}; give --init_weights or train this run first')
    test_samples = read_checked_list(args.test_root, args.test_list, '--test_root')
    announce_undefined_figures(test_samples, args.test_mask_coarse, args.test_mask_fine, logger)
    student_backbone = models.load_backbone(args.backbone_class, weights, args.img_size,
                                            args.demo_width_divisor).to(device)
    logger.info(f'test only: {weights}')
    teacher_backbone = None
    if args.teacher_init_weights:
        teacher_backbone = models.load_backbone(args.teacher_backbone_class, args.teacher_init_weights,
                                                args.img_size, args.demo_width_divisor).to(device)
    run_test(args, test_samples, run_dir, logger, student_backbone, teacher_backbone, rank, world_size, device,
             set())


def run_test(args, samples, run_dir, logger, student_backbone, teacher_backbone, rank, world_size, device,
             logged_images: set):
    """Open-set features, TAR@FAR (coarse, fine, cross), nearest-neighbour accuracy, opensetFeat.npy, roc.png.

    A figure that cannot exist (no positive or negative pair in a grain, fewer than two images) is written as nan
    with a line saying why; the others are written as usual."""
    loader = helpers.build_eval_loader(helpers.ImageDataset(samples, args.img_size, train=False, augment=False),
                                       max(1, args.batch_size // world_size), args.num_workers, rank, world_size)
    batch_transform = helpers.BatchTransform(augment=False)

    def features_of(backbone):
        features, truncated = trainer.extract_features(backbone, loader, batch_transform, device, args.amp,
                                                       len(samples), helpers.gather_in_order,
                                                       show_progress=rank == 0)
        log_truncated(truncated, logger, logged_images)
        return features

    student_features = features_of(student_backbone)
    teacher_features = features_of(teacher_backbone) if teacher_backbone is not None else None
    if rank != 0:
        return
    np.save(os.path.join(run_dir, 'opensetFeat.npy'), student_features.numpy().astype(np.float32))
    coarse = np.array([sample.label for sample in samples])
    fine = np.array([sample.fine_label for sample in samples])
    report = trainer.test_report(student_features, teacher_features, coarse, fine,
                                 args.test_mask_coarse, args.test_mask_fine)
    log_test(logger, report, os.path.join(run_dir, 'roc.png'))


def log_test(logger, report, roc_path):
    """The TAR lines and nearest-neighbour lines of record.txt, tensorboard scalars and roc.png."""
    names = {'student': 'test acc', 'teacher': 'teacher acc', 'cross': 'cross acc'}
    curves = {}
    for name, result in report.items():
        logger.info(utils.format_tar_line(names[name], result['coarse'], result['fine']))
        logger.info(f'{name} nearest-neighbour top-1: coarse={result["coarse_nn_accuracy"]:.5f}, '
                    f'fine={result["fine_nn_accuracy"]:.5f}')
        for grain in ('coarse', 'fine'):
            if result[f'{grain}_undefined']:
                logger.info(f'{name} {grain} TARs are nan (undefined): {result[f"{grain}_undefined"]}')
            for far, tar in zip(utils.DEFAULT_FARS, result[grain]):
                if not math.isnan(tar):
                    logger.scalar(f'test/{name}_{grain}_tar@far{far:.0e}', tar, 0)
            if not result[f'{grain}_undefined']:
                curves[f'{name} {grain}'] = result[f'{grain}_curve']
    logger.result('test', {name: dict(result, **{f'{grain}_curve': dict(zip(('far', 'tar'), result[f'{grain}_curve']))
                                                 for grain in ('coarse', 'fine')})
                           for name, result in report.items()})
    utils.plot_roc(curves, roc_path)


def log_truncated(paths, logger, logged: set):
    """Log each truncated image once a run; they are used, as the original used them."""
    for path in sorted(set(paths) - logged):
        logger.info(f'truncated image (decoded with its missing part filled in, as the original did): {path}')
        logged.add(path)


def check_bad_images(stats, max_fraction: float, epoch: int, logger, logged: set):
    """Log each replaced or truncated image once a run; stop when more than `max_fraction` of the epoch was
    unreadable (truncated images are used, and do not count)."""
    log_truncated(stats['truncated_images'], logger, logged)
    bad = sorted(set(stats['bad_images']))
    for message in bad:
        if message not in logged:
            logger.info(f'bad image (replaced): {message}')
            logged.add(message)
    if bad:
        logger.info(f'epoch {epoch}: {len(bad)} bad images replaced')
    if len(bad) > max_fraction * max(stats['samples'], 1):
        raise SystemExit(f'error: epoch {epoch}: {len(bad)} of {int(stats["samples"])} images were unreadable, '
                         f'more than --max_bad_images {max_fraction}; fix the data (see record.txt)')


def log_epoch(logger, epoch, stats, validation):
    """The epoch line of record.txt (the original's format) and its tensorboard scalars; an epoch that was not
    validated has no validation figures."""
    evaluated = ''
    scalars = [('train/accuracy', stats['accuracy']), ('train/epoch_ce_loss', stats['ce']),
               ('train/epoch_kd_loss', stats['kd'])]
    if validation is not None:
        evaluated = (f'eval_loss={validation["loss"]:.4f}, '
                     f'eval_acc={validation["accuracy"]:.4f}+{validation["interval"]:.4f}, ')
        scalars += [('val/loss', validation['loss']), ('val/accuracy', validation['accuracy'])]
    logger.info(f'epoch {epoch}  lr {stats["lr"]:.6g}: train_acc={stats["accuracy"]:.4f}, {evaluated}'
                f'avg_ce_loss={stats["ce"]:.4f}, avg_kd_loss={stats["kd"]:.4f}')
    logger.epoch_result({'epoch': epoch, 'lr': stats['lr'], 'train_accuracy': stats['accuracy'], 'loss': stats['loss'],
                         'ce': stats['ce'], 'kd': stats['kd'],
                         'val_loss': validation['loss'] if validation else None,
                         'val_accuracy': validation['accuracy'] if validation else None})
    for tag, value in scalars:
        logger.scalar(tag, value, epoch)


def training_state(distiller, optimizer, scaler, progress, args) -> dict:
    """Everything an exact resume needs; the frozen shared head is not stored (it comes from the teacher)."""
    student_state = {key: value for key, value in distiller.student.state_dict().items()
                     if not (args.head_fixed and key.startswith('head.'))}
    return {'student': student_state, 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'progress': dict(progress), 'seed': args.seed,
            'batches_seen': getattr(distiller.student.backbone, 'batches_seen', 0),
            'sampler': {'seed': args.seed, 'epoch': progress['epoch']}}


def checkpoint_epoch_state(progress) -> dict:
    """An EpochProgress as plain Python data, which all_gather_object and a weights-only checkpoint can carry."""
    state = dataclasses.asdict(progress)
    generators = dict(state['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, keys.tolist(), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = generators[device].tolist()
    return dict(state, random_state=generators)


def epoch_progress_from(state: dict):
    """The inverse of checkpoint_epoch_state."""
    generators = dict(state['random_state'])
    name, keys, position, has_gauss, cached = generators['numpy']
    generators['numpy'] = (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached)
    for device in ('torch', 'cuda'):
        if device in generators:
            generators[device] = torch.tensor(generators[device], dtype=torch.uint8)
    return trainer.EpochProgress(**dict(state, random_state=generators))


def choose_checkpoint(run_dir: str, rank: int, logger) -> str | None:
    """The checkpoint to resume from, the same on every process: the latest if it loads, else the previous one;
    a latest that does not load is set aside (renamed) and record.txt says why. None for a new run."""
    latest = os.path.join(run_dir, CHECKPOINT_NAME)
    previous = os.path.join(run_dir, PREVIOUS_CHECKPOINT_NAME)
    decision, problems = [], []
    if rank == 0:
        failures = []
        for path in (latest, previous):
            if not os.path.exists(path):
                continue
            try:
                torch.load(path, map_location='cpu', weights_only=True)
            except Exception as error:  # any damage: truncated, zeroed, not a checkpoint at all
                failures.append((path, models.first_line(error)))
                continue
            decision.append(path)
            break
        if failures and not decision:
            problems.append('; '.join(f'{path} does not load ({reason})' for path, reason in failures) +
                            ': move the damaged files away to start this run afresh, or put back a good copy')
        elif failures:
            path, reason = failures[0]
            aside = f'{path}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
            os.replace(path, aside)
            logger.info(f'{path} does not load ({reason}): set aside as {aside}; resuming from {decision[0]}')
    trainer.stop_if_any_process_failed(problems)
    chosen = trainer.gather_messages(decision)
    return chosen[0] if chosen else None


def resume(path, distiller, optimizer, scaler, seed: int, head_fixed: bool, rank: int, world_size: int):
    """Load the student, optimizer, scaler and DropBlock progress; return (progress dict, this process's
    EpochProgress: where to resume within the epoch)."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    if state.get('seed') != seed:
        raise SystemExit(f'error: {path} was written with --seed {state.get("seed")}; rerun with that seed or '
                         'another --suffix')
    missing, unexpected = distiller.student.load_state_dict(state['student'], strict=False)
    missing = [key for key in missing if not (head_fixed and key.startswith('head.'))]
    if missing or unexpected:
        raise SystemExit(f'error: {path} does not fit the student: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}; was it written by another configuration?')
    optimizer.load_state_dict(state['optimizer'])
    if scaler.is_enabled() and state['scaler']:
        scaler.load_state_dict(state['scaler'])
    if hasattr(distiller.student.backbone, 'batches_seen'):
        distiller.student.backbone.batches_seen = int(state['batches_seen'])
    progress = dict(state['progress'])
    progress.setdefault('iteration', 0)
    within_epoch = state.get('epoch_progress') or []
    if progress['iteration'] and len(within_epoch) != world_size:
        raise SystemExit(f'error: {path} was written within an epoch by {len(within_epoch)} processes; resume it with '
                         f'{len(within_epoch)} processes (the batches of the epoch are split among them)')
    epoch_progress = epoch_progress_from(within_epoch[rank]) if progress['iteration'] else trainer.EpochProgress()
    return progress, epoch_progress


if __name__ == '__main__':
    main(get_parser().parse_args())
