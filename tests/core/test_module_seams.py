"""The seams of ``twinkle.patch`` and ``twinkle.loss`` stay clean (read from the source with ``ast``).

* no import cycle among their modules, counting imports inside functions (those used to hide
  the cycles ``fastpath -> fused_linear_ce -> fastpath`` and the like);
* no module imports another module's private (``_name``) names;
* ``twinkle.loss`` does not import ``twinkle.patch``: losses get the fast path's token
  log-probabilities from the model's output object (``ModelOutput.label_logps``);
* an import inside a function of another of their modules is there only for laziness: the
  imported module pulls in a heavy library (torch, triton, ...) at its top;
* one decoder-layer lookup: nothing outside ``twinkle.patch.model_walk`` walks ``modules()``
  for a ``layers`` ModuleList.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import twinkle

ROOT = pathlib.Path(twinkle.__file__).parent
SCOPE = ("twinkle.patch", "twinkle.loss")
HEAVY = {"torch", "triton", "transformers", "peft", "liger_kernel", "numpy"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _in_scope(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SCOPE)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never run, so no runtime edge)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


class Import:
    def __init__(self, source: str, target: str, names: list[str], top_level: bool, line: int) -> None:
        self.source, self.target, self.names, self.top_level, self.line = source, target, names, top_level, line

    def __repr__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target} {self.names}"


def _imports(module: str) -> list[Import]:
    """Every import of a twinkle module in ``module`` (at any depth), resolved to the imported module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    in_function = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "twinkle":
                    found.append(Import(module, alias.name, [], id(node) not in in_function, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "twinkle":
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            for target in submodules or [base]:
                found.append(
                    Import(module, target, names if not submodules else [], id(node) not in in_function, node.lineno)
                )
    return found


def _heavy_at_top(module: str) -> bool:
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in HEAVY and not node.level:
            return True
    return False


SCOPED = sorted(m for m in MODULES if _in_scope(m))


def test_the_scope_is_found():
    assert {"twinkle.patch.fastpath", "twinkle.patch.model_walk", "twinkle.loss.base"} <= set(SCOPED)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_patch_and_loss():
    """Over the whole package, so a cycle through another package counts too."""
    graph = {m: {i.target for i in _imports(m) if i.target in MODULES and i.target != m} for m in MODULES}
    cycles = [c for c in _cycles(graph) if any(_in_scope(m) for m in c)]
    assert cycles == [], f"import cycles through twinkle.patch / twinkle.loss: {cycles}"


@pytest.mark.parametrize("module", SCOPED)
def test_no_private_names_from_other_modules(module):
    private = [i for i in _imports(module) if i.target != module and any(n.startswith("_") for n in i.names)]
    assert private == [], f"imports another module's private names: {private}"


@pytest.mark.parametrize("module", [m for m in SCOPED if m.startswith("twinkle.loss")])
def test_losses_do_not_import_patch(module):
    into_patch = [i for i in _imports(module) if i.target.startswith("twinkle.patch")]
    assert into_patch == [], f"twinkle.loss reaches into twinkle.patch: {into_patch}"


@pytest.mark.parametrize("module", SCOPED)
def test_imports_inside_functions_are_only_for_heavy_modules(module):
    """Between patch/loss modules, a function-level import is laziness only (the target imports torch/triton)."""
    hidden = [
        i
        for i in _imports(module)
        if not i.top_level and _in_scope(i.target) and i.target != module and not _heavy_at_top(i.target)
    ]
    assert hidden == [], f"imports inside functions of light modules (import them at the top): {hidden}"


def test_one_decoder_layer_lookup():
    """Only twinkle.patch.model_walk looks for the ``layers`` ModuleList; everything else calls decoder_layers."""
    walkers = []
    plugins = ROOT.parents[2] / "plugins"
    files = list(ROOT.rglob("*.py")) + (list(plugins.glob("*/src/**/*.py")) if plugins.is_dir() else [])
    for path in files:
        text = path.read_text()
        if 'getattr(module, "layers"' in text or "ModuleList) and len(layers)" in text:
            walkers.append(path.name)
    assert walkers == ["model_walk.py"]
