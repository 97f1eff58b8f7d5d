"""The walkthrough notebook runs top to bottom on the tiny config."""

import shutil

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_walkthrough_notebook_executes(tiny_run, tmp_path, monkeypatch):
    # A copy of the tiny workdir with every stage complete: the notebook's
    # stage cells load instead of training (the stages are tested elsewhere),
    # and every other cell (sampling, report, render) really runs.
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run, workdir)
    monkeypatch.setenv("LPD_WORKDIR", str(workdir))
    monkeypatch.setenv("LPD_ROOT", str(ROOT))
    path = ROOT / "experiments" / "notebooks" / "walkthrough.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert (workdir / "walkthrough_episode.gif").exists()
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # The archive heatmap and the three report plots.
    # The episode, shown without a network.
    assert [o for o in outputs if "image/gif" in o.get("data", {})]
