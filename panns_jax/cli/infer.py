"""``panns-jax tag | sed | embed``: tagging, sound event detection and embeddings of files.

    panns-jax tag  rec.wav                  # pretrained Cnn14, downloaded once (panns_jax.zoo)
    panns-jax tag  rec.wav more/*.flac --checkpoint DIR --top-k 5 --format json
    panns-jax sed  rec.wav --checkpoint DIR --threshold 0.3 --output events.csv --plot-dir plots
    panns-jax embed audio_dir/ --checkpoint DIR --per-chunk --output emb.npz
    panns-jax tag  rec.wav --dtype bfloat16    # bf16 compute, float32 weights and front end
    panns-jax tag  rec.wav --no-compilation-cache   # compile afresh (also: ..._CACHE=0)

Every argument and output path is checked before a model is built or a sample computed;
outputs are written whole or not at all (:func:`panns_jax.fileio.staged`). The computation
is :mod:`panns_jax.tagger` and :mod:`panns_jax.sed`; this module only parses, checks and
writes. Exit status: 0, 1 when any file failed, 2 on bad setup.

These commands are programs, so they own JAX's process-wide settings: they turn on its
persistent compilation cache (:mod:`panns_jax.compile_cache`, in the user cache beside the
zoo) unless ``--no-compilation-cache`` or ``PANNS_JAX_COMPILATION_CACHE=0`` says otherwise,
so that a second run on the same model and input shape loads its programs instead of
compiling them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from panns_jax import audio, checks, compile_cache, loader, sed
from panns_jax.fileio import staged, write_probe
from panns_jax.kernels.onednn import OneDnnUnavailable
from panns_jax.models import backends
from panns_jax.models.backends import BACKENDS as CONV_BACKENDS
from panns_jax.scheduler import ChunkedOutput
from panns_jax.tagger import (
    DEFAULT_WINDOW_S,
    DTYPES,
    AudioTagger,
    aggregate_chunks,
    chunk_embeddings,
)

# Pretrained weights used when neither --checkpoint nor --model is given.
PRETRAINED_DEFAULT = {"tag": "Cnn14", "sed": "Cnn14_DecisionLevelMax", "embed": "Cnn14"}
Failures = List[Tuple[str, str]]  # (file, why) of every file that failed.


def expand_inputs(items: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Files named by paths, directories (searched recursively) and globs; plus errors."""
    files, errors = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.lower().endswith(audio.AUDIO_EXTENSIONS)
            )
            if not found:
                errors.append(
                    f"{item}: directory holds no audio files "
                    f"({', '.join(audio.AUDIO_EXTENSIONS[:4])}, ...)"
                )
            files += found
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: no files match")
            files += found
        else:
            files.append(item)  # Missing files are reported when read.
    return files, errors


def _add_common(parser: argparse.ArgumentParser, window_help: str, hop_help: str) -> None:
    parser.add_argument(
        "files", nargs="+", help="audio files, directories (searched recursively) or globs"
    )
    loader.add_arguments(
        parser,
        checkpoint_default="the pretrained --model, else Cnn14 (sed: Cnn14_DecisionLevelMax)",
        model_default="Cnn14",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="a randomly initialised --model instead of pretrained weights "
        "(its outputs are meaningless: to try the pipeline only)",
    )
    parser.add_argument("--window", type=float, default=None, help=window_help)
    parser.add_argument("--hop", type=float, default=None, help=hop_help)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="chunks of equal length run together (default 8)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        metavar="{" + ",".join(DTYPES) + "}",
        help="compute dtype (default float32); bfloat16 runs the network in bf16 from "
        "float32 weights after a float32 log-mel front end, with float32 outputs",
    )
    add_conv_backend_argument(parser)
    parser.add_argument(
        "--output", default=None, help="output file (see the format options), written when complete"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_cache_argument(parser)


def add_conv_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--conv-backend``, as every command and benchmark that runs a model declares it."""
    parser.add_argument(
        "--conv-backend",
        default="auto",
        choices=CONV_BACKENDS,
        help="the convolutions' kernels on CPU: auto (default) is onednn where oneDNN is "
        "installed (pip install 'panns-jax[onednn]'; built on first use; 1.1-1.6x faster where "
        "measured), else xla",
    )


def resolved_conv_backend(parser: argparse.ArgumentParser, name: str) -> str:
    """The backend ``--conv-backend name`` stands for here (``auto`` resolved, the kernel
    built); an unusable one is the parser's one-line error."""
    try:
        return backends.prepare(name)
    except (OneDnnUnavailable, ValueError) as err:
        parser.error(str(err))


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-compilation-cache``, as every command that runs a model declares it."""
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="compile afresh instead of reusing compiled programs from the user cache "
        f"(also {compile_cache.ENV}=0; default: cached in the zoo's cache dir, under xla/)",
    )


def add_commands(sub: Any) -> None:
    """The ``tag``, ``sed`` and ``embed`` subcommands, added to ``sub`` (the top parser's
    ``add_subparsers()``)."""
    chunk_help = (
        "chunk length in seconds (default 10); a recording no longer than this is "
        "processed whole, unpadded"
    )
    hop_help = "seconds between chunk starts (default: the window, i.e. no overlap)"

    tag = sub.add_parser("tag", help="top-k AudioSet labels of audio files")
    _add_common(tag, chunk_help, hop_help)
    tag.add_argument("--top-k", type=int, default=10)
    tag.add_argument(
        "--aggregate",
        choices=("max", "mean"),
        default="max",
        help="how chunk probabilities of a long recording combine (default max)",
    )
    tag.add_argument("--format", choices=("table", "json", "csv"), default="table")

    sed_cmd = sub.add_parser("sed", help="framewise probabilities, event segments (CSV) and plots")
    _add_common(
        sed_cmd,
        "decision-level models: chunk seconds (default 10); clip models: "
        "sliding-window seconds (default 1)",
        "decision-level models: chunk hop (default: the window); clip models: "
        "sliding-window hop (default 0.1)",
    )
    sed_cmd.add_argument(
        "--threshold",
        type=float,
        default=0.3,
        help="probability above which a frame is part of an event (default 0.3)",
    )
    sed_cmd.add_argument("--top-k", type=int, default=10, help="classes drawn in the plot")
    sed_cmd.add_argument("--plot-dir", default=None, help="write <name>.png SED figures here")
    sed_cmd.add_argument(
        "--framewise-dir", default=None, help="write <name>.npz (times, framewise, labels) here"
    )

    emb = sub.add_parser("embed", help="embeddings per clip or per chunk to .npy/.npz")
    _add_common(emb, chunk_help, hop_help)
    emb.add_argument(
        "--per-chunk",
        action="store_true",
        help="one embedding per chunk (default: the mean over chunks)",
    )
    emb.set_defaults(output="embeddings.npz")


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``tag``, ``sed`` or ``embed`` command; returns the exit status."""
    files, input_errors = expand_inputs(args.files)
    try:  # Everything is checked before a model is built or a sample computed.
        check_arguments(args)
        check_outputs(args, files)
        cached = wants_compilation_cache(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cached:
        enable_compilation_cache()
    for message in input_errors:
        print(f"error: {message}", file=sys.stderr)
    try:
        tagger = load(args)
    except (ValueError, FileNotFoundError, ImportError, OneDnnUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = {"tag": _tag, "sed": _sed, "embed": _embed}[args.command]
    try:
        failures = command(tagger, files, args)
    except OSError as err:  # Writing the outputs (a full disk, a vanished directory).
        print(
            f"error: cannot write the output: {_os_error(err)}; nothing was written",
            file=sys.stderr,
        )
        return 2
    total = len(files) + len(input_errors)
    if failures or input_errors:
        names = [f for f, _ in failures] + [m.split(":")[0] for m in input_errors]
        print(f"{len(names)} of {total} file(s) failed: {', '.join(names)}", file=sys.stderr)
        return 1
    return 0


def wants_compilation_cache(args: argparse.Namespace) -> bool:
    """Whether the command caches compiled programs: not ``--no-compilation-cache``, and the
    environment allows it (ValueError for a bad switch value)."""
    return not args.no_compilation_cache and compile_cache.wanted_by_environment()


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache on; a cache that cannot be made is a warning."""
    try:
        compile_cache.enable()
    except OSError as err:
        print(
            f"warning: no compilation cache ({_os_error(err)}); compiling afresh",
            file=sys.stderr,
        )


def resolve_weights(args: argparse.Namespace) -> Tuple[Optional[str], Optional[str]]:
    """``(checkpoint, model)`` for :meth:`AudioTagger.load`: pretrained unless told otherwise.

    ``--checkpoint`` as given; else the pretrained ``--model`` (or the command's default)
    from the zoo; random weights (checkpoint None) only with ``--random-weights``.
    """
    if args.random_weights:
        if args.checkpoint is not None:
            raise ValueError("--random-weights and --checkpoint exclude each other")
        return None, args.model
    if args.checkpoint is not None:
        return args.checkpoint, args.model
    from panns_jax import zoo

    name = args.model or PRETRAINED_DEFAULT[args.command]
    if not zoo.is_zoo_name(name):
        raise ValueError(
            f"no pretrained {name} in the zoo (`panns-jax download --list`); "
            "pass --checkpoint DIR_OR_PTH, or --random-weights to try the "
            "pipeline with random weights"
        )
    return name, None  # The loader refuses --overrides for it, before any download.


def load(args: argparse.Namespace) -> AudioTagger:
    """The tagger of the command's weights, with ``--window`` / ``--hop`` checked against
    the model; random weights are said on stderr."""
    checkpoint, model_name = resolve_weights(args)
    tagger = AudioTagger.load(
        checkpoint,
        model=model_name,
        overrides=args.overrides,
        batch_size=args.batch_size,
        dtype=args.dtype,
        conv_backend=args.conv_backend,
    )
    if args.window is not None:  # The model must take a window (tag / embed chunks).
        tagger.window_samples(args.window, "--window")
    if args.hop is not None:
        tagger.hop_samples(args.hop, "--hop")
    if not tagger.pretrained:
        print(
            f"warning: --random-weights: {tagger.model_name} is randomly initialised, so its "
            "outputs are meaningless (this demonstrates the pipeline only)",
            file=sys.stderr,
        )
    return tagger


def check_arguments(args: argparse.Namespace) -> None:
    """Ranges of the numeric options and the compute dtype; ValueError naming the option."""
    checks.batch_size(args.batch_size)
    checks.compute_dtype(args.dtype, "--dtype")
    if args.window is not None:
        checks.positive_seconds(args.window, "--window")
    if args.hop is not None:
        checks.hop_seconds(args.hop, "--hop")
    if getattr(args, "top_k", None) is not None:
        checks.top_k(args.top_k)
    if getattr(args, "threshold", None) is not None:
        checks.probability(args.threshold, "threshold")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_writable_dir(directory: str, what: str) -> None:
    """``directory`` exists and a file can be created in it (tried, then removed)."""
    directory = directory or "."
    if not os.path.isdir(directory):
        raise ValueError(f"{what}: directory {directory} does not exist; create it first")
    try:
        write_probe(directory)
    except OSError as err:
        raise ValueError(f"{what}: cannot write in {directory} ({_os_error(err)})") from None


def check_outputs(args: argparse.Namespace, inputs: Sequence[str]) -> None:
    """Output paths must be writable and none may be an input: checked before computing."""
    outputs = [("--output", args.output, "file")]
    if args.command == "sed":
        outputs += [
            ("--plot-dir", args.plot_dir, "dir"),
            ("--framewise-dir", args.framewise_dir, "dir"),
        ]
    if args.command == "embed" and not args.output.endswith((".npz", ".npy")):
        raise ValueError(
            f"--output {args.output}: embeddings are written as .npz (with file "
            "names) or .npy (the array only); end the name with one of those"
        )
    for option, path, kind in outputs:
        if not path:
            continue
        what = f"{option} {path}"
        for source in inputs:
            if _same_file(path, source):
                raise ValueError(f"{what} is also an input; choose another output path")
        if kind == "file":
            if os.path.isdir(path):
                raise ValueError(f"{what} is a directory; give a file name")
            _check_writable_dir(os.path.dirname(os.path.abspath(path)), what)
        elif os.path.exists(path):
            if not os.path.isdir(path):
                raise ValueError(f"{what} exists and is not a directory")
            _check_writable_dir(path, what)
        else:  # Created after the checks; its parent must exist.
            _check_writable_dir(os.path.dirname(os.path.abspath(path)), what)


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")


def _results(
    tagger: AudioTagger, files: List[str], args: argparse.Namespace, keys: Sequence[str]
) -> Iterator[ChunkedOutput]:
    """The chunk outputs ``keys`` of every file, in order, with ``--window`` / ``--hop``."""
    window_s = args.window or DEFAULT_WINDOW_S
    progress = not args.no_progress
    return tagger.run(files, keys, window_s=window_s, hop_s=args.hop, progress=progress)


def _report(result: ChunkedOutput, failures: Failures) -> bool:
    """Print the file's error (recorded in ``failures``) or its warnings; whether it
    succeeded."""
    if result.error:
        failures.append((result.source, result.error))
        print(f"error: {result.error}", file=sys.stderr)
        return False
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return True


@contextlib.contextmanager
def _open_output(path: Optional[str]) -> Iterator[Any]:
    """``path`` opened for writing (replaced only when complete), or stdout."""
    if path:
        with staged(path) as staging, open(staging, "w", newline="") as f:
            yield f
    else:
        yield sys.stdout
        sys.stdout.flush()


# ----------------------------------------------------------------------------- tag


def _tag(tagger: AudioTagger, files: List[str], args: argparse.Namespace) -> Failures:
    failures: Failures = []
    rows = []
    for result in _results(tagger, files, args, ["clipwise_output"]):
        if _report(result, failures):
            probabilities = aggregate_chunks(result.outputs["clipwise_output"], args.aggregate)
            rows.append(
                {
                    "file": result.source,
                    "duration_s": round(result.num_samples / tagger.sample_rate, 4),
                    "chunks": len(result.starts),
                    "labels": tagger.top_labels(probabilities, args.top_k),
                }
            )
    with _open_output(args.output) as out:
        {"json": _write_json, "csv": _write_csv, "table": _write_table}[args.format](rows, out)
    return failures


def _write_json(rows: List[Dict[str, Any]], out: Any) -> None:
    json.dump(rows, out, indent=2, allow_nan=False)  # Non-finite rows failed before.
    out.write("\n")


def _write_csv(rows: List[Dict[str, Any]], out: Any) -> None:
    writer = csv.writer(out)
    writer.writerow(["file", "rank", "index", "label", "probability"])
    for r in rows:
        for rank, row in enumerate(r["labels"], start=1):
            writer.writerow(
                [r["file"], rank, row["index"], row["label"], f"{row['probability']:.6f}"]
            )


def _write_table(rows: List[Dict[str, Any]], out: Any) -> None:
    for r in rows:
        out.write(f"{r['file']}  ({r['duration_s']:.2f} s, {r['chunks']} chunk(s))\n")
        for row in r["labels"]:
            out.write(f"  {row['probability']:.3f}  {row['label']}\n")


# ----------------------------------------------------------------------------- sed


def _stem(path: str, used: set) -> str:
    """``name`` of ``dir/name.ext``, made unique among the names in ``used``
    (``a/x.wav``, ``b/x.wav``, ``c/x_2.wav`` -> ``x``, ``x_2``, ``x_2_2``)."""
    stem = os.path.splitext(os.path.basename(path))[0] or "audio"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _sed(tagger: AudioTagger, files: List[str], args: argparse.Namespace) -> Failures:
    """Events of every file to one CSV; per file, frames (``--framewise-dir``) and a plot
    (``--plot-dir``) under a name unique among the files."""
    failures: Failures = []
    settings = tagger.sed_settings(args.window, args.hop)
    for directory in (args.plot_dir, args.framewise_dir):
        if directory:
            os.makedirs(directory, exist_ok=True)
    used: set = set()
    with _open_output(args.output) as out:
        writer = csv.writer(out)
        writer.writerow(["file", "onset", "offset", "label", "index", "score"])
        progress = not args.no_progress
        for result in tagger.run(files, [tagger.sed_key], progress=progress, **settings):
            if not _report(result, failures):
                continue
            found = tagger.sed_result(result, args.threshold)
            writer.writerows(_event_rows(found))
            stem = _stem(found.source, used) if (args.plot_dir or args.framewise_dir) else ""
            if args.framewise_dir:
                _save_frames(found, tagger.labels, os.path.join(args.framewise_dir, f"{stem}.npz"))
            if args.plot_dir:
                path = os.path.join(args.plot_dir, f"{stem}.png")
                _save_plot(tagger, found, path, args.top_k, failures)
    return failures


def _event_rows(found: sed.SedResult) -> List[List[Any]]:
    """CSV rows ``file, onset, offset, label, index, score`` of the events of one file."""
    return [
        [found.source, f"{e['onset']:.3f}", f"{e['offset']:.3f}", e["label"], e["index"]]
        + [f"{e['score']:.4f}"]
        for e in found.events
    ]


def _save_frames(found: sed.SedResult, labels: Sequence[str], path: str) -> None:
    with staged(path) as staging, open(staging, "wb") as f:
        np.savez(
            f,
            times=found.times,
            framewise=found.framewise,
            labels=np.asarray(labels),
            source=np.asarray(found.source),
        )


def _save_plot(
    tagger: AudioTagger, found: sed.SedResult, path: str, top_k: int, failures: Failures
) -> None:
    """The SED figure of ``found`` as PNG; a file that cannot be drawn is a failure."""
    try:
        logmel = sed.streamed_logmel(found.source, tagger.sample_rate, tagger.model.frontend)
        with staged(path) as staging:
            sed.plot_sed(found, staging, tagger.labels, top_k=top_k, logmel=logmel)
    except (audio.AudioError, OSError) as err:
        failures.append((found.source, str(err)))
        print(f"error: {found.source}: plot failed ({err})", file=sys.stderr)


# --------------------------------------------------------------------------- embed


def _embed(tagger: AudioTagger, files: List[str], args: argparse.Namespace) -> Failures:
    failures: Failures = []
    names, embeddings, file_index, starts = [], [], [], []
    for result in _results(tagger, files, args, [tagger.embedding_key]):
        if not _report(result, failures):
            continue
        chunks = chunk_embeddings(result.outputs[tagger.embedding_key])
        if args.per_chunk:
            embeddings.append(chunks)
            file_index += [len(names)] * len(chunks)
            starts += list(result.starts / tagger.sample_rate)
        else:
            embeddings.append(chunks.mean(axis=0, keepdims=True))
        names.append(result.source)
    if embeddings:
        array = np.concatenate(embeddings).astype(np.float32)
        chunks_of = {}
        if args.per_chunk:
            chunks_of = dict(
                file_index=np.asarray(file_index, np.int64), start_s=np.asarray(starts, np.float64)
            )
        _save_embeddings(args.output, array, names, chunks_of)
    return failures


def _save_embeddings(
    output: str, array: np.ndarray, names: List[str], chunks_of: Dict[str, np.ndarray]
) -> None:
    """``.npy``: the array only; ``.npz``: with the file names (and the chunks' files and
    start times)."""
    with staged(output) as staging, open(staging, "wb") as f:
        if output.endswith(".npy"):
            np.save(f, array)
        else:
            np.savez(f, embeddings=array, files=np.asarray(names), **chunks_of)
    print(f"wrote {array.shape} embeddings of {len(names)} file(s) to {output}", file=sys.stderr)
