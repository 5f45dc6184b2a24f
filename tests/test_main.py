"""Bad training configs through the real entry point ``python -m panns_jax.main``.

Each ends in exit status 2 with one ``error:`` line naming the field and what it must be
(:mod:`panns_jax.config_checks`), before anything is compiled, and leaves the disk as it is.

Each case runs ``panns_jax.main`` as ``__main__`` (absl flag parsing, config file loading,
``app.run``) in a process forked from a server that has imported JAX and the training code
once, so that a case costs a fraction of a second instead of an interpreter start; one case
runs in a fresh ``python -m panns_jax.main`` to show the two agree.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=tests/train_config.py"
ESC50 = "--config=configs/esc50.py"
# Lines absl's logging writes to stderr (INFO about the JAX backend): not part of the message.
# TensorFlow's C++ logging (imported by the data pipeline) adds this line before its own.
LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d[.\d]* +\d+ |^WARNING: All log messages "
    r"before absl::InitializeLog\(\) is called are written to STDERR$"
)

CASES = [  # (id, flags, expected message, after "error: ").
    (
        "checkpoint_every=0",
        [TINY, "--config.checkpoint_every=0"],
        r"config\.checkpoint_every must be an integer >= 1 .*, got 0",
    ),
    (
        "log_every=0",
        [TINY, "--config.log_every=0"],
        r"config\.log_every must be an integer >= 1 .*, got 0",
    ),
    (
        "eval_every<0",
        [TINY, "--config.eval_every=-1"],
        r"config\.eval_every must be an integer >= 0 .*, got -1",
    ),
    (
        "batch_size=-1",
        [TINY, "--config.batch_size=-1"],
        r"config\.batch_size must be an integer >= 1 .*, got -1",
    ),
    (
        "batch_size=0",
        [TINY, "--config.batch_size=0"],
        r"config\.batch_size must be an integer >= 1 .*, got 0",
    ),
    (
        "eval_batch_size=0",
        [TINY, "--config.eval_batch_size=0"],
        r"config\.eval_batch_size must be an integer >= 1, got 0",
    ),
    (
        "num_train_steps=0",
        [TINY, "--config.num_train_steps=0"],
        r"config\.num_train_steps must be an integer >= 1, got 0",
    ),
    (
        "num_train_steps<0",
        [TINY, "--config.num_train_steps=-5"],
        r"config\.num_train_steps must be an integer >= 1, got -5",
    ),
    (
        "clip_seconds=0",
        [TINY, "--config.clip_seconds=0"],
        r"config\.clip_seconds must be a finite number of seconds > 0, got 0\.0",
    ),
    (
        "clip_seconds=nan",
        [TINY, "--config.clip_seconds=nan"],
        r"config\.clip_seconds must be a finite number of seconds > 0, got nan",
    ),
    (
        "learning_rate=nan",
        [TINY, "--config.learning_rate=nan"],
        r"config\.learning_rate must be a finite number > 0, got nan",
    ),
    (
        "learning_rate=inf",
        [TINY, "--config.learning_rate=inf"],
        r"config\.learning_rate must be a finite number > 0, got inf",
    ),
    (
        "learning_rate<0",
        [TINY, "--config.learning_rate=-0.001"],
        r"config\.learning_rate must be a finite number > 0, got -0\.001",
    ),
    (
        "mixup name",
        [TINY, "--config.mixup=time"],
        r"config\.mixup must be 'none', 'logmel' or 'wave', got 'time'",
    ),
    (
        "conv_backend name",
        [TINY, "--config.conv_backend=mkl"],
        r"config\.conv_backend must be 'auto' or 'xla' or 'onednn', got 'mkl'",
    ),
    (
        "task name",
        [TINY, "--config.task=regression"],
        r"config\.task must be one of \['multilabel', 'singlelabel'\], got 'regression'",
    ),
    (
        "unknown model",
        [TINY, "--config.model=Cnn15"],
        r"config\.model 'Cnn15' is not a registered model \(did you mean Cnn14.*\); .*",
    ),
    (
        "batch over devices",
        [TINY, "--config.batch_size=3", "--config.num_devices=4"],
        r"config\.batch_size 3 \(6 clips per step\) must divide over the 4 devices: use a "
        r"multiple of 2",
    ),
    (
        "fold=99",
        [ESC50 + ":fold=99"],
        r"flag --config=configs/esc50\.py:fold=99: fold must be in 1\.\.5, got 99",
    ),
    ("fold=-3", [ESC50 + ":fold=-3"], r"flag .*: fold must be in 1\.\.5, got -3"),
    (
        "eval_folds=(99,)",
        [ESC50 + ":strategy=scratch", "--config.eval_folds=(99,)"],
        r"config\.eval_folds must hold folds in 1\.\.5, got \(99,\)",
    ),
    (
        "strategy name",
        [ESC50 + ":strategy=linear_probe"],
        r"flag .*: strategy must be one of \('scratch', 'finetune', 'freeze_l1', 'freeze_l3'\), "
        r"got 'linear_probe'",
    ),
    (
        "missing pretrained",
        [ESC50 + ":strategy=freeze_l3", "--config.transfer.checkpoint=/nonexistent/best"],
        r"config\.transfer\.checkpoint /nonexistent/best: no such checkpoint directory, "
        r"\.pth file or released model \(panns-jax download --list\)",
    ),
    (
        "unknown dataset",
        [TINY, "--config.dataset=esc51/32k", "--config.data_dir={disk}"],
        r"config\.dataset 'esc51/32k': Dataset esc51 not found\.",
    ),
    (
        "unknown sample rate",
        [TINY, "--config.dataset=esc50/44k", "--config.data_dir={disk}"],
        r"config\.dataset 'esc50/44k': BuilderConfig 44k not found with version 1\.0\.0 "
        r"\(panns_jax builders have 32k, 16k, 8k\)",
    ),
    (
        "dataset not built",
        [ESC50 + ":strategy=scratch", "--config.data_dir={disk}"],
        r"config\.dataset 'esc50/32k': esc50/32k is not prepared in .*: Unzip https://github"
        r"\.com/karolpiczak/ESC-50/archive/master\.zip into manual_dir .*",
    ),
    (
        "unknown config argument",
        ["--config=configs/cnn14.py:mixup=logmel,sr=44k"],
        r"flag .*: sr must be one of \['16k', '32k', '8k'\], got '44k'",
    ),
]


def _run_main(argv, out_dir: str, module: str = "panns_jax.main") -> None:
    """Forked child: ``python -m MODULE ARGV`` with stdout/stderr to files."""
    import runpy

    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(ROOT)
    sys.argv = [module] + list(argv)
    import warnings

    # The server preloaded panns_jax.transfer (through train); a fresh `python -m` hasn't.
    warnings.filterwarnings("ignore", ".*found in sys.modules after import", RuntimeWarning)
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # A traceback is a failure of the test: keep it.
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def main_server():
    """Forks ``panns_jax.main`` runs from a process that has imported the training code."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["jax", "optax", "flax.linen", "panns_jax.train"])
    return context


def _tree(path: str):
    """Every path below ``path`` with a digest of its contents (dirs: None)."""
    state = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            state[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                state[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(
                    fh.read()
                ).hexdigest()
    return state


def _check_output(code: int, stdout: str, stderr: str, pattern: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stderr)
    assert stdout == "", stdout
    message = [l for l in stderr.splitlines() if l.strip() and not LOG_LINE.match(l)]
    assert len(message) == 1, stderr  # One line; absl's INFO log lines aside.
    assert message[0].startswith("error: "), message
    assert re.fullmatch(pattern, message[0][len("error: ") :]), message[0]


def _run_case(context, argv, out_dir, module="panns_jax.main"):
    os.makedirs(out_dir, exist_ok=True)
    process = context.Process(target=_run_main, args=(argv, out_dir, module))
    process.start()
    process.join(120)
    assert process.exitcode is not None, "main did not finish within 120 s"
    with open(os.path.join(out_dir, "stdout")) as f, open(os.path.join(out_dir, "stderr")) as g:
        return process.exitcode, f.read(), g.read()


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_exit_2(name, argv, pattern, main_server, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "keep.txt").write_text("untouched")
    workdir = disk / "run"
    before = _tree(str(disk))
    start = time.perf_counter()
    argv = [a.format(disk=disk) for a in argv]
    code, stdout, stderr = _run_case(
        main_server, argv + [f"--workdir={workdir}"], str(tmp_path / "out")
    )
    elapsed = time.perf_counter() - start
    _check_output(code, stdout, stderr, pattern)
    assert _tree(str(disk)) == before  # No workdir, no checkpoint, nothing else.
    assert elapsed < 60, f"{elapsed:.0f} s: validation must come before compiling"


def _read_only_dir(tmp_path):
    """A directory no file can be created in: mode 0o555, or (root ignores modes) sysfs."""
    if os.geteuid() != 0:
        path = tmp_path / "disk" / "readonly"
        path.mkdir()
        path.chmod(0o555)
        return str(path / "run")
    return "/sys/panns_jax_test_run"


@pytest.mark.parametrize("kind", ["file", "below a file", "read-only"])
def test_unusable_workdir_is_one_line_and_exit_2(kind, main_server, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "notes.txt").write_text("the user's file")
    workdir, pattern = {
        "file": (
            str(disk / "notes.txt"),
            r".*notes\.txt is a file, not a directory: choose "
            r"another --workdir",
        ),
        "below a file": (
            str(disk / "notes.txt" / "run"),
            r".*notes\.txt/run is below .*"
            r"notes\.txt, which is a file.*",
        ),
        "read-only": (None, r".* cannot be written \(.*\): choose a writable --workdir"),
    }[kind]
    workdir = workdir or _read_only_dir(tmp_path)
    before = _tree(str(disk))
    code, stdout, stderr = _run_case(
        main_server, [TINY, f"--workdir={workdir}"], str(tmp_path / "out")
    )
    _check_output(code, stdout, stderr, pattern)
    assert _tree(str(disk)) == before
    assert (disk / "notes.txt").read_text() == "the user's file"


CROSSVAL_CASES = [  # `python -m panns_jax.crossval cv ...` refuses the same way.
    (
        "cv --folds=9",
        ["cv", ESC50 + ":strategy=scratch", "--folds=9"],
        r"--folds: \[9\] not in 1\.\.5",
    ),
    (
        "cv --folds=x",
        ["cv", ESC50 + ":strategy=scratch", "--folds=1,x"],
        r"--folds must be fold numbers in 1\.\.5, got 1,x",
    ),
    ("cv fold=99", ["cv", ESC50 + ":fold=99"], r"flag .*: fold must be in 1\.\.5, got 99"),
    (
        "cv log_every=0",
        ["cv", ESC50 + ":strategy=scratch", "--config.log_every=0"],
        r"config\.log_every must be an integer >= 1 .*, got 0",
    ),
]


@pytest.mark.parametrize("name,argv,pattern", CROSSVAL_CASES, ids=[c[0] for c in CROSSVAL_CASES])
def test_crossval_bad_config_is_one_line_and_exit_2(name, argv, pattern, main_server, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    before = _tree(str(disk))
    code, stdout, stderr = _run_case(
        main_server,
        argv + [f"--workdir={disk / 'cv'}"],
        str(tmp_path / "out"),
        module="panns_jax.crossval",
    )
    _check_output(code, stdout, stderr, pattern)
    assert _tree(str(disk)) == before


def test_a_good_config_passes_the_same_checks():
    """Negative control: the cases above fail for their one bad value, not for the rest."""
    import train_config

    from configs import esc50
    from panns_jax import config_checks, recipe

    config_checks.validate_config(train_config.get_config())
    config_checks.validate_config(esc50.get_config("strategy=scratch"))
    config = train_config.get_config()
    config.log_every = 0
    with pytest.raises(recipe.ConfigError, match="log_every"):
        config_checks.validate_config(config)


def test_fresh_interpreter_agrees(tmp_path):
    """One case through a fresh ``python -m panns_jax.main``: real process start, exit code."""
    workdir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "panns_jax.main",
            TINY,
            "--config.log_every=0",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check_output(
        result.returncode,
        result.stdout,
        result.stderr,
        r"config\.log_every must be an integer >= 1 .*, got 0",
    )
    assert not workdir.exists()
