"""The one loader: every kind of checkpoint we write or read, in every entry point.

Kinds: a plain checkpoint (trained and saved by us), a transfer run's folded Freeze_L1 head,
a Freeze_L3 head (``transfer_head`` in its overrides), a fine-tuned 50-class model, an
original ``.pth`` (written as the original training script does, with golden-recipe-like
weights) and its ``panns-jax-convert from-torch`` directory. Entry points: ``panns-jax tag /
sed / embed / export / stream`` (the console script's own target, in-process; export writes
a SavedModel, stream reads a file) and the HEAR API. Every output is compared with the
module's own ``apply`` on the same decoded audio, within the golden float32 rule
(:mod:`panns_jax.tolerance`: the entry points run the same float32 network with other batch
shapes and, for exports, another runtime, whose round-off that rule bounds).

All checkpoints come from one narrow Cnn6 (built once per session) and a 1 s clip, so every
entry point compiles a small network on one input shape.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from typing import Any, Callable, Dict, List, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panns_jax import audio, checkpoints, convert, loader, models, tolerance, transfer
from panns_jax.cli import convert as convert_command
from panns_jax.models import transfer_head

ARCH = "Cnn6"
TINY = {"widths": (8, 16, 32, 64), "embedding_size": 32}
SR = 32000
TASK4 = ("dog", "rain", "siren", "speech")
ESC50 = tuple(f"esc_{i:02d}" for i in range(50))


@dataclasses.dataclass
class Kind:
    """A checkpoint on disk, how an entry point is told about it, and what it must yield."""

    source: str
    module: Any  # Built here, independently of the loader: the reference network.
    variables: Dict[str, Any]  # The weights that were written.
    labels: tuple
    task: str
    kind: str
    step: int
    model: Optional[str] = None  # --model: an original .pth needs it.
    overrides: Optional[Dict[str, Any]] = None  # --overrides: a narrow .pth needs them.

    def flags(self) -> List[str]:
        extra = ["--model", self.model] if self.model else []
        if self.overrides:
            extra += ["--overrides", json.dumps(self.overrides)]
        return ["--checkpoint", self.source, *extra]


def recipe_like_state(model) -> Dict[str, np.ndarray]:
    """An original state_dict of ``model`` with the golden recipe's kinds of values
    (``golden/recipe.py``: He-scaled weights, BN scale 1 + 0.1 z, biases 0.01 z) and
    calibrated-looking BN statistics, instead of a fresh init's zeros and ones."""
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), SR))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = convert.to_state_dict(zeros, model, num_batches_tracked=0)
    rng = np.random.default_rng(20200101)
    bn_modules = {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
    for key, value in state.items():
        if key in convert.FRONTEND_KEYS or key.endswith("num_batches_tracked"):
            continue
        module, _, leaf = key.rpartition(".")
        z = rng.standard_normal(value.shape)
        if module in bn_modules:
            value = {
                "weight": 1 + 0.1 * z,
                "bias": 0.1 * z,
                "running_mean": 0.1 * z,
                "running_var": 1 + 0.1 * np.abs(z),
            }[leaf]
        elif leaf == "bias":
            value = 0.01 * z
        else:
            value = z * math.sqrt(2.0 / math.prod(value.shape[1:]))
        state[key] = value.astype(np.float32)
    return state


def _transfer_kind(root, name, base, head_layers, classes, labels, step, seed, hidden=None):
    module = transfer_head.Transfer(
        base=base,
        num_classes=classes,
        head_layers=head_layers,
        hidden_size=hidden,
        freeze_base=name != "finetune50",  # Fine-tuning trains the base too.
        output="softmax",  # Single-label tasks (ESC-50, ...): softmax cross-entropy.
    )
    variables = jax.device_get(models.init(module, jax.random.key(seed), SR))
    checkpoint = transfer.to_checkpoint(
        module, transfer.PretrainedBase(ARCH, dict(TINY)), variables, step, list(labels)
    )
    path = checkpoints.save(str(root / name), checkpoint)
    if head_layers == 1:  # Folded: the base architecture with the task's classes.
        module = models.get(ARCH, **TINY, num_classes=classes)
        variables = checkpoint.variables
    return Kind(path, module, variables, tuple(labels), "singlelabel", "checkpoint", step)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> Dict[str, Kind]:
    root = tmp_path_factory.mktemp("kinds")
    base = models.get(ARCH, **TINY)
    plain_variables = jax.device_get(models.init(base, jax.random.key(1), SR))
    plain = checkpoints.save(
        str(root / "plain"),
        checkpoints.ModelCheckpoint(ARCH, plain_variables, overrides=dict(TINY), step=7),
    )
    audioset = tuple(audio.audioset_labels())
    result = {
        "plain": Kind(plain, base, plain_variables, audioset, "multilabel", "checkpoint", 7),
        "freeze_l1": _transfer_kind(root, "freeze_l1", base, 1, 4, TASK4, 11, seed=2),
        "freeze_l3": _transfer_kind(root, "freeze_l3", base, 3, 4, TASK4, 13, seed=3, hidden=16),
        "finetune50": _transfer_kind(root, "finetune50", base, 1, 50, ESC50, 17, seed=4),
    }
    state = recipe_like_state(base)
    pth = str(root / "original.pth")
    convert.write_torch_checkpoint(pth, state, iteration=1234)
    pth_variables = convert.from_state_dict(state, base)
    result["original_pth"] = Kind(
        pth, base, pth_variables, audioset, "multilabel", "pth", 1234, ARCH, dict(TINY)
    )
    converted = str(root / "converted")
    argv = ["from-torch", pth, "--model", ARCH, "--overrides", json.dumps(TINY)]
    assert convert_command.main([*argv, "--out", converted]) == 0
    result["converted_pth"] = Kind(
        converted, base, pth_variables, audioset, "multilabel", "checkpoint", 1234
    )
    return result


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Dict[str, Any]:
    """A 1 s chirp + noise as a float WAV (decoded exactly), and its decoded samples."""
    import soundfile

    t = np.arange(SR) / SR
    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.05 * rng.standard_normal(SR)
    path = str(tmp_path_factory.mktemp("audio") / "clip.wav")
    soundfile.write(path, x.astype(np.float32), SR, subtype="FLOAT")
    return {"path": path, "samples": audio.load_audio(path, SR)}


@pytest.fixture(scope="module")
def reference(kinds, clip) -> Callable[[str], Dict[str, np.ndarray]]:
    """Each kind's reference network's outputs on the decoded clip (batch 1), computed once."""
    cache: Dict[str, Dict[str, np.ndarray]] = {}

    def outputs(name: str) -> Dict[str, np.ndarray]:
        if name not in cache:
            kind = kinds[name]
            out = jax.jit(kind.module.apply)(kind.variables, jnp.asarray(clip["samples"])[None])
            cache[name] = {k: np.asarray(v)[0] for k, v in out.items()}
        return cache[name]

    return outputs


def mismatch(key: str, got, want) -> str:
    """How ``got`` misses ``want`` under the golden rule for ``key``; empty when it does not."""
    problem, _err, _bound = tolerance.check(key, np.asarray(got), np.asarray(want), "apply")
    return problem


def _leaves(tree) -> Dict[str, np.ndarray]:
    return {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(tree))).items()
    }


KINDS = ("plain", "freeze_l1", "freeze_l3", "finetune50", "original_pth", "converted_pth")


# ----------------------------------------------------------------------------
# The loader itself: every kind, bit for bit, with its metadata.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_loads_bit_for_bit_with_its_metadata(kinds, name):
    kind = kinds[name]
    module, variables, meta = loader.load(kind.source, model=kind.model, overrides=kind.overrides)
    assert module == kind.module
    got, want = _leaves(variables), _leaves(kind.variables)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert meta.name == ARCH and meta.kind == kind.kind and meta.source == kind.source
    assert meta.labels == kind.labels and meta.task == kind.task and meta.step == kind.step
    assert meta.sample_rate == SR
    assert meta.outputs == models.Outputs(decision_level=False, embedding="embedding")
    assert models.get(meta.name, **meta.overrides) == module  # The overrides rebuild it.
    if name == "freeze_l3":
        assert isinstance(module, transfer_head.Transfer) and module.head_layers == 3


def test_overrides_apply_to_pth_and_random_only(kinds):
    with pytest.raises(ValueError, match="records its own overrides"):
        loader.load(kinds["plain"].source, overrides={"num_classes": 3})
    with pytest.raises(ValueError, match="holds Cnn6, not Cnn10"):
        loader.load(kinds["plain"].source, model="Cnn10")
    with pytest.raises(ValueError, match="name the architecture"):
        loader.load(kinds["original_pth"].source)
    module, variables, meta = loader.load(model=ARCH, overrides=TINY, seed=5)
    assert module == models.get(ARCH, **TINY)
    assert meta.kind == "random" and meta.source is None and meta.step == 0
    again = loader.load(model=ARCH, overrides=TINY, seed=5).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)
    assert loader.DEFAULT_MODEL == "Cnn14"  # (Random Cnn14s are not built here: slow.)
    a, b, c = loader.load(model=ARCH, overrides=TINY)  # Unpacks as a 3-tuple.
    assert isinstance(c, loader.Metadata)


def test_negative_control_a_loader_that_drops_the_head_or_the_overrides_fails(kinds):
    """What the matrix relies on: the Freeze_L3 head and a .pth's overrides matter. A loader
    that built the registry model without them could not run these weights."""
    l3 = loader.load(kinds["freeze_l3"].source)
    plain_overrides = {k: v for k, v in l3.metadata.overrides.items() if k != "transfer_head"}
    headless = models.get(ARCH, **plain_overrides)
    with pytest.raises(flax.errors.ScopeParamNotFoundError):  # Its tree is under base/.
        jax.eval_shape(headless.apply, l3.variables, jnp.zeros((1, SR)))
    with pytest.raises(convert.CheckpointMismatchError, match="other sizes"):
        loader.load(kinds["original_pth"].source, model=ARCH)  # Overrides dropped.


# ----------------------------------------------------------------------------
# Models declare their outputs; the one place that traces them to check.
# ----------------------------------------------------------------------------


def traced_outputs(model) -> models.Outputs:
    """What a trace of ``model`` on 1 s of audio says it returns."""
    rate = models.sample_rate(model)
    out, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, rate)), train=False)
    )
    embedding = "embedding" if "embedding" in out else "segmentwise_embedding"
    assert embedding in out, sorted(out)
    return models.Outputs(decision_level="framewise_output" in out, embedding=embedding)


@pytest.mark.parametrize("name", models.names())
def test_declared_outputs_match_a_trace(name):
    model = models.get(name)
    assert models.outputs(model) == traced_outputs(model)


def test_declared_outputs_of_a_transfer_head_and_a_negative_control():
    base = models.get(ARCH, **TINY)
    head = transfer_head.from_head_spec(
        base, {"layers": 3, "hidden_size": 8, "num_classes": 3, "output": "softmax"}
    )
    assert models.outputs(head) == traced_outputs(head) == models.outputs(base)

    class Lying(type(base)):  # A decision-level head that claims to be a clip model.
        declared_outputs = models.Outputs(decision_level=False, embedding="embedding")

    liar = Lying(**{**TINY, "head": "decision_max"})
    assert models.outputs(liar) != traced_outputs(liar)
    with pytest.raises(TypeError, match="declares no outputs"):
        models.outputs(flax.linen.Dense(3))


# ----------------------------------------------------------------------------
# The matrix: every kind in every entry point, one test per entry point.
# ----------------------------------------------------------------------------


def panns_jax_command() -> Callable[[List[str]], int]:
    """The function the ``panns-jax`` script runs, wherever the CLI lives: the target that
    pyproject.toml declares (what an install's console-script metadata is made from, and
    what an editable install's metadata lags behind until it is reinstalled)."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["panns-jax"]
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", KINDS)
def test_tag_gives_the_top_scores_of_every_kind(kinds, clip, reference, tmp_path, capsys, name):
    kind, scores = kinds[name], reference(name)["clipwise_output"]
    out = str(tmp_path / "tags.json")
    argv = ["tag", clip["path"], *kind.flags(), "--format", "json", "--top-k", "3"]
    code = panns_jax_command()([*argv, "--output", out, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with open(out) as f:
        (result,) = json.load(f)
    rows = result["labels"]
    assert len(rows) == 3
    for row in rows:
        assert row["label"] == kind.labels[row["index"]]
        assert not mismatch("clipwise_output", row["probability"], scores[row["index"]])
    third = np.sort(scores)[-3]  # The top 3, up to the rule's round-off.
    assert min(r["probability"] for r in rows) >= third - tolerance.PROBABILITY_ATOL


@pytest.mark.parametrize("name", KINDS)
def test_sed_frames_of_every_kind_are_its_clipwise_output(
    kinds, clip, reference, tmp_path, capsys, name
):
    kind = kinds[name]
    frames_dir = str(tmp_path / "frames")
    argv = ["sed", clip["path"], *kind.flags(), "--window", "1", "--framewise-dir", frames_dir]
    argv += ["--output", str(tmp_path / "events.csv"), "--no-progress"]
    assert panns_jax_command()(argv) == 0, capsys.readouterr().err
    with np.load(os.path.join(frames_dir, "clip.npz")) as data:
        framewise, labels = data["framewise"], list(data["labels"])
    assert labels == list(kind.labels)
    # A clip model slides 1 s windows: over a 1 s clip, every frame is the one window's.
    assert framewise.ndim == 2 and framewise.shape[1] == len(kind.labels)
    for row in framewise:
        assert not mismatch("clipwise_output", row, reference(name)["clipwise_output"])


@pytest.mark.parametrize("name", KINDS)
def test_embed_gives_the_embedding_of_every_kind(kinds, clip, reference, tmp_path, capsys, name):
    out = str(tmp_path / "emb.npz")
    argv = ["embed", clip["path"], *kinds[name].flags(), "--output", out, "--no-progress"]
    assert panns_jax_command()(argv) == 0, capsys.readouterr().err
    with np.load(out) as data:
        embeddings = data["embeddings"]
    assert embeddings.shape == (1, TINY["embedding_size"])
    assert not mismatch("embedding", embeddings[0], reference(name)["embedding"])


@pytest.mark.parametrize("name", KINDS)
def test_export_of_every_kind_matches_apply(kinds, clip, reference, tmp_path, capsys, name):
    from panns_jax import export

    out = str(tmp_path / "model_savedmodel")
    argv = ["export", *kinds[name].flags(), "--format", "savedmodel", "--out", out]
    code = panns_jax_command()([*argv, "--seconds", "1", "--batch-size", "1"])
    assert code == 0, capsys.readouterr().err
    got = export.load(out)(clip["samples"][None])
    for key in ("clipwise_output", "embedding"):
        assert not mismatch(key, got[key][0], reference(name)[key])


@pytest.mark.parametrize("name", KINDS)
def test_stream_prints_the_top_label_of_every_kind(kinds, clip, reference, capsys, name):
    kind = kinds[name]
    argv = ["stream", clip["path"], *kind.flags(), "--frames", "--window", "1", "--hop", "0.5"]
    assert panns_jax_command()(argv) == 0, capsys.readouterr().err
    frames = re.findall(
        r"^\s*([\d.]+) s  frame   (.*) \(([\d.]+)\)$", capsys.readouterr().out, re.M
    )
    assert [float(t) for t, _, _ in frames] == [1.0]  # One 1 s window, stamped at its end.
    _, label, probability = frames[0]
    scores = reference(name)["clipwise_output"]
    printed = 0.005 + tolerance.PROBABILITY_ATOL  # Two decimals, plus the rule.
    assert abs(float(probability) - scores.max()) <= printed
    near_top = {kind.labels[i] for i in np.flatnonzero(scores >= scores.max() - 2 * printed)}
    assert label in near_top


@pytest.mark.parametrize("name", KINDS)
def test_hear_embeddings_of_every_kind_match_apply(kinds, clip, reference, name):
    from panns_jax import hear

    kind = kinds[name]
    model = hear.load_model(
        kind.source,
        kind.model,
        overrides=kind.overrides,
        input_sample_rate=SR,  # The model's own rate: no resampling.
        timestamp_window_s=1.0,
        timestamp_hop_s=0.5,
        batch_size=1,
    )
    scene = np.asarray(hear.get_scene_embeddings(clip["samples"][None], model))
    assert not mismatch("embedding", scene[0], reference(name)["embedding"])
    embeddings, times = hear.get_timestamp_embeddings(clip["samples"][None], model)
    np.testing.assert_array_equal(np.asarray(times), [[0.0, 500.0, 1000.0]])
    # The window centred at 0.5 s is the clip itself.
    assert not mismatch("embedding", np.asarray(embeddings)[0, 1], reference(name)["embedding"])


def test_negative_control_the_matrix_tells_the_kinds_apart(reference):
    """Each kind's outputs differ from every other's by far more than the rule allows, so
    an entry point that loaded the wrong weights (or dropped a head) would fail above."""
    embeddings = {n: reference(n)["embedding"] for n in KINDS}
    for a in KINDS:
        for b in KINDS:
            if a < b and not {a, b} == {"original_pth", "converted_pth"}:
                problem, _, _ = tolerance.check("embedding", embeddings[a], embeddings[b])
                assert problem, (a, b)
    # The converted directory is the .pth, bit for bit.
    np.testing.assert_array_equal(embeddings["original_pth"], embeddings["converted_pth"])


# ----------------------------------------------------------------------------
# The loader's cost: a checkpoint verified before is one file read.
# ----------------------------------------------------------------------------

_LOAD_AND_REPORT = (
    "import json, sys\n"
    "from panns_jax import loader\n"
    "module, variables, meta = loader.load(sys.argv[1])\n"
    "heavy = ('orbax.checkpoint', 'tensorstore')\n"
    "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
)


def _heavy_modules_of_a_load(path: str, home: str) -> List[str]:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_REPORT, path],
        env={**os.environ, "PANNS_JAX_HOME": home},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_checkpoint_verified_before_loads_without_orbax(kinds, tmp_path):
    import shutil

    copy = str(shutil.copytree(kinds["plain"].source, tmp_path / "copy"))
    home = str(tmp_path / "home")
    # Negative control: a copy is not what was verified: orbax reads and checks it once.
    assert _heavy_modules_of_a_load(copy, home) == ["orbax.checkpoint", "tensorstore"]
    assert _heavy_modules_of_a_load(copy, home) == []
    again = loader.load(copy)
    assert _leaves(again.variables).keys() == _leaves(kinds["plain"].variables).keys()
    for key, value in _leaves(kinds["plain"].variables).items():
        np.testing.assert_array_equal(_leaves(again.variables)[key], value)
