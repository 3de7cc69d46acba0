"""The quickstart notebook executes top to bottom and shows the report and the plots."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(smoke_run, monkeypatch):
    out, _ = smoke_run
    # The notebook runs the smoke pipeline into $UNDO_NOTEBOOK_RUN_DIR/arithmetic-smoke; pointing it at the session's
    # finished run makes every stage resume as done, so the notebook itself takes seconds.
    monkeypatch.setenv("UNDO_NOTEBOOK_RUN_DIR", str(out.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and "| undo_a0.7 |" in markdown[0]
