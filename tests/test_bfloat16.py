"""Inference in bfloat16 (``AudioTagger(dtype=...)``, ``panns-jax ... --dtype``) against float32.

The bound is derived from round-off. A network's first-order error is ``G * u * max|z|``
for unit round-off ``u``, where the growth factor ``G`` belongs to the network, its weights
and its input, not to ``u``. The golden oracle measures ``G`` independently of bfloat16:
float32 against float64 on the ``batch`` case, whose first row is the first 5 s of the
recording used here (``tolerance_study.json``, error / 2^-24). bfloat16's unit round-off
is 2^-8, so the logits may move by ``G * 2^-8 * max|z|``. The probabilities may move by a
quarter of that (the sigmoid's slope is at most 1/4). The measured bfloat16 errors are
0.18-0.25 of the bound: bfloat16 mode accumulates in float32 and keeps the float32 front
end, whose round-off is part of ``G`` but does not grow. The error also scales with ``u``.
float16 (u = 2^-11) gives 1/8 of bfloat16's error within a factor of 2. A negative
control shows the bound separates: float8_e4m3fn (u = 2^-4) breaks it 3-4 times over.
"""

from __future__ import annotations

import json

import golden_utils as G
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import serving_utils as S

from panns_jax import audio, checkpoints, checks, cli, loader, models
from panns_jax.models import transfer_head
from panns_jax.tagger import AudioTagger

WAV, SR = S.WAV, S.SR
U_BF16 = 2.0**-8  # bfloat16's unit round-off (8 significant bits).
U_F16 = 2.0**-11
U_F8 = 2.0**-4  # float8_e4m3fn: 4 significant bits.
U_F32 = 2.0**-24


def growth(name: str, key: str) -> float:
    """The measured float32 growth factor of ``key`` (the golden float64 study, batch case)."""
    study = json.loads((G.require_golden() / "tolerance_study.json").read_text())
    return study["models"][name]["f64"]["batch"][key]["max_abs_over_absmax"] / U_F32


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    """``max|got - reference| / max|reference|`` in float64."""
    reference = np.asarray(reference, np.float64)
    error = np.max(np.abs(np.asarray(got, np.float64) - reference))
    return float(error / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def recording():
    return audio.load_audio(WAV, SR)


@pytest.fixture(scope="module", params=["Cnn6", "Cnn14", "MobileNetV1"])
def model(request, tmp_path_factory, recording):
    """A golden checkpoint's name, path, float32 outputs and float32 tagger."""
    path = S.golden_checkpoint(tmp_path_factory, request.param)
    f32 = AudioTagger.load(path)
    return request.param, path, f32, f32.predict(recording)


@pytest.fixture(scope="module")
def cnn6(tmp_path_factory):
    return S.golden_checkpoint(tmp_path_factory, "Cnn6")


def _apply(module, variables, x):
    return jax.device_get(jax.jit(module.apply)(variables, np.asarray(x, np.float32)[None]))


def test_bfloat16_stays_within_its_round_off_bound(model, recording):
    name, path, f32, ref = model
    bf16 = AudioTagger.load(path, dtype="bfloat16")
    out = bf16.predict(recording)
    assert all(v.dtype == np.float32 for v in out.values())
    g_logits, g_embedding = growth(name, "clipwise_logits"), growth(name, "embedding")
    logits = relative_error(out["clipwise_logits"], ref["clipwise_logits"])
    assert logits <= g_logits * U_BF16, (logits, g_logits * U_BF16)
    embedding = relative_error(out["embedding"], ref["embedding"])
    assert embedding <= g_embedding * U_BF16, (embedding, g_embedding * U_BF16)
    bound_p = g_logits * U_BF16 * np.max(np.abs(ref["clipwise_logits"])) / 4
    assert np.max(np.abs(out["clipwise_output"] - ref["clipwise_output"])) <= bound_p
    # bfloat16 ran: its error is round-off that scales with u. float16 (8 times finer,
    # same model and weights) gives 1/8 of it, within a factor of 2.
    f16 = relative_error(
        _apply(f32.model.clone(dtype=jnp.float16), f32.variables, recording)["clipwise_logits"],
        ref["clipwise_logits"],
    )
    assert 0.5 * U_BF16 / U_F16 <= logits / f16 <= 2 * U_BF16 / U_F16, (logits, f16)


@pytest.mark.parametrize("name", ["Cnn6", "Cnn14"])
def test_a_coarser_format_breaks_the_bound(name, tmp_path_factory, recording):
    # float8_e4m3fn rounds 16 times coarser than bfloat16. MobileNetV1 is left out: with
    # the golden weights its float32 growth factor is 192, so the bound allows 75% of
    # max|z| and its float8 error saturates below that.
    path = S.golden_checkpoint(tmp_path_factory, name)
    module, variables, _ = loader.load(path)
    ref = _apply(module, variables, recording)["clipwise_logits"]
    coarse = _apply(module.clone(dtype=jnp.float8_e4m3fn), variables, recording)
    error = relative_error(coarse["clipwise_logits"], ref)
    assert error > 2 * growth(name, "clipwise_logits") * U_BF16, error


def test_transfer_head_computes_in_its_base_dtype(tmp_path, recording):
    base = models.get("Cnn10", widths=(8, 16, 32, 64), embedding_size=32)
    head = dict(layers=3, hidden_size=16, num_classes=4, output="softmax")
    module = transfer_head.from_head_spec(base, head)
    variables = jax.device_get(models.init(module, jax.random.key(0), SR))
    overrides = {"widths": [8, 16, 32, 64], "embedding_size": 32, transfer_head.HEAD_KEY: head}
    path = str(tmp_path / "freeze_l3")
    checkpoints.save(path, checkpoints.ModelCheckpoint("Cnn10", variables, overrides))
    bf16 = AudioTagger.load(path, dtype="bfloat16")
    assert isinstance(bf16.model, transfer_head.Transfer)
    assert bf16.model.base.dtype == jnp.bfloat16 and bf16.model.head_layers == 3
    expected = _apply(module.clone(base=base.clone(dtype=jnp.bfloat16)), variables, recording)
    got = bf16.predict(recording)
    for key in ("clipwise_output", "embedding"):
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], expected[key], **S.TOL)
    # The head's three layers (16, 16 and 4 outputs) multiply bfloat16 operands.
    jaxpr = jax.make_jaxpr(bf16.model.apply)(variables, recording[None]).jaxpr
    products = [
        e.outvars[0].aval.shape
        for e in _equations(jaxpr)
        if e.primitive.name == "dot_general" and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
    ]
    assert products[-3:] == [(1, 16), (1, 16), (1, 4)], products


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it, in order."""
    for e in jaxpr.eqns:
        yield e
        for param in e.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_float32_option_is_the_default_bit_for_bit(cnn6, tmp_path, capsys):
    path = cnn6
    outputs = []
    for extra in ([], ["--dtype", "float32"]):
        assert cli.main(["tag", WAV, "--checkpoint", path, "--format", "json", *extra]) == 0
        tags = capsys.readouterr().out
        npz = tmp_path / f"emb{len(extra)}.npz"
        assert cli.main(["embed", WAV, "--checkpoint", path, "--output", str(npz), *extra]) == 0
        outputs.append((tags, np.load(npz)["embeddings"]))
    assert outputs[0][0] == outputs[1][0]
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert AudioTagger.load(path, dtype="float32").model == loader.load(path).module


def test_cli_bfloat16_is_the_bfloat16_tagger(cnn6, capsys, recording):
    path = cnn6
    ref = AudioTagger.load(path).predict(recording)
    argv = ["tag", WAV, "--checkpoint", path, "--format", "json", "--top-k", "5"]
    assert cli.main([*argv, "--dtype", "bfloat16"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    probabilities = AudioTagger.load(path, dtype="bfloat16").predict(recording)
    S.assert_top(row["labels"], probabilities["clipwise_output"][0])
    assert not np.allclose(probabilities["clipwise_output"], ref["clipwise_output"], atol=1e-6)


@pytest.mark.parametrize("command", ["tag", "sed", "embed"])
def test_bad_dtype_is_one_line_before_any_model(command, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load", refuse)
    assert cli.main([command, WAV, "--dtype", "float16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --dtype must be one of float32, bfloat16, got 'float16'\n"
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'int8'"):
        AudioTagger.load("Cnn14", dtype="int8")
    assert checks.compute_dtype(jnp.bfloat16) == "bfloat16"
