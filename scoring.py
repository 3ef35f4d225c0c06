"""Scoring given weights: the final test of a run, --test_only on a test list or a --benchmark, --export_onnx; and what
a weights file says of its own model (backbone, image size, widths), which fills the flags a user need not repeat."""
import os

import checkpoints
import datasets
import evaluation
import helpers
import model
import retrieval
import serving
import utils

# what a weights file's description sets: its entry -> the flag, for the student and for the teacher
STUDENT_FLAGS = {'backbone': 'backbone_class', 'img_size': 'img_size', 'width_divisor': 'demo_width_divisor'}
TEACHER_FLAGS = {'backbone': 'teacher_backbone_class', 'width_divisor': 'demo_width_divisor'}
# results.json's entry naming the test list its test figures are of (see test_list_identity)
TESTED_LIST_KEY = 'test_list'


def architecture_of(path: str) -> dict | None:
    """What a weights file (or an exported .onnx) says of its model; None when it says nothing."""
    return serving.read_architecture(path) if path.endswith('.onnx') else model.read_architecture(path)


def described_flags(weights: str, teacher_weights: str | None, flags: dict, given: set,
                    other_size_allowed: bool) -> tuple[dict, list[str]]:
    """(flag -> value the weights files describe, lines to log). A flag not on the command line takes the file's
    value; one given with another value stops in one line naming both, except --img_size when `other_size_allowed`
    (a test at another size, said in a line). Files that describe nothing leave the flags as they are."""
    updates, notes = {}, []
    for path, entries in ((weights, STUDENT_FLAGS), (teacher_weights, TEACHER_FLAGS)):
        described = architecture_of(path) if path else None
        for entry, flag in entries.items():
            if described is None or entry not in described:
                continue
            value, current = described[entry], updates.get(flag, flags[flag])
            if flag not in given and flag not in updates:
                updates[flag] = value
            elif current == value:
                continue
            elif flag == 'img_size' and path.endswith('.onnx'):
                continue  # a graph's fixed input: OnnxBackbone names the size it takes
            elif flag == 'img_size' and other_size_allowed:
                notes.append(f'{path} was trained at {value} px; tested at {current} px as --img_size asks')
            else:
                source = f'--{flag} {current}' if flag in given else f'{flag} {current} (from {weights})'
                raise utils.RunError(f'{path} was built with {flag} {value}, this run asks {source}: drop the flag, '
                                     'the file says how to build its model')
    return updates, notes


def final_test(args, place, samples, student_backbone, teacher_backbone):
    """The test of `student_backbone` (and of the teacher's, with the cross figures) on the test list's `samples`;
    results.json says which test list its figures are of (test_list_identity)."""
    loader = helpers.build_test_loader(samples, args.img_size, args.batch_size, args.num_workers, place.rank,
                                       place.world_size)
    place.logger.result(TESTED_LIST_KEY, None)  # a test stopped half-way leaves figures of no known list
    evaluation.run_test(loader, student_backbone, teacher_backbone, device=place.device, amp=args.amp,
                        rank=place.rank, logger=place.logger, output_dir=place.run_dir,
                        coarse_mask=args.test_mask_coarse, fine_mask=args.test_mask_fine)
    place.logger.result(TESTED_LIST_KEY, test_list_identity(args))


def test_list_identity(args) -> dict:
    """What the test figures depend on besides the model: the test list's and pair masks' bytes, the image root."""
    return {'test_root': os.path.abspath(args.test_root),
            **{f'{name}_sha256': utils.file_digest([getattr(args, name)]) if getattr(args, name) else None
               for name in ('test_list', 'test_mask_coarse', 'test_mask_fine')}}


def test_again(args, place, weights: str):
    """Test a finished run's `weights` (its max_acc.pth) on the test list again, the training not redone: its test
    figures are of another list. Said in a line; the new figures replace the earlier ones."""
    samples = datasets.read_checked_list(args.test_root, args.test_list, '--test_root', place.rank, place.world_size)
    evaluation.check_test_list(samples, args.test_mask_coarse, args.test_mask_fine, place.logger)
    student = helpers.backbone_of(args, weights).to(place.device)
    teacher = (helpers.backbone_of(args, args.teacher_init_weights, args.teacher_backbone_class).to(place.device)
               if args.is_distill else None)
    place.logger.info(f'this run is finished ({args.max_epoch} epochs) and its test figures are of another test list '
                      f'(or of one not recorded): testing {weights} on --test_list {args.test_list} again, the '
                      'training not redone; its figures replace the earlier ones in results.json, opensetFeat.npy '
                      'and roc.png')
    place.logger.start()
    final_test(args, place, samples, student, teacher)


def test_only(args, place, weights: str, feature_dir: str):
    """Score `weights` (.onnx too) and any teacher on the test list or a --benchmark (features in `feature_dir`)."""
    rank, world_size, logger = place.rank, place.world_size, place.logger
    if args.benchmark:
        images = retrieval.read_benchmark(args.benchmark, args.benchmark_root, args.benchmark_distractors)
        retrieval.check_benchmark_images(images, rank, world_size)
        logger.info(f'{args.benchmark}: {len(images.queries)} queries, {len(images.database)} database images')
    else:
        samples = datasets.read_checked_list(args.test_root, args.test_list, '--test_root', rank, world_size)
        evaluation.check_test_list(samples, args.test_mask_coarse, args.test_mask_fine, logger)
    models = {'student': (weights, args.backbone_class)}
    if args.teacher_init_weights:
        models['teacher'] = (args.teacher_init_weights, args.teacher_backbone_class)
    backbones = {name: serving.OnnxBackbone(path, args.img_size) if path.endswith('.onnx')
                 else helpers.backbone_of(args, path, backbone).to(place.device)
                 for name, (path, backbone) in models.items()}
    if 'teacher' in backbones and backbones['teacher'].feature_dim != backbones['student'].feature_dim:
        raise utils.RunError(f"{weights} gives {backbones['student'].feature_dim}-d features, the teacher "
                             f"{args.teacher_init_weights} {backbones['teacher'].feature_dim}-d: the cross figures "
                             'compare the two; test a student of the teacher\'s width, or leave the teacher out')
    logger.info(f'test only: {weights}')
    logger.start()
    if not args.benchmark:
        return final_test(args, place, samples, backbones['student'], backbones.get('teacher'))
    # what each model's features depend on: its weights' bytes (read by rank 0 alone, which decides on reuse)
    identities = {name: {'weights': utils.file_digest([path]) if rank == 0 else '', 'backbone': backbone,
                         'img_size': args.img_size, 'width_divisor': args.demo_width_divisor, 'amp': args.amp}
                  for name, (path, backbone) in models.items()}
    loaders = {part: helpers.build_test_loader(part_images, args.img_size, args.batch_size, args.num_workers, rank,
                                               world_size)
               for part, part_images in (('queries', images.queries), ('database', images.database))}
    retrieval.run_benchmark(images, backbones, identities, loaders, feature_dir, device=place.device, amp=args.amp,
                            rank=rank, logger=logger)


def export(args, logger, weights: str):
    """Write `weights` as an ONNX serving graph (int8 with --quantize, calibrated on --calibration_list)."""
    backbone = helpers.backbone_of(args, weights)
    description, calibration = {'backbone': args.backbone_class, 'weights': weights}, None
    if args.quantize == 'int8':
        calibration = serving.calibration_images(args.calibration_root, args.calibration_list, args.img_size)
        description['calibration'] = f'{len(calibration)} images of {args.calibration_list}'
    logger.start()
    contract = serving.export(backbone, args.export_onnx, args.img_size, description, calibration)
    logger.info(f'exported {weights} to {args.export_onnx}: ' +
                '; '.join(f'{key}: {value}' for key, value in contract.items()))


def weights_to_score(init_weights: str | None, run_dir: str, flag: str) -> str:
    """The weights to test or export: `init_weights`, else the run's max_acc.pth; stops when neither exists."""
    weights = init_weights or os.path.join(run_dir, checkpoints.BEST_NAME)
    if not os.path.isfile(weights):
        raise utils.RunError(f'{flag} found no {weights}; give --init_weights or train this run first')
    return weights


def output_directory(weights: str, img_size: int, benchmark: str | None, distractors: list[str] | None,
                     save_dir: str | None) -> str:
    """Where a --test_only run writes: `<test or benchmark(+distractors)>-<weights name>-<size>px` beside the weights
    it scores, or in `save_dir` (with a digest of the weights' path: two files of one name do not share it)."""
    test = (benchmark or 'test') + (f'+{os.path.splitext(os.path.basename(distractors[1]))[0]}' if distractors else '')
    name = f'{test}-{os.path.basename(weights).removesuffix(".tar").rsplit(".", 1)[0]}'
    if save_dir:
        return os.path.join(save_dir, f'{name}-{utils.text_digest(os.path.abspath(weights))[:8]}-{img_size}px')
    return os.path.join(os.path.dirname(os.path.abspath(weights)), f'{name}-{img_size}px')
