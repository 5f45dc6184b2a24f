import os
import sys

import pytest

# Tests see 8 CPU devices so that sharding code paths run without accelerators.
# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test may download a released checkpoint: the zoo is offline, with an empty cache, unless
# a test points it at its own server on 127.0.0.1 (tests/test_zoo.py).
os.environ["PANNS_JAX_OFFLINE"] = "1"
os.environ.pop("PANNS_JAX_MIRROR", None)
os.environ.pop("PANNS_JAX_ZOO_TABLE", None)
os.environ["PANNS_JAX_HOME"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"panns_jax_test_cache_{os.getpid()}"
)
# Tests choose their convolution kernels: "auto" (the default) means XLA's here, and the tests
# of oneDNN's kernel and of "auto" itself (tests/test_backends.py) ask for theirs.
os.environ["PANNS_JAX_CONV_BACKEND"] = "xla"
# The commands run in-process here, and JAX's persistent compilation cache they turn on is
# process-wide: it stays off, and tests/test_compile_cache.py turns it on in its subprocesses.
os.environ["PANNS_JAX_COMPILATION_CACHE"] = "0"

sys.path.insert(0, os.path.dirname(__file__))  # golden_utils, train_config
# configs/ of the project root (tests import them as modules).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def panns_demo_dir(tmp_path_factory):
    """A TFDS data dir for panns_demo, shared by the session; the first user prepares it
    by name (the dataset is generated, no download)."""
    return tmp_path_factory.mktemp("tfds_panns_demo")


@pytest.fixture(scope="session")
def data_dir(panns_demo_dir):
    """panns_demo prepared once for the session (it is generated, no download)."""
    from panns_jax import data

    data.get_builder("panns_demo", data_dir=str(panns_demo_dir))
    return panns_demo_dir


# CI sets PANNS_JAX_STRICT=1: every skip is a failure there, so a test that silently stops
# running (a missing oracle, an optional package that did not install) turns CI red.
STRICT = os.environ.get("PANNS_JAX_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under PANNS_JAX_STRICT=1 (CI): {reason}"


# ---------------------------------------------------------------- serving fixtures
# Module-scoped: each test module gets its own copy, as if it declared them itself.


@pytest.fixture(scope="module")
def cnn6_checkpoint(tmp_path_factory):
    """The golden recipe weights of Cnn6 as a panns_jax checkpoint directory."""
    import serving_utils

    return serving_utils.golden_checkpoint(tmp_path_factory, "Cnn6")


@pytest.fixture(scope="module")
def cnn6(cnn6_checkpoint):
    from panns_jax.tagger import AudioTagger

    return AudioTagger.load(cnn6_checkpoint)


@pytest.fixture(scope="module")
def direct(cnn6):
    """The Cnn6 model applied to one whole waveform, without the chunk scheduler."""
    import serving_utils

    return serving_utils.direct(cnn6)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    import serving_utils

    return serving_utils.write_long_wav(tmp_path_factory)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint, its .pth and audio files (serving_utils.tiny_env)."""
    import serving_utils

    return serving_utils.tiny_env(tmp_path_factory)


# ---------------------------------------------------------------- transfer fixtures


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A tiny Cnn10 checkpoint (10 classes, random weights) standing in for a pretrained one:
    what ``finetune`` and ``probe`` start from in their tests."""
    import jax

    from panns_jax import checkpoints, models

    tiny = {"widths": (8, 16, 32, 64), "embedding_size": 32}
    path = str(tmp_path_factory.mktemp("pretrained") / "ckpt")
    model = models.get("Cnn10", **tiny, num_classes=10)
    variables = jax.device_get(models.init(model, jax.random.key(5), 32000))
    checkpoints.save(
        path, checkpoints.ModelCheckpoint("Cnn10", variables, {**tiny, "num_classes": 10})
    )
    return path


# ---------------------------------------------------------------- zoo fixtures


@pytest.fixture(scope="module")
def served_files():
    """The released files a test mirror serves (written by torch.save)."""
    import zoo_mirror

    return zoo_mirror.release_files()


@pytest.fixture(scope="module")
def server(served_files):
    """A mirror of the released files on 127.0.0.1, stopped after the module."""
    import zoo_mirror

    with zoo_mirror.serving(served_files) as httpd:
        yield httpd


@pytest.fixture
def zoo_env(tmp_path, server, served_files, monkeypatch):
    """The zoo pointed at ``server``, with its cache in ``tmp_path``."""
    import zoo_mirror

    return zoo_mirror.point_the_zoo_at(server, served_files, tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """An audio file of odd length for the zoo's tag runs."""
    import zoo_mirror

    return zoo_mirror.write_wav(str(tmp_path_factory.mktemp("zoo_audio") / "odd.wav"))
