"""Time to the first tag of one recording, whole process, vs panns_inference on this machine.

    python benchmarks/cold_start.py                       # random Cnn14 weights, a 7 s clip, 3 runs
    python benchmarks/cold_start.py --runs 5 --torch-checkpoint ~/panns_data/Cnn14_mAP=0.431.pth

What a user waits for from the shell: ``python -m panns_jax.cli tag one.wav --checkpoint DIR``
(import, checkpoint load, reading the audio, the first forward and printing the tags), the
median of ``--runs`` fresh processes, against the PyTorch package's documented use in a
fresh process (``librosa.load`` at 32 kHz, ``AudioTagging(checkpoint_path=...)``,
``inference``), the two interleaved run by run so that load from elsewhere hits both alike.
Our runs use the command's defaults: the persistent compilation cache in a cache directory
of their own (``PANNS_JAX_HOME``), which one warm-up run fills, as any earlier use of the
same model and input shape would; the warm-up is reported too, and so is a run with
``--no-compilation-cache``. A phase breakdown (import, load, first tag, second tag) is
taken in one more process of each side.

The panns_inference column needs that package and its checkpoint on disk
(``--torch-checkpoint``, default its own ``~/panns_data/Cnn14_mAP=0.431.pth``) with its
label file; it is skipped with a message otherwise (this script never downloads). Given
that checkpoint, both sides use its weights (converted once for ours); else ours uses
random weights, which cost the same time. The load average is printed before and after:
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import load_line  # noqa: E402

SR = 32000
TORCH_DEFAULT = os.path.join("~", "panns_data", "Cnn14_mAP=0.431.pth")

# Phases of one process of ours, as the command runs them (cache on, as its default).
OUR_PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from panns_jax import compile_cache
from panns_jax.tagger import AudioTagger
t1 = time.perf_counter()
compile_cache.enable()
tagger = AudioTagger.load(sys.argv[1])
t2 = time.perf_counter()
tagger.tag(sys.argv[2], top_k=10)
t3 = time.perf_counter()
tagger.tag(sys.argv[2], top_k=10)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first tag": t3 - t2,
                  "second tag": t4 - t3}))
"""

# panns_inference as its README uses it, whole (the phases print to stderr).
THEIR_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
import librosa
from panns_inference import AudioTagging
t1 = time.perf_counter()
tagger = AudioTagging(checkpoint_path=sys.argv[1], device="cpu")
t2 = time.perf_counter()
times = []
for _ in range(2):
    start = time.perf_counter()
    audio, _ = librosa.load(sys.argv[2], sr=32000, mono=True)
    clipwise, embedding = tagger.inference(audio[None, :])
    print(clipwise.argsort()[0, ::-1][:10])
    times.append(time.perf_counter() - start)
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first tag": times[0],
                  "second tag": times[1]}), file=sys.stderr)
"""


def _write_clip(path: str, seconds: float) -> None:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    soundfile.write(path, x.astype(np.float32), SR)


def _our_checkpoint(work: str, model: str, torch_checkpoint: Optional[str]) -> str:
    """A checkpoint of ``model``: the torch checkpoint's weights converted, else random."""
    path = os.path.join(work, "checkpoint")
    if torch_checkpoint:
        command = [sys.executable, "-m", "panns_jax.convert", "from-torch", torch_checkpoint]
        subprocess.run([*command, "--model", model, "--out", path], check=True)
        return path
    import jax
    import numpy as np

    from panns_jax import checkpoints, models

    module = models.get(model)
    variables = models.init(module, jax.random.key(0), models.sample_rate(module))
    variables = jax.tree_util.tree_map(np.asarray, variables)
    checkpoints.save(path, checkpoints.ModelCheckpoint(model, variables))
    return path


def _timed(command: List[str], env: Dict[str, str]) -> float:
    """Seconds of one process, from its start to its exit; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return elapsed


def _phases(command: List[str], env: Dict[str, str], stream: str) -> Dict[str, float]:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads((done.stdout if stream == "stdout" else done.stderr).strip().splitlines()[-1])


def _torch_side(path: Optional[str]) -> Optional[str]:
    """The panns_inference checkpoint to compare with, or None with the reason printed."""
    if importlib.util.find_spec("panns_inference") is None:
        print("panns_inference is not installed: its column is skipped")
        return None
    path = os.path.expanduser(path or TORCH_DEFAULT)
    labels = os.path.join(os.path.expanduser("~"), "panns_data", "class_labels_indices.csv")
    for needed in (path, labels):
        if not os.path.isfile(needed):
            print(
                f"{needed} is missing (never downloaded here): the panns_inference column is "
                "skipped"
            )
            return None
    return path


def _report(name: str, times: List[float], reference: Optional[List[float]]) -> None:
    median = statistics.median(times)
    line = f"{name:<44} median {median:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})"
    if reference:
        line += f"  {median / statistics.median(reference):.2f}x panns_inference's time"
    print(line)


def _print_phases(name: str, phases: Dict[str, float]) -> None:
    parts = "  ".join(f"{k} {v:.2f} s" for k, v in phases.items())
    print(f"  {name:<16} {parts}  (sum {sum(phases.values()):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Cnn14")
    parser.add_argument("--seconds", type=float, default=7.0, help="the recording's length")
    parser.add_argument("--runs", type=int, default=3, help="processes timed per side")
    parser.add_argument(
        "--torch-checkpoint",
        default=None,
        help=f"panns_inference's checkpoint (default {TORCH_DEFAULT}); never downloaded",
    )
    args = parser.parse_args()
    if args.runs < 1 or not args.seconds > 0:
        parser.error("--runs must be at least 1 and --seconds positive")
    print(load_line())
    torch_checkpoint = _torch_side(args.torch_checkpoint)
    if torch_checkpoint and args.model != "Cnn14":
        print("panns_inference tags with Cnn14 only: its column is skipped")
        torch_checkpoint = None
    work = tempfile.mkdtemp(prefix="panns_cold_start_")
    try:
        _measure(args, work, torch_checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(load_line())


def _measure(args: argparse.Namespace, work: str, torch_checkpoint: Optional[str]) -> None:
    clip = os.path.join(work, "one.wav")
    _write_clip(clip, args.seconds)
    checkpoint = _our_checkpoint(work, args.model, torch_checkpoint)
    env = {**os.environ, "PANNS_JAX_HOME": os.path.join(work, "home")}
    env.pop("PANNS_JAX_COMPILATION_CACHE", None)  # The command's default, on.
    ours = [sys.executable, "-m", "panns_jax.cli", "tag", clip, "--checkpoint", checkpoint]
    ours += ["--no-progress"]
    theirs = [sys.executable, "-c", THEIR_RUN, str(torch_checkpoint), clip]
    print(f"{args.model}, one {args.seconds:g} s recording, {args.runs} runs per side")
    warm_up = _timed(ours, env)  # Fills the compilation cache (and the page cache).
    if torch_checkpoint:
        _timed(theirs, env)
    ours_times: List[float] = []
    their_times: List[float] = []
    for _ in range(args.runs):
        ours_times.append(_timed(ours, env))
        if torch_checkpoint:
            their_times.append(_timed(theirs, env))
    uncached = [_timed(ours + ["--no-compilation-cache"], env) for _ in range(args.runs)]
    if their_times:
        _report("panns_inference (librosa.load + inference)", their_times, None)
    _report("panns-jax tag (compilation cache filled)", ours_times, their_times)
    _report("panns-jax tag --no-compilation-cache", uncached, their_times)
    print(f"{'panns-jax tag, the run that filled the cache':<44} {warm_up:6.2f} s")
    print("phases of one more process of each side:")
    ours_phases = [sys.executable, "-c", OUR_PHASES, checkpoint, clip]
    _print_phases("panns_jax", _phases(ours_phases, env, "stdout"))
    if torch_checkpoint:
        _print_phases("panns_inference", _phases(theirs, env, "stderr"))


if __name__ == "__main__":
    main()
