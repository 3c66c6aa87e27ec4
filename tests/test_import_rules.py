"""DESIGN.md's import rules, checked on the package's source with `ast` (module-level and function-level imports).

- `models/`, `diffusion/`, `metrics/` import neither Lightning's trainer nor `stages/`, `callbacks/`, `runtime/`,
  `evaluation/`, `pipeline` or `cli` (torchmetrics is fine in `metrics/`);
- `data/` imports no model code (`models/`, `stages/`);
- `stages/` never import `callbacks/`, `evaluation/`, `pipeline` or `cli`;
- no two modules import each other, lazily or not, and no longer circle of imports does either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lit_diffusion

TRAINER = ("lightning", "pytorch_lightning")  # `lightning` covers lightning.pytorch and lightning.fabric
UPPER = ("stages", "callbacks", "runtime", "evaluation", "pipeline", "cli")
RULES = {  # room -> what it must not import (package-relative names, or top-level third-party packages)
    "models": TRAINER + UPPER,
    "diffusion": TRAINER + UPPER,
    "metrics": TRAINER + UPPER,
    "data": ("models", "stages"),
    "stages": ("callbacks", "evaluation", "pipeline", "cli"),
}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_of(path: Path, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for every import in the file, at any depth (lazy ones too).
    `from a import b` counts as importing `a.b` (b may be a submodule) and, through it, `a`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` inside a.b.c -> a.x
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target, ast.unparse(node)))
            for alias in node.names:
                if alias.name != "*":
                    found.append((node.lineno, f"{target}.{alias.name}", ast.unparse(node)))
    return found


def _room(module: str, package: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == package and len(parts) > 1 else None


def _within(target: str, name: str) -> bool:
    return target == name or target.startswith(name + ".")


def check_import_rules(root: str | Path, package: str | None = None) -> list[str]:
    """Every broken rule in the package at `root`, as 'module:line: import ... (why)'."""
    root = Path(root)
    package = package or root.name
    modules = {}  # module name -> (path, is_package)
    for path in sorted(root.rglob("*.py")):
        modules[module_name(path, root, package)] = (path, path.name == "__init__.py")
    problems, edges = [], {}
    for module, (path, is_package) in modules.items():
        room = _room(module, package)
        for line, target, text in imports_of(path, module, is_package):
            where = f"{module}:{line}: {text}"
            for banned in RULES.get(room, ()):
                name = banned if banned in TRAINER else f"{package}.{banned}"
                if _within(target, name):
                    problems.append(f"{where} ({room}/ must not import {name})")
                    break
            if target in modules and target != module:
                edges.setdefault(module, {}).setdefault(target, where)
    for a, targets in sorted(edges.items()):
        for b, where in sorted(targets.items()):
            back = edges.get(b, {}).get(a)
            if back and a < b:
                problems.append(f"{where} and {back} (import each other)")
    for cycle in _longer_cycles(edges):  # a -> b -> c -> a: none of them can be read without the others
        problems.append(" -> ".join(edges[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1])) + " (a circle)")
    return sorted(set(problems))


def _longer_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle of three or more modules through each group of modules that all reach each other (Tarjan's strongly
    connected components), found by a breadth-first search from the group's first module back to itself."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 2 or (len(group) == 2 and not all(b in edges.get(a, {}) and a in edges.get(b, {})
                                                               for a, b in [tuple(group)])):
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nexts = [w for w in sorted(edges.get(path[-1], {})) if w in group]
            if start in nexts and len(path) > 2:
                cycles.append(path)
                break
            for w in nexts:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_the_package_keeps_the_import_rules():
    problems = check_import_rules(Path(lit_diffusion.__file__).parent)
    assert not problems, "import rules (DESIGN.md) broken:\n" + "\n".join(problems)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    pkg = tmp_path / "fakepkg"
    files = {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/net.py": "import torch\nimport lightning.pytorch as pl\n",
        "metrics/__init__.py": "",
        "metrics/fid.py": "from torchmetrics import Metric\n\ndef f():\n    from ..callbacks import grid\n",
        "diffusion/__init__.py": "",
        "diffusion/schedule.py": "import math\n",
        "data/__init__.py": "",
        "data/encode.py": "def run():\n    from fakepkg.models.net import Net\n",
        "stages/__init__.py": "",
        "stages/clip.py": "from fakepkg import evaluation\nfrom fakepkg.diffusion import schedule\n",
        "callbacks/__init__.py": "",
        "callbacks/grid.py": "def draw():\n    import fakepkg.evaluation.report\n",
        "evaluation/__init__.py": "",
        "evaluation/report.py": "from fakepkg.callbacks.grid import draw\n",
        "cli.py": "def main():\n    from fakepkg.bench import run\n",
        "bench/__init__.py": "def run():\n    from fakepkg.bench.latents import encode\n",
        "bench/latents.py": "def encode():\n    from fakepkg.cli import main\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    problems = check_import_rules(pkg)
    expected = [
        "fakepkg.models.net:2: import lightning.pytorch as pl (models/ must not import lightning)",
        "fakepkg.metrics.fid:4: from ..callbacks import grid (metrics/ must not import fakepkg.callbacks)",
        "fakepkg.data.encode:2: from fakepkg.models.net import Net (data/ must not import fakepkg.models)",
        "fakepkg.stages.clip:1: from fakepkg import evaluation (stages/ must not import fakepkg.evaluation)",
        "fakepkg.callbacks.grid:2: import fakepkg.evaluation.report and fakepkg.evaluation.report:1: "
        "from fakepkg.callbacks.grid import draw (import each other)",
        "fakepkg.bench:2: from fakepkg.bench.latents import encode -> fakepkg.bench.latents:2: from fakepkg.cli "
        "import main -> fakepkg.cli:2: from fakepkg.bench import run (a circle)",
    ]
    assert problems == sorted(expected)  # torchmetrics in metrics/ and stages -> diffusion are allowed
