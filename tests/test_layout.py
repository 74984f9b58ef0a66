"""The package's shape: dependencies point one way (no import cycle, imports inside functions counted) and no
module grows past a few hundred lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / 'pyterrier_hypencoder'


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict:
    """Module -> the package modules it imports, wherever the import statement stands (top level or in a function)."""
    files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in files.items():
        here = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = '.'.join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or '')
                targets |= {base} | {f'{base}.{alias.name}' for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
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


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph['pyterrier_hypencoder.retriever']  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle_inside_a_function():
    # The check itself, on a made-up graph: a -> b at the top, b -> a inside a function, both count.
    assert find_cycle({'a': {'b'}, 'b': {'a'}, 'c': set()}) == ['a', 'b', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_storage_and_search_know_nothing_of_the_model_or_ray():
    graph = import_graph()
    for name in ('index', 'sharded', 'graph', 'search', 'shard_search', 'common'):
        reach, todo = set(), [f'pyterrier_hypencoder.{name}']
        while todo:
            for nxt in graph[todo.pop()] - reach:
                reach.add(nxt)
                todo.append(nxt)
        assert 'pyterrier_hypencoder.model' not in reach, name
        if name != 'common':  # common chooses the backend, and only imports Ray's when asked for it
            assert 'pyterrier_hypencoder.ray_backend' not in reach, name


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
