"""``panns-jax probe``: embeddings computed once and cached, classifiers scored by the data's
protocol (hold-out, folds), the table and JSON in agreement, the pictures written, and every
bad input one ``error:`` line, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from custom_data_utils import CLASSES, class_folders, manifest, tree

from panns_jax import cli, probe

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Twelve 1-2 s clips per class: high tones, low tones, noise."""
    root = tmp_path_factory.mktemp("own")
    data = str(root / "DATA")
    return data, class_folders(data, per_class=12, seed=3)


def _table_numbers(text: str) -> dict:
    """Row name -> the numbers of its metric columns, from the printed table."""
    rows = {}
    for line in text.strip().splitlines()[2:]:
        cells = line.split()
        name = " ".join(cells[:2]) if cells[0] == "fold" else cells[0]
        rows[name] = [float(c) for c in cells[-4:]]
    return rows


def _json_numbers(row: dict) -> list:
    return [round(row[k][m], 4) for k in ("logistic", "knn") for m in ("accuracy", "map_at_3")]


def test_hold_out_separates_tones_from_noise_and_the_cache_is_reused(
    tiny_pretrained, folders, tmp_path, capsys, monkeypatch
):
    data, _ = folders
    cache = tmp_path / "cache"
    args = [
        "probe",
        data,
        "--model",
        tiny_pretrained,
        "--cache-dir",
        str(cache),
        "--holdout",
        "0.34",
    ]
    calls = []
    embed_split = probe.embed_split
    monkeypatch.setattr(
        probe, "embed_split", lambda *a, **k: calls.append(a[2]) or embed_split(*a, **k)
    )

    assert cli.main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["clip_seconds"] == 1.0  # The shortest recording (1-2 s), rounded down.
    assert calls == ["train", "valid"] and results["cached"] is False
    (row,) = results["rows"]
    assert row["name"] == "valid" and row["num_eval"] == 12 and row["num_train"] == 24
    assert results["classes"] == list(CLASSES) and results["task"] == "singlelabel"
    assert row["logistic"]["accuracy"] >= 0.9, row
    assert np.sum(results["confusion_matrix"]["logistic"]) == 12
    cached = results["embedding_cache"]
    assert os.path.dirname(cached) == str(cache) and cached.endswith(".npz")
    stamp = os.stat(cached).st_mtime_ns

    # The second run embeds nothing: the cache file is read, not written.
    assert cli.main([*args, "--clip-seconds", "1.0"]) == 0
    table = capsys.readouterr().out
    assert calls == ["train", "valid"] and os.stat(cached).st_mtime_ns == stamp
    assert _table_numbers(table) == {"valid": _json_numbers(row)}

    # Another segment length is other embeddings: a new cache file.
    assert cli.main([*args, "--clip-seconds", "0.5", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert calls[2:] == ["train", "valid"] and again["embedding_cache"] != cached


def test_fold_column_gives_a_row_per_fold_and_the_mean_with_pictures(
    tiny_pretrained, folders, tmp_path, capsys
):
    data, written = folders
    rows = [
        (p, kind, str(i % 3 + 1)) for kind, paths in written.items() for i, p in enumerate(paths)
    ]
    labels = manifest(os.path.join(data, "folds.csv"), rows, ["file", "label", "fold"])
    out = tmp_path / "results"
    args = ["probe", labels, "--model", tiny_pretrained, "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*args, "--clip-seconds", "1", "--output-dir", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in results["rows"]] == ["fold 1", "fold 2", "fold 3"]
    assert [r["num_eval"] for r in results["rows"]] == [12, 12, 12]
    for kind in ("logistic", "knn"):
        folds = [r[kind]["accuracy"] for r in results["rows"]]
        assert results["mean"][kind]["accuracy"] == pytest.approx(np.mean(folds))
        assert np.sum(results["confusion_matrix"][kind]) == 36  # Summed over the folds.
    saved = json.loads((out / "probe_results.json").read_text())
    assert saved["rows"] == results["rows"]
    assert sorted(os.listdir(out)) == [
        "confusion_matrix_knn.png",
        "confusion_matrix_logistic.png",
        "probe_results.json",
    ]
    assert (out / "confusion_matrix_knn.png").read_bytes()[:8] == PNG

    assert cli.main([*args, "--clip-seconds", "1"]) == 0  # Cached: the table of the same.
    table = _table_numbers(capsys.readouterr().out)
    assert table["mean"] == _json_numbers(results["mean"])
    assert table["fold 2"] == _json_numbers(results["rows"][1])


def test_multi_label_scores_map_and_draws_per_class_ap(tiny_pretrained, folders, tmp_path, capsys):
    data, written = folders
    rows = [
        (p, kind if i % 3 else f"{kind};noise", "train" if i < 8 else "valid")
        for kind, paths in written.items()
        if kind != "noise"
        for i, p in enumerate(paths)
    ]
    labels = manifest(os.path.join(data, "multi.csv"), rows, ["file", "label", "split"])
    out = tmp_path / "results"
    args = ["probe", labels, "--model", tiny_pretrained, "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*args, "--clip-seconds", "1", "--output-dir", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["task"] == "multilabel" and "confusion_matrix" not in results
    (row,) = results["rows"]
    assert 0 < row["logistic"]["mAP"] <= 1 and 0 < row["knn"]["mAP"] <= 1
    assert set(results["per_class_ap"]["knn"]) == {"high_tone", "low_tone", "noise"}
    assert sorted(os.listdir(out)) == [
        "per_class_ap_knn.png",
        "per_class_ap_logistic.png",
        "probe_results.json",
    ]


@pytest.mark.parametrize(
    "case",
    [
        "no_data",
        "unknown_set",
        "missing_model",
        "output_inside",
        "bad_manifest",
        "transfer_not_built",
        "clip_too_short",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_pretrained, folders, tmp_path, capsys, case):
    data, _ = folders
    work = tmp_path / "work"
    work.mkdir()
    bad = manifest(str(work / "bad.csv"), [("a.wav", "x")], ["path", "label"])
    cache = ["--cache-dir", str(work / "cache")]
    argv, expected = {
        "no_data": ([str(work / "nothing"), "--model", tiny_pretrained], "no such folder"),
        "unknown_set": (["esc51", "--model", tiny_pretrained], "esc50, gtzan"),
        "missing_model": ([data, "--model", str(work / "none")], "--model"),
        "output_inside": (
            [data, "--model", tiny_pretrained, "--output-dir", os.path.join(data, "out")],
            "lies inside",
        ),
        "bad_manifest": ([bad, "--model", tiny_pretrained], "no file column"),
        "clip_too_short": (
            [data, "--model", tiny_pretrained, "--clip-seconds", "0.1"],
            "--clip-seconds 0.1: clips of 0.1 s are too short for Cnn10",
        ),
        "transfer_not_built": (
            ["esc50", "--model", tiny_pretrained, "--data-dir", str(work / "tfds")],
            "esc50",
        ),
    }[case]
    before, data_before = tree(str(tmp_path)), tree(data)
    assert cli.main(["probe", *argv, *cache]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert captured.out == ""
    assert tree(str(tmp_path)) == before and tree(data) == data_before


def test_missing_scikit_learn_names_the_extra(
    tiny_pretrained, folders, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError.
    data, _ = folders
    before = tree(str(tmp_path))
    assert cli.main(["probe", data, "--model", tiny_pretrained, "--cache-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: panns-jax probe needs scikit-learn: pip install 'panns-jax[probe]'"
    assert tree(str(tmp_path)) == before


def test_segments_are_averaged_per_recording():
    """A recording of three segments gets the mean of its segments' embeddings."""
    from panns_jax.data import sources

    audio = [
        np.full(300, 0.25, np.float32),
        np.concatenate([np.full(100, v) for v in (0.1, 0.2, 0.6)]),
    ]
    source = sources.ArraySource(audio, [[0], [1]], num_classes=2, columns={"fold": [1, 2]})
    arrays = probe.embed_split(
        lambda x: x[:, :1] * np.array([[1.0, 2.0]], np.float32),
        source,
        "train",
        clip_samples=100,
        batch_size=2,
        progress=False,
    )
    np.testing.assert_allclose(arrays["embedding"], [[0.25, 0.5], [0.3, 0.6]], rtol=1e-3)
    np.testing.assert_array_equal(arrays["labels"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(arrays["fold"], [1, 2])


def test_a_transfer_set_by_name_trains_on_train_and_scores_test(tiny_pretrained, tmp_path, capsys):
    """MSoS built from a small fake download (tests/test_data_transfer.py): its protocol's
    splits and 4 s segments, its class names."""
    from builder_utils import prepare
    from test_data_transfer import _msos

    from panns_jax import data as pdata
    from panns_jax.data import transfer

    _msos(tmp_path / "manual")
    prepare(pdata.Msos, tmp_path / "tfds", tmp_path / "manual", max_bad_fraction=0.5)
    capsys.readouterr()  # TFDS's build messages.
    args = ["probe", "msos", "--model", tiny_pretrained, "--data-dir", str(tmp_path / "tfds")]
    assert cli.main([*args, "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["dataset"] == "msos/32k" and results["clip_seconds"] == 4.0
    assert results["classes"] == list(transfer.MSOS_CATEGORIES)
    assert results["mean"] is None and results["pictures_of"] == "test"
    (row,) = results["rows"]
    assert (row["name"], row["num_train"], row["num_eval"]) == ("test", 5, 3)


@pytest.mark.parametrize("means, calls_onednn", [("onednn", True), ("xla", False)])
def test_embeddings_run_the_default_conv_backend(tiny_pretrained, monkeypatch, means, calls_onednn):
    """Probes embed through models.jit_inference with "auto": oneDNN's convolutions where
    "auto" means them ($PANNS_JAX_CONV_BACKEND here), XLA's otherwise."""
    from unittest import mock

    from panns_jax import loader
    from panns_jax.kernels import onednn

    monkeypatch.setenv("PANNS_JAX_CONV_BACKEND", means)
    with mock.patch.object(onednn, "conv", wraps=onednn.conv) as traced:
        embed = probe.embed_function(loader.load(tiny_pretrained))
        assert embed(np.zeros((2, 32000), np.float32)).shape == (2, 32)
    assert traced.called == calls_onednn
