"""The kind table agrees with the registry, the built-ins, the package attributes and the docs (meta-tests)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from twinkle._kinds import KIND_BY_NAME, KIND_TABLE, KINDS, kind_packages, markdown_table
from twinkle.plugins import PluginSystem
from twinkle.registry import ComponentNotFoundError, Registry

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "twinkle_core" / "src"


def package_file(package: str) -> Path:
    return SRC.joinpath(*package.split(".")) / "__init__.py"


def type_checking_imports(package: str) -> dict[str, str]:
    """name -> "module:attr" of the ``if TYPE_CHECKING:`` imports in a package's ``__init__.py``."""
    tree = ast.parse(package_file(package).read_text())
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), f"{package}: only imports under TYPE_CHECKING"
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"{package}: write `{alias.name} as {alias.name}` (re-export)"
                    names[alias.name] = f"{stmt.module}:{alias.name}"
    return names


def expected_attributes(package: str) -> dict[str, str]:
    """What a package must expose: its kinds' base classes, its fixed exports, its built-ins."""
    module = importlib.import_module(package)
    expected: dict[str, str] = {}
    for kind in KIND_TABLE:
        if kind.module == package and kind.base:
            expected[kind.base_name] = kind.base
    expected.update(getattr(module, "_EXPORTS", {}))
    for kind, entries in module._BUILTIN.items():
        if KIND_BY_NAME[kind].importable:
            expected.update(entries)
    return expected


CORE = PluginSystem(only=()).load().registry


def test_kind_names_are_unique_and_every_kind_has_a_package_and_an_interface():
    assert len(KINDS) == len(KIND_TABLE) == len(set(KINDS))
    for kind in KIND_TABLE:
        assert package_file(kind.module).is_file(), kind
        assert kind.interface, f"{kind.name}: describe what a component receives and returns"
        if kind.base:
            module, _, attr = kind.base.partition(":")
            source = SRC.joinpath(*module.split(".")).with_suffix(".py").read_text()
            assert f"class {attr}" in source, kind.base


@pytest.mark.parametrize("package", kind_packages())
def test_builtin_tables_only_hold_kinds_of_their_package(package):
    table = importlib.import_module(package)._BUILTIN
    for kind in table:
        assert KIND_BY_NAME[kind].module == package, (package, kind)


def test_core_registers_exactly_the_builtin_tables():
    from twinkle._builtin import builtin_tables

    expected = {
        (kind, name): target
        for table in builtin_tables().values()
        for kind, e in table.items()
        for name, target in e.items()
    }
    registered = {(r.kind, r.name): r.target for r in CORE if r.plugin == "core"}
    assert registered == expected
    assert {package for package in builtin_tables()} == set(kind_packages())


@pytest.mark.parametrize("package", kind_packages())
def test_type_checkers_see_what_the_package_exposes(package):
    """The TYPE_CHECKING imports (what mypy, pyright and IDEs see) are exactly the lazy attributes."""
    assert type_checking_imports(package) == expected_attributes(package)


@pytest.mark.parametrize("package", kind_packages())
def test_dir_lists_the_attributes(package):
    module = importlib.import_module(package)
    assert set(expected_attributes(package)) <= set(dir(module))


@pytest.mark.parametrize("package", kind_packages())
def test_torch_free_attributes_resolve_to_their_targets(package):
    """Every attribute whose module needs no torch resolves to the object its table names."""
    from twinkle._utils import import_target

    module = importlib.import_module(package)
    for name, target in expected_attributes(package).items():
        try:
            obj = import_target(target)
        except ImportError:  # needs torch/transformers: tests/core/test_builtins.py checks those
            continue
        assert getattr(module, name) is obj, (package, name)


def test_docs_kinds_table_is_the_rendered_kind_table():
    docs = (REPO / "docs" / "plugins.md").read_text()
    assert markdown_table() in docs, "run `python -m twinkle._kinds` and paste its table into docs/plugins.md"


def test_official_names_hint_the_install_command_as_a_sentence():
    for kind in KIND_TABLE:
        for name, distribution in kind.official.items():
            with pytest.raises(ComponentNotFoundError) as err:
                Registry().resolve(kind.name, name)
            message = str(err.value)
            assert f"pip install {distribution}" in message
            assert f"./plugins/{distribution}" in message or f"plugins/{distribution}" in message
            # the hint ends its sentence before the list of registered names
            assert f"). Registered {kind.name} names: (none)." in message


def test_unknown_names_raise_by_how_they_were_asked_not_by_their_case():
    import twinkle.model

    for name in ("NoSuchModel", "no_such_model"):
        with pytest.raises(ComponentNotFoundError, match="Registered model names"):
            exec(f"from twinkle.model import {name}")
        with pytest.raises(AttributeError, match="Registered model names") as err:
            getattr(twinkle.model, name)
        assert not isinstance(err.value, ImportError)
        assert not hasattr(twinkle.model, name)
        assert getattr(twinkle.model, name, "default") == "default"


def test_the_type_check_file_imports_every_public_name():
    """tests/typing/kinds_public_names.py (mypy, `nox -s lint`) covers every name the packages expose."""
    tree = ast.parse((REPO / "tests" / "typing" / "kinds_public_names.py").read_text())
    imported: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in kind_packages():
            imported.setdefault(node.module, set()).update(alias.name for alias in node.names)
    for package in kind_packages():
        assert imported.get(package, set()) == set(expected_attributes(package)), package


def test_install_hints_from_a_checkout_and_from_an_index(monkeypatch, tmp_path):
    from twinkle import _kinds

    root = _kinds.checkout_root()
    assert root == REPO, "this test runs from a checkout: its plugins/ folder is found"
    monkeypatch.chdir(REPO)
    assert _kinds.install_hint("twinkle-rewards") == (
        "pip install ./plugins/twinkle-rewards (this checkout; from a package index: pip install twinkle-rewards)."
    )
    monkeypatch.chdir(tmp_path)  # outside the checkout: an absolute path
    assert _kinds.install_hint("twinkle-rewards").startswith(f"pip install {REPO / 'plugins' / 'twinkle-rewards'} ")
    monkeypatch.setattr(_kinds, "checkout_root", lambda: None)  # an installed wheel
    assert _kinds.install_hint("twinkle-rewards") == (
        "pip install twinkle-rewards (from a checkout of Twinkle: pip install ./plugins/twinkle-rewards)."
    )
    assert _kinds.extra_hint("http") == (
        "pip install 'twinkle-core[http]' (from a checkout of Twinkle: pip install -e './twinkle_core[http]')."
    )


def test_http_mode_without_its_extra_names_the_install_command(monkeypatch):
    import sys

    import twinkle
    from twinkle._kinds import MissingExtraError

    monkeypatch.setitem(sys.modules, "httpx", None)  # as if httpx were not installed
    with pytest.raises(MissingExtraError, match=r"initialize\(mode='http'\) needs httpx") as err:
        twinkle.initialize(mode="http", base_url="http://127.0.0.1:9", api_key="key")
    assert "twinkle-core[http]" in str(err.value) and "pip install" in str(err.value)
    assert isinstance(err.value, ImportError) and err.value.name == "httpx"
    assert twinkle.current_runtime() is None


def test_the_repository_cites_no_file_outside_it():
    """Docstrings and docs cite docs/spec.md, not the shared spec folder of the machine it was written on."""
    outside = "shared/" + "spec/"  # split so this file does not match itself
    offenders = [
        str(path.relative_to(REPO))
        for pattern in ("*.py", "*.md", "*.toml")
        for path in REPO.rglob(pattern)
        if ".nox" not in path.parts and ".git" not in path.parts and outside in path.read_text(errors="ignore")
    ]
    assert offenders == []
