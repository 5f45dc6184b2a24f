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
import zoo_cases as C
import zoo_mirror as M

from panns_jax import cli, download, zoo

torch = pytest.importorskip("torch", reason="the served checkpoints are written by torch.save")


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
        with pytest.raises(download.DownloadError, match="recorded when it was first verified"):
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


# ----------------------------------------------------------------------------
# Hostile caches and servers: refused in one line within a bounded time, nothing outside
# the cache touched, and a good checkpoint still loads afterwards.
# ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path, zoo_env):
    return C.Outside(tmp_path, zoo_env["PANNS_JAX_HOME"])


@pytest.mark.parametrize(
    "link, suffix",
    [("symbolic", ".part"), ("symbolic", ""), ("symbolic", ".json"), ("symbolic", ".lock")]
    + [("hard", ".part")],
)
def test_a_link_in_the_cache_is_never_followed(zoo_env, outside, wav, capsys, link, suffix):
    """A link where the cache keeps the partial download, the file, its record or its lock
    points outside: it is neither written through nor read, and `--force` removes it."""
    path = os.path.join(zoo_env["PANNS_JAX_HOME"], M.LEGACY_FILE + suffix)
    os.makedirs(os.path.dirname(path))
    (os.symlink if link == "symbolic" else os.link)(outside.victim, path)
    outside.freeze()
    for argv in (
        ["download", "Cnn6_legacy", "--no-progress"],
        ["tag", wav, "--checkpoint", "Cnn6_legacy", "--no-progress"],
    ):
        C.assert_refused(C.run(capsys, *argv), f"{path} is a {link} link", "--force")
        assert os.path.samefile(path, outside.victim)
    assert C.run(capsys, "download", "Cnn6_legacy", "--force", "--no-progress")[0] == 0
    assert not os.path.lexists(path) or not (
        os.path.islink(path) or os.path.samefile(path, outside.victim)
    )
    outside.assert_unchanged()
    assert zoo.load("Cnn6_legacy", progress=False).model == "Cnn6"


def test_a_record_with_a_digest_that_is_not_hex_is_ignored(zoo_env, outside, capsys):
    """A converted checkpoint is stored in a directory named by the recorded sha256: a
    damaged record that names a path there is ignored, and the file is verified again."""
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0
    record_path = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE + ".json")
    with open(record_path) as f:
        record = json.load(f)
    record["sha256"] = "/../../made_by_the_zoo/" + record["sha256"]
    with open(record_path, "w") as f:
        json.dump(record, f)
    outside.freeze()
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0
    outside.assert_unchanged()
    with open(record_path) as f:
        assert len(json.load(f)["sha256"]) == 64


def test_a_trickling_server_meets_the_download_deadline(
    zoo_env, server, served_files, outside, capsys, monkeypatch
):
    """A server that sends a byte at a time (20 bytes/s, for up to 15 s) is left at the
    deadline: 1 s plus the size at the minimum rate (here the size per second: 1 s)."""
    size = len(served_files[M.ZIP_FILE])
    monkeypatch.setattr(download, "DEADLINE_FLOOR_S", 1.0)
    monkeypatch.setenv("PANNS_JAX_MIN_RATE", str(size))
    server.trickle[M.ZIP_FILE] = (0.05, 15.0)
    outside.freeze()
    code, err, seconds = result = C.run(capsys, "download", "Cnn6", "--no-progress")
    C.assert_refused(result, "past the deadline of 2.0 s", "PANNS_JAX_MIN_RATE")
    assert 2 <= seconds < 6, seconds  # The server would have gone on for 15 s.
    part = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE + ".part")
    have = os.path.getsize(part)
    assert 0 < have < 200  # Kept, to resume.
    M.forget_behaviour(server)
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0
    assert M.gets(server, M.ZIP_FILE) == [f"bytes={have}-"]
    outside.assert_unchanged()


def test_a_held_lock_is_waited_for_a_bounded_time(
    zoo_env, server, outside, wav, capsys, monkeypatch
):
    """Another process holds the file's lock (for 30 s at most): each entry point waits
    PANNS_JAX_LOCK_TIMEOUT seconds, then names the lock in one line."""
    lock = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE + ".lock")
    os.makedirs(os.path.dirname(lock))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time\n"
            "with filelock.FileLock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(30)\n",
            lock,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        outside.freeze()
        monkeypatch.setenv("PANNS_JAX_LOCK_TIMEOUT", "1")
        for argv in (
            ["download", "Cnn6", "--no-progress"],
            ["tag", wav, "--checkpoint", "Cnn6", "--no-progress"],
        ):
            code, err, seconds = result = C.run(capsys, *argv)
            C.assert_refused(result, f"another process still holds {lock} after 1 s")
            assert "waiting for another process" in err and 1 <= seconds < 5, (seconds, err)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert server.requests == [] and M.cache_files(zoo_env) == []
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0
    outside.assert_unchanged()


@pytest.mark.parametrize(
    "code, partial, answer",
    [
        (416, True, "answered HTTP 416 Requested Range Not Satisfiable"),
        (416, False, "answered HTTP 416 Requested Range Not Satisfiable"),
        (404, False, "answered HTTP 404 Not Found"),
        (403, True, "answered HTTP 403 Forbidden"),
        (503, False, "after 5 tries (HTTP 503 Service Unavailable)"),
    ],
)
def test_http_answers_are_one_line_saying_what_the_server_answered(
    zoo_env, server, served_files, outside, capsys, code, partial, answer
):
    part = os.path.join(zoo_env["PANNS_JAX_HOME"], M.ZIP_FILE + ".part")
    if partial:  # A download that an earlier run left halfway.
        os.makedirs(os.path.dirname(part))
        with open(part, "wb") as f:
            f.write(served_files[M.ZIP_FILE][:1000])
    server.answers[M.ZIP_FILE] = code
    outside.freeze()
    err = C.assert_refused(C.run(capsys, "download", "Cnn6", "--no-progress"), answer)
    assert "No such file" not in err and "not usable" not in err
    assert M.gets(server, M.ZIP_FILE)[0] == ("bytes=1000-" if partial else None)
    M.forget_behaviour(server)
    assert C.run(capsys, "download", "Cnn6", "--no-progress")[0] == 0
    outside.assert_unchanged()


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak RSS from /proc")
def test_from_checks_the_size_first_and_converts_before_installing(
    zoo_env, served_files, outside, tmp_path
):
    """Sparse files of 8 GiB and 2 GiB of zeros given with --from: refused by their size
    (Cnn6 has a known size; 8 GiB is more than any file of unknown size) or by the reader
    before a byte is copied, each within seconds, in a process whose peak RSS stays under
    1.5 GB; then a good copy installs in that same process."""
    sparse = {"8GiB.pth": 8 << 30, "2GiB.pth": 2 << 30}
    for name, size in sparse.items():
        with open(tmp_path / "outside" / name, "wb") as f:
            f.truncate(size)
    good = tmp_path / "good.pth"
    good.write_bytes(served_files[M.ZIP_FILE])
    cases = [
        ("Cnn6", "8GiB.pth", f"8589934592 bytes, but {M.ZIP_FILE} has"),
        ("Cnn6_legacy", "8GiB.pth", "more than any checkpoint of unknown size"),
        ("Cnn6_legacy", "2GiB.pth", "not a checkpoint that loads"),
        ("Cnn6", "2GiB.pth", f"2147483648 bytes, but {M.ZIP_FILE} has"),
    ]
    outside.freeze()
    argvs = [["download", n, "--from", str(tmp_path / "outside" / f)] for n, f, _ in cases]
    argvs.append(["download", "Cnn6", "--from", str(good)])
    result = M.run_python(
        {**zoo_env, "PANNS_JAX_OFFLINE": "1"},
        "import json, sys, time",
        "def peak():",  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's).
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]",
        "    return int(status.split()[0])",
        "from panns_jax import cli",
        f"for argv in {argvs!r}:",
        "    start = time.monotonic()",
        "    code = cli.main(argv)",
        "    peak_kib = peak()",
        "    print(json.dumps([code, time.monotonic() - start, peak_kib]), flush=True)",
        "    print('--', file=sys.stderr, flush=True)",
        "print(peak())",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *runs, peak_kib = result.stdout.splitlines()
    errors = result.stderr.split("--\n")
    for (name, file, message), run, err in zip(cases, runs, errors):
        code, seconds, _ = json.loads(run)
        C.assert_refused((code, err, seconds), message)
        assert seconds < 5, (name, file, seconds)
    assert json.loads(runs[-1])[0] == 0, errors[-2:]
    assert int(peak_kib) < 1.5e6, (peak_kib, runs)  # KiB.
    cached = M.cache_files(zoo_env)  # Cnn6 with its record and its conversion, only.
    assert cached[1:] == [M.ZIP_FILE, M.ZIP_FILE + ".json"] and len(cached) == 3, cached
    outside.assert_unchanged()
