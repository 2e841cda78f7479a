"""notebooks/explore_study.ipynb runs top to bottom on a demo study (nbclient, this Python's
kernel) and draws its figures; the committed notebook carries no outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_study.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_notebook_runs_on_a_demo_study(demo_study: Path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    root = NOTEBOOK.parent.parent
    # the kernel inherits the environment: the study's folder, this checkout's package, Agg
    monkeypatch.setenv("VLMEXP_STUDY_DIR", str(demo_study))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed notebook, to look at
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [c for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    # history, weights vs depth of the top candidates, the demo image the merge answers
    assert len(images) >= 3
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in code for o in c.outputs)
    assert "weights digest" in text  # the notebook asserts it equals the logged one
    last = code[-1]
    answered = [o for o in last.outputs if "image/png" in o.get("data", {})]
    assert answered, "the rebuilt merge's answer to a demo image is drawn"
