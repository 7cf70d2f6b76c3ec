"""The library's layering: every module imports, the import graph has no cycle, nothing imports upward.

Layers, bottom to top (a module may import its own layer and those below it):

0. foundations: errors, compat, console, selectors, roles, sinks, recipe, archs, hub, models, context, settings,
   methods, kernels
1. attention integration: attention, state
2. the API: plan, api, the package itself (``import attnsteer``)
3. evaluations, the speed benchmark, calibration, pictures and the demo: evals, speed, calibrate, pictures, demo
4. the command line: cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnsteer"

LAYERS = {
    "errors": 0,
    "_version": 0,
    "compat": 0,
    "console": 0,
    "selectors": 0,
    "roles": 0,
    "sinks": 0,
    "recipe": 0,
    "archs": 0,
    "models": 0,
    "hub": 0,
    "context": 0,
    "settings": 0,
    "methods": 0,
    "kernels": 0,
    "attention": 1,
    "state": 1,
    "plan": 2,
    "api": 2,
    "": 2,
    "evals": 3,
    "speed": 3,  # the speed benchmark: a tool beside the evaluations
    "pictures": 3,  # attnsteer inspect's pictures
    "calibrate": 3,
    "vllm": 3,  # the vLLM plugin: on top of the attention paths and plans, beside the evals
    "integrations": 3,  # attnsteer inside lm-eval and lmms-eval: model classes beside the evals
    "lm_eval": 4,  # ``python -m attnsteer.lm_eval``: lm-eval's command line with the attnsteer model
    "demo": 3,
    "cli": 4,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """attnsteer modules ``name`` imports anywhere in its file (function-level imports too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` names submodule x: the dependency is on x, not on the package
            subs = [f"{module}.{alias.name}" for alias in node.names]
            targets = subs if all(t in MODULES for t in subs) else [module]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.startswith("attnsteer") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return LAYERS[part]


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
    assert not missing, f"give these top-level modules a layer in LAYERS: {missing}"


def test_nothing_imports_upward():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_below_the_cli_imports_it():
    users = [
        m
        for m, targets in GRAPH.items()
        if not m.startswith("attnsteer.cli") and any(t.startswith("attnsteer.cli") for t in targets)
    ]
    assert not users, f"the library imports its own command line: {users}"


def test_the_import_graph_has_no_cycle():
    """Package ``__init__`` files that re-export their submodules are the only allowed back edges
    (``attnsteer.methods`` -> ``attnsteer.methods.act`` -> ``attnsteer.methods.base``)."""

    def edges(module):
        return [t for t in GRAPH[module] if not module.startswith(t + ".")]  # a submodule importing its package

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in edges(module):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_kernels_never_import_transformers():
    for name, path in MODULES.items():
        if name.startswith("attnsteer.kernels"):
            assert not {t for t in _external_imports(path) if t.split(".")[0] == "transformers"}, (
                f"{name} must not depend on transformers"
            )


def _external_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_every_module_imports_in_a_fresh_interpreter():
    # _triton needs triton (tested in test_kernels), the vLLM backends need vllm (tested in
    # test_vllm, in its own environment), the lmms-eval plugin lmms_eval; __main__ modules run a
    # command when imported
    needs = {
        "attnsteer.kernels._triton": "triton",
        "attnsteer.vllm.cpu_backend": "vllm",
        "attnsteer.vllm.flex_backend": "vllm",
        "attnsteer.integrations.lmms_eval": "lmms_eval",  # tested in test_lmms_eval_plugin, its own environment
        "attnsteer.integrations.lm_eval": "lm_eval",  # an extra of the main environment, not of the others
    }
    names = [
        m
        for m in MODULES
        if not m.endswith("__main__")
        and (m not in needs or (m != "attnsteer.kernels._triton" and _importable(needs[m])))
    ]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("light", ["attnsteer"])
def test_the_core_import_stays_light(light):
    """``import attnsteer`` loads neither the evaluation stack nor triton."""
    code = (
        f"import sys, {light}\n"
        "heavy = [m for m in ('lm_eval', 'datasets', 'triton', 'matplotlib', 'attnsteer.evals', 'attnsteer.cli') "
        "if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


# ---- the library neither parses arguments, prints nor sets environment variables -------------------------
# Only attnsteer/cli/ does (the library reports through return values, tqdm and progress callbacks).
# Two modules write to a stream their caller passes in (the caller decides where it goes): the demo's
# report (demo.run(out=, err=)) and the model loader's progress lines (models.load_with_progress(stream)).
NOT_YET_CONVERTED = ("demo.py", "models.py")


def _is_environ(node: ast.expr) -> bool:
    """``os.environ`` (or a bare ``environ``)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _cli_only_uses(source: str) -> list[str]:
    """``line: what`` for each argument parser flag, print, stdout / stderr write or environment
    variable set in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        what = None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                what = "print(...)"
            elif isinstance(func, ast.Attribute) and func.attr == "add_argument":
                what = "add_argument(...)"
            elif isinstance(func, ast.Attribute) and func.attr in ("setdefault", "update") and _is_environ(func.value):
                what = f"os.environ.{func.attr}(...)"
            elif isinstance(func, ast.Attribute) and func.attr == "putenv":
                what = "os.putenv(...)"
            elif (
                isinstance(func, ast.Attribute)
                and func.attr == "write"
                and isinstance(func.value, ast.Attribute)
                and func.value.attr in ("stdout", "stderr")
            ):
                what = f"sys.{func.value.attr}.write(...)"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Subscript) and _is_environ(t.value) for t in targets):
                what = "os.environ[...] = ..."
        if what:
            found.append((node.lineno, what))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_check_for_cli_only_calls_finds_each_kind():
    source = (
        "import os, sys\nprint('x')\np.add_argument('--x')\nos.environ['A'] = '1'\nos.environ.setdefault('B', '1')\n"
        "os.environ.update(C='1')\nos.putenv('D', '1')\nsys.stderr.write('e')\nos.environ['E'] += 'x'\n"
        "value = os.environ['F']\nos.environ.get('G')\nlog(print)\n"
    )
    assert [hit.split(": ")[0] for hit in _cli_only_uses(source)] == [str(n) for n in range(2, 10)]


def test_only_the_cli_parses_arguments_prints_or_sets_environment_variables():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("cli/") or relative.startswith(NOT_YET_CONVERTED):
            continue
        offenders += [f"attnsteer/{relative}:{hit}" for hit in _cli_only_uses(path.read_text())]
    assert not offenders, (
        "only attnsteer/cli/ parses arguments, prints or sets environment variables; the library returns "
        "results and reports progress through tqdm or a callback:\n" + "\n".join(offenders)
    )
