"""Model checkpoints: a directory with the variables and what built them (JSON).

    DIR/panns_jax.json   {"format": 1, "model": "Cnn14", "overrides": {...}, "step": 0,
                          "labels": null | [class names], "digest": "sha256:...",
                          "extra": {...}}
    DIR/variables/       orbax checkpoint of {'params', 'batch_stats'}: the weights
    DIR/weights.bin      the same arrays in one file (:mod:`panns_jax.weightfile`)
    DIR/verified.json    when the weights were last verified: each file's stat

Written atomically: everything goes to a temporary sibling directory that is renamed
into place only when complete, so a crash or an error never leaves a half checkpoint.
Replacing an existing checkpoint swaps the two directories in one ``renameat2``
(``RENAME_EXCHANGE``, Linux) where available, so ``DIR`` always names a complete
checkpoint, the old or the new one. Files and directories get the usual modes
(``0o666`` / ``0o777`` less the umask), not ``mkdtemp``'s private ``0o700``.

Integrity: ``digest`` is a SHA-256 of every weight (path, dtype, shape, bytes), so a
flipped bit is an error rather than NaN probabilities. ``panns_jax.json`` is validated
(keys, types, overrides that build the model, weights whose shapes fit it) with one-line
errors naming the file. Verifying costs a full read of the orbax data, the digest and a
trace of the model, so it is done once per change of the files: ``verified.json`` records
the digest it checked and the size, times (``mtime``, ``ctime``), inode and device of
``panns_jax.json``, ``weights.bin`` and every file under ``variables/``. While all of them
are as recorded, :func:`load` reads ``weights.bin`` alone (one read, no hash). When any of
them changed (a copy, an edit, a truncation), or the record is missing, the orbax data is
read and every check runs: the digest of the orbax weights and of ``weights.bin``, and the
shapes; a damaged file of either is one :class:`CheckpointError` line. The record is then
written again, in the checkpoint directory, or where that is read-only in the directory
:func:`load` is given as ``records`` (the loader's: ``verified/`` in the user cache). A
change that keeps a file's size, times and inode is not seen (``ctime`` cannot be set back
by hand); a file written within :data:`RACY_NS` of the record is never trusted by it.
Checkpoints written before ``weights.bin`` existed load through orbax, and their record
skips the digest and shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from panns_jax import fileio, weightfile

METADATA_FILE = "panns_jax.json"
VARIABLES_DIR = "variables"
WEIGHTS_FILE = "weights.bin"
STAMP_FILE = "verified.json"
# A file changed less than this after a record was taken could keep its recorded times
# (file times tick coarsely), so such a record is not trusted.
RACY_NS = 20_000_000
FORMAT_VERSION = 1
COLLECTIONS = ("params", "batch_stats")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names it and the reason."""


@dataclasses.dataclass
class ModelCheckpoint:
    """A model's name, its registry overrides, its variables and its training step.

    ``extra`` is free JSON metadata stored with the weights (e.g. the score that made
    a checkpoint the best), so that both are replaced together.
    """

    model: str
    variables: Dict[str, Any]
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0
    labels: Optional[List[str]] = None  # Class names, when not AudioSet's 527.
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def build_model(self) -> Any:  # A flax module (models imports this module).
        from panns_jax import models

        return models.get(self.model, **self.overrides)


def _encode_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-able overrides: a FrontendConfig becomes {"frontend": {...fields}}."""
    from panns_jax.frontend import FrontendConfig

    encoded = {}
    for key, value in overrides.items():
        if isinstance(value, FrontendConfig):
            value = {"__frontend__": dataclasses.asdict(value)}
        elif isinstance(value, tuple):
            value = list(value)
        encoded[key] = value
    return encoded


def _decode_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    from panns_jax.frontend import FrontendConfig

    decoded = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "__frontend__" in value:
            value = FrontendConfig(**value["__frontend__"])
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        decoded[key] = value
    return decoded


def parse_overrides(text: str) -> Dict[str, Any]:
    """A command line's ``--overrides '{"widths": [16, 32, 64, 128]}'`` -> registry overrides.

    Lists become tuples, as :func:`load` decodes them. Bad text raises
    ``argparse.ArgumentTypeError``, which argparse prints as one usage line.
    """
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"num_classes\": 10}'")
    try:
        return _decode_overrides(value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"bad overrides ({err})") from None


def is_model_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def _leaves(variables: Mapping[str, Any]) -> Iterator[Tuple[Tuple[str, ...], np.ndarray]]:
    """``((collection, *path), array)`` of the ``params`` and ``batch_stats`` leaves, in the
    digest's order (collections in :data:`COLLECTIONS` order, paths sorted as joined by /)."""
    import flax

    for collection in COLLECTIONS:
        flat = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path in sorted(flat, key="/".join):
            yield (collection, *path), np.asarray(flat[path])


def _digest(leaves: Iterator[Tuple[Tuple[str, ...], np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for key, value in leaves:
        value = np.ascontiguousarray(value)
        digest.update(f"{'/'.join(key)}|{value.dtype.str}|{value.shape}\n".encode())
        digest.update(memoryview(value.reshape(-1).view(np.uint8)))
    return "sha256:" + digest.hexdigest()


def weights_digest(variables: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the ``params`` and ``batch_stats`` leaves: path, dtype, shape, bytes."""
    return _digest(_leaves(variables))


def _make_dir(parent: str, prefix: str) -> str:
    """A new directory with the umask's mode (``mkdtemp`` would make it 0o700)."""
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a staging directory in {parent}")


def _this_process_checkpointer():
    """An orbax checkpointer that involves this process only.

    Model checkpoints hold host numpy arrays, and one process writes them. Orbax's default
    checkpointer waits at a barrier for every process of a multi-host job, which would
    deadlock when process 0 alone exports ``best``.
    """
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def _discard(staging: str, checkpointer: Any, quiet: float = 0.5, limit: float = 30.0) -> None:
    """Remove the staging directory of a failed save, and keep it removed.

    When one of orbax's writes fails, the others may still be in flight: the checkpointer
    is closed first (it waits for its own thread), but tensorstore's writes run on threads
    of their own and can create files in ``staging`` after the error surfaced, even while
    it is being removed. So it is removed again until it has stayed absent for ``quiet``
    seconds, ``limit`` seconds at most; the error path alone pays this.
    """
    if checkpointer is not None:
        with contextlib.suppress(Exception):  # It re-raises the write's error.
            checkpointer.close()
    deadline = time.monotonic() + limit
    while True:
        shutil.rmtree(staging, ignore_errors=True)
        time.sleep(quiet)
        if not os.path.lexists(staging) or time.monotonic() > deadline:
            return


def save(path: str, checkpoint: ModelCheckpoint, *, overwrite: bool = False) -> str:
    """Write ``checkpoint`` to directory ``path`` atomically; returns the absolute path.

    ``overwrite`` replaces an existing panns_jax checkpoint only. Any other existing path
    is refused, so a typo cannot delete a directory of other files.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if not is_model_checkpoint(path):
            raise FileExistsError(
                f"{path} exists and is not a panns_jax checkpoint (no "
                f"{METADATA_FILE}); refusing to replace it: choose another "
                "output path or remove it yourself"
            )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = _make_dir(parent, f".{os.path.basename(path)}.tmp-")
    checkpointer = None
    try:
        variables = {k: v for k, v in checkpoint.variables.items() if k in COLLECTIONS}
        checkpointer = _this_process_checkpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        leaves = list(_leaves(variables))
        if all(weightfile.supported(value) for _, value in leaves):  # Not bfloat16 weights.
            weightfile.write(os.path.join(staging, WEIGHTS_FILE), leaves)
        metadata = {
            "format": FORMAT_VERSION,
            "model": checkpoint.model,
            "overrides": _encode_overrides(checkpoint.overrides),
            "step": int(checkpoint.step),
            "labels": checkpoint.labels,
            "digest": _digest(iter(leaves)),
        }
        if checkpoint.extra:
            metadata["extra"] = checkpoint.extra
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _record_verified(staging, metadata["digest"], wait=True)
        fileio.replace_dir(staging, path)
    except BaseException as err:
        _discard(staging, checkpointer)
        code = re.search(r"os_error_code='(\d+)'", str(err))
        if not isinstance(err, OSError) and code:
            # tensorstore reports a full disk (ENOSPC), a size limit... as a ValueError
            # with the errno inside: say it as the OS would, in one line.
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), parent) from None
        raise
    return path


def read_metadata(path: str) -> Dict[str, Any]:
    """``panns_jax.json`` of checkpoint ``path``, validated; :class:`CheckpointError` if bad."""
    file = os.path.join(path, METADATA_FILE)
    where = f"{file}:"
    fix = "restore it from a copy or re-create the checkpoint"
    try:
        with open(file, encoding="utf-8") as f:
            metadata = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where} not valid JSON ({err}); {fix}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{where} expected a JSON object, got a {type(metadata).__name__}; {fix}"
        )
    if "model" not in metadata:
        raise CheckpointError(f"{where} missing key 'model' (the architecture name); {fix}")
    checks = [
        ("model", str, "a model name"),
        ("overrides", dict, "an object"),
        ("step", int, "an integer"),
        ("labels", (list, type(None)), "a list or null"),
        ("digest", str, "a string"),
        ("extra", dict, "an object"),
    ]
    for key, kind, what in checks:
        if key in metadata and (
            not isinstance(metadata[key], kind) or isinstance(metadata[key], bool)
        ):
            raise CheckpointError(
                f"{where} '{key}' must be {what}, got {json.dumps(metadata[key])[:80]}; {fix}"
            )
    version = metadata.get("format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} format {version!r} is not one this version reads "
            f"({FORMAT_VERSION}); upgrade panns_jax or re-create it"
        )
    labels = metadata.get("labels")
    if labels is not None and not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"{where} 'labels' must be a list of strings; {fix}")
    return metadata


def _build(path: str, name: str, overrides: Dict[str, Any]):
    from panns_jax import models

    try:
        return models.get(name, **overrides)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{os.path.join(path, METADATA_FILE)}: model {name!r} with "
            f"overrides {overrides} cannot be built ({message}); fix the "
            "overrides or re-create the checkpoint"
        ) from None


def _check_shapes(path: str, name: str, model: Any, variables: Mapping[str, Any]) -> None:
    """The weights must have the shapes the model (with its overrides) declares."""
    import flax
    import jax

    from panns_jax import models

    try:
        want = jax.eval_shape(lambda: models.init(model, jax.random.key(0)))
    except Exception as err:  # Overrides that build a module but not a network.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{os.path.join(path, METADATA_FILE)}: {name} with these "
            f"overrides cannot run ({type(err).__name__}: {message}); fix "
            "the overrides or re-create the checkpoint"
        ) from None
    for collection in COLLECTIONS:
        want_flat = flax.traverse_util.flatten_dict(dict(want.get(collection, {})), sep="/")
        got_flat = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})), sep="/")
        for key in sorted(set(want_flat) | set(got_flat)):
            w = tuple(want_flat[key].shape) if key in want_flat else None
            g = tuple(np.shape(got_flat[key])) if key in got_flat else None
            if w != g:
                detail = (
                    f"has no {collection}/{key}"
                    if g is None
                    else f"has an unexpected {collection}/{key}"
                    if w is None
                    else f"{collection}/{key} is {g}, {name} expects {w}"
                )
                raise CheckpointError(
                    f"{path}: the weights do not fit {name} with the overrides in "
                    f"{METADATA_FILE} (the checkpoint {detail}); were the overrides edited? "
                    "Restore the original panns_jax.json"
                )


def load(path: str, *, verify: bool = True, records: Optional[str] = None) -> ModelCheckpoint:
    """Read a checkpoint written by :func:`save` (variables as numpy arrays).

    Damaged metadata, weights that fail their digest, and overrides that do not fit the
    weights each raise one :class:`CheckpointError` line (a ``ValueError``). The checks
    run once per change of the files (see the module docstring); ``verify=False`` skips
    them, and reads ``weights.bin`` only where a record vouches for it, else orbax.
    ``records`` is a directory for the records of checkpoints in read-only directories
    (the loader gives ``verified/`` in the user cache).
    """
    path = os.path.abspath(path)
    if not is_model_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a panns_jax checkpoint (no {METADATA_FILE}); convert an original "
            "PyTorch checkpoint with `panns-jax-convert from-torch CKPT.pth --model NAME "
            "--out DIR`"
        )
    metadata = read_metadata(path)
    name = metadata["model"]
    overrides = _metadata_overrides(path, metadata)
    model = _build(path, name, overrides)
    labels = metadata.get("labels")
    classes = getattr(model, "num_classes", None)
    if labels is not None and classes is not None and len(labels) != classes:
        raise CheckpointError(
            f"{os.path.join(path, METADATA_FILE)}: {len(labels)} labels for "
            f"a {classes}-class model; fix 'labels' or re-create the checkpoint"
        )
    variables = _variables(path, metadata, model, verify, records)
    return ModelCheckpoint(
        model=name,
        variables=variables,
        overrides=overrides,
        step=metadata.get("step", 0),
        labels=labels,
        extra=metadata.get("extra", {}),
    )


def _metadata_overrides(path: str, metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """The registry overrides that ``panns_jax.json`` records, decoded."""
    try:
        return _decode_overrides(metadata.get("overrides", {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{os.path.join(path, METADATA_FILE)}: bad overrides ({err}); "
            "fix them or re-create the checkpoint"
        ) from None


def _restore_variables(path: str) -> Dict[str, Any]:
    """The weights under ``variables/``, read by orbax; damage is one CheckpointError."""
    variables_dir = os.path.join(path, VARIABLES_DIR)
    if not os.path.isdir(variables_dir):
        raise CheckpointError(
            f"{path}: no {VARIABLES_DIR}/ directory (the weights are missing); "
            "restore the checkpoint from a copy"
        )
    try:
        variables = _this_process_checkpointer().restore(variables_dir)
    except Exception as err:  # orbax/tensorstore errors on damaged files.
        message = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{path}: the weights cannot be read ({type(err).__name__}: "
            f"{message[:200]}); restore the checkpoint from a copy"
        ) from None
    return {k: v for k, v in variables.items()}


# ----------------------------------------------------------------------------
# Reading the weights: the verified fast file, or orbax with every check.
# ----------------------------------------------------------------------------


def _variables(
    path: str, metadata: Mapping[str, Any], model: Any, verify: bool, records: Optional[str]
) -> Dict[str, Any]:
    """The weights of checkpoint ``path``: ``weights.bin`` while a record says the files are
    the ones verified, else orbax's, checked (``verify``) and recorded."""
    expected = metadata.get("digest")
    if _verified(path, expected, records):
        if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
            return _read_weights_file(path)
        return _restore_variables(path)
    variables = _restore_variables(path)
    if not verify:
        return variables
    got = weights_digest(variables)
    if expected is not None and got != expected:
        raise CheckpointError(
            f"{path}: the weights do not match the digest in "
            f"{METADATA_FILE}: the files are damaged (e.g. a flipped bit); "
            "restore the checkpoint from a copy"
        )
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        copy = _read_weights_file(path)
        if weights_digest(copy) != got:
            raise CheckpointError(
                f"{os.path.join(path, WEIGHTS_FILE)}: the weights do not match the digest in "
                f"{METADATA_FILE}: the file is damaged (e.g. a flipped bit); restore the "
                "checkpoint from a copy"
            )
    _check_shapes(path, metadata["model"], model, variables)
    _record_verified(path, expected, records)
    return variables


def _read_weights_file(path: str) -> Dict[str, Any]:
    """The variables in ``weights.bin``; a damaged file is one :class:`CheckpointError`."""
    import flax

    file = os.path.join(path, WEIGHTS_FILE)
    try:
        leaves = weightfile.read(file)
    except weightfile.WeightFileError as err:
        raise CheckpointError(f"{file}: {err}; restore the checkpoint from a copy") from None
    flat = {key: value for key, value in leaves}
    unknown = sorted("/".join(k) for k in flat if k[0] not in COLLECTIONS)
    if unknown or len(flat) != len(leaves):
        raise CheckpointError(
            f"{file}: holds {unknown[0] if unknown else 'a repeated array'}, not a weight of "
            f"{'/'.join(COLLECTIONS)}; restore the checkpoint from a copy"
        )
    return dict(flax.traverse_util.unflatten_dict(flat))


def _stamped_files(path: str) -> Dict[str, List[int]]:
    """``relative path -> [size, mtime_ns, ctime_ns, inode, device]`` of the files a record
    covers: the metadata, ``weights.bin`` and everything under ``variables/``."""
    names = [METADATA_FILE, WEIGHTS_FILE]
    for root, dirs, files in os.walk(os.path.join(path, VARIABLES_DIR)):
        dirs.sort()
        names += sorted(os.path.relpath(os.path.join(root, f), path) for f in files)
    found = {}
    for name in names:
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        found[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return found


def _record_paths(path: str, records: Optional[str]) -> Iterator[str]:
    """Where the record of ``path`` may be: in it, else (a read-only directory) in
    ``records`` under a name made from its real path."""
    yield os.path.join(path, STAMP_FILE)
    if records:
        key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
        yield os.path.join(records, key + ".json")


def _racy_ns(files: Dict[str, List[int]]) -> int:
    """How long after a record its files must be unchanged: :data:`RACY_NS`, or 2 s where
    the file system keeps whole seconds only (every ctime a whole second)."""
    if files and all(stat[2] % 1_000_000_000 == 0 for stat in files.values()):
        return 2_000_000_000
    return RACY_NS


def _record(digest: Optional[str], files: Dict[str, List[int]], taken_ns: int) -> Dict[str, Any]:
    # A layout of the weights that another model code expects is a new FORMAT_VERSION.
    return {"digest": digest, "format": FORMAT_VERSION, "taken_ns": taken_ns, "files": files}


def _verified(path: str, digest: Optional[str], records: Optional[str] = None) -> bool:
    """Whether a record says that the files of ``path`` are the ones verified for ``digest``."""
    files = None
    for place in _record_paths(path, records):
        try:
            with open(place, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("taken_ns"), int):
            continue
        files = _stamped_files(path) if files is None else files
        newest = max((stat[2] for stat in files.values()), default=0)
        taken = record["taken_ns"]
        if record == _record(digest, files, taken) and newest < taken - _racy_ns(files):
            return True
    return False


def _record_verified(
    path: str, digest: Optional[str], records: Optional[str] = None, *, wait: bool = False
) -> None:
    """Record that the files of ``path`` hold weights verified for ``digest``.

    Best effort: where neither the checkpoint directory nor ``records`` can be written,
    the next load verifies again. A file changed less than :func:`_racy_ns` ago makes the
    record untrustworthy; ``wait`` waits up to 40 ms for it (a fresh save), else nothing
    is recorded.
    """
    files = _stamped_files(path)
    newest = max((stat[2] for stat in files.values()), default=0)
    racy, taken = _racy_ns(files), time.time_ns()
    if newest >= taken - racy and wait and racy == RACY_NS:
        time.sleep(min(RACY_NS * 2, newest + RACY_NS * 2 - taken) / 1e9)
        taken = time.time_ns()
    if newest >= taken - racy:  # Just changed (or a clock ahead of ours): not now.
        return
    text = json.dumps(_record(digest, files, taken))
    for place in _record_paths(path, records):
        try:
            os.makedirs(os.path.dirname(place), exist_ok=True)
            with fileio.staged(place) as staging, open(staging, "w", encoding="utf-8") as f:
                f.write(text)
            return
        except OSError:
            continue
