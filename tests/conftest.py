"""Helpers: load a numbered script as a module (their names start with a digit), run one as a user would,
make a tiny folder of photos."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path

import pytest
import torch

from tools import load_script

ROOT = Path(__file__).resolve().parents[1]  # pytest.ini's pythonpath puts it on sys.path: `import common` works

# No test sees the user's downloaded or converted LPIPS backbones: an empty torch.hub folder for every test and
# every script it runs (tests that need a backbone file place one in their own TORCH_HOME).
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="torch_home_")
atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], ignore_errors=True)

# Small, fast settings for real runs: 32 px shapes, a few hundred steps.
QUICK = ["--image-size", "32", "--log-every", "20"]


def photo_folder(root, n_train, n_test, size):
    """A tiny photo set: root/train/ and root/test/ of smooth random colour PNGs (4 x 4 noise enlarged)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for part, n in [("train", n_train), ("test", n_test)]:
        (root / part).mkdir(parents=True)
        for i in range(n):
            small = torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(root / part / f"{i:02d}.png")
    return root


def no_network(*args, **kwargs):
    """Stands in for a download function on a machine without network."""
    raise urllib.error.URLError("no network")


def run_cli(script, *args, timeout=600, env=None):
    """Run `python <script>.py args`, or `python -m tools.x args` for a tool, from the repository root; returns the
    CompletedProcess."""
    command = ["-m", script] if script.startswith("tools.") else [f"{script}.py"]
    return subprocess.run([sys.executable, *command, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def whole_and_resumed(script, flags, steps, stop, out):
    """`script` run for `steps` steps, and again stopped at `stop` and resumed to `steps` -> the two run folders."""
    for folder, first in [(out / "whole", steps), (out / "resumed", stop)]:
        result = run_cli(script, *flags, "--max-steps", first, "--out", folder)
        assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli(script, "--resume", out / "resumed" / "checkpoint.pt", "--max-steps", steps)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "whole", out / "resumed"


def rows_without_speed(folder):
    """metrics.csv's rows without images_per_s, the one column two runs of the same steps need not share."""
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in read_rows(folder / "metrics.csv")]


def read_rows(path):
    import csv
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def assert_clean_error(stderr, *fragments):
    """Exactly one non-empty stderr line, starting 'error:', no traceback, mentioning each fragment."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_rejected(script, *args, mentions):
    """Running `script args` exits 2 with no traceback and an error line that mentions `mentions`:
    our own one-line `error:`, or argparse's usage followed by `<script>.py: error: ...`."""
    result = run_cli(script, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    if result.stderr.startswith("usage:"):
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{script}.py: error:") and mentions in last and "Traceback" not in result.stderr
    else:
        assert_clean_error(result.stderr, mentions)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME on a machine whose downloads fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


@pytest.fixture(scope="session")
def vae01():
    return load_script("01_vanilla_vae")
