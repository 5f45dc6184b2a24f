"""panns_jax.zoo against a local mirror: the table, first use, the converted cache, the loader.

The mirror (tests/zoo_mirror.py) serves Cnn6 checkpoints made from the golden recipe
weights from 127.0.0.1 only. The downloader's own behaviour (resume, digests, locks,
offline, installs) is tests/test_download.py.
"""

from __future__ import annotations

import json
import os

import golden_utils as G
import jax
import numpy as np
import pytest
import zoo_mirror as M

from panns_jax import cli, convert, models, tagger, zoo

torch = pytest.importorskip("torch", reason="the served checkpoints are written by torch.save")


@pytest.fixture(scope="module")
def served_files():
    return M.release_files()


@pytest.fixture(scope="module")
def server(served_files):
    with M.serving(served_files) as httpd:
        yield httpd


@pytest.fixture
def zoo_env(tmp_path, server, served_files, monkeypatch):
    return M.point_the_zoo_at(server, served_files, tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    return M.write_wav(str(tmp_path_factory.mktemp("zoo_audio") / "odd.wav"))


def test_first_use_downloads_verifies_converts_then_a_second_process_uses_the_cache(
    zoo_env, server, served_files, wav
):
    audio_tagger = tagger.AudioTagger.load("Cnn6")
    assert M.gets(server, M.ZIP_FILE) == [None]  # One plain GET.
    home = zoo_env["PANNS_JAX_HOME"]
    with open(os.path.join(home, M.ZIP_FILE), "rb") as f:
        assert M.md5(f.read()) == M.md5(served_files[M.ZIP_FILE])
    record = json.load(open(os.path.join(home, M.ZIP_FILE + ".json")))
    assert record["verified_by"] == "published md5"
    converted = f"Cnn6_mAP=0.343.{record['sha256'][:16]}"
    assert M.cache_files(zoo_env) == sorted([M.ZIP_FILE, M.ZIP_FILE + ".json", converted])
    # The converted weights are the golden recipe's, bit for bit; outputs match golden.
    expected = convert.from_state_dict(G.load_state("Cnn6"), models.get("Cnn6"))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, jax.device_get(audio_tagger.variables), expected
    )
    golden = G.outputs("Cnn6")
    for case in ("batch", "odd"):
        out = audio_tagger.predict_batch(G.inputs()[case], ["clipwise_output", "embedding"])
        for key in ("clipwise_output", "embedding"):
            problem = G.check_array(f"{case}/{key}", out[key], golden[f"{case}/{key}"])
            assert not problem, problem

    # A second process: the cache, no request, no torch, the .pth never read.
    server.requests.clear()
    result = M.run_python(
        zoo_env,
        "import sys, json",
        "from panns_jax import pth",
        "def refuse(*a, **k): raise AssertionError('the cached .pth was read')",
        "pth.load = refuse",
        "from panns_jax import cli",
        f"code = cli.main(['tag', {wav!r}, '--model', 'Cnn6', '--format', "
        "'json', '--no-progress', '--top-k', '5'])",
        "assert 'torch' not in sys.modules, 'torch was imported'",
        "sys.exit(code)",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert server.requests == []
    (row,) = json.loads(result.stdout)
    probabilities = golden["odd/clipwise_output"][0]
    top = np.argsort(-probabilities, kind="stable")[:5]
    assert [r["index"] for r in row["labels"]] == top.tolist()
    np.testing.assert_allclose(
        [r["probability"] for r in row["labels"]], probabilities[top], atol=G.PROBABILITY_ATOL
    )


def test_every_checkpoint_flag_takes_a_zoo_name(zoo_env, server):
    """export, stream, HEAR and transfer load through loader.load."""
    import ml_collections

    from panns_jax import export, hear, loader, transfer

    expected = convert.from_state_dict(G.load_state("Cnn6"), models.get("Cnn6"))
    first = loader.load("Cnn6")  # What `stream --checkpoint Cnn6` calls.
    assert first.metadata.name == "Cnn6" and len(M.gets(server, M.ZIP_FILE)) == 1
    assert first.metadata.kind == "zoo"
    model, variables, name = export.resolve_source("Cnn6")
    assert name == "Cnn6" and model == models.get("Cnn6")
    stream_variables = first.variables
    assert hear.load_model("Cnn6").tagger.model_name == "Cnn6"
    config = ml_collections.ConfigDict(
        {"model": "Cnn6", "transfer": {"strategy": "finetune", "checkpoint": "Cnn6"}}
    )
    base = transfer.load_base(config)
    for loaded in (variables, stream_variables, base.variables):
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded), expected)
    assert len(M.gets(server, M.ZIP_FILE)) == 1  # Downloaded once, then the cache.
    with pytest.raises(ValueError, match="is a pretrained Cnn6, not Cnn10"):
        loader.load("Cnn6", model="Cnn10")
    with pytest.raises(FileNotFoundError, match="nor a pretrained model name"):
        loader.load("Cnn6x")


def test_list_and_table_facts(zoo_env, capsys, monkeypatch):
    assert cli.main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "Cnn6_legacy" in out and "sha256 recorded at first download" in out
    builtin = {e.name: e for e in zoo.BUILTIN}
    assert len(builtin) == 22 and builtin["Cnn14"].file == "Cnn14_mAP=0.431.pth"
    assert builtin["Cnn14"].md5 == "541141fa2ee191a88f24a3219fff024e"
    assert builtin["MobileNetV1"].size == 23_639_473
    assert builtin["Cnn14_DecisionLevelMax"].size == 327_428_481
    for entry in zoo.BUILTIN:
        assert entry.arch in models.names(), entry
        assert entry.file == f"{entry.name}_mAP={entry.map:.3f}.pth"
    monkeypatch.delenv("PANNS_JAX_MIRROR")
    assert zoo.url(builtin["Cnn14"]) == (
        "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
    )


def test_names_resolve_by_name_or_file_stem_and_unknown_ones_suggest_neighbours(zoo_env):
    assert zoo.get("Cnn14_mAP=0.431").name == zoo.get("Cnn14").name == "Cnn14"
    assert zoo.get(M.ZIP_FILE).name == "Cnn6"  # The mirror's table extends the release.
    assert zoo.is_zoo_name("Cnn6_legacy") and not zoo.is_zoo_name("Cnn15")
    with pytest.raises(zoo.ZooError, match="did you mean Cnn14") as info:
        zoo.get("Cnn15")
    assert "`panns-jax download --list` shows them" in str(info.value)
    release = zoo.target(zoo.get("Cnn6"))
    assert release.path == os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE)
    assert release.url == f"{zoo_env['PANNS_JAX_MIRROR']}/Cnn6_mAP%3D0.343.pth"
