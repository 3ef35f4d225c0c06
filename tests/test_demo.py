"""The demo pipeline of start.sh end to end, at a far smaller size, and start.sh's recipe launch."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def demo_environment(tmp_path, **extra) -> dict:
    environment = dict(os.environ, PYTHON=sys.executable, REAL_PYTHON=sys.executable, DEMO_DIR=str(tmp_path / 'demo'),
                       OMP_NUM_THREADS='1')
    for name in ('TEACHER', 'TRAIN_ROOT', 'TRAIN_LIST', 'TEST_ROOT', 'TEST_LIST', 'RANK', 'WORLD_SIZE',
                 'LOCAL_RANK'):
        environment.pop(name, None)
    environment.update(extra)
    return environment


def test_demo_runs_every_stage_and_writes_the_table(tmp_path):
    environment = demo_environment(tmp_path, DEMO_SIZE='small', DEMO_LANDMARKS='6', DEMO_TEST_LANDMARKS='5',
                                   DEMO_WIDTH_DIVISOR='16', DEMO_TEACHER_EPOCHS='1', DEMO_STUDENT_EPOCHS='1',
                                   DEMO_RESNET12_EPOCHS='1', DEMO_VIEWS='22', DEMO_BATCH='128')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True,
                              text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert ('demo: size small: 6 landmarks x 22 views, widths / 16, batch 128, epochs 1 (teacher), 1 (Swin-tiny), '
            '1 (ResNet12)') in finished.stdout
    with open(tmp_path / 'demo' / 'results.md', encoding='utf-8') as handle:
        table = handle.read()
    assert table.split('\n![')[0] in finished.stdout
    assert '![TAR against FAR, training loss and validation accuracy](summary.png)' in table
    with open(tmp_path / 'demo' / 'summary.png', 'rb') as image:
        assert image.read(8) == b'\x89PNG\r\n\x1a\n'
    rows = {line.split('|')[1].strip(): line for line in table.splitlines() if line.startswith('| ')}
    for title in ('Swin-base teacher', 'Resnet12 student', 'Resnet12 query vs teacher gallery (cross)',
                  'Swin-tiny student', 'Swin-tiny query vs teacher gallery (cross)', 'untrained Swin-tiny (floor)',
                  'untrained Swin-tiny query vs teacher gallery (cross floor)'):
        assert re.match(r"^\| .+ \| [0-9.e+]+ \| \d+( \| [0-9.]+){7} \|$",
                        rows[title]), rows.get(title)
    assert rows['untrained Swin-tiny (floor)'].split('|')[3].strip() == '0'
    assert rows['Swin-tiny student'].split('|')[3].strip() == '1'
    runs, = (tmp_path / 'demo' / 'runs').iterdir()
    assert runs.name == 'seed0-6x22-test5-w16-b128-e1.1.1-32px'
    assert sorted(os.listdir(runs)) == ['Synthetic-Resnet12-KD-1.0-NoAug', 'Synthetic-Swin_base-no_distill-NoAug',
                                        'Synthetic-Swin_tiny-KD-1.0-NoAug', 'teacher_cache']
    with open(runs / 'teacher_cache' / 'manifest.json', encoding='utf-8') as handle:
        assert json.load(handle)['complete']  # the students trained from it
    # a rerun reuses the data set (checked: tests/test_synthetic.py) and the size (test below)
    assert (tmp_path / 'demo' / 'data' / 'seed0-6x22-test5' / 'manifest.json').is_file()


def test_recipe_launch_refuses_an_unknown_student(tmp_path):
    environment = demo_environment(tmp_path, TEACHER='teacher.pth', TRAIN_ROOT='.', TRAIN_LIST='train.txt',
                                   STUDENT='Resnet50')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 2
    assert 'STUDENT must be Swin_tiny or Resnet12, not Resnet50' in finished.stderr


FAKE_PYTHON = '''#!/bin/sh
# stands in for python: reports 8 GPUs, prints the command start.sh would run (and appends it to FAKE_LOG when set:
# the demo sends some output to /dev/null); the demo's sizing is the real one
case "$1" in
    -c) echo 8 ;;
    *demo_size.py) exec "$REAL_PYTHON" "$@" ;;
    *) echo "$@"; [ -z "${FAKE_LOG:-}" ] || echo "$@" >> "$FAKE_LOG" ;;
esac
'''


def launched_command(tmp_path, **extra) -> str:
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    recipe = dict(PYTHON=str(fake), TEACHER='/t/teacher.pyth', TRAIN_ROOT='/d/train', TRAIN_LIST='/d/train.txt',
                  TEST_ROOT='/d/test', TEST_LIST='/d/test.txt')
    environment = demo_environment(tmp_path, **dict(recipe, **extra))
    if 'NPROC' not in extra:
        environment.pop('NPROC', None)
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh'), '--num_workers', '12'], env=environment,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    return ' '.join(finished.stdout.split())


def test_recipes_launch_torchrun_on_every_gpu(tmp_path):
    swin = launched_command(tmp_path)
    assert swin.startswith(f'{ROOT}/launch.py --standalone --nproc_per_node 8 {ROOT}/main.py '
                           '--backbone_class Swin_tiny --max_epoch 200 --warmup_epoch 10 --lr 0.001 --optim AdamW')
    for flag in ('--batch_size 256', '--lr_scheduler cosine', '--augment', '--is_distill',
                 '--teacher_backbone_class Swin_base', '--teacher_init_weights /t/teacher.pyth', '--kd_loss KD',
                 '--kd_weight 1.0', '--head_fixed', '--amp auto', '--test_root /d/test --test_list /d/test.txt'):
        assert flag in swin  # auto: main.py takes bf16 where the GPU computes it natively (tests/test_precision.py)
    assert swin.endswith('--num_workers 12')
    assert '--save_dir ./checkpoints' in swin
    several = launched_command(tmp_path, TRAIN_ROOT='/r1 /r2', TRAIN_LIST='/l1.txt /l2.txt', SAVE_DIR='/runs')
    assert '--train_root /r1 /r2 --train_list /l1.txt /l2.txt' in several and '--save_dir /runs' in several
    resnet = launched_command(tmp_path, STUDENT='Resnet12', NPROC='4', AMP='none')
    assert f'--nproc_per_node 4 {ROOT}/main.py --backbone_class Resnet12 --max_epoch 40 --warmup_epoch 0 ' \
           '--lr 0.01 --optim SGD' in resnet and '--amp none' in resnet


def test_cluster_variables_make_a_multi_host_launch(tmp_path):
    command = launched_command(tmp_path, HOST_NUM='2', HOST_GPU_NUM='8', INDEX='1', CHIEF_IP='10.0.0.5')
    assert command.startswith(f'{ROOT}/launch.py --nnodes 2 --node_rank 1 --master_addr 10.0.0.5 '
                              f'--master_port 29500 --nproc_per_node 8 {ROOT}/main.py')


def test_a_bad_process_count_is_refused(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    environment = demo_environment(tmp_path, PYTHON=str(fake), TEACHER='t.pth', TRAIN_ROOT='.', TRAIN_LIST='l.txt',
                                   NPROC='eight')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True,
                              text=True, timeout=60)
    assert finished.returncode == 2 and "NPROC must be a number of processes, not 'eight'" in finished.stderr


def test_test_only_launch_needs_the_weights_and_the_test_list_only(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    arguments = ['sh', os.path.join(ROOT, 'start.sh'), '--test_only', '--init_weights', '/w/max_acc.pth']
    for teacher in ({}, {'TEACHER': '/t/teacher.pyth'}):
        environment = demo_environment(tmp_path, PYTHON=str(fake), TEST_ROOT='/d/test', TEST_LIST='/d/test.txt',
                                       **teacher)
        finished = subprocess.run(arguments, env=environment, capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        command = ' '.join(finished.stdout.split())
        assert command.startswith(f'{ROOT}/launch.py --standalone --nproc_per_node 8 {ROOT}/main.py')
        assert '--test_root /d/test --test_list /d/test.txt' in command
        assert command.endswith('--test_only --init_weights /w/max_acc.pth')
        assert '--train_list' not in command and '--is_distill' not in command
        assert ('--teacher_init_weights /t/teacher.pyth' in command) == bool(teacher)
    finished = subprocess.run(arguments, env=demo_environment(tmp_path, PYTHON=str(fake)), capture_output=True,
                              text=True, timeout=60)
    assert finished.returncode != 0 and 'set TEST_ROOT' in finished.stderr


def test_test_only_through_start_sh_scores_a_student(tiny_data, tmp_path):
    import torch

    import model
    weights = str(tmp_path / 'student.pth')
    torch.save({'params': model.create_backbone('Resnet12', 96, 8).state_dict()}, weights)
    environment = demo_environment(tmp_path, TEST_ROOT=tiny_data['root'], TEST_LIST=tiny_data['test'],
                                   STUDENT='Resnet12', NPROC='1', SAVE_DIR=str(tmp_path / 'runs'))
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh'), '--test_only', '--init_weights', weights,
                               '--img_size', '96', '--demo_width_divisor', '8', '--num_workers', '0'],
                              env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert re.search(r'^test acc: coarsegrained:\[[0-9., ]+\]--finegrained:\[[0-9., ]+\]$', finished.stdout, re.M)


def native_bf16_here() -> bool:
    """Whether this machine's CPU flags (read here, not by the product) include native bf16."""
    with open('/proc/cpuinfo', encoding='utf-8') as handle:
        flags = next((set(line.split(':', 1)[1].split()) for line in handle if line.startswith(('flags', 'Features'))),
                     set())
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def fake_demo(tmp_path, **extra) -> tuple[dict, object]:
    """The demo's environment with python standing in for main.py and demo.py (demo_size.py runs), and its log."""
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / 'commands.txt'
    environment = demo_environment(tmp_path, PYTHON=str(fake), FAKE_LOG=str(log))
    for name in ('DEMO_LANDMARKS', 'DEMO_VIEWS', 'DEMO_TEST_LANDMARKS', 'DEMO_IMG_SIZE', 'DEMO_WIDTH_DIVISOR',
                 'DEMO_AMP', 'DEMO_TEACHER_EPOCHS', 'DEMO_STUDENT_EPOCHS', 'DEMO_RESNET12_EPOCHS', 'DEMO_SIZE',
                 'DEMO_MINUTES', 'DEMO_SEED'):
        environment.pop(name, None)
    environment.update(extra)
    return environment, log


def test_the_demo_runs_with_the_settings_the_readme_gives(tmp_path):
    environment, log = fake_demo(tmp_path, DEMO_SIZE='full')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    data, teacher, swin, resnet, floor, report = [' '.join(line.split()) for line in log.read_text().splitlines()]
    assert f'demo.py data {tmp_path}/demo/data/seed0-300x40-test50 --seed 0 ' in data
    assert '--num_train_landmarks 300 --train_views 40 --num_test_landmarks 50' in data
    amp = 'bf16' if native_bf16_here() else 'none'  # auto: bf16 only where the CPU computes it natively
    for command in (teacher, swin, resnet, floor):
        assert (f'--img_size 32 --demo_width_divisor 4 --amp {amp} --num_workers 1 --batch_size 128 --optim AdamW '
                '--weight_decay 0.05 --warmup_epoch 1') in command
    assert '--backbone_class Swin_base --num_classes 300 --max_epoch 7 --lr 0.001' in teacher
    for student in (swin, resnet):
        assert '--teacher_cache' in student and '--feature_kd_weight 1 ' in student
        assert '--teacher_cache_mode' not in student and '--teacher_eval' not in student  # the eval-mode cache
    assert '--backbone_class Swin_tiny --lr 0.001 --max_epoch 3' in swin
    assert '--backbone_class Resnet12 --lr 0.002 --max_epoch 4' in resnet
    assert '--max_epoch 0 --suffix=-untrained' in floor
    assert all('--seed 0 ' in command for command in (teacher, swin, resnet, floor))
    runs = f'{tmp_path}/demo/runs/seed0-300x40-test50-w4-b128-e7.3.4-32px'
    assert report.split()[-3:] == ['report', runs, f'{tmp_path}/demo']
    environment['DEMO_SEED'] = '3'  # one seed for the data and every run
    log.unlink()
    assert subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, timeout=120).returncode == 0
    commands = [' '.join(line.split()) for line in log.read_text().splitlines()]
    assert all('--seed 3 ' in command for command in commands[:5]) and '--seed 0' not in ' '.join(commands)
    assert 'data/seed3-300x40-test50' in commands[0]


def test_the_demo_measures_this_machine_and_keeps_the_size_it_chose(tmp_path):
    # a budget no machine meets: the smallest size, said with its predicted time; kept for the reruns
    environment, log = fake_demo(tmp_path, DEMO_MINUTES='0.01', OMP_NUM_THREADS='2')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert re.search(r"demo: a teacher step takes [0-9.]+ s here; the size 'small' \(150 landmarks x 40 views, "
                     r"widths / 8, batch 64, epochs 7 / 5 / 6\) is the smallest; it does not fit 0.01 minutes "
                     r"\(about [0-9.]+ predicted\)", finished.stderr), finished.stderr
    assert '--num_train_landmarks 150 --train_views 40' in log.read_text()
    assert (tmp_path / 'demo' / 'size.txt').read_text().split()[:8] == ['small', '150', '40', '8', '64', '7', '5', '6']
    log.unlink()
    again = subprocess.run(['sh', os.path.join(ROOT, 'start.sh')], env=environment, capture_output=True, text=True,
                           timeout=60)
    assert "demo: the size chosen on this directory's first run" in again.stdout
    assert 'a teacher step takes' not in again.stderr and '--num_train_landmarks 150' in log.read_text()


def test_the_cluster_job_runs_the_recipe_on_every_host(tmp_path):
    with open(os.path.join(ROOT, 'simple_config.json'), encoding='utf-8') as handle:
        job = json.load(handle)
    assert (job['host_num'], job['host_gpu_num'], job['exec_start_in_all_mpi_pods']) == (2, 8, True)
    assert job['init_cmd'] == 'pip install -r requirements.txt'
    settings = dict(word.split('=', 1) for word in job['start_cmd'].split() if '=' in word)
    assert job['start_cmd'].endswith(' sh start.sh')
    # what the cluster sets on host 1 of 2, then the job's own variables
    command = launched_command(tmp_path, HOST_NUM='2', HOST_GPU_NUM='8', INDEX='1', CHIEF_IP='10.0.0.5', **settings)
    assert command.startswith(f'{ROOT}/launch.py --nnodes 2 --node_rank 1 --master_addr 10.0.0.5 ')
    for flag in (f"--teacher_init_weights {settings['TEACHER']}", f"--train_root {settings['TRAIN_ROOT']}",
                 f"--train_list {settings['TRAIN_LIST']}", f"--val_root {settings['VAL_ROOT']}",
                 f"--test_list {settings['TEST_LIST']}", f"--save_dir {settings['SAVE_DIR']}"):
        assert flag in command


@pytest.mark.parametrize('processes', ['1', '2'])
def test_a_recipe_run_with_a_wrong_train_root_ends_on_its_one_line_error(tiny_data, tmp_path, processes):
    from conftest import classifier_file
    teacher = classifier_file(tmp_path / 'teacher.pth', seed=1)
    environment = demo_environment(tmp_path, TEACHER=teacher, TRAIN_ROOT=str(tmp_path / 'nowhere'),
                                   TRAIN_LIST=tiny_data['train'], NPROC=processes, SAVE_DIR=str(tmp_path / 'runs'))
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh'), '--img_size', '96', '--demo_width_divisor', '8'],
                              env=environment, capture_output=True, text=True, timeout=300)
    printed = (finished.stdout + finished.stderr).strip().splitlines()
    assert finished.returncode != 0
    assert len(printed) <= 3, printed
    assert printed[-1] == f"error: --train_root {tmp_path / 'nowhere'}: no such directory", printed


def test_one_process_on_one_host_runs_main_py_itself(tmp_path):
    command = launched_command(tmp_path, NPROC='1')
    assert command.startswith(f'{ROOT}/main.py --backbone_class Swin_tiny') and 'torch.distributed.run' not in command


@pytest.mark.parametrize('flag', [['--train_format', 'gldv2'], ['--train_format=gldv2']])
def test_google_landmarks_as_it_ships_launches_without_a_list(tmp_path, flag):
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    environment = demo_environment(tmp_path, PYTHON=str(fake), TEACHER='/t/teacher.pth', TRAIN_ROOT='/d/gldv2',
                                   NPROC='8')
    finished = subprocess.run(['sh', os.path.join(ROOT, 'start.sh'), *flag], env=environment,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    command = ' '.join(finished.stdout.split())
    assert '--train_root /d/gldv2 ' in command and '--train_list' not in command
    assert command.endswith(' '.join(flag))


def steps_scaled(factor: float) -> dict:
    """Step seconds of the development machine (2 cores, float32) times `factor`."""
    measured = {'Swin_base': (0.199, 0.087, 0.063), 'Swin_tiny': (0.100, 0.050, 0.040),
                'Resnet12': (0.146, 0.051, 0.038)}
    return {(name, divisor, batch): seconds[index] * factor for name, seconds in measured.items()
            for index, (divisor, batch) in enumerate(((4, 128), (8, 128), (8, 64)))}


def test_a_slower_machine_gets_a_smaller_demo_that_fits_its_budget():
    import demo_size
    chosen = []
    for factor in (1, 2, 4, 6, 100):
        size, seconds = demo_size.choose_size(480, steps_scaled(factor), 0.002 * factor, 2)
        chosen.append(demo_size.DEMO_SIZES.index(size))
        larger = demo_size.DEMO_SIZES[:chosen[-1]]
        assert all(demo_size.predicted_seconds(other, steps_scaled(factor), 0.002 * factor, 2) > 480
                   for other in larger)  # the largest that fits
        assert seconds <= 480 or size is demo_size.DEMO_SIZES[-1]
    assert chosen[0] == 0 and chosen == sorted(chosen) and chosen[-1] == len(demo_size.DEMO_SIZES) - 1
    # twice the steps' time, about twice the demo's (data and start-up aside)
    full = demo_size.DEMO_SIZES[0]
    one, two = (demo_size.predicted_seconds(full, steps_scaled(factor), 0.002, 2) for factor in (1, 2))
    assert 1.7 < two / one < 2.0
