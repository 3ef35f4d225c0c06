"""Distil a landmark teacher into a student that shares its frozen classifier; train, resume, test.

Single process:  python main.py --backbone_class Swin_tiny --is_distill --teacher_init_weights T.pth ...
Several GPUs:    torchrun --nproc_per_node 8 main.py ...   (DDP; --batch_size is the global batch)
"""
import os

import torch.distributed as dist

import checkpoints
import feature_store
import flags
import helpers
import precision
import run_directory
import scoring
import trainer
import utils


def main(args):
    rank, world_size, device = utils.init_distributed()
    lock, logger, signals = None, None, trainer.StopSignals()
    try:
        notes = flags.clip_default_warmup(args)
        run_dir, weights = run_directory.training_directory(args), None
        if (args.test_only or args.export_onnx) and not flags.path_problems(args):  # the checks see the file's values
            weights = scoring.weights_to_score(args.init_weights, run_dir, '--test_only' if args.test_only
                                               else '--export_onnx')
            updates, described = scoring.described_flags(weights, args.teacher_init_weights, vars(args),
                                                        flags.given_flags(args), other_size_allowed=args.test_only)
            vars(args).update(updates)
            notes += described
        flags.check_args(args, world_size)
        args.amp, precision_line = precision.choose_amp(args.amp, device)
        output_dir = output_directory(args, run_dir, weights)
        lock = run_directory.hold_run_directory(output_dir, rank, world_size) if output_dir else None
        logger = run_directory.Logger(output_dir, rank=rank)
        signals.install()
        logger.info(f'export: {weights} -> {args.export_onnx}' if args.export_onnx else f'run directory: {output_dir}')
        logger.info('args: ' + ' '.join(f'{key}={value}' for key, value in sorted(vars(args).items())
                                        if key != 'given'))
        for note in notes:
            logger.info(note)
        logger.info(precision_line)
        args.num_workers = helpers.loader_workers_that_fit(args.num_workers, args.batch_size // world_size,
                                                           args.img_size, logger)
        place = trainer.RunPlace(output_dir, logger, rank, world_size, device)
        if args.export_onnx:
            signals.at_once = 'during the export: nothing was written; the same command exports again'
            return scoring.export(args, logger, weights)
        if args.test_only:
            signals.at_once = 'during the test: the files of the earlier tests are whole; the same command tests again'
            scoring.test_only(args, place, weights, os.path.join(os.path.dirname(output_dir), 'benchmark_features'))
        elif not train_and_test(args, place, signals):
            return
        logger.info(f'results: {os.path.join(output_dir, run_directory.RESULTS_NAME)} (record.txt beside it)')
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
        feature_store.release_held()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train_and_test(args, place: trainer.RunPlace, signals: trainer.StopSignals) -> bool:
    """Train (resuming where the run directory left off), then test the best epoch's student; False (and a line) for a
    run that finished before, which is left as it was. A finished run whose test figures are of another test list is
    tested again on this one (said in a line), its training not redone."""
    if finished_before(args, place):
        return False
    best_file = os.path.join(place.run_dir, checkpoints.BEST_NAME)
    finished = finished_training(args, place) if args.test_list else None
    if finished and 'test' in finished and os.path.isfile(best_file):
        # tested before on another list than this one (else finished_before said so): this list is tested instead
        signals.at_once = ("during the test: the run's checkpoints and max_acc.pth are whole; the same command tests "
                           'again')
        scoring.test_again(args, place, best_file)
        return True
    signals.at_once = ('during start-up: the teacher cache keeps the rows computed so far; the same command starts '
                       'again')
    run, test_samples = helpers.build_training(args, place, signals)
    signals.at_once = None  # training: a signal stops after the next iteration, with a checkpoint
    run.fit()
    if test_samples:
        signals.at_once = ("during the final test: the run's checkpoints and max_acc.pth are whole; the same command "
                           'tests again')
        best, distiller = run.best_weights(), run.parts.distiller
        student = helpers.backbone_of(args, best).to(place.device) if best else distiller.student.backbone
        teacher = distiller.teacher.backbone if distiller.teacher else None
        if args.teacher_cache:  # the teacher is built for its own and the cross figures only
            teacher = helpers.backbone_of(args, args.teacher_init_weights, args.teacher_backbone_class)
        scoring.final_test(args, place, test_samples, student, teacher.to(place.device) if teacher else None)
    return True


def finished_before(args, place: trainer.RunPlace) -> bool:
    """Whether the run directory holds this run finished (its last epoch's checkpoint, and the final test's figures
    of this test list when there is one), said in a line; a checkpoint of other settings stops. Either way nothing is
    written."""
    results = finished_training(args, place)
    if results is None:
        return False
    tested = not args.test_list or ('test' in results and  # else the test runs, of this list
                                    results.get(scoring.TESTED_LIST_KEY) == scoring.test_list_identity(args))
    if not tested:
        return False
    place.logger.info(f'this run is finished ({args.max_epoch} epochs{", tested" if args.test_list else ""}); nothing '
                      f'was changed: its results are in {os.path.join(place.run_dir, run_directory.RESULTS_NAME)}')
    return True


def finished_training(args, place: trainer.RunPlace) -> dict | None:
    """The results of the run directory's training when it is finished (its last epoch's checkpoint; with a test list,
    max_acc.pth there when a best epoch was recorded), else None; a checkpoint of other settings stops."""
    latest = checkpoints.latest_progress(place.run_dir, place.rank)
    if latest is None:
        return None
    progress, stored_flags = latest
    checkpoints.check_flags(stored_flags, helpers.trajectory_flags(args),
                            os.path.join(place.run_dir, checkpoints.CHECKPOINT_NAME))
    try:
        results = run_directory.read_results(place.run_dir)
    except utils.RunError:  # a damaged results.json: the run goes on, and its logger sets the file aside
        return None
    best_lost = results.get('best_epoch') and not os.path.isfile(os.path.join(place.run_dir, checkpoints.BEST_NAME))
    if progress['epoch'] < args.max_epoch or progress['iteration'] or (args.test_list and best_lost):
        return None  # not finished, or its test would score other weights: the training path names the loss
    return results


def output_directory(args, run_dir: str, weights: str | None) -> str | None:
    """Where the run writes: its run directory (training); beside the weights, or in a --save_dir given with them (a
    test); nowhere (an export writes its .onnx file alone)."""
    if args.export_onnx:
        return None
    if not args.test_only:
        return run_dir
    save_dir = args.save_dir if args.init_weights and 'save_dir' in flags.given_flags(args) else None
    return scoring.output_directory(weights, args.img_size, args.benchmark, args.benchmark_distractors, save_dir)


if __name__ == '__main__':
    main(flags.parse_args())
