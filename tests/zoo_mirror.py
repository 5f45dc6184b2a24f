"""A local mirror of the released checkpoints for tests/test_zoo.py and tests/test_download.py.

It serves Cnn6 checkpoints made from the golden recipe weights (saved by torch in both of
its formats) from an HTTP server on 127.0.0.1, and points the zoo at it with
``PANNS_JAX_MIRROR`` and a table of its own (``PANNS_JAX_ZOO_TABLE``). No other address is
ever contacted: conftest.py makes the zoo offline for every other test.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Dict, Iterator, List, Optional

import golden_utils as G

from panns_jax import convert, download, models

ZIP_FILE = "Cnn6_mAP=0.343.pth"
LEGACY_FILE = "Cnn6_legacy_mAP=0.343.pth"
BAD_FILE = "Cnn6_bad_mAP=0.343.pth"
SR = 32000


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range. It can drop a response halfway, ignore Range, stream slowly, answer a
    fixed status, cut the body short or trickle it, and it logs every request."""

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
        if name in server.answers:
            self.send_error(server.answers[name])
            return
        if server.ignore_range:
            requested = None
        start = int(requested.split("=")[1].split("-")[0]) if requested else 0
        if start >= len(data) > 0:
            self.send_error(416)
            return
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        if name in server.cuts:  # The first bytes only, announced as the whole or unannounced.
            body, announce = body[: server.cuts[name][0]], server.cuts[name][1]
            if announce:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in server.trickle:  # One byte per interval, for at most so many seconds.
            interval, seconds = server.trickle[name]
            for i in range(int(seconds / interval)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(interval)
            self.close_connection = True
            return
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

    def log_message(self, *args: Any) -> None:
        pass


def release_files() -> Dict[str, bytes]:
    """The golden recipe Cnn6 as the original saves it (every key, front end included), in
    torch's zip format, its legacy format, and a zip copy the table gives a wrong md5."""
    import torch

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


class _Server(http.server.ThreadingHTTPServer):
    """A client that hangs up mid-body is expected here: nothing is printed for it."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@contextlib.contextmanager
def serving(files: Dict[str, bytes]) -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 serving ``files`` by name, for the block's duration."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.drops = dict(files), [], {}
    httpd.delay, httpd.ignore_range = 0.0, False
    httpd.answers, httpd.cuts, httpd.trickle = {}, {}, {}
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def point_the_zoo_at(server, files: Dict[str, bytes], tmp_path, monkeypatch) -> Dict[str, str]:
    """A fresh cache, the mirror and a table of the served files, set in this process.

    Returns the whole environment, for subprocesses. Retries pause 0.05 s. The server
    forgets its requests and whatever it was told to do. Cnn6 has a published md5 and
    size. Cnn6_legacy has neither, so the sha256 of its first download is recorded.
    Cnn6_bad has a wrong md5.
    """
    forget_behaviour(server)
    table = [
        {
            "name": "Cnn6",
            "arch": "Cnn6",
            "file": ZIP_FILE,
            "map": 0.343,
            "md5": md5(files[ZIP_FILE]),
            "size": len(files[ZIP_FILE]),
            "purpose": "test",
        },
        {"name": "Cnn6_legacy", "arch": "Cnn6", "file": LEGACY_FILE, "map": 0.343},
        {"name": "Cnn6_bad", "arch": "Cnn6", "file": BAD_FILE, "map": 0.343, "md5": "0" * 32},
    ]
    (tmp_path / "table.json").write_text(json.dumps(table))
    env = {
        "PANNS_JAX_HOME": str(tmp_path / "cache"),
        "PANNS_JAX_MIRROR": mirror_url(server),
        "PANNS_JAX_ZOO_TABLE": str(tmp_path / "table.json"),
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PANNS_JAX_OFFLINE", raising=False)
    monkeypatch.setattr(download, "BACKOFF_S", 0.05)
    full = {k: v for k, v in os.environ.items() if k != "PANNS_JAX_OFFLINE"}
    full.update(env)
    return full


def forget_behaviour(server) -> None:
    """The server forgets its requests and serves every file whole and at once."""
    server.requests.clear()
    for behaviour in (server.drops, server.answers, server.cuts, server.trickle):
        behaviour.clear()
    server.delay, server.ignore_range = 0.0, False


def mirror_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def gets(server, name: str) -> List[Optional[str]]:
    """The Range header of every request for ``name`` (None for a plain GET), in order."""
    return [r for n, r in server.requests if n == name]


def cache_files(env: Dict[str, str]) -> List[str]:
    """The cache's files, less the lock files (which filelock may leave)."""
    home = env["PANNS_JAX_HOME"]
    names = os.listdir(home) if os.path.isdir(home) else []
    return sorted(n for n in names if not n.endswith(".lock"))


def write_wav(path: str) -> str:
    """The golden 'odd' input as a float WAV at the model's rate (read back exactly)."""
    import soundfile as sf

    sf.write(path, G.inputs()["odd"][0], SR, subtype="FLOAT")
    return path


def run_python(env: Dict[str, str], *code_lines: str, timeout: int = 600):
    """Run the lines as a Python program in a fresh interpreter with ``env``."""
    return subprocess.run(
        [sys.executable, "-c", "\n".join(code_lines)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(G.PROJECT_ROOT),
    )
