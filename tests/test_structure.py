"""The shape of the code, checked by reading it with ``ast``: short functions, no ``eval``,
imports that only run downward, and a reason beside every import of fsr inside a function.

Layers (a module may import its own layer and the ones below it, never one above):

    cli -> commands -> upscale, evaluate, train -> models (models.face included) -> data -> detect -> core

``fsr.models.face`` (face recognition models, the identity stack and the face pipeline) is
part of ``models``: it may use ``detect`` and ``core`` and is used by ``evaluate`` and
``train``. ``fsr/__init__.py`` belongs to no layer.

The allow-lists below name what is still to be fixed, each entry by file and name; they
only shrink: an entry that no longer applies fails the test too, so it is removed with the fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

FSR = Path(__file__).resolve().parents[1] / "fsr"
MAX_FUNCTION_LINES = 80

LAYERS = {
    "cli": 0,
    "commands": 1,
    "upscale": 2,
    "evaluate": 2,
    "train": 2,
    "models": 3,
    "data": 4,
    "detect": 5,
    "core": 6,
}

#: Functions still longer than MAX_FUNCTION_LINES: "path::qualified name".
LONG_FUNCTIONS_TO_SPLIT: set[str] = set()

#: Imports that still run upward: "path -> module".
UPWARD_IMPORTS_TO_FIX: set[str] = set()

#: Imports of fsr modules inside functions with no comment yet: "path::function -> module".
INNER_IMPORTS_TO_FIX: set[str] = set()


def python_files() -> list[Path]:
    return sorted(FSR.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(FSR.parent).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(FSR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of ``fsr.X...`` (None for the package root)."""
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def functions(tree: ast.AST):
    """(qualified name, node) of every function and method, nested ones included."""
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                stack.append((f"{name}.", child))
            else:
                stack.append((prefix, child))


def fsr_imports(node: ast.AST, module: str):
    """(import node, imported fsr module) for every import below ``node``."""
    package = module.split(".")
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == "fsr":
                    yield child, alias.name
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative import: resolve against this module's package
                base = package[: len(package) - child.level + (1 if module.endswith("__init__") else 0)]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            if target.split(".")[0] == "fsr":
                yield child, target


def parsed():
    for path in python_files():
        source = path.read_text()
        yield path, source, ast.parse(source, filename=str(path))


def test_no_function_longer_than_80_lines():
    long = set()
    for path, _, tree in parsed():
        for name, node in functions(tree):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                long.add(f"{relative(path)}::{name}")
    assert long - LONG_FUNCTIONS_TO_SPLIT == set(), "functions over 80 lines: split them into named stages"
    assert LONG_FUNCTIONS_TO_SPLIT - long == set(), "now short enough: remove from LONG_FUNCTIONS_TO_SPLIT"


def test_no_eval_or_exec():
    calls = [
        f"{relative(path)}:{node.lineno}"
        for path, _, tree in parsed()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec")
    ]
    assert calls == []


def test_nothing_imports_upward():
    upward = set()
    for path, _, tree in parsed():
        module = module_name(path)
        own = layer_of(module)
        if own is None:
            continue
        for _, target in fsr_imports(tree, module):
            other = layer_of(target)
            if other is not None and other < own:
                upward.add(f"{relative(path)} -> {target}")
    assert upward - UPWARD_IMPORTS_TO_FIX == set(), f"upward imports (layers {LAYERS})"
    assert UPWARD_IMPORTS_TO_FIX - upward == set(), "fixed: remove from UPWARD_IMPORTS_TO_FIX"


def _has_reason(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's own lines or on the line just above it."""
    own = lines[node.lineno - 1 : node.end_lineno]
    above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
    return any("#" in line for line in own) or above.startswith("#")


def test_imports_of_fsr_inside_functions_say_why():
    silent = set()
    for path, source, tree in parsed():
        lines = source.splitlines()
        module = module_name(path)
        for name, function in functions(tree):
            for node in function.body:
                for inner, target in fsr_imports(node, module):
                    if not _has_reason(lines, inner):
                        silent.add(f"{relative(path)}::{name} -> {target}")
    assert silent - INNER_IMPORTS_TO_FIX == set(), "import at module top, or comment why not (cycle, heavy optional dependency)"
    assert INNER_IMPORTS_TO_FIX - silent == set(), "fixed: remove from INNER_IMPORTS_TO_FIX"


def test_the_layer_table_covers_every_package():
    packages = {p.name for p in FSR.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in FSR.glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(LAYERS)


def test_the_command_line_starts_without_torchvision_or_piq():
    """torchvision (with torch._dynamo, which it imports) and piq cost about 1.5 s of every command's
    start-up on a 2-core CPU; face detection loads only torchvision's NMS kernel, and the pixel
    metrics import piq on first use."""
    import subprocess
    import sys

    probe = ("import sys, fsr.cli, fsr.commands.upscale, fsr.detect.mtcnn, fsr.evaluate.metrics; "
             "fsr.detect.mtcnn._nms_kernel(); "  # the detector's NMS kernel, loaded on its own
             "print(sorted(m for m in ('torchvision', 'piq', 'torch._dynamo') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_fsr_help_and_version_answer_without_importing_torch():
    """``fsr --help`` and ``fsr --version`` list and name the commands from the CLI's own table;
    importing torch (about 1.2 s on a 2-core CPU) waits for a command that computes."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from fsr.cli import app\n"
             "for args in (['--help'], ['--version']):\n"
             "    try:\n"
             "        app(args)\n"
             "    except SystemExit as exit:\n"
             "        assert exit.code in (0, None), exit.code\n"
             "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip().endswith("torch not loaded"), run.stdout
    assert "verify-sweep" in run.stdout and "fsr 0." in run.stdout


def test_the_command_table_matches_the_commands_it_loads():
    """Each summary that ``fsr --help`` lists is the first sentence block of the docstring of the
    function that the command runs, and each name builds a command whose help is that docstring."""
    import importlib

    from fsr.cli import COMMANDS, app
    import typer

    group = typer.main.get_command(app)
    for name, entry in COMMANDS.items():
        function = getattr(importlib.import_module(entry.module), entry.function)
        assert entry.summary == " ".join(function.__doc__.split("\n\n")[0].split()), name
        command = group.get_command(None, name)
        assert command.name == name and command.help.startswith(entry.summary[:40]), name
    assert group.get_command(None, "no-such-command") is None
