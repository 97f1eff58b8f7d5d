"""What lpd says about the platform it runs on."""

import jax

from lpd import devices
from lpd.cli import main


def _pci(root, name, vendor, device):
    d = root / "sys" / "bus" / "pci" / "devices" / name
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_visible_accelerators_from_device_files_and_pci_ids(tmp_path):
    assert devices.visible_accelerator(tmp_path) is None
    _pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC, not a TPU.
    _pci(tmp_path, "0000:00:05.0", "0x8086", "0x0063")  # Another vendor's 0x0063.
    assert devices.visible_accelerator(tmp_path) is None
    _pci(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # A v5e chip.
    assert devices.visible_accelerator(tmp_path) == "tpu"
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").touch()
    assert devices.visible_accelerator(tmp_path) == "gpu"


def test_unused_accelerator_warns_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    assert jax.default_backend() == "cpu"  # These machines have no accelerator.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(devices, "installed_plugins", lambda: [])
    assert devices.platform_warning(root=tmp_path) is None
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    warning = devices.platform_warning(root=tmp_path)
    assert "\n" not in warning and "ACCEL=cuda12" in warning and "NVIDIA" in warning
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # Asked for the CPU: no warning.
    assert devices.platform_warning(root=tmp_path) is None


def test_every_command_logs_its_platform(capsys, tmp_path):
    code = main(["export-archive", "--workdir", str(tmp_path / "none"), "--out", "x"])
    captured = capsys.readouterr()
    count = len(jax.devices())
    assert captured.out.startswith(f"platform: cpu, {count} device")
    assert code == 2 and captured.err.startswith("lpd: error:")  # Still one line.
    assert "\n" not in captured.err.strip()


def test_installed_extra_that_finds_no_device_warns_in_one_line(monkeypatch):
    # As with `make setup ACCEL=cuda12` on a host without a GPU: the plugin's
    # error (which jax would print as a traceback) is folded into the line.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(devices, "installed_plugins", lambda: ["cuda12"])
    error = "operation cuInit(0) failed: Unknown CUDA error 303"
    warning = devices.platform_warning([error])
    assert "\n" not in warning and "cuda12 extra is installed" in warning
    assert error in warning and "525" in warning
    assert "installed but jax runs on the CPU (" in devices.platform_warning([])


def test_installed_plugins_read_package_metadata(monkeypatch):
    plugins = {"cuda12": "numpy", "tpu": "no-such-package-for-lpd"}
    monkeypatch.setattr(devices, "PLUGINS", plugins)
    assert devices.installed_plugins() == ["cuda12"]
