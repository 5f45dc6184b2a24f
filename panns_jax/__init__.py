"""panns_jax: PANNs audio tagging, SED and embedding networks in JAX/Flax."""

__version__ = "0.1.0"
