"""The Colab notebooks in notebooks/ run top to bottom (tiny settings) and pass their checks.

Each notebook reads PANNS_NOTEBOOK_SMOKE=1 to pick CI-sized settings and asserts on its
results in its last cell. A failing cell fails the test with the cell's traceback.
"""

from __future__ import annotations

import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
REASON = (
    "executing notebooks needs nbclient, nbformat and ipykernel: "
    "pip install -e '.[notebooks]' (or add them to the test extra)"
)

nbclient = pytest.importorskip("nbclient", reason=REASON)
nbformat = pytest.importorskip("nbformat", reason=REASON)
pytest.importorskip("ipykernel", reason=REASON)


@pytest.mark.parametrize("name", ["tag_and_sed.ipynb", "finetune.ipynb", "convert_pytorch.ipynb"])
def test_notebook_runs_and_passes_its_checks(name, tmp_path, monkeypatch):
    if name == "convert_pytorch.ipynb":
        pytest.importorskip("torch", reason="PyTorch not installed: the notebook writes a .pth")
    monkeypatch.setenv("PANNS_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PANNS_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", "")  # One CPU device in the kernel, not conftest's eight.
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()
    last = notebook.cells[-1]
    text = "".join(o.get("text", "") for o in last.get("outputs", []))
    assert "ok" in text, text
