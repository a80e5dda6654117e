"""What `pip install rlp-cli` gives a user outside this repository: the wheel carries the built-in configs
and presets, and `rlp ls presets`, `rlp ablate PRESET --dry-run` and `rlp copy-preset` work from it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_presets_and_they_work_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = dist.glob("rlp_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "rlp_cli" / "presets").glob("*.yaml"))
    assert presets and all(f"rlp_cli/presets/{name}" in names for name in presets)
    assert "rlp_cli/configs/default.yaml" in names and "rlp_cli/ablate/backends.py" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"  # no ablations/ folder, no repo
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

    def rlp(*args):
        return subprocess.run([sys.executable, "-m", "rlp_cli.cli", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import rlp_cli; print(rlp_cli.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not this checkout
    listed = rlp("ls", "presets")
    assert listed.returncode == 0 and "sparse-vs-dense" in listed.stdout and "smoke" in listed.stdout, listed.stderr
    dry = rlp("ablate", "sparse-vs-dense", "--dry-run")
    assert dry.returncode == 0 and "dry run: nothing was started" in dry.stdout, dry.stdout + dry.stderr
    copied = rlp("copy-preset", "smoke")
    assert copied.returncode == 0 and (elsewhere / "ablations" / "smoke.yaml").read_text() == \
        (ROOT / "rlp_cli" / "presets" / "smoke.yaml").read_text()
    again = rlp("copy-preset", "smoke")
    assert again.returncode == 2 and "exists" in again.stderr
