"""Helper programs a user may run (python -m tools.NAME --help); not needed by the numbered scripts."""
import importlib.util
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
