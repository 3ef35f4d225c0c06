"""What a run needs, built from its settings: the models (DDP included), the loaders, the optimizer, the teacher
cache, and the training run that main.py hands to the trainer."""
import copy
import functools
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import datasets
import evaluation
import feature_store
import gldv2
import losses
import model
import run_directory
import swin_transformer
import trainer
import utils

# Settings that change a run's trajectory without naming its directory: a resume with other values is refused.
TRAJECTORY_FLAGS = ('seed', 'min_lr', 'weight_decay', 'momentum', 'amp', 'img_size', 'num_classes', 'drop_block',
                    'demo_width_divisor', 'teacher_backbone_class', 'teacher_init_weights', 'teacher_eval',
                    'init_head_from_teacher', 'label_map', 'train_root', 'train_list', 'teacher_cache_dtype',
                    'teacher_cache_views', 'teacher_cache_mode', 'feature_kd_weight', 'train_format', 'gldv2_csv',
                    'gldv2_val_share', 'exclude_landmarks')


def build_training_loaders(train_samples, val_samples, *, val_list: str | None, num_classes: int, img_size: int,
                           batch_size: int, num_workers: int, augment: bool, seed: int, rank: int, world_size: int,
                           teacher_features: str | None = None, views: int = 0):
    """(train loader, validation loader or None) over this process's part, every label checked against the head;
    `batch_size` is global; `teacher_features` is the teacher cache's file (of `views` views)."""
    datasets.check_labels(train_samples, num_classes, 'the training lists')
    train_set = datasets.ImageDataset(train_samples, img_size, train=True, augment=augment, seed=seed,
                                      teacher_features=teacher_features, views=views)
    train_loader = datasets.build_train_loader(train_set, batch_size // world_size, num_workers, seed=seed, rank=rank,
                                               world_size=world_size)
    if len(train_loader) == 0:
        raise utils.RunError(f'the training lists hold {len(train_samples)} images, fewer than one batch of '
                             f'--batch_size {batch_size}; lower --batch_size')
    if not val_samples:
        return train_loader, None
    datasets.check_labels(val_samples, num_classes, val_list)
    return train_loader, build_test_loader(val_samples, img_size, batch_size, num_workers, rank, world_size)


def build_test_loader(samples, img_size: int, batch_size: int, num_workers: int, rank: int, world_size: int):
    """The test list's loader, each process over its contiguous part; `batch_size` is the global batch."""
    return datasets.build_eval_loader(datasets.ImageDataset(samples, img_size, train=False, augment=False),
                                      max(1, batch_size // world_size), num_workers, rank, world_size)


def shared_memory_free_bytes() -> int | None:
    """Free bytes of /dev/shm, through which loader workers hand batches over; None where there is none."""
    try:
        status = os.statvfs('/dev/shm')
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


def loader_workers_that_fit(requested: int, batch_size: int, img_size: int, logger) -> int:
    """As many loader workers as asked, unless this host's cores shared by its processes are fewer, or their batches
    in flight (two per worker, for every process of this host, with room to spare) would not fit in /dev/shm: then
    fewer, said in one line."""
    processes = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    cores = max(1, len(os.sched_getaffinity(0)) // processes)
    if requested > cores:
        logger.info(f'--num_workers {requested} is more than the {cores} cores each of the {processes} processes '
                    f'of this host has: using {cores}')
        requested = cores
    free = shared_memory_free_bytes()
    if requested == 0 or free is None:
        return requested
    per_worker = 2 * 2 * processes * batch_size * 3 * img_size * img_size
    fitting = min(requested, int(free // per_worker))
    if fitting < requested:
        logger.info(f'/dev/shm has {free / 2 ** 20:.0f} MB free, too little for {requested} loader workers in each of '
                    f'{processes} processes (about {requested * per_worker / 2 ** 20:.0f} MB): using {fitting}; give '
                    'the container more shared memory (e.g. docker run --shm-size 16g) for full speed')
    return fitting


def build_model(student_name: str, img_size: int, num_classes: int | None, student_weights: str | None, *,
                teacher_name: str | None = None, teacher_weights: str | None = None, head_fixed: bool = False,
                width_divisor: int = 1, grad_checkpointing: bool = False, channels_last: bool = False,
                init_head_from_teacher: bool = False, stochastic_teacher: bool = True,
                drop_block_schedule: str = 'published', cached_teacher: bool = False) -> model.DistillationModel:
    """The student (from `student_weights` when given) with its head, and the frozen teacher when distilling.
    The head: the teacher's itself with `head_fixed` (one frozen copy in memory), else a trainable copy of it with
    `init_head_from_teacher`, else a fresh Xavier-initialised one (as the original). With `cached_teacher` the
    teacher's features come from its cache: only its classifier is loaded."""
    teacher = teacher_head = None
    if teacher_name:
        if cached_teacher:
            teacher_head = model.load_head(teacher_name, teacher_weights, width_divisor)
        else:
            teacher = model.load_classifier(teacher_name, teacher_weights, img_size, width_divisor)
            teacher_head = teacher.head
        teacher_classes = teacher_head.weight.shape[0]
        if num_classes not in (None, teacher_classes):
            raise utils.RunError(f'--num_classes {num_classes} but the teacher {teacher_weights} classifies '
                                 f'{teacher_classes} classes; drop --num_classes')
        num_classes = teacher_classes
    if num_classes is None:
        raise utils.RunError('a student without a teacher needs its number of classes: give --num_classes')
    backbone = (model.load_backbone(student_name, student_weights, img_size, width_divisor, drop_block_schedule).train()
                if student_weights else
                model.create_backbone(student_name, img_size, width_divisor, drop_block_schedule))
    if grad_checkpointing:
        if not hasattr(backbone, 'set_grad_checkpointing'):
            raise utils.RunError(f'--grad_checkpointing needs a Swin student, not {student_name}')
        backbone.set_grad_checkpointing(True)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if head_fixed:
        head = teacher_head
    elif teacher_head is not None and init_head_from_teacher:
        head = copy.deepcopy(teacher_head).requires_grad_(True)
    else:
        head = model.CosFaceHead(num_classes, backbone.feature_dim)
    return model.DistillationModel(model.Classifier(backbone, head), teacher, stochastic_teacher,
                                   teacher_head=teacher_head if cached_teacher else None)


def prepare_student(distiller: model.DistillationModel, *, fused_attention: bool, compile_backbone: bool,
                    world_size: int, device: torch.device) -> nn.Module:
    """The student as the training step calls it: with fused attention, compiled, and under DDP as asked."""
    if fused_attention:
        for network in (distiller.student.backbone, distiller.teacher.backbone if distiller.teacher else None):
            if isinstance(network, swin_transformer.SwinBackbone):
                swin_transformer.use_fused_attention(network)
    if compile_backbone:
        distiller.student.backbone.compile()  # in place, so that state_dict keys keep their names
    if device.type == 'cuda':
        # ResNet12's shapes never change: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = isinstance(distiller.student.backbone, model.ResNet12)
    return distributed_student(distiller.student, device) if world_size > 1 else distiller.student


def distributed_student(classifier: model.Classifier, device: torch.device) -> nn.Module:
    """The student under DDP, without waste: a frozen (shared) head stays outside DDP (its 1 GB neither broadcast nor
    bucketed), buffers are broadcast only for BatchNorm, gradients live in the communication buckets."""
    has_batch_norm = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in classifier.modules())
    options = dict(device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=has_batch_norm,
                   gradient_as_bucket_view=True)
    if classifier.head.weight.requires_grad:
        return DistributedDataParallel(classifier, **options)
    return model.Classifier(DistributedDataParallel(classifier.backbone, **options), classifier.head)


def parameter_counts(distiller: model.DistillationModel) -> dict:
    """Parameters of the student (trainable, all, its backbone alone) and of the teacher in memory (trainable, all:
    its classifier alone when its features come from a cache)."""
    def counts(module):
        parameters = list(module.parameters()) if module is not None else []
        return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)
    teacher = distiller.teacher if distiller.teacher is not None else distiller.teacher_head
    names = ('student_trainable', 'student_total', 'student_backbone', 'teacher_trainable', 'teacher_total')
    return dict(zip(names, (*counts(distiller.student), counts(distiller.student.backbone)[1], *counts(teacher))))


def build_optimizer(name: str, parameters, lr: float, weight_decay: float, momentum: float = 0.0):
    """torch.optim's `name` (SGD, Adam or AdamW: --optim's choices) over the given parameters only; SGD without
    momentum unless given, as the original."""
    extra = {'momentum': momentum} if name == 'SGD' else {}
    return getattr(torch.optim, name)(list(parameters), lr=lr, weight_decay=weight_decay, **extra)


def build_training(args, place: trainer.RunPlace, signals: trainer.StopSignals) -> tuple[trainer.Trainer, list]:
    """(The Trainer of the run the flags describe, the test list's samples)."""
    logger, rank, world_size, device = place.logger, place.rank, place.world_size, place.device
    trainer.seed_epoch(args.seed, 0, rank)
    train_samples, val_samples, listed_classes, landmark_classes = training_samples(args, place)
    num_classes = args.num_classes
    if num_classes is None and not args.is_distill:  # no teacher's classifier to decide: the lists do
        num_classes = listed_classes
        csv_name = 'train_clean.csv' if args.gldv2_csv == 'clean' else 'train.csv'
        source = (f'one per landmark of {csv_name}' if args.train_format == 'gldv2' else
                  "the training lists' largest label + 1")
        logger.info(f'classes: {num_classes}, {source} (--num_classes gives another)')
    if num_classes is not None and not args.is_distill:  # a fresh head of that many classes is allocated below
        feature_dim = model.FEATURE_DIM // args.demo_width_divisor
        check_head_fits(num_classes, feature_dim, classes_cause(args, train_samples))
    datasets.check_training_roots(train_samples)
    # what would only fail after the last epoch (or after the teacher cache's pre-pass) is found now
    test_samples = datasets.read_checked_list(args.test_root, args.test_list, '--test_root', rank, world_size)
    evaluation.check_test_list(test_samples, args.test_mask_coarse, args.test_mask_fine, logger)
    distiller = build_model(
        args.backbone_class, args.img_size, num_classes, args.init_weights, head_fixed=args.head_fixed,
        teacher_name=args.teacher_backbone_class if args.is_distill else None, width_divisor=args.demo_width_divisor,
        teacher_weights=args.teacher_init_weights, grad_checkpointing=args.grad_checkpointing,
        channels_last=args.channels_last, stochastic_teacher=not args.teacher_eval, drop_block_schedule=args.drop_block,
        init_head_from_teacher=args.init_head_from_teacher, cached_teacher=bool(args.teacher_cache)).to(device)
    cache = teacher_cache_of(args, train_samples, rank) if args.teacher_cache else None
    train_loader, val_loader = build_training_loaders(
        train_samples, val_samples, val_list=args.val_list or 'the validation split',
        num_classes=distiller.student.head.num_classes,
        img_size=args.img_size, batch_size=args.batch_size, num_workers=args.num_workers, augment=args.augment,
        seed=args.seed, rank=rank, world_size=world_size, teacher_features=cache.path if cache else None,
        views=teacher_views(args) if cache else 0)
    logger.start()  # every start-up check has passed: from here on the run writes in its directory
    if landmark_classes is not None:
        utils.on_rank_zero(rank, lambda: gldv2.write_class_map(landmark_classes, place.run_dir))
    counts = parameter_counts(distiller)
    logger.info(f'student para trainable/sum {counts["student_trainable"]}/{counts["student_total"]}; '
                f'teacher para trainable/sum {counts["teacher_trainable"]}/{counts["teacher_total"]}')
    logger.result('parameters', counts)
    if cache is not None:
        generators = checkpoints.random_state()
        ready_teacher_cache(args, place, cache, train_samples)
        checkpoints.set_random_state(generators)  # the run goes on as it would without the pre-pass
    parts = trainer.TrainingParts(
        distiller=distiller,
        student=prepare_student(distiller, fused_attention=args.fused_attention, compile_backbone=args.compile,
                                world_size=world_size, device=device),
        criterion=losses.DistillationLoss(args.kd_loss if args.is_distill else None, args.kd_weight,
                                          world_size=world_size, feature_weight=args.feature_kd_weight),
        optimizer=build_optimizer(args.optim, distiller.trainable_parameters(), args.lr, args.weight_decay,
                                  args.momentum),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'),
        train_loader=train_loader, val_loader=val_loader,
        schedule=functools.partial(trainer.learning_rate, base_lr=args.lr, min_lr=args.min_lr,
                                   warmup_epochs=args.warmup_epoch, max_epoch=args.max_epoch, gamma=args.gamma,
                                   scheduler=args.lr_scheduler, step_size=trainer.step_sizes(args.step_size)),
        batch_transform=datasets.BatchTransform(args.augment, memory_format=torch.channels_last if args.channels_last
                                                else torch.contiguous_format))
    return trainer.Trainer(args, parts, place, trajectory_flags(args), signals), test_samples


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def check_head_fits(num_classes: int, feature_dim: int, cause: tuple[str, str]):
    """Refuse, before it is allocated, a classifier head whose float32 weight alone is larger than this machine's
    memory (it could never be built); `cause` is (what set its number of classes, how to fix that)."""
    head_bytes, memory = num_classes * feature_dim * 4, physical_memory_bytes()
    if memory is not None and head_bytes > memory:
        raise utils.RunError(f'{cause[0]} makes a classifier head of {num_classes:,} classes x {feature_dim}-d '
                             f'features, {utils.size_text(head_bytes)} of float32, more than the '
                             f"{utils.size_text(memory)} of this machine's memory: {cause[1]}")


def classes_cause(args, train_samples) -> tuple[str, str]:
    """(What set the head's number of classes, how to fix it), for check_head_fits: --num_classes, or the largest
    training label (its list file and line)."""
    if args.num_classes is not None:
        return f'--num_classes {args.num_classes}', 'give the number of landmarks the training labels count'
    largest = max(train_samples, key=lambda sample: sample.label)
    how = f' ({largest.label_note})' if largest.label_note else ''
    return (f'{largest.origin or "the training data"}: label {largest.label}{how}',
            'labels number the landmarks 0..N-1 (one class each); renumber the list, or map its labels with '
            '--label_map')


def training_samples(args, place: trainer.RunPlace) -> tuple[list, list, int, dict | None]:
    """(training samples, validation samples, the classes their labels span, GLDv2's landmark -> class or None) of the
    lists or of GLDv2, without the --exclude_landmarks."""
    excluded = gldv2.read_landmark_list(args.exclude_landmarks) if args.exclude_landmarks else set()
    if args.train_format == 'gldv2':
        root, index_dir = args.train_root[0], args.shard_index or os.path.join(args.save_dir, 'gldv2_shard_index')
        utils.on_rank_zero(place.rank, lambda: gldv2.index_shards_of(root, index_dir, place.logger))
        resumed = os.path.isfile(os.path.join(place.run_dir, checkpoints.CHECKPOINT_NAME))
        train, val, classes = gldv2.read_training(
            root, clean=args.gldv2_csv == 'clean', excluded=excluded, val_share=args.gldv2_val_share, seed=args.seed,
            run_dir=place.run_dir, resumed=resumed, index_dir=index_dir, logger=place.logger)
        listed_classes, landmark_classes = len(classes), classes
    else:
        train, listed_classes = datasets.read_train_samples(args.train_root, args.train_list, args.label_map)
        val = datasets.read_checked_list(args.val_root, args.val_list, '--val_root', place.rank, place.world_size)
        landmark_classes, kept = None, [sample for sample in train if sample.label not in excluded]
        if excluded:  # the labels keep their numbers, as a teacher trained on the lists has them
            place.logger.info(f'--exclude_landmarks: {len(excluded & {sample.label for sample in train})} labels, '
                              f'{len(train) - len(kept)} images left out of training and validation')
        train, val = kept, [sample for sample in val if sample.label not in excluded]
    if not train:
        raise utils.RunError(f'--exclude_landmarks {args.exclude_landmarks} left no training image')
    return train, val, listed_classes, landmark_classes


def training_sources(args) -> list[str | None]:
    """The files that say which images train with which labels: the lists and label map, or GLDv2's CSV file."""
    if args.train_format == 'gldv2':
        csv_name = 'train_clean.csv' if args.gldv2_csv == 'clean' else 'train.csv'
        return [os.path.join(args.train_root[0], csv_name), args.exclude_landmarks]
    return args.train_list + [args.label_map, args.exclude_landmarks]


def trajectory_flags(args) -> dict:
    """The settings stored in every checkpoint, which a resume must repeat (TRAJECTORY_FLAGS, the cache's use, and
    the exclusion file's contents: one edited in place is another exclusion)."""
    excluded = utils.file_digest([args.exclude_landmarks]) if args.exclude_landmarks else None
    return dict({name: getattr(args, name) for name in TRAJECTORY_FLAGS}, teacher_cache=bool(args.teacher_cache),
                exclude_landmarks_sha256=excluded)


def teacher_cache_of(args, samples, rank: int) -> feature_store.FeatureStore:
    """The --teacher_cache store of this run; rank 0 alone, which checks its manifest, digests the files it is for."""
    identity = {} if rank else {
        'teacher': args.teacher_backbone_class, 'teacher_file': utils.file_digest([args.teacher_init_weights]),
        'training_lists': utils.file_digest(training_sources(args)), 'train_root': list(args.train_root),
        'images': len(samples), 'img_size': args.img_size, 'width_divisor': args.demo_width_divisor,
        'augment': args.augment, 'views': teacher_views(args), 'seed': args.seed, 'dtype': args.teacher_cache_dtype,
        'teacher_mode': 'train' if draws_cache(args) else 'eval', 'chunk': feature_store.CHUNK}
    shape = (teacher_views(args), len(samples), model.FEATURE_DIM // args.demo_width_divisor)
    return feature_store.FeatureStore(args.teacher_cache, identity, shape, args.teacher_cache_dtype,
                                      images=None if rank else [sample.path for sample in samples])


def ready_teacher_cache(args, place: trainer.RunPlace, cache: feature_store.FeatureStore, samples):
    """Make `cache` ready: refused if another run's, computed where rows are missing or damaged, spot-checked."""
    rank, world_size, logger, device = place.rank, place.world_size, place.logger, place.device
    if world_size > 1:
        if rank == 0:
            os.makedirs(args.teacher_cache, exist_ok=True)
        run_directory.check_shared_storage(args.teacher_cache, rank, '--teacher_cache')
    # the published DropBlock schedule, as the live teacher's: its draws depend on nothing but the random state
    teacher = model.load_backbone(args.teacher_backbone_class, args.teacher_init_weights, args.img_size,
                                  args.demo_width_divisor).to(device)
    dataset = datasets.ImageDataset(samples, args.img_size, train=True, augment=args.augment, seed=args.seed,
                                    views=teacher_views(args))
    transform = datasets.BatchTransform(augment=args.augment)
    draws = dict(stochastic=draws_cache(args), seed=args.seed, device=device, amp=args.amp)
    if feature_store.prepare_teacher_cache(cache, rebuild=args.teacher_cache_rebuild, rank=rank, logger=logger):
        feature_store.fill_teacher_cache(cache, teacher, dataset, transform, **draws, num_workers=args.num_workers,
                                         rank=rank, world_size=world_size, logger=logger)
    feature_store.check_teacher_cache(cache, teacher, dataset, transform, **draws)
    views = teacher_views(args)
    mode = (f'{views} draws of the train-mode teacher (stochastic depth active, as published)' if draws_cache(args)
            else 'the eval-mode teacher (no stochastic depth)')
    logger.info(f'teacher cache {cache.path}: {mode}{", each of its own augmented view" if args.augment else ""}; '
                f'epoch e reads view e mod {views}')


def teacher_views(args) -> int:
    """Views of each image in the teacher cache: --teacher_cache_views, each a draw of the train-mode teacher
    (--teacher_cache_mode draws) and with --augment its own augmented image; else the eval-mode teacher's one."""
    return args.teacher_cache_views if args.augment or draws_cache(args) else 1


def draws_cache(args) -> bool:
    """Whether the teacher cache holds draws of the train-mode teacher (else the eval-mode teacher's features)."""
    return args.teacher_cache_mode == 'draws'


def backbone_of(args, weights: str, name: str | None = None):
    """The backbone `name` (default: the student's) of a weights file, at this run's image size and widths."""
    return model.load_backbone(name or args.backbone_class, weights, args.img_size, args.demo_width_divisor,
                               args.drop_block)
