"""panns_jax.zoo against a local mirror: downloads, verification, cache, locks, offline.

The tests serve Cnn6 checkpoints made from the golden recipe weights (saved by torch in
both formats) from an HTTP server on 127.0.0.1 that they start, and point the zoo at it
with PANNS_JAX_MIRROR and a table of their own (PANNS_JAX_ZOO_TABLE). No other address
is ever contacted: conftest.py makes the zoo offline for every other test.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import golden_utils as G
import jax
import numpy as np
import pytest
import soundfile as sf

from panns_jax import convert, inference, models, zoo

torch = pytest.importorskip("torch", reason="the served checkpoints are written by torch.save")

ZIP_FILE = "Cnn6_mAP=0.343.pth"
LEGACY_FILE = "Cnn6_legacy_mAP=0.343.pth"
BAD_FILE = "Cnn6_bad_mAP=0.343.pth"
SR = 32000


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range; can drop a response halfway or stream it slowly; logs every request."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        name = urllib.parse.unquote(self.path.lstrip("/"))
        requested = self.headers.get("Range")
        with server.lock:
            server.requests.append((name, requested))
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = int(requested.split("=")[1].split("-")[0]) if requested else 0
        if start >= len(data) > 0:
            self.send_error(416)
            return
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with server.lock:
            drop = server.drops.get(name, 0) > 0
            if drop:
                server.drops[name] -= 1
        if drop:  # Half the body, then the connection dies.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        step = 1 << 18
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            if server.delay:
                time.sleep(server.delay)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served_files():
    """The golden recipe Cnn6 as the original saves it: every key, frontend included."""
    G.require_golden()
    state = G.load_state("Cnn6")
    state.update(convert.frontend_state(models.get("Cnn6").frontend))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    payload = {"model": tensors, "iteration": 1}
    files = {}
    for name, zip_format in ((ZIP_FILE, True), (LEGACY_FILE, False), (BAD_FILE, True)):
        buffer = io.BytesIO()
        torch.save(payload, buffer, _use_new_zipfile_serialization=zip_format)
        files[name] = buffer.getvalue()
    assert files[LEGACY_FILE][:2] == b"\x80\x02" and files[ZIP_FILE][:2] == b"PK"
    return files


@pytest.fixture(scope="module")
def server(served_files):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.drops, httpd.delay = served_files, [], {}, 0.0
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def zoo_env(tmp_path, server, served_files, monkeypatch):
    """A fresh cache, the mirror on 127.0.0.1 and a table of the served files; returns the
    environment for subprocesses too."""
    server.requests.clear()
    server.drops.clear()
    server.delay = 0.0
    table = [
        {
            "name": "Cnn6",
            "arch": "Cnn6",
            "file": ZIP_FILE,
            "map": 0.343,
            "md5": _md5(served_files[ZIP_FILE]),
            "size": len(served_files[ZIP_FILE]),
            "purpose": "test",
        },
        # No published digest: the sha256 of the first download is recorded (TOFU).
        {"name": "Cnn6_legacy", "arch": "Cnn6", "file": LEGACY_FILE, "map": 0.343},
        {"name": "Cnn6_bad", "arch": "Cnn6", "file": BAD_FILE, "map": 0.343, "md5": "0" * 32},
    ]
    (tmp_path / "table.json").write_text(json.dumps(table))
    env = {
        "PANNS_JAX_HOME": str(tmp_path / "cache"),
        "PANNS_JAX_MIRROR": f"http://127.0.0.1:{server.server_address[1]}",
        "PANNS_JAX_ZOO_TABLE": str(tmp_path / "table.json"),
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PANNS_JAX_OFFLINE", raising=False)
    monkeypatch.setattr(zoo, "BACKOFF_S", 0.05)
    full = {k: v for k, v in os.environ.items() if k != "PANNS_JAX_OFFLINE"}
    full.update(env)
    return full


def _gets(server, name: str) -> list:
    return [r for n, r in server.requests if n == name]


def _cache_files(env) -> list:
    """The cache's files, less the lock files (which filelock may leave)."""
    home = env["PANNS_JAX_HOME"]
    names = os.listdir(home) if os.path.isdir(home) else []
    return sorted(n for n in names if not n.endswith(".lock"))


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """The golden 'odd' input as a float WAV at the model's rate (read back exactly)."""
    path = tmp_path_factory.mktemp("zoo_audio") / "odd.wav"
    sf.write(path, G.inputs()["odd"][0], SR, subtype="FLOAT")
    return str(path)


def _run(env, *code_lines, timeout=600):
    script = "\n".join(code_lines)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(G.PROJECT_ROOT),
    )


def test_first_use_downloads_verifies_converts_then_a_second_process_uses_the_cache(
    zoo_env, server, served_files, wav, capsys
):
    tagger = inference.AudioTagger.from_pretrained("Cnn6")
    assert _gets(server, ZIP_FILE) == [None]  # One plain GET.
    home = zoo_env["PANNS_JAX_HOME"]
    with open(os.path.join(home, ZIP_FILE), "rb") as f:
        assert _md5(f.read()) == _md5(served_files[ZIP_FILE])
    record = json.load(open(os.path.join(home, ZIP_FILE + ".json")))
    assert record["verified_by"] == "published md5"
    converted = f"Cnn6_mAP=0.343.{record['sha256'][:16]}"
    assert _cache_files(zoo_env) == sorted([ZIP_FILE, ZIP_FILE + ".json", converted])
    # The converted weights are the golden recipe's, bit for bit; outputs match golden.
    expected = convert.from_state_dict(G.load_state("Cnn6"), models.get("Cnn6"))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, jax.device_get(tagger.variables), expected
    )
    golden = G.outputs("Cnn6")
    for case in ("batch", "odd"):
        out = tagger.predict_batch(G.inputs()[case], ["clipwise_output", "embedding"])
        for key in ("clipwise_output", "embedding"):
            problem = G.check_array(f"{case}/{key}", out[key], golden[f"{case}/{key}"])
            assert not problem, problem

    # A second process: the cache, no request, no torch, the .pth never read.
    server.requests.clear()
    result = _run(
        zoo_env,
        "import sys, json",
        "from panns_jax import pth",
        "def refuse(*a, **k): raise AssertionError('the cached .pth was read')",
        "pth.load = refuse",
        "from panns_jax import inference",
        f"code = inference.main(['tag', {wav!r}, '--model', 'Cnn6', '--format', "
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


def test_dropped_connection_resumes_with_range_and_the_right_digest(zoo_env, server, served_files):
    size = len(served_files[LEGACY_FILE])
    server.drops[LEGACY_FILE] = 1
    path = zoo.fetch("Cnn6_legacy", progress=False)
    assert _gets(server, LEGACY_FILE) == [None, f"bytes={size // 2}-"]
    with open(path, "rb") as f:
        data = f.read()
    assert data == served_files[LEGACY_FILE]
    record = json.load(open(path + ".json"))
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["verified_by"] == "sha256 of the first download"
    assert not os.path.exists(path + ".part")
    # The first download's sha256 now guards the file: other bytes are refused.
    os.remove(path)
    server.files[LEGACY_FILE] = served_files[ZIP_FILE]
    try:
        with pytest.raises(zoo.ZooError, match="recorded at its first download"):
            zoo.fetch("Cnn6_legacy", progress=False)
    finally:
        server.files[LEGACY_FILE] = served_files[LEGACY_FILE]
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_wrong_digest_says_expected_and_got_and_leaves_nothing(
    zoo_env, server, served_files, capsys
):
    assert inference.main(["download", "Cnn6_bad", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"expected {'0' * 32}" in err and f"got {_md5(served_files[BAD_FILE])}" in err
    assert "nothing was kept" in err
    assert _cache_files(zoo_env) == []


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
    assert len(_gets(server, ZIP_FILE)) == 1
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("Cnn6 ")
    assert sum("waiting for another process" in e for _, e in outputs) == 1


def test_offline_fails_with_one_line_naming_the_url_and_the_path(
    zoo_env, server, wav, monkeypatch, capsys
):
    monkeypatch.setenv("PANNS_JAX_OFFLINE", "1")
    assert inference.main(["tag", wav, "--model", "Cnn6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    path = os.path.join(zoo_env["PANNS_JAX_HOME"], ZIP_FILE)
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
        assert inference.main([command, wav, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"https://zenodo.org/record/3987831/files/{name}.pth?download=1" in err, err
    # Random weights only when asked for; a name outside the zoo says what to do.
    assert inference.main(["tag", wav, "--model", "Cnn6", "--random-weights", "--no-progress"]) == 0
    assert "--random-weights" in capsys.readouterr().err
    assert inference.main(["tag", wav, "--model", "Cnn14_mel128", "--no-progress"]) == 2
    assert "no pretrained Cnn14_mel128 in the zoo" in capsys.readouterr().err


def test_install_from_file_then_corruption_is_detected(
    zoo_env, server, served_files, tmp_path, capsys
):
    source = tmp_path / "mine.pth"
    data = bytearray(served_files[ZIP_FILE])
    data[len(data) // 3] ^= 1  # One flipped bit: not the release file.
    source.write_bytes(bytes(data))
    assert inference.main(["download", "Cnn6", "--from", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "md5 mismatch" in err and "expected" in err, err
    assert _cache_files(zoo_env) == []
    source.write_bytes(served_files[ZIP_FILE])
    assert inference.main(["download", "Cnn6", "--from", str(source)]) == 0
    assert source.read_bytes() == served_files[ZIP_FILE]  # Left in place.
    assert server.requests == []
    cached = os.path.join(zoo_env["PANNS_JAX_HOME"], ZIP_FILE)
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
        f.seek(len(served_files[ZIP_FILE]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(zoo.ZooError, match="corrupted.*md5 mismatch.*it was removed"):
        zoo.load("Cnn6", progress=False)
    assert not os.path.exists(cached)
    assert server.requests == []
    zoo.load("Cnn6", progress=False)
    assert _gets(server, ZIP_FILE) == [None]


def test_install_replaces_a_damaged_cached_file(zoo_env, server, served_files):
    """A different file already in the cache is discarded and the verified copy takes its
    place (the staged copy is a sibling that discarding the old file does not touch)."""
    cached = os.path.join(zoo_env["PANNS_JAX_HOME"], ZIP_FILE)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached, "wb") as f:
        f.write(b"not the release file")
    source = os.path.join(os.path.dirname(zoo_env["PANNS_JAX_HOME"]), "mine.pth")
    with open(source, "wb") as f:
        f.write(served_files[ZIP_FILE])
    assert zoo.install("Cnn6", source) == cached
    with open(cached, "rb") as f:
        assert f.read() == served_files[ZIP_FILE]
    assert not [n for n in _cache_files(zoo_env) if n.endswith(".part")]
    assert server.requests == []


def test_every_checkpoint_flag_takes_a_zoo_name(zoo_env, server):
    """export, stream, HEAR and transfer load through loader.load."""
    import ml_collections

    from panns_jax import export, hear, loader, transfer

    expected = convert.from_state_dict(G.load_state("Cnn6"), models.get("Cnn6"))
    first = loader.load("Cnn6")  # What `stream --checkpoint Cnn6` calls.
    assert first.metadata.name == "Cnn6" and len(_gets(server, ZIP_FILE)) == 1
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
    assert len(_gets(server, ZIP_FILE)) == 1  # Downloaded once, then the cache.
    with pytest.raises(ValueError, match="is a pretrained Cnn6, not Cnn10"):
        loader.load("Cnn6", model="Cnn10")
    with pytest.raises(FileNotFoundError, match="nor a pretrained model name"):
        loader.load("Cnn6x")


def test_list_and_table_facts(zoo_env, capsys, monkeypatch):
    assert inference.main(["download", "--list"]) == 0
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


def test_an_unusable_cache_directory_is_one_line(zoo_env, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv("PANNS_JAX_HOME", str(tmp_path / "a_file" / "cache"))
    assert inference.main(["download", "Cnn6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not usable" in err and "PANNS_JAX_HOME" in err, err
