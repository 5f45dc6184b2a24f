"""Shared material of the serving-layer tests (tagger, sed, cli, streaming, HEAR, export).

Two kinds of model: the golden recipe weights of Cnn6 (and Cnn14_DecisionLevelMax), whose
outputs every check compares with the model applied directly, and a tiny Cnn10 (widths
8..64, 5 named classes) with a few hostile audio files, for the error cases, where a short
compile matters more than meaningful outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Callable, Dict, Sequence, Tuple

import golden_utils as G
import jax
import numpy as np
import soundfile as sf

from panns_jax import checkpoints, convert, models

WAV = str(G.AUDIO / "R9_ZSCveAHg_7s.wav")
SR = 32000
TOL = dict(rtol=1e-5, atol=2e-6)  # Batched/jitted vs direct: float reassociation only.
# The long recording's 10 s chunks every 40 s, plus one ending at its end (170 s,
# overlapping the one at 160 s).
LONG_STARTS = [0, 40 * SR, 80 * SR, 120 * SR, 160 * SR, 170 * SR]

OVERRIDES = {"widths": (8, 16, 32, 64), "embedding_size": 32, "num_classes": 5}
OVERRIDES_JSON = json.dumps({"widths": [8, 16, 32, 64], "embedding_size": 32})
LABELS = ["dog", "cat", "rain", "siren", "speech"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ golden weights


def golden_checkpoint(tmp_path_factory: Any, name: str) -> str:
    """A panns_jax checkpoint directory of the golden recipe weights of ``name``."""
    G.require_golden()
    path = tmp_path_factory.mktemp("ckpt") / name
    checkpoints.save(str(path), convert.torch_to_checkpoint(G.load_state(name), name))
    return str(path)


def direct(tagger: Any) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """The tagger's model applied directly to one waveform: the reference of every check."""
    apply = jax.jit(tagger.model.apply)
    return lambda x: jax.device_get(apply(tagger.variables, np.asarray(x, np.float32)[None]))


def write_long_wav(tmp_path_factory: Any) -> str:
    """A 3-minute 32 kHz recording: tones, noise and silence that change over time."""
    rng = np.random.default_rng(0)
    t = np.arange(180 * SR) / SR
    x = 0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t) * (np.sin(2 * np.pi * t / 23) > 0)
    x += 0.05 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * t / 37) > 0.3)
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, x.astype(np.float32), SR, subtype="FLOAT")
    return str(path)


def assert_top(labels: list, probabilities: np.ndarray) -> None:
    """``labels`` are the top classes of ``probabilities``, most probable first."""
    from panns_jax import audio

    top = np.argsort(-probabilities, kind="stable")[: len(labels)]
    assert [row["index"] for row in labels] == top.tolist()
    np.testing.assert_allclose([row["probability"] for row in labels], probabilities[top], **TOL)
    assert labels[0]["label"] == audio.audioset_labels()[top[0]]


# -------------------------------------------------------------- the tiny model


def tiny_env(tmp_path_factory: Any) -> Dict[str, Any]:
    """The tiny Cnn10's checkpoint (step 7, LABELS) and audio files, in one directory:
    good (1 s noise), silence, loud (x 1e6), short (0.5 s), truncated (a PCM header that
    declares 2 s over 0.5 s of data), rate10 and rate1 (40 KB declaring absurd rates)."""
    root = tmp_path_factory.mktemp("errors")
    model = models.get("Cnn10", **OVERRIDES)
    variables = jax.device_get(models.init(model, jax.random.key(0), SR))
    ckpt = str(root / "ckpt")
    checkpoints.save(
        ckpt, checkpoints.ModelCheckpoint("Cnn10", variables, OVERRIDES, 7, labels=LABELS)
    )
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    sf.write(root / "good.wav", noise, SR, subtype="FLOAT")
    sf.write(root / "silence.wav", np.zeros(SR, np.float32), SR)
    sf.write(root / "loud.wav", noise * 1e6, SR, subtype="FLOAT")
    sf.write(root / "short.wav", noise[: SR // 2], SR)
    full = root / "full16.wav"
    sf.write(full, np.tile(noise, 2), SR, subtype="PCM_16")
    data = full.read_bytes()
    (root / "truncated.wav").write_bytes(data[: 44 + SR // 2 * 2])  # Header says 2 s; 0.5 s.
    for rate in (10, 1):
        write_absurd_rate(root / f"rate{rate}.wav", rate, rng)
    return {"root": root, "ckpt": ckpt, "variables": variables, "noise": noise}


def write_absurd_rate(path: Any, rate: int, rng: np.random.Generator) -> None:
    """A 16-bit mono WAV of 40 KB of noise whose header declares ``rate`` Hz."""
    sf.write(path, np.zeros(16, np.float32), SR, subtype="PCM_16")
    header = bytearray(open(path, "rb").read()[:44])
    header[24:28], header[28:32] = struct.pack("<I", rate), struct.pack("<I", 2 * rate)
    header[40:44], header[4:8] = struct.pack("<I", 40000), struct.pack("<I", 36 + 40000)
    with open(path, "wb") as f:
        f.write(bytes(header) + rng.bytes(40000))


def nan_variables(env: Dict[str, Any], *paths: Tuple[str, str, int]) -> Dict[str, Any]:
    """A copy of the tiny model's variables with NaN at each ``(layer, weight, index)``."""
    variables = jax.tree_util.tree_map(np.array, env["variables"])
    for layer, weight, index in paths:
        variables["params"][layer][weight][index] = np.nan
    return variables


def save_tiny(path: Any, variables: Dict[str, Any]) -> str:
    """A checkpoint of the tiny Cnn10 with ``variables`` (a digest of NaN weights is valid)."""
    return checkpoints.save(
        str(path), checkpoints.ModelCheckpoint("Cnn10", variables, OVERRIDES, 0, labels=LABELS)
    )


# ------------------------------------------------------------- command results


def snapshot(root: Any) -> dict:
    """path -> (mode, sha256) of every file and directory under ``root``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            digest = ""
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, root)] = (os.stat(path).st_mode, digest)
    return state


def one_error_line(err: str) -> str:
    """The single ``error:`` line of stderr (asserts there is exactly one, no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_main(
    main: Callable[[Sequence[str]], int], argv: Sequence[Any], capsys: Any
) -> Tuple[int, str, str]:
    """``main(argv)`` with every argument as a string: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
