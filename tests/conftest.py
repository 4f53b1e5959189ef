"""Helpers: load a numbered script as a module (their names start with a digit), run one as a user would."""
import argparse
import importlib.util
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small, fast settings for real runs: 32 px shapes, a few hundred steps.
QUICK = ["--image-size", "32", "--log-every", "20"]


def no_network(*args, **kwargs):
    """Stands in for a download function on a machine without network."""
    raise urllib.error.URLError("no network")


def checkpoint_codes(out):
    """(mu, true factors) of the shapes test images, recomputed from the run's checkpoint.pt: an
    independent path to the codes that a script's summary.json scores (MIG, switch_on)."""
    import torch
    import common
    state = common.load_checkpoint(Path(out) / "checkpoint.pt")
    a = dict({"recon": "mse"}, **state["args"])  # 03-04 have no --recon: always the Gaussian (MSE) likelihood
    if a["dataset"] != "shapes":
        common.fail(f"{out} is a {a['dataset']} run; the true factors are known only for shapes")
    _, test, factors = common.load_data(argparse.Namespace(dataset="shapes", image_size=a["image_size"]))  # the run's own test set
    centre = any("to_mu.0.running_mean" in k for k in state["model"])  # 02-04 centre mu's inputs
    model = common.VAE(1, a["image_size"], a["latent_dim"], a["width"], a["recon"], centre_mu=centre)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        mu = torch.cat([model.encoder(common.to_model_range(chunk, a["recon"]))[0] for chunk in test.split(500)])
    return mu, factors


def load_script(stem):
    spec = importlib.util.spec_from_file_location(stem, ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(script, *args, timeout=600):
    """Run `python <script>.py args` from the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, f"{script}.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def vae01():
    return load_script("01_vanilla_vae")
