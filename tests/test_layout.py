"""The package's shape: layers as subpackages whose imports point down (imports inside functions counted), no
import cycle, a small root, and no module past a few hundred lines."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'pyterrier_hypencoder'

# Bottom up. A module may import its own layer and the layers listed for it, nothing else of the package.
LEAVES = ('errors', 'devices', 'optional', 'checks')
LAYERS = ('model', 'search', 'index', 'distributed', 'pt', 'train')
ALLOWED = {
    'leaf': set(),
    'model': {'leaf'},
    'search': {'leaf', 'model'},
    'index': {'leaf', 'model', 'search'},
    'distributed': {'leaf', 'model', 'search', 'index'},
    'pt': {'leaf', 'model', 'search', 'index', 'distributed'},
    'train': {'leaf', 'model'},
    'root': {'leaf', 'model', 'search', 'index', 'distributed', 'pt'},  # __init__: the public names
}
# Third-party imports that belong to one layer only.
OWNED = {'ray': {'distributed'}, 'transformers': {'model', 'train'}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer_of(module: str) -> str:
    parts = module.split('.')[1:]
    if not parts:
        return 'root'
    if parts[0] in LEAVES:
        return 'leaf'
    assert parts[0] in LAYERS, f'{module} is in no layer: add it to tests/test_layout.py or move it'
    return parts[0]


def imports(path: Path):
    """(module, is_package_import) for every import statement in ``path``, wherever it stands."""
    name = module_name(path)
    here = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = '.'.join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ''
            yield base, [f'{base}.{alias.name}' for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def import_graph() -> dict:
    """Module -> the package modules it imports, wherever the import statement stands (top level or in a function)."""
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in files.items():
        targets = set()
        for base, members in imports(path):
            targets |= {base, *members}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def layer_violations(graph: dict) -> list:
    bad = []
    for module, targets in graph.items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f'{module} ({mine}) imports {target} ({theirs})')
    return bad


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph['pyterrier_hypencoder.pt.retriever']  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle_inside_a_function():
    # The check itself, on a made-up graph: a -> b at the top, b -> a inside a function, both count.
    assert find_cycle({'a': {'b'}, 'b': {'a'}, 'c': set()}) == ['a', 'b', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_every_import_points_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_the_layer_check_sees_an_upward_import_inside_a_function():
    # Both directions, on made-up graphs: the model reaching up to search, and search reaching up to shards.
    up = {'pyterrier_hypencoder.model.qnet': {'pyterrier_hypencoder.search.rows'}}
    assert layer_violations(up) == ['pyterrier_hypencoder.model.qnet (model) imports pyterrier_hypencoder.search.rows (search)']
    assert layer_violations({'pyterrier_hypencoder.search.rows': {'pyterrier_hypencoder.distributed.shards'}})
    assert not layer_violations({'pyterrier_hypencoder.distributed.shards': {'pyterrier_hypencoder.search.rows'}})
    # and the real package's in-function imports are seen: the model's encoders import checks inside a function
    assert 'pyterrier_hypencoder.checks' in import_graph()['pyterrier_hypencoder.model.encoders']


def test_the_model_reaches_no_storage_search_shards_or_transformers():
    graph = import_graph()
    reach, todo = set(), ['pyterrier_hypencoder.model.hypencoder']
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert {layer_of(m) for m in reach} <= {'leaf', 'model'}, sorted(reach)


@pytest.mark.parametrize('package, layers', sorted(OWNED.items()))
def test_third_party_engines_are_imported_by_their_layer_only(package, layers):
    users = {layer_of(module_name(p)) for p in PACKAGE.rglob('*.py')
             for base, _ in imports(p) if base == package or base.startswith(package + '.')}
    assert users <= layers, f'{package} is imported in {users - layers}'


def test_each_layer_says_what_it_holds_and_may_import():
    for layer in LAYERS:
        init = PACKAGE / layer / '__init__.py'
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f'{init} needs a docstring saying what the layer holds and may import'


def test_the_root_holds_at_most_8_modules():
    root = sorted(p.name for p in PACKAGE.glob('*.py'))
    assert len(root) <= 8, root


def test_no_module_over_450_lines():
    long = {module_name(p): n for p in PACKAGE.rglob('*.py') if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_private_name_is_imported_across_modules():
    # A helper two modules share is a public name of the module that owns it, not a `_private` reach-in.
    reach_ins = []
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').startswith(PACKAGE.name)):
                reach_ins += [f'{module_name(path)}: {alias.name}' for alias in node.names
                              if alias.name.startswith('_') and not alias.name.startswith('__')]
    assert not reach_ins, reach_ins


# Each search function, by the module that defines it.
SEARCH_FUNCTIONS = {'exhaustive_search': 'search.exhaustive', 'graph_search': 'search.graph_walk',
                    'adaptive_search': 'search.adaptive', 'surrogate_search': 'search.adaptive',
                    'pooled_search': 'search.pooled'}


def test_search_functions_are_called_from_the_dispatch_only():
    # A mode's function is chosen in one place (search.modes), so the retriever, the shards and the benchmarks
    # run the same path.
    for path in PACKAGE.rglob('*.py'):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SEARCH_FUNCTIONS:
                owner = f'pyterrier_hypencoder.{SEARCH_FUNCTIONS[node.func.id]}'
                assert module in (owner, 'pyterrier_hypencoder.search.modes'), f'{module} calls {node.func.id}'
