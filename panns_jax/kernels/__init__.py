"""Native CPU kernels that XLA:CPU does not provide, built on the user's machine on demand."""
