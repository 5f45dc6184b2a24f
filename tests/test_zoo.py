"""panns_jax.zoo against a local mirror: the table, first use, the converted cache, the loader.

The mirror (tests/zoo_mirror.py) serves Cnn6 checkpoints made from the golden recipe
weights from 127.0.0.1 only. The downloader's own behaviour (resume, digests, locks,
offline, installs) is tests/test_download.py.
"""

from __future__ import annotations

import hashlib
import json
import os

import golden_utils as G
import jax
import numpy as np
import pytest
import zoo_cases as C
import zoo_mirror as M

from panns_jax import cli, convert, models, tagger, zoo

torch = pytest.importorskip("torch", reason="the served checkpoints are written by torch.save")


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


# ----------------------------------------------------------------------------
# Hostile tables and bad first copies: refused in one line, nothing outside the cache
# touched, and a good checkpoint still loads afterwards.
# ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path, zoo_env):
    return C.Outside(tmp_path, zoo_env["PANNS_JAX_HOME"])


@pytest.mark.parametrize("file", ["../x", "ABSOLUTE", "nested/../../x", ".."])
def test_a_table_file_that_is_not_a_plain_name_is_refused_and_nothing_outside_changes(
    zoo_env, server, served_files, outside, wav, tmp_path, capsys, monkeypatch, file
):
    """An entry whose file reaches outside the cache, with a wrong md5 that would make a
    cached copy be deleted, fails on every entry point, offline or not."""
    file = outside.x if file == "ABSOLUTE" else file
    table = tmp_path / "table.json"
    good = C.table_rows(table)
    C.write_table(table, good + [{"name": "Evil", "file": file, "map": 0.3, "md5": "0" * 32}])
    server.files[file] = b"the mirror's bytes"  # What a download of it would write.
    outside.freeze()
    try:
        for offline in ("1", ""):
            monkeypatch.setenv("PANNS_JAX_OFFLINE", offline)
            for argv in (
                ["download", "Evil", "--no-progress"],
                ["tag", wav, "--checkpoint", "Evil", "--no-progress"],
                ["download", "--list"],
            ):
                err = C.assert_refused(C.run(capsys, *argv), "PANNS_JAX_ZOO_TABLE")
                assert "plain .pth file name" in err and repr(file) in err, err
    finally:
        del server.files[file]
    outside.assert_unchanged()
    assert M.cache_files(zoo_env) == [] and server.requests == []
    C.write_table(table, good)
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0


def test_table_fields_of_the_wrong_type_are_one_line(zoo_env, outside, wav, tmp_path, capsys):
    table = tmp_path / "table.json"
    good = C.table_rows(table)
    row = {"name": "Typo", "file": "Typo.pth", "map": 0.3}
    cases = [
        ({**row, "size": "1673"}, "size '1673' must be a positive integer"),
        ({**row, "md5": 123}, "md5 123 must be 32 hex digits"),
        ({**row, "map": "0.3"}, "map '0.3' must be a number"),
        ({**row, "file": 5}, "file 5 must be a plain .pth file name"),
        ({**row, "name": None}, "name None must be a non-empty"),
        ({**row, "size": True}, "size True must be a positive integer"),
        (["Typo", "Typo.pth"], "entry 1 is not an object"),
        ({"name": "Typo", "map": 0.3}, "entry 1 lacks file"),
        ({**row, "sha": "x"}, "unknown keys ['sha']"),
    ]
    outside.freeze()
    for bad, message in cases:
        C.write_table(table, [bad])
        for argv in (
            ["download", "Typo", "--no-progress"],
            ["tag", wav, "--checkpoint", "Typo", "--no-progress"],
        ):
            C.assert_refused(C.run(capsys, *argv), "PANNS_JAX_ZOO_TABLE", message)
    table.write_text('{"name": "Typo"}')
    C.assert_refused(C.run(capsys, "download", "--list"), "not a JSON list")
    outside.assert_unchanged(table)
    C.write_table(table, good)
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0


@pytest.mark.parametrize(
    "announce, message",
    [
        (True, "not a checkpoint that loads"),  # A short Content-Length, all of it sent.
        (False, "announced no length"),  # No Content-Length, and the connection closes early.
    ],
    ids=["short_content_length", "no_length_early_close"],
)
def test_a_cut_first_download_is_never_pinned(
    zoo_env, server, served_files, outside, wav, capsys, announce, message
):
    """Cnn6_legacy has no published md5 or size: the sha256 of its first copy guards every
    later one, so a cut copy must leave no record (a good copy is then accepted)."""
    data = served_files[M.LEGACY_FILE]
    server.cuts[M.LEGACY_FILE] = (len(data) // 2, announce)
    outside.freeze()
    for argv in (
        ["download", "Cnn6_legacy", "--no-progress"],
        ["tag", wav, "--checkpoint", "Cnn6_legacy", "--no-progress"],
    ):
        C.assert_refused(C.run(capsys, *argv), message, "nothing was kept")
        assert M.cache_files(zoo_env) == []  # No record, no partial file.
    assert len(M.gets(server, M.LEGACY_FILE)) == 2
    server.cuts.clear()
    assert C.run(capsys, "download", "Cnn6_legacy", "--no-progress")[0] == 0
    record = json.load(open(os.path.join(zoo_env["PANNS_JAX_HOME"], M.LEGACY_FILE + ".json")))
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    outside.assert_unchanged()


def test_junk_given_with_from_is_never_installed_or_pinned(
    zoo_env, server, served_files, outside, tmp_path, capsys
):
    data = served_files[M.LEGACY_FILE]
    sources = {
        "junk.pth": np.random.default_rng(0).bytes(1 << 20),
        "half.pth": data[: len(data) // 2],
        "empty.pth": b"",
        "zip_of_other.pth": served_files[M.ZIP_FILE][:-100],
    }
    for name, content in sources.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "good.pth").write_bytes(data)
    outside.freeze()
    for name in sources:
        result = C.run(capsys, "download", "Cnn6_legacy", "--from", tmp_path / name)
        C.assert_refused(result, "not a checkpoint that loads")
        assert M.cache_files(zoo_env) == [], name
    assert C.run(capsys, "download", "Cnn6_legacy", "--from", tmp_path / "good.pth")[0] == 0
    record = json.load(open(os.path.join(zoo_env["PANNS_JAX_HOME"], M.LEGACY_FILE + ".json")))
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert zoo.status(zoo.get("Cnn6_legacy"))["cached"] == "converted"
    outside.assert_unchanged()
    assert server.requests == []


def test_a_wrong_recorded_sha256_names_force_which_clears_it(
    zoo_env, server, served_files, outside, wav, tmp_path, capsys
):
    """A record pinned to the wrong digest refuses every good copy, downloaded, cached or
    given; the error says so, and `--force` (with or without --from) replaces it, while a
    bad copy given with `--force --from` leaves the cache as it was."""
    data = served_files[M.LEGACY_FILE]
    sha256 = hashlib.sha256(data).hexdigest()
    home = zoo_env["PANNS_JAX_HOME"]
    record_path = os.path.join(home, M.LEGACY_FILE + ".json")
    wrong = {"name": "Cnn6_legacy", "file": M.LEGACY_FILE, "size": 7, "sha256": "0" * 64}
    os.makedirs(home)
    with open(record_path, "w") as f:
        json.dump(wrong, f)
    (tmp_path / "good.pth").write_bytes(data)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    outside.freeze()

    def refused(*argv):
        err = C.assert_refused(C.run(capsys, *argv), "sha256 mismatch", "0" * 64)
        assert "`panns-jax download Cnn6_legacy --force`" in err, err

    refused("download", "Cnn6_legacy", "--no-progress")
    refused("tag", wav, "--checkpoint", "Cnn6_legacy", "--no-progress")
    refused("download", "Cnn6_legacy", "--from", tmp_path / "good.pth")
    assert M.cache_files(zoo_env) == [M.LEGACY_FILE + ".json"]
    result = C.run(capsys, "download", "Cnn6_legacy", "--force", "--from", tmp_path / "junk.pth")
    C.assert_refused(result, "not a checkpoint that loads", "nothing was installed")
    assert json.load(open(record_path))["sha256"] == "0" * 64
    result = C.run(capsys, "download", "Cnn6_legacy", "--force", "--from", tmp_path / "good.pth")
    assert result[0] == 0, result
    assert json.load(open(record_path))["sha256"] == sha256
    assert len(M.gets(server, M.LEGACY_FILE)) == 2  # The refused downloads only.

    # The cached copy itself is refused by a wrong record; --force downloads it again.
    with open(record_path, "w") as f:
        json.dump(wrong, f)
    refused("download", "Cnn6_legacy", "--no-progress")
    assert C.run(capsys, "download", "Cnn6_legacy", "--force", "--no-progress")[0] == 0
    assert json.load(open(record_path))["sha256"] == sha256
    assert zoo.load("Cnn6_legacy", progress=False).extra["zoo"]["sha256"] == sha256
    outside.assert_unchanged()
