"""The commands' persistent compilation cache: a second process on the same model and input
shape compiles nothing, counted by JAX's own monitoring events (not by timing); off by
environment or flag it compiles again, and library code never turns it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

import pytest
from serving_utils import one_error_line, run_main

from panns_jax import cli, compile_cache

# Runs argv[2:] in a fresh interpreter (``cli`` for the command line, ``api`` for a tagger
# that turns the cache on itself, ``library`` for one that does not), counting every backend
# compilation request and the persistent cache's hits and misses, written to argv[1].
RUNNER = r"""
import json, sys
import jax, jax.monitoring as monitoring
counts = {"requests": 0, "hits": 0, "misses": 0}
EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
          "/jax/compilation_cache/cache_misses": "misses"}
def on_event(event, **kwargs):
    if event in EVENTS:
        counts[EVENTS[event]] += 1
def on_duration(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["requests"] += 1
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
out, how, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if how == "cli":
    from panns_jax.cli import main
    code = main(args)
else:
    from panns_jax import compile_cache
    from panns_jax.tagger import AudioTagger
    if how == "api":
        compile_cache.enable()
    tagger = AudioTagger.load(args[1])
    tagger.tag(args[0], top_k=1)
    code = 0
counts["dir"] = jax.config.jax_compilation_cache_dir
with open(out, "w") as f:
    json.dump({"code": code, **counts}, f)
"""


def _run(tmp_path, how: str, args: List[Any], **env: str) -> Dict[str, Any]:
    """One fresh process: its exit code, stdout and counts; compiles = requests not hit."""
    out = tmp_path / f"counts{len(list(tmp_path.glob('counts*')))}.json"
    environment = {**os.environ, "PANNS_JAX_HOME": str(tmp_path / "home"), **env}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), how, *[str(a) for a in args]],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and out.exists(), done.stderr
    counts = json.loads(out.read_text())
    counts["compiles"] = counts["requests"] - counts["hits"]
    counts["stdout"] = done.stdout
    return counts


def _entries(tmp_path) -> List[str]:
    cache = tmp_path / "home" / "xla"
    return sorted(os.listdir(cache)) if cache.exists() else []


def test_a_second_tag_process_compiles_nothing_and_off_compiles_again(env, tmp_path):
    argv = ["tag", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--no-progress"]
    on = {"PANNS_JAX_COMPILATION_CACHE": "1"}
    first = _run(tmp_path, "cli", argv, **on)
    assert first["code"] == 0 and first["dir"] == str(tmp_path / "home" / "xla")
    assert first["compiles"] >= 1 and first["misses"] == first["compiles"] and not first["hits"]
    written = _entries(tmp_path)
    assert written  # Every compiled program, the ones compiled in under a second included.
    second = _run(tmp_path, "cli", argv, **on)
    assert second["compiles"] == 0 and second["hits"] == first["compiles"], second
    assert second["stdout"] == first["stdout"] and _entries(tmp_path) == written
    # Negative controls: off by environment or by flag, the same run compiles again.
    for off, extra in [
        ({"PANNS_JAX_COMPILATION_CACHE": "0"}, []),
        (on, ["--no-compilation-cache"]),
    ]:
        again = _run(tmp_path, "cli", argv + extra, **off)
        assert again["dir"] is None and again["compiles"] == first["compiles"], again
        assert not again["hits"] and again["stdout"] == first["stdout"]
    assert _entries(tmp_path) == written


def test_a_second_stream_process_compiles_nothing(env, tmp_path):
    argv = ["stream", env["root"] / "good.wav", "--checkpoint", env["ckpt"]]
    on = {"PANNS_JAX_COMPILATION_CACHE": "1"}
    first = _run(tmp_path, "cli", argv, **on)
    assert first["code"] == 0 and first["compiles"] >= 1 and not first["hits"]
    second = _run(tmp_path, "cli", argv, **on)
    assert second["compiles"] == 0 and second["hits"] == first["compiles"], second
    off = _run(tmp_path, "cli", argv + ["--no-compilation-cache"], **on)  # Negative control.
    assert off["dir"] is None and off["compiles"] == first["compiles"] and not off["hits"]


def test_the_library_leaves_the_cache_off_and_enable_turns_it_on(env, tmp_path):
    args = [env["root"] / "good.wav", env["ckpt"]]
    plain = _run(tmp_path, "library", args)
    assert plain["dir"] is None and plain["compiles"] >= 1 and _entries(tmp_path) == []
    first = _run(tmp_path, "api", args)
    assert first["dir"] == compile_cache_dir(tmp_path) and first["compiles"] == plain["compiles"]
    second = _run(tmp_path, "api", args)
    assert second["compiles"] == 0 and second["hits"] == plain["compiles"], second


def compile_cache_dir(tmp_path) -> str:
    return str(tmp_path / "home" / "xla")


def test_a_bad_switch_value_is_one_line_before_anything_loads(env, capsys, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "sometimes")
    code, out, err = run_main(cli.main, ["tag", env["root"] / "good.wav"], capsys)
    assert code == 2 and out == ""
    assert "PANNS_JAX_COMPILATION_CACHE='sometimes': expected 1 or 0" in one_error_line(err)


@pytest.mark.parametrize("value, wanted", [("", True), ("1", True), ("on", True), ("0", False)])
def test_switch_values(monkeypatch, value, wanted):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.wanted_by_environment() is wanted


def test_a_cache_that_cannot_be_made_is_a_warning_and_the_run_goes_on(
    env, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("PANNS_JAX_HOME", str(blocker))  # xla/ under a file: not a directory.
    monkeypatch.setenv(compile_cache.ENV, "1")
    argv = ["tag", env["root"] / "good.wav", "--checkpoint", env["ckpt"], "--no-progress"]
    code, out, err = run_main(cli.main, argv, capsys)
    assert code == 0 and "good.wav" in out
    assert "warning: no compilation cache (" in err and "compiling afresh" in err
    assert compile_cache.enabled_dir() is None
