"""Helper programs a user may run (python -m tools.NAME --help); not needed by the numbered scripts."""
import argparse
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


def load_run(folder, dataset=None):
    """(script, args, VAE with the final weights, in eval mode) of a run folder, rebuilt from its checkpoint.pt.
    The architecture is read off the saved weights: channels from the last layer, centring from the BatchNorm
    before mu (02-04's code vectors; 01 and code maps have none). 03 and 04 have no --recon: always "mse".
    dataset: the one the caller can use; a run on another stops with exit 2."""
    import common
    state = common.load_checkpoint(Path(folder) / "checkpoint.pt")
    args = argparse.Namespace(**dict({"recon": "mse", "latent": "vector"}, **state["args"]))
    if dataset and args.dataset != dataset:
        common.fail(f"{folder} is a {args.dataset} run; this works only for {dataset} runs")
    weights = state["model"]
    model = common.VAE(weights["decoder.conv_out.bias"].numel(), args.image_size, args.latent_dim, args.width,
                       args.recon, centre_mu="encoder.to_mu.0.running_mean" in weights,
                       spatial=args.latent == "spatial", downsample=getattr(args, "downsample", 4),
                       arch=getattr(args, "arch", "plain"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # written by another version of the scripts
        common.fail(f"{folder}/checkpoint.pt does not fit the model its arguments describe ({str(e)[:250]})")
    return state["script"], args, model.eval()
