"""A preempted, interrupted or damaged run: mid-epoch checkpoints, signals, damaged checkpoints, the run lock."""
import glob
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, data_args, run_main

import run_directory  # noqa: E402

SMALL = ['--img_size', '96', '--demo_width_divisor', '8', '--batch_size', '4', '--log_interval', '1']
EVERY_ITERATION = ['--checkpoint_minutes', '1e-9']


def environment():
    variables = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        variables.pop(name, None)
    return variables


def training_argv(tiny_data, workers=2):
    return SMALL + data_args(tiny_data)[:8] + [
        '--num_workers', str(workers), '--backbone_class', 'Resnet12', '--num_classes', '4', '--max_epoch', '3',
        '--warmup_epoch', '1', '--optim', 'AdamW', '--lr', '0.003', '--augment', '--seed', '7',
        '--drop_block', 'annealed']


def only_run_dir(save_dir) -> str:
    records = glob.glob(os.path.join(str(save_dir), '*', '*', 'record.txt'))
    assert len(records) == 1, records
    return os.path.dirname(records[0])


def record_of(run_dir):
    with open(os.path.join(run_dir, 'record.txt'), encoding='utf-8') as handle:
        return handle.read()


def checkpoint_progress(save_dir):
    """(epochs done, iteration within the next epoch) of the run's latest checkpoint, or None."""
    paths = glob.glob(os.path.join(str(save_dir), '*', '*', 'checkpoint.pth.tar'))
    if not paths:
        return None
    try:
        progress = torch.load(paths[0], weights_only=True)['progress']
    except Exception:  # replaced while being read: try again later
        return None
    return progress['epoch'], progress.get('iteration', 0)


def assert_same_final_weights(straight_dir, resumed_dir):
    for name, key in (('max_acc.pth', 'params'), ('checkpoint.pth.tar', 'student')):
        straight = torch.load(os.path.join(straight_dir, name), weights_only=True)[key]
        resumed = torch.load(os.path.join(resumed_dir, name), weights_only=True)[key]
        assert straight.keys() == resumed.keys()
        for tensor_name, tensor in straight.items():
            assert torch.equal(tensor, resumed[tensor_name]), (name, tensor_name)


def interrupt_mid_epoch(command, save_dir, signal_number):
    """Start `command`, send `signal_number` once a checkpoint within epoch 2 exists; return the finished process.

    SIGINT goes to the whole process group, loader workers included, as Ctrl-C in a terminal does."""
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300  # it only ends a hung run: the run's own progress decides when the signal goes
    while time.time() < deadline and process.poll() is None:
        progress = checkpoint_progress(save_dir)
        if progress and progress[0] == 1 and progress[1] >= 1:
            break
        time.sleep(0.01)
    else:
        process.kill()
        pytest.fail(f'the run {"ended" if process.poll() is not None else "hung"} before a checkpoint within epoch 2')
    if signal_number == signal.SIGINT:
        os.killpg(process.pid, signal_number)
    else:
        process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=300)
    process.stdout_text, process.stderr_text = stdout, stderr
    return process


@pytest.fixture(scope='module')
def straight_run(tiny_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp('straight')
    subprocess.run([sys.executable, os.path.join(ROOT, 'main.py')] + training_argv(tiny_data) +
                   ['--save_dir', str(save_dir)], check=True, env=environment(), capture_output=True)
    return only_run_dir(save_dir)


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_run_stopped_within_an_epoch_resumes_there_and_ends_with_the_same_weights(tiny_data, tmp_path,
                                                                                    straight_run, signal_number):
    command = [sys.executable, os.path.join(ROOT, 'main.py')] + training_argv(tiny_data) + EVERY_ITERATION + [
        '--save_dir', str(tmp_path)]
    stopped = interrupt_mid_epoch(command, tmp_path, signal_number)
    run_dir = only_run_dir(tmp_path)
    epoch, iteration = checkpoint_progress(tmp_path)
    assert epoch < 3
    if signal_number != signal.SIGKILL:
        name = signal.Signals(signal_number).name
        assert stopped.returncode == 128 + signal_number, stopped.stderr_text[-2000:]
        assert re.search(rf'^stopped by {name} in epoch \d+ after iteration \d+: checkpoint written to .*; the same '
                         r'command resumes from there$', record_of(run_dir), re.M)
        assert 'Traceback' not in stopped.stderr_text
    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f'resumed from {run_dir}/checkpoint.pth.tar at ' in record_of(run_dir)
    assert_same_final_weights(straight_run, run_dir)


def test_two_processes_stopped_by_sigterm_resume_to_the_same_weights(tiny_data, tmp_path):
    # launched as start.sh launches several processes: launch.py, torchrun without its traceback
    command = [sys.executable, os.path.join(ROOT, 'launch.py'), '--standalone', '--nproc_per_node', '2',
               os.path.join(ROOT, 'main.py')] + training_argv(tiny_data, workers=0) + ['--batch_size', '8']
    straight = subprocess.run(command + ['--save_dir', str(tmp_path / 'straight')], env=environment(),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    interrupted = tmp_path / 'interrupted'
    stopped = interrupt_mid_epoch(command + EVERY_ITERATION + ['--save_dir', str(interrupted)], interrupted,
                                  signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr_text[-2000:]
    assert 'stopped by SIGTERM' in record_of(only_run_dir(interrupted))
    # the stop line is the last thing printed: no launcher traceback or failure report after it
    assert re.match('stopped by SIGTERM (in|after) epoch ', stopped.stdout_text.strip().splitlines()[-1])
    assert not re.search('Traceback|SignalException|ChildFailedError|exitcode|Received', stopped.stderr_text)
    rerun = subprocess.run(command + EVERY_ITERATION + ['--save_dir', str(interrupted)], env=environment(),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_final_weights(only_run_dir(tmp_path / 'straight'), only_run_dir(interrupted))


# ------------------------------------------------------------------------------------------ damaged checkpoints
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(tiny_data, tmp_path):
    argv = training_argv(tiny_data, workers=0) + ['--save_dir', str(tmp_path)]
    run_main(argv)
    run_dir = only_run_dir(tmp_path)
    latest = os.path.join(run_dir, 'checkpoint.pth.tar')
    assert torch.load(os.path.join(run_dir, 'checkpoint.prev.pth.tar'), weights_only=True)['progress']['epoch'] == 2
    with open(latest, 'r+b') as handle:
        handle.truncate(1000)
    run_main(argv)
    record = record_of(run_dir)
    assert re.search(r'checkpoint.pth.tar does not load \(.*\): set aside as .*checkpoint.pth.tar.damaged-\d+-\d+; '
                     r'resuming from .*checkpoint.prev.pth.tar$', record, re.M)
    assert 'at the end of epoch 2' in record
    assert len(glob.glob(os.path.join(run_dir, 'checkpoint.pth.tar.damaged-*'))) == 1
    assert torch.load(latest, weights_only=True)['progress']['epoch'] == 3


def test_with_no_usable_checkpoint_the_run_says_what_to_do(tiny_data, tmp_path):
    argv = training_argv(tiny_data, workers=0) + ['--save_dir', str(tmp_path)]
    run_dir = os.path.join(str(tmp_path), 'TLD-Resnet12-no_distill',
                           'lr0.003_AdamW_cosine_epoch3_warmup1_bs4')
    os.makedirs(run_dir)
    for name in ('checkpoint.pth.tar', 'checkpoint.prev.pth.tar'):
        with open(os.path.join(run_dir, name), 'wb') as handle:
            handle.write(b'\0' * 1000)
    with pytest.raises(SystemExit) as stopped:
        run_main(argv)
    message = str(stopped.value.code)
    assert '\n' not in message and message.startswith(f'error: {run_dir}/checkpoint.pth.tar does not load (')
    assert message.endswith('move the damaged files away to start this run afresh, or put back a good copy')


# ------------------------------------------------------------------------------------------------ the run lock
def write_lock(run_dir, host, pid, age_seconds=0.0):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, 'run.lock')
    with open(path, 'w', encoding='utf-8') as handle:
        json.dump({'host': host, 'pid': pid, 'started': '2026-11-28 10:00:00'}, handle)
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))


def test_a_live_holder_keeps_the_run_directory(tiny_data, tmp_path):
    argv = training_argv(tiny_data, workers=0) + ['--save_dir', str(tmp_path)]
    run_dir = os.path.join(str(tmp_path), 'TLD-Resnet12-no_distill', 'lr0.003_AdamW_cosine_epoch3_warmup1_bs4')
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        for host, pid, age in ((socket.gethostname(), holder.pid, 0), ('other-host', 12345, 30)):
            write_lock(run_dir, host, pid, age)
            with pytest.raises(SystemExit, match=re.escape(f'is in use by another run (host {host}, process {pid}, '
                                                           'started 2026-11-28 10:00:00)')):
                run_main(argv)
            assert not os.path.exists(os.path.join(run_dir, 'record.txt'))
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_does_not_block_a_rerun(tiny_data, tmp_path):
    argv = training_argv(tiny_data, workers=0) + ['--save_dir', str(tmp_path), '--max_epoch', '1']
    run_dir = os.path.join(str(tmp_path), 'TLD-Resnet12-no_distill', 'lr0.003_AdamW_cosine_epoch1_warmup1_bs4')
    write_lock(run_dir, socket.gethostname(), 2 ** 22 + 17, 0)   # no such process
    run_main(argv)
    write_lock(run_dir, 'other-host', 12345, run_directory.RunLock.STALE_SECONDS + 60)  # no heartbeat for too long
    run_main(argv)
    assert not os.path.exists(os.path.join(run_dir, 'run.lock'))  # released at the end


# ------------------------------------------------------------------------------------------- the cluster's setup
SEPARATE_STORAGE_RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import flags, main
argv = sys.argv[1:]
if os.environ['RANK'] == '1':  # this process's --save_dir is another disk, as on a second host without shared storage
    argv[argv.index('--save_dir') + 1] += '_elsewhere'
main.main(flags.parse_args(argv))
"""


def test_a_save_dir_that_processes_do_not_share_is_refused_at_start(tiny_data, tmp_path):
    runner = tmp_path / 'runner.py'
    runner.write_text(SEPARATE_STORAGE_RUNNER.format(root=ROOT))
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             str(runner)] + training_argv(tiny_data, workers=0) + [
        '--batch_size', '8', '--save_dir', str(tmp_path / 'runs')],
        env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    messages = re.findall(r'^error: .*$', result.stderr, re.M)
    assert len(messages) == 1, result.stderr[-3000:]
    assert 'process 1 on host' in messages[0] and '--save_dir must be storage that every host shares' in messages[0]
    assert not os.path.exists(tmp_path / 'runs')  # no lock left, nothing written, no empty directory


def test_small_shared_memory_lowers_the_loader_workers_and_says_so(tiny_data, tmp_path, monkeypatch):
    import helpers
    monkeypatch.setattr(helpers, 'shared_memory_free_bytes', lambda: 2 * 2 * 4 * 3 * 96 * 96 + 1)
    monkeypatch.setattr(helpers.os, 'sched_getaffinity', lambda pid: set(range(8)))  # cores enough for 3 workers
    run_main(training_argv(tiny_data, workers=3) + ['--max_epoch', '1', '--save_dir', str(tmp_path)])
    record = record_of(only_run_dir(tmp_path))
    assert re.search(r'^/dev/shm has 0 MB free, too little for 3 loader workers in each of 1 processes '
                     r'\(about \d+ MB\): using 1; give the container more shared memory', record, re.M)
    assert 'num_workers=3' in record


def _race_for_the_lock(run_dir, start, decided, results):
    start.wait()
    try:
        lock = run_directory.RunLock(run_dir).acquire()
    except run_directory.RunDirectoryBusy:
        lock = None
    results.put(lock is not None)
    decided.wait()  # the winner holds the lock, alive, until the other has decided
    if lock is not None:
        lock.release()


def test_two_runs_racing_for_one_stale_lock_exactly_one_takes_it(tmp_path):
    context = multiprocessing.get_context('fork')
    for attempt in range(20):
        run_dir = str(tmp_path / f'attempt{attempt}')
        write_lock(run_dir, socket.gethostname(), 2 ** 22 + 17, 0)  # a holder that is gone: stale
        start, decided, results = context.Barrier(2), context.Barrier(2), context.Queue()
        racers = [context.Process(target=_race_for_the_lock, args=(run_dir, start, decided, results))
                  for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=60)
        assert sorted(results.get(timeout=5) for _ in racers) == [False, True], f'attempt {attempt}'


def test_a_lock_that_cannot_be_read_yet_is_a_run_starting(tmp_path):
    run_dir = str(tmp_path)
    open(os.path.join(run_dir, 'run.lock'), 'w').close()  # created, its holder not yet written
    with pytest.raises(run_directory.RunDirectoryBusy, match='being taken by another run that is starting'):
        run_directory.RunLock(run_dir).acquire()
    assert os.path.getsize(os.path.join(run_dir, 'run.lock')) == 0


def test_the_run_lock_names_the_host_process_and_start_of_its_run(tmp_path):
    lock = run_directory.hold_run_directory(str(tmp_path / 'run'), 0, 1)
    with open(tmp_path / 'run' / 'run.lock', encoding='utf-8') as handle:
        content = json.load(handle)
    lock.release()
    assert content['host'] == socket.gethostname() and content['pid'] == os.getpid()
    assert time.strptime(content['started'], '%Y-%m-%d %H:%M:%S')
    assert not (tmp_path / 'run' / 'run.lock').exists()
