"""panns_jax.download against a local mirror: resume, digests, locks, offline, installs.

The mirror (tests/zoo_mirror.py) serves Cnn6 checkpoints made from the golden recipe
weights from 127.0.0.1 only; the zoo's table of the mirror names what to fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import zoo_mirror as M

from panns_jax import cli, download, zoo

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
    return M.write_wav(str(tmp_path_factory.mktemp("download_audio") / "odd.wav"))


def test_dropped_connection_resumes_with_range_and_the_right_digest(zoo_env, server, served_files):
    size = len(served_files[M.LEGACY_FILE])
    server.drops[M.LEGACY_FILE] = 1
    path = zoo.fetch("Cnn6_legacy", progress=False)
    assert M.gets(server, M.LEGACY_FILE) == [None, f"bytes={size // 2}-"]
    with open(path, "rb") as f:
        data = f.read()
    assert data == served_files[M.LEGACY_FILE]
    record = json.load(open(path + ".json"))
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["verified_by"] == "sha256 of the first download"
    assert not os.path.exists(path + ".part")
    # The first download's sha256 now guards the file: other bytes are refused.
    os.remove(path)
    server.files[M.LEGACY_FILE] = served_files[M.ZIP_FILE]
    try:
        with pytest.raises(download.DownloadError, match="recorded at its first download"):
            zoo.fetch("Cnn6_legacy", progress=False)
    finally:
        server.files[M.LEGACY_FILE] = served_files[M.LEGACY_FILE]
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_a_server_that_ignores_range_restarts_the_file(tmp_path, server, served_files, monkeypatch):
    """A whole-file answer to a range request rewrites the partial file from its start. The
    downloader needs no zoo: a target is a URL, a path and the facts to check."""
    monkeypatch.delenv("PANNS_JAX_OFFLINE", raising=False)
    monkeypatch.setattr(download, "BACKOFF_S", 0.05)
    server.requests.clear()
    server.drops[M.ZIP_FILE], server.ignore_range = 1, True
    data = served_files[M.ZIP_FILE]
    target = download.Target(
        "served", f"{M.mirror_url(server)}/{M.ZIP_FILE}", str(tmp_path / M.ZIP_FILE), M.md5(data)
    )
    try:
        with download.locked(target):
            record = download.verified(target, progress=False)
    finally:
        server.drops.clear()
        server.ignore_range = False
    assert M.gets(server, M.ZIP_FILE) == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / M.ZIP_FILE).read_bytes() == data
    assert record["md5"] == M.md5(data) and record["name"] == "served"
    left = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock"))
    assert left == [M.ZIP_FILE, M.ZIP_FILE + ".json"]  # No partial file.


def test_wrong_digest_says_expected_and_got_and_leaves_nothing(
    zoo_env, server, served_files, capsys
):
    assert cli.main(["download", "Cnn6_bad", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"expected {'0' * 32}" in err and f"got {M.md5(served_files[M.BAD_FILE])}" in err
    assert "nothing was kept" in err
    assert M.cache_files(zoo_env) == []


def test_two_concurrent_processes_download_once(zoo_env, server, tmp_path):
    server.delay = 0.02  # ~2 s for the file.
    script = "\n".join(
        [
            "import os, sys, time",
            "from panns_jax import checkpoints, convert, zoo",  # The slow imports, first.
            "open(sys.argv[1] + '.ready', 'w').close()",
            "while not os.path.exists(sys.argv[2]): time.sleep(0.01)",
            "c = zoo.load('Cnn6', progress=False)",
            "print(c.model, c.extra['zoo']['sha256'])",
        ]
    )
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"p{i}"), str(go)],
            env=zoo_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 300
    while not all((tmp_path / f"p{i}.ready").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.05)
    go.touch()  # Both ask at the same moment.
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-1500:] for _, e in outputs]
    assert len(M.gets(server, M.ZIP_FILE)) == 1
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("Cnn6 ")
    assert sum("waiting for another process" in e for _, e in outputs) == 1


def test_offline_fails_with_one_line_naming_the_url_and_the_path(
    zoo_env, server, wav, monkeypatch, capsys
):
    monkeypatch.setenv("PANNS_JAX_OFFLINE", "1")
    assert cli.main(["tag", wav, "--model", "Cnn6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    path = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE)
    url = f"{zoo_env['PANNS_JAX_MIRROR']}/Cnn6_mAP%3D0.343.pth"
    assert err.count("\n") == 1 and url in err and path in err and "--from FILE" in err, err
    assert server.requests == []
    # Defaults: pretrained Cnn14 for tag and embed, Cnn14_DecisionLevelMax for sed.
    monkeypatch.delenv("PANNS_JAX_MIRROR")
    for command, name in (
        ("tag", "Cnn14_mAP%3D0.431"),
        ("embed", "Cnn14_mAP%3D0.431"),
        ("sed", "Cnn14_DecisionLevelMax_mAP%3D0.385"),
    ):
        assert cli.main([command, wav, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"https://zenodo.org/record/3987831/files/{name}.pth?download=1" in err, err
    # Random weights only when asked for; a name outside the zoo says what to do.
    assert cli.main(["tag", wav, "--model", "Cnn6", "--random-weights", "--no-progress"]) == 0
    assert "--random-weights" in capsys.readouterr().err
    assert cli.main(["tag", wav, "--model", "Cnn14_mel128", "--no-progress"]) == 2
    assert "no pretrained Cnn14_mel128 in the zoo" in capsys.readouterr().err


def test_install_from_file_then_corruption_is_detected(
    zoo_env, server, served_files, tmp_path, capsys
):
    source = tmp_path / "mine.pth"
    data = bytearray(served_files[M.ZIP_FILE])
    data[len(data) // 3] ^= 1  # One flipped bit: not the release file.
    source.write_bytes(bytes(data))
    assert cli.main(["download", "Cnn6", "--from", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "md5 mismatch" in err and "expected" in err, err
    assert M.cache_files(zoo_env) == []
    source.write_bytes(served_files[M.ZIP_FILE])
    assert cli.main(["download", "Cnn6", "--from", str(source)]) == 0
    assert source.read_bytes() == served_files[M.ZIP_FILE]  # Left in place.
    assert server.requests == []
    cached = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE)
    assert zoo.status(zoo.get("Cnn6"))["cached"] == "converted"
    first = zoo.load("Cnn6", progress=False)

    # A damaged converted checkpoint: converted again from the verified .pth.
    record = json.load(open(cached + ".json"))
    converted = os.path.join(zoo_env["PANNS_JAX_HOME"], f"Cnn6_mAP=0.343.{record['sha256'][:16]}")
    with open(os.path.join(converted, "panns_jax.json")) as f:
        metadata = json.load(f)
    metadata["digest"] = "sha256:" + "0" * 64
    with open(os.path.join(converted, "panns_jax.json"), "w") as f:
        json.dump(metadata, f)
    again = zoo.load("Cnn6", progress=False)
    assert "converting" in capsys.readouterr().err
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.variables, first.variables)

    # A damaged .pth: detected on the next use, removed, named; the next run downloads it.
    with open(cached, "r+b") as f:
        f.seek(len(served_files[M.ZIP_FILE]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(download.DownloadError, match="corrupted.*md5 mismatch.*it was removed"):
        zoo.load("Cnn6", progress=False)
    assert not os.path.exists(cached)
    assert server.requests == []
    zoo.load("Cnn6", progress=False)
    assert M.gets(server, M.ZIP_FILE) == [None]


def test_install_replaces_a_damaged_cached_file(zoo_env, server, served_files):
    """A different file already in the cache is discarded and the verified copy takes its
    place (the staged copy is a sibling that discarding the cached file does not touch)."""
    cached = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached, "wb") as f:
        f.write(b"not the release file")
    source = os.path.join(os.path.dirname(zoo_env["PANNS_JAX_HOME"]), "mine.pth")
    with open(source, "wb") as f:
        f.write(served_files[M.ZIP_FILE])
    assert zoo.install("Cnn6", source) == cached
    with open(cached, "rb") as f:
        assert f.read() == served_files[M.ZIP_FILE]
    assert not [n for n in M.cache_files(zoo_env) if n.endswith(".part")]
    assert server.requests == []


def test_an_unusable_cache_directory_is_one_line(zoo_env, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv("PANNS_JAX_HOME", str(tmp_path / "a_file" / "cache"))
    assert cli.main(["download", "Cnn6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not usable" in err and "PANNS_JAX_HOME" in err, err
