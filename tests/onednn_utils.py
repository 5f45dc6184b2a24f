"""A broken oneDNN kernel for negative controls."""

from __future__ import annotations

import pytest

from panns_jax.kernels import onednn


def pad_one_row_lower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make oneDNN's kernels pad one more row above and one fewer below: the same output
    shape, every row of the result taken one row off (a padding off by one)."""
    call = onednn._call

    def shifted(target, shape, *args, geometry):
        stride, top, bottom, pad_w, dilation = geometry
        return call(target, shape, *args, geometry=(stride, top + 1, bottom - 1, pad_w, dilation))

    monkeypatch.setattr(onednn, "_call", shifted)
