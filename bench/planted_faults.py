"""The suite's strength on the faults that matter here: each fault of tests/faults.json is planted alone in a copy of
the repository, and the tests named for it are run there; a fault is caught when they fail.

    python bench/planted_faults.py [--only NAME-FRAGMENT]

Last line: `caught=<n> of <m>`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_of_repository(directory: str):
    """The tracked and untracked (not ignored) files of the repository, copied into `directory`."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split('\n')
    for name in filter(None, files):
        target = os.path.join(directory, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(ROOT, name), 'rb') as source, open(target, 'wb') as copy:
            copy.write(source.read())


def caught(fault: dict) -> bool:
    """Whether the fault's tests fail once it is planted (a fault whose text is not found stops the script)."""
    with tempfile.TemporaryDirectory() as directory:
        copy_of_repository(directory)
        path = os.path.join(directory, fault['file'])
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
        if text.count(fault['old']) != 1:
            raise SystemExit(f"{fault['name']}: {fault['file']} does not hold its text once; update tests/faults.json")
        with open(path, 'w', encoding='utf-8') as handle:
            handle.write(text.replace(fault['old'], fault['new']))
        finished = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                                   *fault['tests']], cwd=directory, capture_output=True, text=True)
        return finished.returncode != 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', default='', help='plant only the faults whose name holds this')
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'tests', 'faults.json'), encoding='utf-8') as handle:
        faults = [fault for fault in json.load(handle) if args.only in fault['name']]
    results = []
    for fault in faults:
        results.append(caught(fault))
        print(f"{'caught' if results[-1] else 'MISSED'}: {fault['name']}", flush=True)
    print(f'caught={sum(results)} of {len(results)}')


if __name__ == '__main__':
    main()
