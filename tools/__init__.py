"""Helper programs a user may run (python -m tools.NAME --help), and what every chapter takes from here: the flags
they share (tools.flags), the measures (tools.evaluate) and the pictures (tools.pictures) of a run's end."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `import common`


def load_script(stem):
    """Import a numbered script as a module (their names start with a digit, so `import` cannot)."""
    spec = importlib.util.spec_from_file_location(stem, ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run(folder, dataset=None):
    """(script, args, its autoencoder in eval mode) of a finished run folder: config.json and autoencoder.pt.
    dataset: the one the caller can use; a run on another stops with exit 2."""
    import common
    folder = Path(folder)
    if not (folder / "config.json").exists():
        common.fail(f"{folder} is not a run folder (no config.json); pass the folder a chapter wrote")
    config = json.loads((folder / "config.json").read_text())
    args = argparse.Namespace(**dict({"recon": "mse"}, **config["args"]))
    if dataset and args.dataset != dataset:
        common.fail(f"{folder} is a {args.dataset} run; this works only for {dataset} runs")
    return config["script"], args, common.load_autoencoder(folder / "autoencoder.pt")
