"""The dependency direction of the four packages, read from the source with ast (nothing imported):

    runtime (outside runtime/cli)  -> nothing of train, export or phantoms, at module level or lazily,
                                      and never torch
    runtime/cli                    -> no module-level torch; at module level only the torch-free
                                      train.config (options are generated from RunConfig)
    phantoms                       -> runtime only, never torch (it is in the base install)
    train                          -> runtime (+ phantoms)
    export                         -> train + runtime (+ phantoms, as train)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "liverstage.runtime", "train": "liverstage.train", "export": "liverstage.export",
            "phantoms": "liverstage.phantoms"}
ALLOWED = {
    "liverstage.runtime": {"liverstage.runtime"},
    "liverstage.phantoms": {"liverstage.runtime", "liverstage.phantoms"},
    "liverstage.train": {"liverstage.runtime", "liverstage.phantoms", "liverstage.train"},
    "liverstage.export": {"liverstage.runtime", "liverstage.phantoms", "liverstage.train", "liverstage.export"},
}
CLI_MODULE_LEVEL_TRAIN = {"liverstage.train.config"}


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(absolute module name, at module level?, line) of every import statement in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, module_level, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.extend((f"{target}.{alias.name}" if not child.module else target, module_level, child.lineno)
                             for alias in child.names)
            visit(child, module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True)
    return found


def _package_of(module: str) -> str | None:
    return next((p for p in ALLOWED if module == p or module.startswith(p + ".")), None)


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_import_reader_sees_relative_lazy_and_module_level_imports():
    imports = {(m, top) for m, top, _ in _imports(ROOT / "train" / "experiment.py")}
    assert ("liverstage.runtime.atomic", True) in imports  # `from ..runtime.atomic import ...`
    assert ("liverstage.train.trainer", False) in imports  # inside run_experiment
    assert ("liverstage.runtime", True) in imports  # `from ..runtime import checks`


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_each_package_imports_only_what_its_direction_allows(folder):
    bad = []
    for path in _sources(folder):
        own = _package_of(_module_name(path))
        in_cli = path.parent.name == "cli" and folder == "runtime"
        for module, module_level, line in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            target = _package_of(module)
            if module == "torch" or module.startswith("torch."):
                if folder == "phantoms" or (folder == "runtime" and (module_level or not in_cli)):
                    bad.append(where + " (the base install has no torch)")
                continue
            if target is None or target in ALLOWED[own]:
                continue
            if in_cli and (not module_level or module in CLI_MODULE_LEVEL_TRAIN):
                continue  # commands import train / export lazily, inside their bodies
            bad.append(where)
    assert not bad, "\n".join(bad)


def test_what_the_cli_imports_at_module_level_from_train_imports_no_torch():
    for module in CLI_MODULE_LEVEL_TRAIN:
        path = ROOT / "train" / (module.rpartition(".")[2] + ".py")
        torch_imports = [m for m, _, _ in _imports(path) if m == "torch" or m.startswith("torch.")]
        inside_train = [m for m, _, _ in _imports(path) if _package_of(m) == "liverstage.train"]
        assert not torch_imports and not inside_train, (module, torch_imports, inside_train)
