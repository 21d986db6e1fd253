"""The import graph between top-level folders runs one way: down.

Layers, bottom to top: storage, core, personas, learner, chatbot, then `app.py`. A module may
import its own package and any layer below it, never one above. Every import counts: at
module level, inside functions and under `TYPE_CHECKING`. Project modules are never loaded
by name (`importlib.import_module`, `__import__`), package data is only read from the
own layer or below (`load_prompt(..., "pkg")`, `resources.files("pkg")`), and project modules
are imported at module level only: a function-local import hides a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("storage", "core", "personas", "learner", "chatbot", "app")
RANK = {name: i for i, name in enumerate(LAYERS)}
PROJECT = set(LAYERS) - {"app"}
_BY_NAME = {"import_module", "__import__"}
_DATA_READERS = {"load_prompt", "files"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _literals(call: ast.Call) -> list[str]:
    args = [*call.args, *(k.value for k in call.keywords)]
    return [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def check_source(source: str, layer: str, path: str = "<string>") -> list[Violation]:
    """Every upward import and every by-name load of a project module in `source`."""
    found: list[Violation] = []
    own = RANK[layer]

    def upward(target: str, line: int, how: str) -> None:
        top = _top(target)
        if top in PROJECT and RANK[top] > own:
            found.append(Violation(path, line, f"{layer} {how} {target} (a higher layer)"))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                upward(alias.name, node.lineno, "imports")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            upward(node.module, node.lineno, "imports")
        elif isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name in _BY_NAME:
                found.append(Violation(path, node.lineno, f"loads a module by name ({name})"))
            elif name in _DATA_READERS:
                for text in _literals(node):
                    upward(text, node.lineno, "reads package data of")
    return found


def local_project_imports(source: str, path: str = "<string>") -> list[Violation]:
    """Imports of project modules inside a function body."""
    found: list[Violation] = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if _top(name) in PROJECT:
                    found.append(Violation(path, node.lineno, f"imports {name} inside a function"))
    return found


def _project_files() -> list[tuple[Path, str]]:
    files = [(REPO / "app.py", "app")]
    for package in PROJECT:
        files += [(p, package) for p in sorted((REPO / package).rglob("*.py"))]
    return files


def test_no_upward_imports_between_layers():
    violations: list[Violation] = []
    for path, layer in _project_files():
        rel = str(path.relative_to(REPO))
        violations += check_source(path.read_text(encoding="utf-8"), layer, rel)
    assert not violations, "imports against the layer order:\n" + "\n".join(map(str, violations))


def test_project_modules_are_imported_at_module_level():
    violations: list[Violation] = []
    for path, _layer in _project_files():
        rel = str(path.relative_to(REPO))
        violations += local_project_imports(path.read_text(encoding="utf-8"), rel)
    assert not violations, "function-local project imports:\n" + "\n".join(map(str, violations))


def test_checker_flags_a_function_local_project_import():
    source = (
        "import json\n"
        "def f():\n"
        "    import torch\n"
        "    from learner.store import CorpusStore\n"
        "    return CorpusStore\n"
    )
    assert [v.line for v in local_project_imports(source)] == [4]


def test_every_package_is_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == PROJECT


def test_checker_flags_an_upward_import():
    source = (
        "from core.types import ChatModel\n"
        "import storage.db\n"
        "def profile():\n"
        "    from chatbot.memory import MemoryService\n"
        "    return MemoryService\n"
    )
    found = check_source(source, "learner")
    assert [(v.line, v.what) for v in found] == [
        (4, "learner imports chatbot.memory (a higher layer)")
    ]


def test_checker_flags_by_name_loads_and_upward_package_data():
    source = (
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import learner.registry\n"
        "mod = importlib.import_module('learner.store')\n"
        "prompt = load_prompt('upc_system', 'chatbot')\n"
        "own = load_prompt('upc_system')\n"
    )
    found = check_source(source, "core")
    assert [v.line for v in found] == [4, 5, 6]


def test_checker_allows_own_layer_and_below():
    source = "from chatbot.memory import X\nfrom learner.registry import Y\nimport core.settings\n"
    assert check_source(source, "chatbot") == []
    assert check_source("from . import sibling\n", "storage") == []


def test_no_giant_modules_or_functions():
    """Issue 14's limits: no module over 600 lines, no function over 100."""
    big_modules, big_functions = [], []
    for package in sorted(PROJECT):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = str(path.relative_to(REPO))
            if len(text.splitlines()) > 600:
                big_modules.append(name)
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    assert node.end_lineno is not None
                    if node.end_lineno - node.lineno + 1 > 100:
                        big_functions.append(f"{name}:{node.name}")
    assert big_modules == [] and big_functions == []
