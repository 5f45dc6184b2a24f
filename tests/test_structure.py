"""The training code's structure (issue #15): one import direction between the loop and
transfer learning, one model-builder interface, one Task per kind of problem."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = ("panns_jax.train", "panns_jax.transfer", "panns_jax.crossval", "panns_jax.model_builder")


def import_graph(package_dir: str) -> Dict[str, Set[str]]:
    """Every ``import`` statement (at any depth, lazy ones included) of the package's
    modules, as edges between its modules. ``from pkg import sub`` is an edge to ``pkg.sub``
    when that is a module, else to ``pkg``."""
    files = {}
    for folder, _, names in os.walk(package_dir):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, os.path.dirname(package_dir))[:-3]
                module = module.replace(os.sep, ".").removesuffix(".__init__")
                files[module] = path
    graph = {}
    for module, path in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[module] = {e for e in edges if e in files and e != module}
    return graph


def cycles_through(graph: Dict[str, Set[str]], start: str) -> List[List[str]]:
    """The import cycles that pass through ``start`` (each as a path back to it)."""
    found, stack = [], [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for target in graph.get(node, ()):
            if target == start:
                found.append(path + [start])
            elif target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return found


def test_the_loop_and_transfer_import_one_way():
    graph = import_graph(os.path.join(ROOT, "panns_jax"))
    for module in LOOP:
        assert module in graph, module
        assert cycles_through(graph, module) == [], module
    assert "panns_jax.transfer" not in graph["panns_jax.train"]  # Only through the builder.
    # Negative control: the old back edge (transfer's cross-validation importing train)
    # is a cycle the check finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.transfer"].add("panns_jax.train")
    assert cycles_through(broken, "panns_jax.train")


def test_builders_and_tasks_carry_what_the_loop_used_to_branch_on():
    import train_config

    from configs import esc50
    from panns_jax import model_builder, train, transfer

    plain, transfer_run = train_config.get_config(), esc50.get_config("strategy=freeze_l1")
    registry = model_builder.for_config(plain)
    frozen = model_builder.for_config(transfer_run)  # Loads nothing: no checkpoint given.
    assert isinstance(registry, model_builder.RegistryBuilder)
    assert isinstance(frozen, transfer.TransferBuilder)
    for builder in (registry, frozen):
        assert isinstance(builder, model_builder.ModelBuilder)
    params = {"base": {"conv_block1": {"kernel": 0}}, "fc_transfer": {"kernel": 0}}
    assert registry.param_labels(params) is None
    assert frozen.param_labels(params) == {
        "base": {"conv_block1": {"kernel": "frozen"}},
        "fc_transfer": {"kernel": "trained"},
    }
    assert not hasattr(train.make_optimizer(plain).init({"w": 0.0}), "inner_states")
    assert hasattr(train.make_optimizer(transfer_run).init(params), "inner_states")

    result = {"accuracy": 0.75, "mAP": 0.5, "mAUC": 0.625, "d_prime": 1.25}
    single, multi = train.get_task(transfer_run), train.get_task(plain)
    assert (single.output, multi.output) == ("softmax", "sigmoid")
    assert single.summary(result) == "accuracy 0.7500  mAP 0.5000  mAUC 0.6250  d_prime 1.2500"
    assert multi.summary(result) == "mAP 0.5000  mAUC 0.6250  d_prime 1.2500"
    with pytest.raises(KeyError):  # A multi-label result has no accuracy to print.
        single.summary({"mAP": 0.5})


def calls_of(package_dir: str, function: str) -> Set[str]:
    """Modules of the package that call ``function`` (by attribute or bare name)."""
    callers = set()
    for folder, _, names in os.walk(package_dir):
        for name in names:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    target = node.func
                    called = (
                        target.attr
                        if isinstance(target, ast.Attribute)
                        else (target.id if isinstance(target, ast.Name) else None)
                    )
                    if called == function:
                        callers.add(os.path.relpath(os.path.join(folder, name), ROOT))
    return callers


def test_only_the_training_binary_changes_malloc(tmp_path):
    """tune_malloc is process-wide: the library never calls it, only the main binary (#15)."""
    assert calls_of(os.path.join(ROOT, "panns_jax"), "tune_malloc") == {"panns_jax/main.py"}
    # Negative control: a library module that calls it is found.
    sneaky = tmp_path / "pkg"
    sneaky.mkdir()
    (sneaky / "train.py").write_text("from m import malloc\nmalloc.tune_malloc()\n")
    assert calls_of(str(sneaky), "tune_malloc") == {os.path.relpath(sneaky / "train.py", ROOT)}
