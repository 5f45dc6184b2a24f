import os
import sys

# Tests see 8 CPU devices so that sharding code paths run without accelerators.
# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(__file__))  # golden_utils, train_config
# configs/ of the project root (tests import them as modules).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
