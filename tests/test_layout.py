"""The layout holds: each top-level file one concern of bounded size, and rooms that depend on each other one way
only, so that no call can leave a room and come back into it."""
import ast
import glob
import os

from conftest import ROOT

PRODUCT = {os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(ROOT, '*.py'))} - {'demo'}
# the rooms below the training suite: they know nothing of training, runs or files
BACKBONES = {'resnet12', 'swin_transformer'}


def imported_rooms(room: str) -> set[str]:
    """The product's own modules that `room` imports, anywhere in it."""
    with open(os.path.join(ROOT, f'{room}.py'), encoding='utf-8') as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split('.')[0])
    return names & PRODUCT - {room}


def test_no_file_is_over_500_lines_and_main_over_400():
    sizes = {}
    for room in PRODUCT:
        with open(os.path.join(ROOT, f'{room}.py'), encoding='utf-8') as handle:
            sizes[room] = len(handle.read().splitlines())
    assert 'main' in sizes and 'datasets' in sizes and 'retrieval' in sizes
    assert sizes['main'] <= 400, sizes['main']
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_rooms_depend_on_each_other_one_way_only():
    graph = {room: imported_rooms(room) for room in PRODUCT}
    for room in BACKBONES | {'utils', 'losses'}:
        assert graph[room] == set(), (room, graph[room])
    assert graph['model'] <= BACKBONES | {'utils'}
    # the trainer is built by helpers.py for main.py; flags.py reads its --step_size parser
    assert 'trainer' not in set().union(*(graph[room] for room in PRODUCT - {'main', 'helpers', 'flags'}))
    visiting, done = [], set()

    def visit(room):
        assert room not in visiting, f'import cycle: {" -> ".join(visiting[visiting.index(room):] + [room])}'
        if room in done:
            return
        visiting.append(room)
        for dependency in graph[room]:
            visit(dependency)
        visiting.pop()
        done.add(room)
    for room in sorted(graph):
        visit(room)
