import os
import sys

import pytest

# Tests see 8 CPU devices so that sharding code paths run without accelerators.
# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(__file__))  # golden_utils, train_config
# configs/ of the project root (tests import them as modules).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def panns_demo_dir(tmp_path_factory):
    """A TFDS data dir for panns_demo, shared by the session; the first user prepares it
    by name (the dataset is generated, no download)."""
    return tmp_path_factory.mktemp("tfds_panns_demo")
