"""The installed package carries what it reads at run time: `pip install .` users run
`pgsluice demo` and `pgsluice load`, which read the load profiles from the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_load_profiles(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a clean copy: no build/ left over from an earlier build
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "node_modules", "__pycache__", ".*_cache", ".pgsluice"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("pgsluice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = sorted((ROOT / "loadtest" / "profiles").glob("*.toml"))
    assert profiles
    for profile in profiles:
        assert f"loadtest/profiles/{profile.name}" in names
    assert "proxy/ops/cli.py" in names and "protos/pgsluice/v1/sluice_pb2.py" in names
