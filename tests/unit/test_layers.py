"""The rules between layers (docs/design.md §3): imports point down, packages form no cycle,
and ray / deepspeed are loaded only by train/, tune/, serve/ and the suites above them."""
import ast
import subprocess
import sys
from pathlib import Path

import hyperscale

PKG = Path(hyperscale.__file__).resolve().parent

# What each package may import from the others (its own modules always). config is split:
# its schema sits below the methods, its loader (config.load, re-exported lazily by
# config/__init__) above them, where the methods table assembles the tree.
ALLOWED = {
    "diffusion": set(),
    "storage": set(),
    "progress": set(),
    "config.schema": {"diffusion"},
    "data": {"storage"},
    "models": {"diffusion", "storage", "data"},
    "methods": {"config.schema", "diffusion", "models", "storage"},
    "eval": {"diffusion", "models", "data", "storage", "progress"},
    "config": {"config.schema", "methods", "models"},
    "cli": {"config"},
    "train": {"config", "config.schema", "diffusion", "models", "methods", "data", "eval", "storage", "progress"},
    "pipeline": {"config", "config.schema", "models", "storage", "train"},
    "tune": {"config", "config.schema", "diffusion", "models", "methods", "data", "eval", "storage", "progress",
             "train"},
    "serve": {"config", "config.schema", "diffusion", "models", "storage", "progress"},
    "bench": {"config", "config.schema", "diffusion", "models", "methods", "data", "eval", "storage", "progress",
              "train", "serve"},
}
LOWER = ("diffusion", "storage", "config", "data", "models", "methods", "eval")  # no ray, no deepspeed


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "config":
        return "config.schema" if parts[2:3] == ["schema"] else "config"
    return parts[1]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = ("hyperscale",) + path.relative_to(PKG).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__") + ("" if parts[-1] != "__init__" else ".__init__"), path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hyperscale"):
            if node.module == "hyperscale":
                yield from (f"hyperscale.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("hyperscale."))


def test_imports_point_down_the_layers():
    bad = []
    for module, path in _modules():
        if module.count(".") < 1 or module.split(".")[1] in ("__init__",):
            continue
        src = _package(module)
        assert src in ALLOWED, f"{module}: package '{src}' has no place in ALLOWED (tests/unit/test_layers.py)"
        for target in _imports(path):
            dst = _package(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(PKG.parent)}: {src} -> {dst} ({target})")
    assert not bad, "\n".join(bad)


def test_the_allowed_graph_has_no_cycle():
    done = set()

    def visit(node, trail):
        assert node not in trail, " -> ".join(trail + [node])
        if node in done:
            return
        for nxt in ALLOWED[node]:
            visit(nxt, trail + [node])
        done.add(node)

    for node in ALLOWED:
        visit(node, [])


CODE = """
import importlib, pkgutil, sys
import hyperscale, hyperscale.cli
for pkg in {lower}:
    mod = importlib.import_module("hyperscale." + pkg)
    for info in pkgutil.walk_packages(mod.__path__, mod.__name__ + "."):
        importlib.import_module(info.name)
from hyperscale.storage.local import REPO
from hyperscale.methods import method_names
method_names()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))
print(bad)
assert not bad, bad
"""


def test_lower_layers_do_not_load_ray_or_deepspeed():
    p = subprocess.run([sys.executable, "-c", CODE.format(lower=LOWER)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
