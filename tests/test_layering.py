"""The package's import graph: every import (module level or inside a function) points to the
same tier or a lower one, and no chain of imports leads back to where it started.

The tiers, from the ground up (docs/architecture.md, "Package map and layering"):
primitives that know nothing of the model, then the layers built on them, the model, the
schedules that run it, and what drives or measures them. Read from the source (ast), so the
test needs no imports and sees lazy imports too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_dsv3"

TIERS = [  # the tiers of docs/architecture.md's package map
    ("config", "megatron_compat", "megatron_cli", "kernels", "fp8", "weight_grad", "data",
     "indexed_data", "flops", "optimizer"),
    ("parallel", "gradients", "layers", "sharded_checkpoint"),
    ("attention", "moe", "mtp"),
    ("specs",),
    ("model",),
    ("inference",),
    ("pipeline",),
    ("profiling",),
    ("train", "checkpoint", "pretrain", "pretrain_dualpipe", "pretrain_log",
     "inference.cli", "inference.__main__"),  # the generate/chat command reads checkpoints
    ("rl",),  # GRPO: starts from the job's checkpoints, reuses its saving and logging
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The package modules `path` imports (relative imports resolved; `from . import x` counts
    as importing the package `.`'s module x when x is one)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    base = here if is_package else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("megatron_dsv3"):
                    continue
                target = node.module.split(".")[1:]
            else:
                target = base[:len(base) - (node.level - 1)] + (node.module or "").split(".")
                target = [t for t in target if t]
            found.add(".".join(target))
            for alias in node.names:  # `from .pkg import module`
                candidate = ".".join(target + [alias.name])
                if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_dsv3."):
                    found.add(alias.name.split(".", 1)[1])
    return {f for f in found if f and f != name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _tier(module: str) -> int:
    """The tier of the longest prefix naming the module (a command line inside a package sits
    above the package)."""
    matches = [(len(p), index) for index, prefixes in enumerate(TIERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    if matches:
        return max(matches)[1]
    raise AssertionError(f"megatron_dsv3.{module} belongs to no tier: add it to TIERS in "
                         "tests/test_layering.py (and to docs/architecture.md's package map)")


def test_every_import_points_to_the_same_tier_or_below():
    upward = []
    for module, imported in _graph().items():
        if not module:  # the package's own __init__
            continue
        for target in imported:
            if _tier(target) > _tier(module):
                upward.append(f"{module} (tier {_tier(module)}) imports {target} "
                              f"(tier {_tier(target)})")
    assert not upward, "imports against the layering:\n  " + "\n  ".join(sorted(upward))


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_relative_lazy_and_package_imports():
    """The parser itself, on the package's own files: a lazy import inside a function
    (model.compile_model -> attention.mla), a two-dot relative import (moe.layer -> layers)
    and an import of a module through its package (pipeline -> pipeline.schedules)."""
    graph = _graph()
    assert "attention.mla" in graph["model"]
    assert "layers" in graph["moe.layer"]
    assert "pipeline.schedules" in graph["pipeline"]
    assert _tier("pipeline.fb_overlap") > _tier("moe.pieces") > _tier("weight_grad")
