"""The accelerator extras resolve against the project's own pins (pip's
resolver, no install; these machines have no GPU or TPU)."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lpd.devices import PLUGINS  # extra -> the package only that build brings

ROOT = Path(__file__).resolve().parents[1]


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


@pytest.mark.parametrize("extra", sorted(PLUGINS))
def test_accelerator_extra_resolves_against_the_pins(extra, tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(pins + project["optional-dependencies"][extra]))
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet"]
        + ["--ignore-installed", "--use-feature=fast-deps"]
        + ["--report", str(report), "-r", str(requirements)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    chosen = {
        _name(p["metadata"]["name"]): p["metadata"]["version"]
        for p in json.loads(report.read_text())["install"]
    }
    for pin in pins:  # Every pin kept, none moved by the extra.
        name, version = pin.split("==")
        assert chosen[_name(name)] == version, pin
    assert PLUGINS[extra] in chosen
    if extra != "tpu":  # The CUDA plugin's version is the jax pin's.
        assert chosen[PLUGINS[extra]] == chosen["jax"]
