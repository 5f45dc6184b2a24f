"""``python -m panns_jax.cli``: the ``panns-jax`` command."""

import sys

from panns_jax.cli import main

sys.exit(main())
