"""The flags: the parser (the original's flags under their names, plus this project's, in groups, every default shown
once) and every check of a value or of a combination, each failure one line with the fix."""
import argparse
import difflib
import math
import os

import losses
import model
import precision
import resnet12
import retrieval
import trainer
import utils


USAGE = """Distil a landmark teacher into a student that shares its frozen classifier; train, resume, test.

Single process:  python main.py --backbone_class Swin_tiny --is_distill --teacher_init_weights T.pth ...
Several GPUs:    torchrun --nproc_per_node 8 main.py ...   (DDP; --batch_size is the global batch)
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The usage text as written; each flag's default shown once: appended unless its help already says it."""

    def _get_help_string(self, action):
        if 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with the nearest flag for a mistyped one (not the usage block)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}{self.nearest_flags(message)}\n')

    def nearest_flags(self, message: str) -> str:
        """'; did you mean --max_epoch?' for each unrecognized --flag of the message that resembles a known one."""
        if not message.startswith('unrecognized arguments:'):
            return ''
        known = {option.lstrip('-'): option for action in self._actions for option in action.option_strings}
        hints = []
        for word in message.split(':', 1)[1].split():
            name = word.split('=')[0]
            match = difflib.get_close_matches(name.lstrip('-'), list(known), n=1, cutoff=0.75)
            if name.startswith('--') and match:
                hints.append(f'{name}: did you mean {known[match[0]]}?')
        return f' ({"; ".join(hints)})' if hints else ' (python main.py --help lists every flag)'


def get_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The original's flags, under their names, plus this project's, in groups (without `defaults`: only the flags
    given appear in what it parses)."""
    parser = FlagParser(prog='main.py', description=USAGE, formatter_class=HelpFormatter)
    for title, add_flags in (('model and schedule', add_recipe_flags), ('distillation', add_distillation_flags),
                             ('data', add_data_flags), ('the run', add_run_flags)):
        group = parser.add_argument_group(title)  # a flag without help text still shows its default
        add_flags(lambda *names, help='default: %(default)s', **rest: group.add_argument(
            *names, help=help, **(rest if defaults else dict(rest, default=argparse.SUPPRESS))))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with `given`: the names of those on the command line (a weights file's description fills the
    others of its model)."""
    args = get_parser().parse_args(argv)
    args.given = set(vars(get_parser(defaults=False).parse_args(argv)))
    return args


def add_recipe_flags(add):
    """The model, its schedule and optimizer."""
    add('--backbone_class', default='Swin_tiny', choices=model.BACKBONE_NAMES)
    add('--init_weights', default=None, help='student weights to start from (or to test with --test_only)')
    add('--img_size', type=int, default=384)
    add('--num_classes', type=int, default=None,
        help="default: the teacher's classifier's, else the training lists' largest label + 1")
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


def add_distillation_flags(add):
    """The teacher and the distillation loss."""
    add('--is_distill', action='store_true')
    add('--teacher_backbone_class', default='Swin_base', choices=model.BACKBONE_NAMES)
    add('--teacher_init_weights', default=None, help='teacher file with its cosine classifier')
    add('--kd_loss', default='KD', choices=losses.KD_LOSSES)
    add('--kd_weight', type=float, default=1.0)
    add('--feature_kd_weight', type=float, default=0.0,
        help="adds this times 1 - cos(student feature, teacher feature), summed over the batch (default 0: the "
             'published loss)')
    add('--head_fixed', action='store_true', help="the student uses the teacher's classifier, frozen")
    add('--init_head_from_teacher', action='store_true',
        help="without --head_fixed, start the student's own head as a trainable copy of the teacher's "
             '(default: a fresh Xavier-initialised head, as the original)')
    add('--teacher_eval', action='store_true',
        help="run the teacher deterministically (eval mode) while distilling; default: as the published runs, "
             'with its stochastic depth active (never any gradient)')
    add('--teacher_cache', default=None, metavar='DIR',
        help="store the teacher's feature of every training image once in DIR and train from it, no teacher run")
    add('--teacher_cache_mode', default='eval', choices=('eval', 'draws'),
        help='eval: the eval-mode teacher (as good as the live published one, bench/distill_quality.py); draws: K '
             'draws of the train-mode teacher, stochastic depth active as published, epoch e reading draw e mod K')
    add('--teacher_cache_views', type=int, default=8,
        help='K: the draws stored (--teacher_cache_mode draws) and, with --augment, augmented views of each image')
    add('--teacher_cache_rebuild', action='store_true', help='replace a cache in DIR built for other settings')
    add('--teacher_cache_dtype', default='float16', choices=('float16', 'float32'), help='float32: exactness checks')


def add_data_flags(add):
    """Lists, image roots and loading."""
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
    add('--benchmark', default=None, choices=retrieval.REVISITOP_SETS + ('gldv2',),
        help='with --test_only: score on a retrieval benchmark instead of --test_list')
    add('--benchmark_root', default=None, metavar='DIR',
        help="the benchmark's files as it lays them out: gnd_<name>.pkl and jpg/ (roxford5k, rparis6k), or "
             'index.csv, test.csv, retrieval_solution_v2.1.csv, index/ and test/ (gldv2)')
    add('--benchmark_distractors', nargs=2, default=None, metavar=('ROOT', 'LIST'),
        help='roxford5k, rparis6k: extra database images (the 1M distractors), LIST one path under ROOT a line')
    add('--train_format', default='lists', choices=('lists', 'gldv2'),
        help='gldv2: Google Landmarks v2 as it ships in the one --train_root: train_clean.csv or train.csv, and train/ '
             'with the images extracted (a/b/c/<id>.jpg) or in their tar shards (images_000.tar ...), read in place')
    add('--gldv2_csv', default='clean', choices=('clean', 'full'), help='train_clean.csv or train.csv')
    add('--gldv2_val_share', type=float, default=0.02,
        help="the share of each GLDv2 landmark's images held out for validation, drawn by --seed (0: none)")
    add('--shard_index', default=None, metavar='DIR', help='where the index of the GLDv2 tar shards is kept '
                                                           '(default: SAVE_DIR/gldv2_shard_index)')
    add('--exclude_landmarks', default=None, metavar='FILE',
        help='GLDv2 landmark ids (or, with lists, labels), one a line, whose images are left out of training')
    add('--augment', action='store_true', help='random resized crop, flip and PCA lighting')
    add('--num_workers', type=int, default=8, help='data loading processes per training process')
    add('--max_bad_images', type=float, default=0.01, help='fraction of an epoch that may be unreadable')


def add_run_flags(add):
    """Where the run goes, how it checkpoints and logs, what it does, and how fast."""
    add('--save_dir', default='./checkpoints')
    add('--suffix', default='', help='appended to the run directory name')
    add('--eval_interval', type=int, default=1, help='epochs between validations')
    add('--log_interval', type=int, default=50, help='iterations between tensorboard points')
    add('--checkpoint_minutes', type=float, default=30.0,
        help='also write the resumable checkpoint within an epoch every this many minutes (0: at epoch ends only)')
    # the original's switches, accepted for old scripts: a run with a checkpoint always resumes, torchrun gives DDP
    add('--resume', nargs='?', const=True, default=False, type=utils.parse_bool, help=argparse.SUPPRESS)
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
    add('--amp', default='none', choices=precision.AMP_CHOICES,
        help='autocast: auto takes bf16 where the device computes it natively, else fp16 on a GPU and float32 on a '
             'CPU (start.sh passes auto); fp16 is for GPUs only')
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
    benchmark, gldv2 = f'--benchmark {args.benchmark}', args.train_format == 'gldv2'
    rules = (
        (args.batch_size % world_size, f'--batch_size {args.batch_size} is the global batch and must be divisible by '
                                       f'the {world_size} processes'),
        (args.is_distill and not args.teacher_init_weights,
         '--is_distill needs --teacher_init_weights (the teacher file)'),
        (args.teacher_cache and not args.is_distill,
         "--teacher_cache stores the teacher's features: add --is_distill and a teacher"),
        (args.teacher_cache_mode == 'draws' and args.teacher_eval, '--teacher_eval runs the teacher in eval mode; '
         '--teacher_cache_mode draws stores the train-mode teacher: choose one'),
        (args.head_fixed and not args.is_distill,
         "--head_fixed shares the teacher's classifier: add --is_distill and a teacher"),
        (args.feature_kd_weight and not args.is_distill,
         "--feature_kd_weight pulls the student's features toward the teacher's: add --is_distill and a teacher"),
        (gldv2 and (len(args.train_root) != 1 or args.train_list or args.val_list),
         '--train_format gldv2 reads one --train_root (its CSV files, train/) and holds out its own validation '
         'split (--gldv2_val_share): give one --train_root, and no --train_list or --val_list'),
        (not gldv2 and len(args.train_root) != len(args.train_list), f'--train_root has {len(args.train_root)} '
         f'entries, --train_list {len(args.train_list)}: give one root per list'),
        (not (args.test_only or args.export_onnx or args.train_list or gldv2),
         'training needs --train_root and --train_list (or use --test_only or --export_onnx)'),
        (args.export_onnx and args.test_only,
         '--export_onnx and --test_only are two runs: export first, then test the .onnx file'),
        (args.quantize != 'none' and not args.export_onnx,
         '--quantize applies to --export_onnx: give the .onnx path to write'),
        (args.quantize == 'int8' and not args.calibration_list,
         f'--quantize int8 of a {args.backbone_class} calibrates its activations on real images: give '
         "--calibration_root and --calibration_list (a list in the suite's format)"),
        (bool(args.calibration_root) != bool(args.calibration_list), 'give --calibration_root with --calibration_list'),
        (args.test_only and not args.test_list and not args.benchmark,
         '--test_only needs --test_root and --test_list, or a --benchmark'),
        (not args.benchmark and (args.benchmark_root or args.benchmark_distractors),
         f'--{"benchmark_root" if args.benchmark_root else "benchmark_distractors"} goes with --benchmark: name the '
         'benchmark'),
        (args.benchmark and not args.test_only, f'{benchmark} scores a model: add --test_only (and --init_weights)'),
        (args.benchmark and args.test_list, f'{benchmark} and --test_list are two tests: run them one at a time'),
        (args.benchmark and not args.benchmark_root, f'{benchmark} needs --benchmark_root, the directory of its files'),
        (args.benchmark and args.benchmark_distractors and args.benchmark not in retrieval.REVISITOP_SETS,
         '--benchmark_distractors adds database images to roxford5k or rparis6k only'),
        (bool(args.val_root) != bool(args.val_list) or bool(args.test_root) != bool(args.test_list),
         'give --val_root with --val_list and --test_root with --test_list'),
        (args.init_weights and args.init_weights.endswith('.onnx') and not args.test_only,
         f'--init_weights {args.init_weights} is an exported ONNX serving graph, which only --test_only scores: '
         'training and export start from PyTorch weights (a max_acc.pth, a teacher .pyth)'),
        (not args.test_only and not args.export_onnx and args.warmup_epoch > args.max_epoch > 0,
         f'--warmup_epoch {args.warmup_epoch} is longer than --max_epoch {args.max_epoch}: the rate would never '
         'reach --lr; give a --warmup_epoch of at most --max_epoch'))
    return [message for broken, message in rules if broken]


def path_problems(args) -> list[str]:
    """Files and directories that do not exist, and an --export_onnx path that cannot be written."""
    problems = []
    if args.export_onnx:
        parent = os.path.dirname(os.path.abspath(args.export_onnx))
        if os.path.isdir(args.export_onnx) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            problems.append(f'--export_onnx {args.export_onnx}: cannot write a file there (a directory, or a folder '
                            'that does not exist or is not writable); give the path of the .onnx file to write')
    files = ('train_list', 'val_list', 'test_list', 'label_map', 'init_weights', 'teacher_init_weights',
             'test_mask_coarse', 'test_mask_fine', 'calibration_list', 'exclude_landmarks')
    for name in files + ('train_root', 'val_root', 'test_root', 'calibration_root', 'benchmark_root'):
        kind, exists = ('file', os.path.isfile) if name in files else ('directory', os.path.isdir)
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
    """Numbers out of range, an --img_size or --demo_width_divisor a backbone does not take, an unusable --step_size, a
    run with nothing to do."""
    ranges = ((('eval_interval', 'log_interval', 'img_size', 'batch_size', 'demo_width_divisor', 'teacher_cache_views'),
               'be at least 1', lambda value: value < 1),
              (('max_epoch', 'warmup_epoch', 'min_lr', 'weight_decay', 'momentum', 'kd_weight', 'feature_kd_weight',
                'num_workers', 'max_bad_images', 'checkpoint_minutes'), 'not be negative', lambda value: value < 0),
              (('lr', 'min_lr', 'weight_decay', 'momentum', 'gamma', 'kd_weight', 'feature_kd_weight', 'max_bad_images',
                'checkpoint_minutes'), 'be a finite number', lambda value: not math.isfinite(value)),
              (('lr', 'gamma'), 'be positive', lambda value: value <= 0),
              (('gldv2_val_share',), 'be at least 0 and below 1', lambda value: not 0 <= value < 1))
    problems = [f'--{name} must {rule}, not {getattr(args, name)}'
                for names, rule, broken in ranges for name in names if broken(getattr(args, name))]
    problems += backbone_problems(args)
    if not args.test_only and args.max_epoch == 0 and not args.test_list:
        problems.append('--max_epoch 0 trains nothing and there is no --test_list to evaluate: nothing to do')
    if args.num_classes is not None and args.num_classes < 1:
        problems.append(f'--num_classes must be at least 1, not {args.num_classes}')
    sizes = trainer.step_sizes(args.step_size)
    if args.lr_scheduler != 'cosine' and (not sizes or min(sizes) < 1):
        problems.append(f'--step_size {args.step_size!r}: give a positive integer (step) or comma-separated '
                        'positive integers (multistep)')
    elif args.lr_scheduler == 'step' and len(sizes) > 1:
        problems.append(f'--step_size {args.step_size}: `step` decays every N epochs; give one N, or use '
                        '--lr_scheduler multistep for a list of epochs')
    return problems


def backbone_problems(args) -> list[str]:
    """An --img_size or --demo_width_divisor that a backbone of the run (the student's, a teacher's in use) cannot be
    built with, naming the values it can."""
    uses_teacher = args.is_distill or (args.test_only and args.teacher_init_weights)
    names = list(dict.fromkeys([args.backbone_class] + ([args.teacher_backbone_class] if uses_teacher else [])))
    problems = list(dict.fromkeys(f'--img_size {args.img_size}: {message}' for name in names if args.img_size >= 1 and
                                  (message := model.image_size_problem(name, args.img_size))))
    divisors = [divisor for divisor in model.width_divisors(names[0])
                if all(divisor in model.width_divisors(name) for name in names)]
    if args.demo_width_divisor >= 1 and args.demo_width_divisor not in divisors:
        problems.append(f'--demo_width_divisor {args.demo_width_divisor} does not divide the channel widths of '
                        f'{" and ".join(names)}: give one of {", ".join(map(str, divisors))}')
    return problems


def given_flags(args) -> set[str]:
    """The flags given on the command line (parse_args); without that record, those that differ from the defaults."""
    given = getattr(args, 'given', None)
    defaults = vars(get_parser().parse_args([]))
    return given if given is not None else {name for name, value in defaults.items()
                                            if getattr(args, name, value) != value}


def clip_default_warmup(args) -> list[str]:
    """A --max_epoch shorter than the default warmup (10 epochs) clips the warmup to it, said in a line (the quick
    start's short runs); a --warmup_epoch given on the command line is kept, and checked."""
    if 'warmup_epoch' in given_flags(args) or args.test_only or args.export_onnx:
        return []
    if not 0 < args.max_epoch < args.warmup_epoch:
        return []
    default, args.warmup_epoch = args.warmup_epoch, args.max_epoch
    return [f'note: --warmup_epoch {args.max_epoch}: the default warmup ({default} epochs) is longer than --max_epoch '
            f'{args.max_epoch}, so the rate reaches --lr at the last epoch; give --warmup_epoch to choose another']
