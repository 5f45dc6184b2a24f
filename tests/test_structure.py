"""The package's structure: its import directions, its one doors, what each module may touch.

Every module imports only its own and lower layers of the README's module map. The training
loop and transfer learning import one way, and no module reaches itself through imports.
Checkpoint directories are read through the loader, only the training binary changes the
process's allocator, and no module uses JAX's private ``jax._src``. The tagging commands
start without TensorFlow, and plots leave matplotlib's global state alone. Each check has a
negative control that shows it catches what it forbids.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Callable, Dict, Iterable, List, Sequence, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "panns_jax")
LOOP = ("panns_jax.train", "panns_jax.transfer", "panns_jax.crossval", "panns_jax.model_builder")


def module_files(package_dir: str) -> Dict[str, str]:
    """Module name -> file of every module under ``package_dir`` (``pkg.sub``, ``pkg``)."""
    files = {}
    for folder, _, names in os.walk(package_dir):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, os.path.dirname(package_dir))[:-3]
                module = module.replace(os.sep, ".").removesuffix(".__init__")
                files[module] = path
    return files


def _package_of(module: str, path: str) -> str:
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module that ``from <base> import ...`` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(package_dir: str, package_edges: bool = False) -> Dict[str, Set[str]]:
    """Every ``import`` statement (at any depth, lazy ones included) of the package's
    modules, as edges between its modules. ``from pkg import sub`` is an edge to ``pkg.sub``
    when that is a module, else to ``pkg``. package_edges: also an edge from each module to
    its package, whose ``__init__`` Python runs first when the module is imported."""
    files = module_files(package_dir)
    graph = {}
    for module, path in files.items():
        package = _package_of(module, path)
        edges = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, package)
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


# ----------------------------------------------------------------------------
# Import directions.
# ----------------------------------------------------------------------------


def test_the_loop_and_transfer_import_one_way():
    graph = import_graph(PACKAGE)
    for module in LOOP:
        assert module in graph, module
        assert cycles_through(graph, module) == [], module
    assert "panns_jax.transfer" not in graph["panns_jax.train"]  # Only through the builder.
    # Negative control: a back edge (transfer's cross-validation importing train) is a
    # cycle the check finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.transfer"].add("panns_jax.train")
    assert cycles_through(broken, "panns_jax.train")


def test_the_package_imports_without_a_circle():
    """No module of panns_jax reaches itself through imports, lazy ones included: the
    loader imports the zoo and the converter, and neither imports the other back."""
    graph = import_graph(PACKAGE)
    assert {"panns_jax.loader", "panns_jax.convert", "panns_jax.zoo"} <= set(graph)
    assert {m: cycles_through(graph, m) for m in graph if cycles_through(graph, m)} == {}
    # Negative control: a lazy import from the converter into the zoo, whose conversion
    # calls the converter, is the circle the check finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.convert"].add("panns_jax.zoo")
    assert cycles_through(broken, "panns_jax.convert")


def test_the_zoo_imports_the_downloader_and_not_the_other_way():
    """The table and its conversion sit above the downloader, which knows no zoo."""
    graph = import_graph(PACKAGE)
    assert "panns_jax.download" in graph["panns_jax.zoo"]
    assert graph["panns_jax.download"] <= {"panns_jax.fileio"}
    # Negative control: the downloader reading the table is a circle the check finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.download"].add("panns_jax.zoo")
    assert cycles_through(broken, "panns_jax.download")


def test_the_data_package_has_no_import_circle():
    """Importing any module of panns_jax.data runs the package's ``__init__`` first: that
    must not import its submodules back (an eager import of the pipeline would import TF)."""
    graph = import_graph(PACKAGE, package_edges=True)
    data = [m for m in graph if m == "panns_jax.data" or m.startswith("panns_jax.data.")]
    for module in ("panns_jax.data.sampling", "panns_jax.data.pipeline"):
        assert module in data, module
    for module in data:
        assert cycles_through(graph, module) == [], module
    # Negative control: an eager re-export of the pipeline is the circle it finds.
    broken = {k: set(v) for k, v in graph.items()}
    broken["panns_jax.data"].add("panns_jax.data.pipeline")
    assert cycles_through(broken, "panns_jax.data.pipeline")


# The layers of the README's module map, lowest first. A module may import its own layer and
# the layers listed for it; the command lines (``cli`` and every ``__main__``) may import any.
LAYERS = {
    "foundation": (
        "audio checks fileio frontend kernels malloc metrics recipe report tasks tf_cpu "
        "tolerance".split(),
        set(),
    ),
    "models": (["models"], {"foundation"}),
    "interop": (
        "checkpoints convert download loader pth weightfile zoo".split(),
        {"foundation", "models"},
    ),
    "data": (["data"], {"foundation"}),
    "training": (
        "checkpointing config_checks crossval finetune main model_builder multihost optim "
        "probe train transfer".split(),
        {"foundation", "models", "interop", "data"},
    ),
    "serving": (
        "compile_cache export hear scheduler sed streaming tagger".split(),
        {"foundation", "models", "interop"},
    ),
}


def layer_of(module: str) -> str:
    """The layer of ``panns_jax.<name>...`` by its first name; ``cli`` for command lines."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "cli" or parts[-1] == "__main__":
        return "cli"
    found = [layer for layer, (names, _) in LAYERS.items() if parts[1] in names]
    assert len(found) == 1, f"{module} belongs to no layer of LAYERS (or to several)"
    return found[0]


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import that goes sideways or up the layers, as 'module -> imported'."""
    bad = []
    for module, imported in graph.items():
        if module == "panns_jax" or layer_of(module) == "cli":
            continue
        own = layer_of(module)
        allowed = LAYERS[own][1] | {own}
        bad += [f"{module} -> {m}" for m in sorted(imported) if layer_of(m) not in allowed]
    return bad


def test_every_module_imports_only_its_own_and_lower_layers():
    """Training and serving never import each other; interop and data know neither."""
    graph = import_graph(PACKAGE)
    assert layer_violations(graph) == []
    assert {layer_of(m) for m in graph if m != "panns_jax"} == set(LAYERS) | {"cli"}


@pytest.mark.parametrize(
    "module, imported",
    [
        ("panns_jax.tagger", "panns_jax.train"),  # Serving reaching into training.
        ("panns_jax.train", "panns_jax.tagger"),  # And the other way.
        ("panns_jax.loader", "panns_jax.model_builder"),  # Interop above its layer.
        ("panns_jax.models.layers", "panns_jax.checkpoints"),  # Models reading files.
        ("panns_jax.data.pipeline", "panns_jax.train"),
    ],
)
def test_negative_control_an_import_across_the_layers_is_found(module, imported):
    broken = {k: set(v) for k, v in import_graph(PACKAGE).items()}
    broken[module].add(imported)
    assert layer_violations(broken) == [f"{module} -> {imported}"]


def test_builders_and_tasks_carry_what_the_loop_branches_on():
    import train_config

    from configs import esc50
    from panns_jax import model_builder, tasks, train, transfer

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
    assert not hasattr(train.make_optimizer(plain, registry).init({"w": 0.0}), "inner_states")
    assert hasattr(train.make_optimizer(transfer_run, frozen).init(params), "inner_states")

    result = {"accuracy": 0.75, "map_at_3": 0.8, "mAP": 0.5, "mAUC": 0.625, "d_prime": 1.25}
    single, multi = tasks.get(transfer_run.get("task")), tasks.get(plain.get("task"))
    assert (single.output, multi.output) == ("softmax", "sigmoid")
    assert single.summary(result) == (
        "accuracy 0.7500  map_at_3 0.8000  mAP 0.5000  mAUC 0.6250  d_prime 1.2500"
    )
    assert multi.summary(result) == "mAP 0.5000  mAUC 0.6250  d_prime 1.2500"
    with pytest.raises(KeyError):  # A multi-label result has no accuracy to print.
        single.summary({"mAP": 0.5})


# ----------------------------------------------------------------------------
# References, resolved through every import: what a name in a module stands for.
# ----------------------------------------------------------------------------


class Names:
    """What each name of one module may stand for, as dotted names.

    Every import binds (``import a.b as c``, ``from a import b as c``, relative imports,
    ``from a import *``), at any depth, lazy ones included. So do plain assignments of
    something already resolved (``ck = checkpoints``) and of
    ``importlib.import_module("a.b")``. A name that nothing binds stands for itself, so a
    receiver from an unresolvable import is still seen by its name. Scopes are merged: a
    name may stand for several things, and any of them counts.
    """

    def __init__(self, tree: ast.Module, package: str):
        self.bound: Dict[str, Set[str]] = {}
        self.stars: Set[str] = set()
        self.imported: Set[str] = set()  # Every module or attribute an import statement names.
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imported.add(alias.name)
                    top = alias.name.split(".")[0]
                    self._bind(alias.asname or top, alias.name if alias.asname else top)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, package)
                self.imported.add(base)
                for alias in node.names:
                    if alias.name == "*":
                        self.stars.add(base)
                        continue
                    self.imported.add(f"{base}.{alias.name}")
                    self._bind(alias.asname or alias.name, f"{base}.{alias.name}")
        self._bind_assignments(tree)

    def _bind(self, name: str, dotted: str) -> bool:
        known = self.bound.setdefault(name, set())
        fresh = dotted not in known
        known.add(dotted)
        return fresh

    def _bind_assignments(self, tree: ast.Module) -> None:
        """Bind assignments until nothing changes: an alias may be assigned from an alias."""
        assignments = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                assignments += [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                assignments.append((node.target, node.value))
        changed = True
        while changed:
            changed = False
            for target, value in assignments:
                if isinstance(target, ast.Name):
                    for dotted in self.resolve(value, unbound=False):
                        changed |= self._bind(target.id, dotted)

    def resolve(self, node: ast.AST, unbound: bool = True) -> Set[str]:
        """The dotted names ``node`` may stand for: a name, an attribute chain,
        ``getattr(x, "attr")`` or ``importlib.import_module("module")``."""
        if isinstance(node, ast.Name):
            found = set(self.bound.get(node.id, ())) | {f"{s}.{node.id}" for s in self.stars}
            return found or ({node.id} if unbound else set())
        if isinstance(node, ast.Attribute):
            return {f"{d}.{node.attr}" for d in self.resolve(node.value, unbound)}
        if isinstance(node, ast.Call):
            callee = self.resolve(node.func)
            texts = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if "getattr" in callee and len(texts) >= 2 and isinstance(texts[1], str):
                return {f"{d}.{texts[1]}" for d in self.resolve(node.args[0], unbound)}
            if callee & {"importlib.import_module", "__import__"} and texts:
                return {texts[0]} if isinstance(texts[0], str) else set()
        return set()

    def references(self, tree: ast.Module) -> Set[str]:
        """Everything the module names: its imports, and every expression resolved."""
        found = set(self.imported)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Name, ast.Attribute, ast.Call)):
                found |= self.resolve(node)
        return found


def modules_referring(package_dir: str, forbidden: Callable[[str], bool]) -> Set[str]:
    """The modules (as paths from the package's parent) that name anything ``forbidden``
    accepts, by any import, alias or attribute chain."""
    found = set()
    for module, path in module_files(package_dir).items():
        with open(path) as f:
            tree = ast.parse(f.read())
        names = Names(tree, _package_of(module, path))
        if any(forbidden(dotted) for dotted in names.references(tree)):
            found.add(os.path.relpath(path, os.path.dirname(package_dir)))
    return found


def synthetic_package(root, sources: Dict[str, str]) -> str:
    """A package ``panns_jax`` under ``root`` holding ``sources`` (relative path -> text)."""
    package = root / "panns_jax"
    for relative, text in {"__init__.py": "", **sources}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != "__init__.py" and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("")
        path.write_text(text)
    return str(package)


def is_checkpoints_load(dotted: str) -> bool:
    """``panns_jax.checkpoints.load``, or ``load`` on a receiver called ``checkpoints``."""
    return dotted == "panns_jax.checkpoints.load" or dotted.split(".")[-2:] == [
        "checkpoints",
        "load",
    ]


def is_tune_malloc(dotted: str) -> bool:
    return dotted.split(".")[-1] == "tune_malloc"


def is_private_jax(dotted: str) -> bool:
    return dotted == "jax._src" or dotted.startswith("jax._src.")


# Modules that use nothing forbidden: resolved references that look alike stay allowed.
INNOCENT = {
    "innocent.py": (
        "import json\nimport numpy as np\nimport jax\n"
        "from panns_jax import loader, zoo\nfrom panns_jax import checkpoints\n"
        "def load(p):\n    return p\n"
        "def f(p):\n    checkpoints.save(p, None)\n    jax.numpy.zeros(3)\n"
        "    return loader.load(p), zoo.load(p), json.load(p), np.load(p), load(p)\n"
    ),
}

# Every way a module may reach checkpoints.load, each a module of its own.
SIDE_ENTRANCES = {
    "plain.py": "from panns_jax import checkpoints\ncheckpoints.load('x')\n",
    "module_alias.py": "import panns_jax.checkpoints as c\nc.load('x')\n",
    "function_alias.py": "from panns_jax.checkpoints import load as L\nL('x')\n",
    "from_package_alias.py": "from panns_jax import checkpoints as ck\nck.load('x')\n",
    "relative.py": "from . import checkpoints as ck\nck.load('x')\n",
    "relative_function.py": "from .checkpoints import load\nload('x')\n",
    "sub/relative_up.py": "from ..checkpoints import load as read\nread('x')\n",
    "dotted.py": "import panns_jax.checkpoints\npanns_jax.checkpoints.load('x')\n",
    "package_attribute.py": "import panns_jax\npanns_jax.checkpoints.load('x')\n",
    "star.py": "from panns_jax.checkpoints import *\nload('x')\n",
    "reference.py": "from panns_jax import checkpoints\nread = checkpoints.load\nread('x')\n",
    "getattr.py": "from panns_jax import checkpoints\ngetattr(checkpoints, 'load')('x')\n",
    "lazy.py": "def f(p):\n    from panns_jax import checkpoints as c\n    return c.load(p)\n",
    "assigned_module.py": "from panns_jax import checkpoints\nck = checkpoints\nck.load('x')\n",
    "import_module.py": (
        "import importlib\nc = importlib.import_module('panns_jax.checkpoints')\nc.load('x')\n"
    ),
    "unresolved_receiver.py": "def main(p):\n    return checkpoints.load(p)\n",
}


def test_checkpoint_directories_are_read_through_the_loader_only():
    """One door: every command reaches a checkpoint through ``loader.load``. Below it only
    the zoo reads its own cache of converted downloads."""
    assert modules_referring(PACKAGE, is_checkpoints_load) == {
        "panns_jax/loader.py",
        "panns_jax/zoo.py",
    }


@pytest.mark.parametrize("module", sorted(SIDE_ENTRANCES))
def test_negative_control_every_side_entrance_to_checkpoints_load_is_found(tmp_path, module):
    package = synthetic_package(tmp_path, {module: SIDE_ENTRANCES[module], **INNOCENT})
    assert modules_referring(package, is_checkpoints_load) == {f"panns_jax/{module}"}


def test_only_the_training_binary_changes_malloc():
    """tune_malloc is process-wide: the library never calls it, only the main binary."""
    assert modules_referring(PACKAGE, is_tune_malloc) == {"panns_jax/main.py"}


@pytest.mark.parametrize(
    "source",
    [
        "from m import malloc\nmalloc.tune_malloc()\n",
        "from panns_jax.malloc import tune_malloc as keep_memory\nkeep_memory()\n",
        "from . import malloc as m\nm.tune_malloc()\n",
        "import panns_jax.malloc as m\nfix = m.tune_malloc\nfix()\n",
        "from panns_jax import malloc\ngetattr(malloc, 'tune_malloc')()\n",
    ],
    ids=["any_receiver", "function_alias", "relative_alias", "reference", "getattr"],
)
def test_negative_control_a_library_module_that_changes_malloc_is_found(tmp_path, source):
    package = synthetic_package(tmp_path, {"train.py": source, **INNOCENT})
    assert modules_referring(package, is_tune_malloc) == {"panns_jax/train.py"}


def test_no_module_uses_jax_private_src():
    """``jax._src`` is JAX's private tree: it changes without notice between releases."""
    assert modules_referring(PACKAGE, is_private_jax) == set()


@pytest.mark.parametrize(
    "source",
    [
        "from jax._src import distributed\n",
        "def f():\n    from jax._src.distributed import global_state\n    return global_state\n",
        "import jax._src.core as core\n",
        "import jax._src\n",
        "from jax import _src\n",
        "import jax\nstate = jax._src.distributed.global_state\n",
        "import jax as j\nstate = getattr(j, '_src')\n",
    ],
    ids=["from", "lazy_from", "import_as", "import", "from_jax", "attribute", "getattr"],
)
def test_negative_control_a_private_jax_import_is_found(tmp_path, source):
    package = synthetic_package(tmp_path, {"train.py": source, **INNOCENT})
    assert modules_referring(package, is_private_jax) == {"panns_jax/train.py"}


# ----------------------------------------------------------------------------
# What importing a module pulls in, and the global state it leaves.
# ----------------------------------------------------------------------------


def modules_after(code: str, watched: Sequence[str], pythonpath: Iterable[str] = ()) -> Set[str]:
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
    """tag / sed / embed, download and convert start without TensorFlow's ~9 s import: only
    export, HEAR and the data pipeline need it, and they import it themselves."""
    modules = "panns_jax.tagger, panns_jax.sed, panns_jax.cli, panns_jax.cli.download"
    modules += ", panns_jax.cli.convert"
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
    # Negative control: switching to Agg and drawing with pyplot is caught.
    pyplot = 'os.environ["MPLBACKEND"] = "svg"\nimport matplotlib\nmatplotlib.use("Agg")\n'
    pyplot += "import matplotlib.pyplot as plt\nplt.subplots(2, 1)"
    assert modules_after(f"import os\n{pyplot}", ["matplotlib.pyplot"]) == {"matplotlib.pyplot"}
    with pytest.raises(AssertionError):
        modules_after(f"import os\n{pyplot}\n{backend}", [])
