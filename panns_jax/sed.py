"""Sound event detection: framewise probabilities stitched from chunks, events, figures.

Works with every model (:meth:`panns_jax.tagger.AudioTagger.detect` runs the model):
decision-level models (Cnn14_DecisionLevel*) give ``framewise_output`` natively (100
frames/s, stitched across chunks by :func:`stitch_framewise`); clip-level models are slid
over the recording in short windows (default 1 s every 0.1 s), each window's
``clipwise_output`` becoming the frame at its centre. Events are runs of frames above a
threshold (:func:`detect_events`); :func:`plot_sed` draws the paper's SED figure (Kong et
al. 2020, Fig. 4: log-mel on top, the top classes' framewise probabilities below) on its
own :class:`matplotlib.figure.Figure`, never touching pyplot or the global backend.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from panns_jax import audio
from panns_jax import frontend as fe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from panns_jax import models


@dataclasses.dataclass
class SedResult:
    """Framewise probabilities of one recording and the events found in them.

    ``framewise[i]`` holds the class probabilities of the frame centred at
    ``times[i]`` seconds; every frame spans ``frame_hop`` seconds.
    Events are ``{onset, offset, label, index, score}``, score = peak probability.
    """

    source: str
    times: np.ndarray
    framewise: np.ndarray
    frame_hop: float
    duration: float
    events: List[Dict[str, Any]]


def output_key(outputs: models.Outputs) -> str:
    """The output SED reads: ``framewise_output`` of a decision-level model, else each
    window's ``clipwise_output``."""
    return "framewise_output" if outputs.decision_level else "clipwise_output"


def from_chunks(
    source: str,
    outputs: Mapping[str, np.ndarray],
    starts: np.ndarray,
    window: int,
    num_samples: int,
    *,
    sample_rate: int,
    frame_hop_samples: int,
    labels: Sequence[str],
    threshold: float,
) -> SedResult:
    """A recording's frames and events from its chunks' outputs.

    ``framewise_output`` ``(n, T_w, C)`` (decision-level models, chunk starts multiples of
    ``frame_hop_samples``) is stitched; else each chunk's ``clipwise_output`` ``(n, C)`` is
    the frame at the chunk's centre, frames spaced by the median hop between chunks.
    """
    sr = sample_rate
    if "framewise_output" in outputs:
        frame_hop = frame_hop_samples / sr
        framewise = stitch_framewise(
            outputs["framewise_output"], starts, window, num_samples, frame_hop_samples
        )
        times = np.arange(len(framewise)) * frame_hop
    else:
        framewise = outputs["clipwise_output"]
        times = (starts + min(window, num_samples) / 2) / sr
        frame_hop = (
            float(np.median(np.diff(starts))) / sr
            if len(times) > 1
            else min(window, num_samples) / sr
        )
    duration = num_samples / sr
    events = detect_events(framewise, times, frame_hop, threshold, labels, duration)
    return SedResult(source, times, framewise, frame_hop, duration, events)


def stitch_framewise(
    framewise: np.ndarray, starts: np.ndarray, window: int, num_samples: int, frame_hop: int
) -> np.ndarray:
    """Framewise outputs ``(n, T_w, C)`` of chunks -> ``(1 + num_samples // frame_hop, C)``.

    Chunk starts are multiples of ``frame_hop``, so chunk frame j is recording frame
    ``start / frame_hop + j``. Where chunks overlap, each frame comes from the chunk
    whose centre is nearest; frames past the last chunk repeat its last frame, as
    the original pads its framewise output.
    """
    total = 1 + num_samples // frame_hop
    out = np.empty((total, framewise.shape[-1]), framewise.dtype)
    first = np.asarray(starts) // frame_hop
    centre = first + (window / frame_hop) / 2
    bounds = np.concatenate([[0], np.ceil((centre[:-1] + centre[1:]) / 2).astype(int), [total]])
    for k in range(len(first)):
        lo, hi = bounds[k], min(bounds[k + 1], first[k] + framewise.shape[1])
        out[lo:hi] = framewise[k, lo - first[k] : hi - first[k]]
        if hi < bounds[k + 1]:
            out[hi : bounds[k + 1]] = framewise[k, -1]
    return out


def detect_events(
    framewise: np.ndarray,
    times: np.ndarray,
    frame_hop: float,
    threshold: float,
    labels: Sequence[str],
    duration: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Runs of frames with probability >= ``threshold``, per class, sorted by onset.

    Frame i covers ``times[i] +- frame_hop / 2`` (clipped to the recording).
    """
    active = framewise >= threshold
    padded = np.pad(active, ((1, 1), (0, 0)))
    change = np.diff(padded.astype(np.int8), axis=0)
    events = []
    for c in np.flatnonzero(active.any(axis=0)):
        onsets = np.flatnonzero(change[:, c] == 1)
        offsets = np.flatnonzero(change[:, c] == -1)  # Exclusive frame index.
        for on, off in zip(onsets, offsets):
            onset = max(0.0, float(times[on]) - frame_hop / 2)
            offset = float(times[off - 1]) + frame_hop / 2
            if duration is not None:
                offset = min(offset, duration)
            events.append(
                {
                    "onset": round(onset, 4),
                    "offset": round(offset, 4),
                    "label": labels[c],
                    "index": int(c),
                    "score": float(framewise[on:off, c].max()),
                }
            )
    events.sort(key=lambda e: (e["onset"], -e["score"]))
    return events


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------


def sed_figure(
    result: SedResult,
    labels: Sequence[str],
    *,
    top_k: int = 10,
    logmel: Optional[np.ndarray] = None,
) -> Figure:
    """The paper's SED figure as a :class:`matplotlib.figure.Figure` (Agg canvas): log-mel
    on top, the top-k classes' probabilities below.

    A figure of its own, not pyplot's: drawing it changes no global matplotlib state (backend,
    current figure), so notebooks and GUI programs keep theirs. Classes are ranked by their
    maximum over time. Long recordings are drawn at most ~4000 columns wide (max over
    groups of frames, mean for the log-mel).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = np.argsort(-result.framewise.max(axis=0), kind="stable")[:top_k]
    activity = _pool_columns(result.framewise[:, top], np.max)
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=False)
    if logmel is not None:
        image = _pool_columns(logmel, np.mean)
        axes[0].imshow(
            image.T,
            origin="lower",
            aspect="auto",
            cmap="jet",
            extent=(0, result.duration, 0, logmel.shape[1]),
        )
        axes[0].set_ylabel("mel bins")
    axes[0].set_title(f"log-mel spectrogram: {os.path.basename(result.source)}")
    axes[0].set_xlim(0, result.duration)
    axes[1].imshow(
        activity.T,
        origin="upper",
        aspect="auto",
        cmap="jet",
        vmin=0,
        vmax=1,
        extent=(0, result.duration, len(top), 0),
        interpolation="nearest",
    )
    axes[1].set_yticks(np.arange(len(top)) + 0.5)
    axes[1].set_yticklabels([labels[i] for i in top])
    axes[1].set_xlabel("seconds")
    axes[1].set_title("framewise probabilities of the top classes")
    fig.tight_layout()
    return fig


def plot_sed(
    result: SedResult,
    path: str,
    labels: Sequence[str],
    *,
    top_k: int = 10,
    logmel: Optional[np.ndarray] = None,
) -> str:
    """Write :func:`sed_figure` to ``path`` as PNG (100 dpi); returns ``path``."""
    fig = sed_figure(result, labels, top_k=top_k, logmel=logmel)
    fig.savefig(path, format="png", dpi=100)
    return path


def _pool_columns(
    x: np.ndarray, reduce: Callable[..., np.ndarray], max_columns: int = 4000
) -> np.ndarray:
    factor = -(-len(x) // max_columns)
    if factor <= 1:
        return x
    pad = (-len(x)) % factor
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return reduce(x.reshape(-1, factor, *x.shape[1:]), axis=1)


def streamed_logmel(
    source: Union[str, np.ndarray],
    sample_rate: int,
    config: fe.FrontendConfig,
    block_s: float = 60.0,
) -> np.ndarray:
    """Log-mel ``(frames, mel_bins)`` of a recording for plots, computed block by block
    (bounded memory for hour-long files)."""
    block = int(block_s * sample_rate)
    hop = config.hop_size
    parts, frames_so_far = [], 0
    for chunk in audio.iter_chunks(source, sample_rate, block, block, align=hop):
        x = chunk.samples
        if len(x) < config.window_size:
            x = np.pad(x, (0, config.window_size - len(x)))
        frames = np.asarray(_jit_logmel(x[None], config))[0]
        part = frames[max(frames_so_far - chunk.start // hop, 0) :]
        parts.append(part)
        frames_so_far += len(part)
    return np.concatenate(parts)


# One compiled front end per (config, block length) for every file plotted, not one per call.
_jit_logmel = jax.jit(lambda x, config: fe.logmel(x, config), static_argnums=1)
