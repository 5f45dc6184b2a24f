"""``python -m panns_jax.export``: the ``panns-jax export`` command, :mod:`panns_jax.cli.export`."""

import sys

from panns_jax.cli.export import main

sys.exit(main())
