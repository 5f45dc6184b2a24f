"""Audio tagging from the command line and from Python.

    panns-jax tag recording.wav --model Cnn14 --checkpoint DIR
    python -m panns_jax.inference tag recording.wav --top-k 5 --format json

The whole recording is processed at once, without padding or cropping, as the
original inference script does (golden/TRAINING.md §11).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from panns_jax import audio, models


class AudioTagger:
    """A model with its variables, ready to tag waveforms or files.

    Without ``variables`` the model is randomly initialised (useful only to try
    the pipeline: its labels are meaningless).
    """

    def __init__(self, model_name: str = "Cnn14", variables: Optional[Dict[str, Any]] = None,
                 seed: int = 0):
        self.model_name = model_name
        self.model = models.get(model_name)
        self.sample_rate = models.sample_rate(self.model)
        self.pretrained = variables is not None
        self.variables = variables or models.init(self.model, jax.random.key(seed),
                                                  self.sample_rate)
        self._forward = jax.jit(lambda v, x: self.model.apply(v, x))
        self.labels = audio.audioset_labels()

    def predict(self, waveform: np.ndarray) -> Dict[str, np.ndarray]:
        """Outputs of the model for one mono waveform at the model's sample rate."""
        x = jnp.asarray(np.asarray(waveform, np.float32)[None])
        return jax.device_get(self._forward(self.variables, x))

    def tag(self, source: Union[str, np.ndarray], top_k: int = 10) -> List[Dict[str, Any]]:
        """Top-k labels ``[{index, label, probability}]`` of a file path or waveform."""
        waveform = audio.load_audio(source, self.sample_rate) if isinstance(source, str) else source
        probabilities = self.predict(waveform)["clipwise_output"][0]
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        return [{"index": int(i), "label": self.labels[i] if i < len(self.labels) else str(i),
                 "probability": float(probabilities[i])} for i in order]


def load_tagger(checkpoint: Optional[str], model_name: Optional[str]) -> AudioTagger:
    """A tagger from a panns_jax checkpoint directory, an original ``.pth``, or none (random)."""
    if checkpoint is None:
        return AudioTagger(model_name or "Cnn14")
    from panns_jax import checkpoints, convert

    if checkpoints.is_model_checkpoint(checkpoint):
        loaded = checkpoints.load(checkpoint)
        if model_name and model_name != loaded.model:
            raise ValueError(f"{checkpoint} holds {loaded.model}, not {model_name}")
    else:
        if not model_name:
            raise ValueError(f"{checkpoint}: name the architecture of a .pth with --model")
        state, step = convert.read_torch_checkpoint(checkpoint)
        loaded = convert.torch_to_checkpoint(state, model_name, step=step)
    if loaded.overrides:
        raise ValueError(f"{checkpoint}: a {loaded.overrides} model has no AudioSet labels to tag")
    return AudioTagger(loaded.model, variables=loaded.variables)


def _print_table(results: List[Dict[str, Any]]) -> None:
    for result in results:
        print(result["file"])
        for row in result["labels"]:
            print(f"  {row['probability']:.3f}  {row['label']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="panns-jax", description="PANNs audio tagging in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    tag = sub.add_parser("tag", help="print the top-k AudioSet labels of audio files")
    tag.add_argument("files", nargs="+", help="audio files (any format soundfile/librosa reads)")
    tag.add_argument("--checkpoint", default=None,
                     help="panns_jax checkpoint directory or original PANNs .pth "
                          "(default: none, a randomly initialised model)")
    tag.add_argument("--model", default=None,
                     help="architecture name (default: the checkpoint's, else Cnn14)")
    tag.add_argument("--top-k", type=int, default=10)
    tag.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)

    try:
        tagger = load_tagger(args.checkpoint, args.model)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not tagger.pretrained:
        print(f"warning: no checkpoint given; {tagger.model_name} is randomly initialised, so the "
              "labels below are meaningless (this demonstrates the pipeline only)", file=sys.stderr)
    results, failures = [], []
    for path in args.files:
        try:
            results.append({"file": path, "labels": tagger.tag(path, args.top_k)})
        except ValueError as err:  # AudioError and too-short audio.
            failures.append(path)
            print(f"error: {err}", file=sys.stderr)
    if args.format == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        _print_table(results)
    if failures:
        print(f"{len(failures)} of {len(args.files)} file(s) failed: {', '.join(failures)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
