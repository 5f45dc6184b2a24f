"""``python -m panns_jax.export``: see :mod:`panns_jax.export.cli`."""

import sys

from panns_jax.export.cli import main_export

sys.exit(main_export())
