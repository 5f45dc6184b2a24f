"""The training code's structure (issue #15): one import direction between the loop and
transfer learning, one model-builder interface, one Task per kind of problem."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = ("panns_jax.train", "panns_jax.transfer", "panns_jax.crossval", "panns_jax.model_builder")


def import_graph(package_dir: str, package_edges: bool = False) -> Dict[str, Set[str]]:
    """Every ``import`` statement (at any depth, lazy ones included) of the package's
    modules, as edges between its modules. ``from pkg import sub`` is an edge to ``pkg.sub``
    when that is a module, else to ``pkg``. package_edges: also an edge from each module to
    its package, whose ``__init__`` Python runs first when the module is imported."""
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
        if package_edges and module.rpartition(".")[0] in files:
            edges.add(module.rpartition(".")[0])
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


def test_the_package_imports_without_a_circle():
    """No module of panns_jax reaches itself through imports, lazy ones included (#15): the
    loader imports the zoo and the converter, and neither imports the other back."""
    graph = import_graph(os.path.join(ROOT, "panns_jax"))
    assert {"panns_jax.loader", "panns_jax.convert", "panns_jax.zoo"} <= set(graph)
    assert {m: cycles_through(graph, m) for m in graph if cycles_through(graph, m)} == {}
    # Negative control: the old lazy import (convert's loader reaching into the zoo, whose
    # conversion calls the converter) is the circle the check finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.convert"].add("panns_jax.zoo")
    assert cycles_through(broken, "panns_jax.convert")


def test_the_data_package_has_no_import_circle():
    """Importing any module of panns_jax.data runs the package's ``__init__`` first: that
    must not import its submodules back (it used to import pipeline, and with it TF) (#15)."""
    graph = import_graph(os.path.join(ROOT, "panns_jax"), package_edges=True)
    data = [m for m in graph if m == "panns_jax.data" or m.startswith("panns_jax.data.")]
    for module in ("panns_jax.data.sampling", "panns_jax.data.pipeline"):
        assert module in data, module
    for module in data:
        assert cycles_through(graph, module) == [], module
    # Negative control: the old eager re-export of the pipeline is the circle it finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.data"].add("panns_jax.data.pipeline")
    assert cycles_through(broken, "panns_jax.data.pipeline")


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


def calls_of(package_dir: str, function: str, receiver: Optional[str] = None) -> Set[str]:
    """Modules of the package that call ``function`` (by attribute or bare name; with
    ``receiver``, only as ``receiver.function``)."""
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
                    if isinstance(target, ast.Attribute):
                        owner = target.value.id if isinstance(target.value, ast.Name) else None
                        called = target.attr if receiver in (None, owner) else None
                    else:
                        called = (
                            target.id if isinstance(target, ast.Name) and not receiver else None
                        )
                    if called == function:
                        callers.add(os.path.relpath(os.path.join(folder, name), ROOT))
    return callers


def test_checkpoint_directories_are_read_through_the_loader_only(tmp_path):
    """One door (#15): every command reaches a checkpoint through ``loader.load``; below it
    only the zoo reads its own cache of converted downloads."""
    package = os.path.join(ROOT, "panns_jax")
    assert calls_of(package, "load", receiver="checkpoints") == {
        "panns_jax/loader.py",
        "panns_jax/zoo.py",
    }
    # Negative control: a side entrance (convert's to-torch used to be one) is found.
    side = tmp_path / "pkg"
    side.mkdir()
    (side / "convert.py").write_text("def main(p):\n    return checkpoints.load(p)\n")
    assert calls_of(str(side), "load", receiver="checkpoints") == {
        os.path.relpath(side / "convert.py", ROOT)
    }


def test_only_the_training_binary_changes_malloc(tmp_path):
    """tune_malloc is process-wide: the library never calls it, only the main binary (#15)."""
    assert calls_of(os.path.join(ROOT, "panns_jax"), "tune_malloc") == {"panns_jax/main.py"}
    # Negative control: a library module that calls it is found.
    sneaky = tmp_path / "pkg"
    sneaky.mkdir()
    (sneaky / "train.py").write_text("from m import malloc\nmalloc.tune_malloc()\n")
    assert calls_of(str(sneaky), "tune_malloc") == {os.path.relpath(sneaky / "train.py", ROOT)}


def modules_after(code: str, watched: Sequence[str], pythonpath: Sequence[str] = ()) -> Set[str]:
    """Which of ``watched`` are in ``sys.modules`` after ``code`` runs in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, ROOT, env.get("PYTHONPATH", "")])
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {list(watched)!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return set(ast.literal_eval(done.stdout.decode().strip().splitlines()[-1]))


def test_tagging_modules_import_without_tensorflow(tmp_path):
    """tag / sed / embed start without TensorFlow's ~9 s import: only export, HEAR and the
    data pipeline need it, and they import it themselves (#15)."""
    modules = "panns_jax.tagger, panns_jax.sed, panns_jax.cli, panns_jax.inference"
    assert modules_after(f"import {modules}", ["tensorflow"]) == set()
    # Negative control: a module that imports TensorFlow is caught (a stand-in package, so
    # the control costs no real TensorFlow import).
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("")
    (tmp_path / "uses_tf.py").write_text("import tensorflow\n")
    assert modules_after("import uses_tf", ["tensorflow"], [str(tmp_path)]) == {"tensorflow"}


def test_sed_plots_leave_matplotlib_global_state_alone(tmp_path):
    """plot_sed draws on its own Figure: no pyplot, no backend switch, so a notebook's or a
    GUI program's matplotlib setup survives a call (library code changes no process state)."""
    backend = "import matplotlib\nassert dict.__getitem__(matplotlib.rcParams, 'backend') == 'svg'"
    png = tmp_path / "sed.png"
    plot = f"""
import os
os.environ["MPLBACKEND"] = "svg"
import numpy as np
from panns_jax import sed
frames = np.linspace(0, 1, 300 * 3, dtype=np.float32).reshape(300, 3)
result = sed.SedResult("x.wav", np.arange(300) * 0.01, frames, 0.01, 3.0, [])
sed.plot_sed(result, {str(png)!r}, ["a", "b", "c"], top_k=2, logmel=np.zeros((300, 64)))
{backend}
"""
    assert modules_after(plot, ["matplotlib.pyplot"]) == set()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # Negative control: what plot_sed used to do (switch to Agg, draw with pyplot) is caught.
    old = 'os.environ["MPLBACKEND"] = "svg"\nimport matplotlib\nmatplotlib.use("Agg")\n'
    old += "import matplotlib.pyplot as plt\nplt.subplots(2, 1)"
    assert modules_after(f"import os\n{old}", ["matplotlib.pyplot"]) == {"matplotlib.pyplot"}
    with pytest.raises(AssertionError):
        modules_after(f"import os\n{old}\n{backend}", [])
