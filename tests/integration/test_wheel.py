"""The package installs as a wheel: configs ship inside it and `mmllm train` runs from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], check=False, capture_output=True,
                         text=True, timeout=900, **kwargs)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _build_wheel(tmp_path: Path) -> Path:
    # Build from a copy, so the build leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.pyc")
    for name in ("mmllm", "components"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("mmllm-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_empty_directory(tmp_path, shared_data_dir):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmllm/conf/train.yaml" in names and "mmllm/conf/debug/tiny.yaml" in names
    assert "mmllm/conf/curation/executor/local.yaml" in names

    # A fresh venv with its own pip installs the wheel; the shared venv's packages (torch, ...)
    # are then reachable through a .pth line, but not this checkout.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMLLM_ROOT")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([py, "-c", "import mmllm, mmllm.config as c; print(mmllm.__file__); print(c.CONF_DIR)"],
                 cwd=empty, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the installed copy, not REPO

    _run([venv / "bin" / "mmllm", "train", "debug=tiny", "trainer.max_steps=2",
          "trainer.val_check_interval=2", f"paths.data_dir={shared_data_dir}"], cwd=empty, env=env)
    (run,) = (empty / "outputs" / "train" / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "tokenizer").is_dir()
    assert "max_steps: 2" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written here
