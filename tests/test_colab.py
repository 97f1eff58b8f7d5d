"""The walkthrough's install cell, as Colab runs it: a fresh Python 3.12
environment that has only the notebook machinery, lpd installed by the cell
itself from the wheel `make dist` builds, then the notebook top to bottom."""

import glob
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "experiments" / "notebooks" / "walkthrough.ipynb"
RUN_NOTEBOOK = """
import sys
import nbformat
from nbclient import NotebookClient

notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=1200, kernel_name="python3").execute()
errors = [
    o for c in notebook.cells for o in c.get("outputs", [])
    if o.get("output_type") == "error"
]
assert not errors, errors
"""


def _python312() -> str | None:
    """A Python 3.12 interpreter that runs (pyenv's shims need PYENV_VERSION)."""
    pyenv = sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))
    )
    for candidate in [shutil.which("python3.12"), *pyenv]:
        check = "import sys; assert sys.version_info[:2] == (3, 12)"
        if candidate and subprocess.run([candidate, "-c", check]).returncode == 0:
            return candidate
    return None


@pytest.mark.slow
def test_install_cell_in_a_fresh_python312_venv(tiny_run, tmp_path):
    python = _python312()
    if python is None:
        pytest.skip("no Python 3.12 interpreter on this machine")
    wheels, content = tmp_path / "wheels", tmp_path / "content"
    content.mkdir()
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    subprocess.run(pip_wheel + ["-w", str(wheels), str(ROOT)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    venv_python = str(venv / "bin" / "python")
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["dev"]
    kernel = [
        p for p in dev if p.split("==")[0] in ("nbclient", "nbformat", "ipykernel")
    ]
    subprocess.run([venv_python, "-m", "pip", "install", "-q", *kernel], check=True)
    workdir = content / "runs" / "notebook"
    shutil.copytree(tiny_run, workdir)  # The stages load; the rest runs.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(LPD_INSTALL="1", LPD_WHEELS=str(wheels), LPD_WORKDIR=str(workdir))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    subprocess.run(
        [venv_python, "-c", RUN_NOTEBOOK, str(NOTEBOOK)],
        cwd=content,
        env=env,
        check=True,
    )
    where = subprocess.run(
        [venv_python, "-c", "import lpd, sys; print(lpd.__file__, sys.version)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert str(venv) in where and " 3.12." in where  # The wheel, not the clone.
    assert (workdir / "walkthrough_episode.gif").exists()
