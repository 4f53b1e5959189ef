"""The ladder in one picture: the same test images, then one row of reconstructions per run.

    python -m tools.ladder runs/01_vanilla_vae/folder-* runs/02_burgess_capacity/folder-* \
        runs/03_lpips_frozen/folder-* runs/04_vae_gan_warmup/folder-* --out ladder.png

Every run must be on the same data (data set, --data-dir, --image-size). For each run it rebuilds the
model from checkpoint.pt, reconstructs the whole test set from z = mu and scores all runs the same
way: PSNR, LPIPS (AlexNet; the random backbone unless the ImageNet file is in $TORCH_HOME, see 03)
and spectrum error (common.spectrum_metrics: 0 = the data's power spectrum; blur and noise both
raise it). Each row is labelled with the three; the last two columns enlarge a patch 4x, of the two
shown images with the most fine detail, so texture can be seen. The numbers are also printed, one line per run.
"""
import argparse
import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from tools import ROOT  # noqa: F401  also puts the repository root on sys.path
import common  # noqa: E402

LABELS = {"01_vanilla_vae": "01 ELBO", "02_burgess_capacity": "02 capacity", "03_lpips_frozen": "03 + LPIPS",
          "04_vae_gan_warmup": "04 + GAN"}


def load_run(folder):
    """(script, args, VAE with the run's final weights) from a run folder."""
    state = common.load_checkpoint(Path(folder) / "checkpoint.pt")
    args = argparse.Namespace(**dict({"recon": "mse", "latent": "vector"}, **state["args"]))
    channels = state["model"]["decoder.conv_out.bias"].numel()
    model = common.VAE(channels, args.image_size, args.latent_dim, args.width, args.recon,
                       centre_mu=state["script"] != "01_vanilla_vae", spatial=args.latent == "spatial")
    model.load_state_dict(state["model"])
    return state["script"], args, model.eval()


def perceptual_metric(random_backbone):
    """LPIPS-alex as 03 builds it: the ImageNet backbone if it loads (and not random_backbone), else the
    random one that a seed-0 run of 03 or 04 with --lpips-random-backbone has."""
    import lpips
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if not random_backbone:
            try:
                return lpips.LPIPS(net="alex", verbose=False).eval(), "ImageNet"
            except Exception:  # no weights file and no network
                pass
        torch.manual_seed(0)
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval(), "random"


@torch.no_grad()
def reconstruct(model, images, recon):
    """uint8 (N, C, H, W) -> reconstructions from z = mu, [0, 1]."""
    return torch.cat([model.to_unit(model.decoder(model.encoder(common.to_model_range(chunk, recon))[0]))
                      for chunk in images.split(200)])


@torch.no_grad()
def scores(recon, originals, perceptual):
    """PSNR (dB), mean LPIPS and spectrum error of [0, 1] reconstructions against the originals."""
    mse = (recon - originals).pow(2).mean().item()
    lpips_values = torch.cat([perceptual(r * 2 - 1, o * 2 - 1).flatten() for r, o in zip(
        recon.expand(-1, 3, -1, -1).split(200), originals.expand(-1, 3, -1, -1).split(200))])
    _, error = common.spectrum_metrics(common.power_spectrum(recon), common.power_spectrum(originals))
    return 10 * math.log10(1 / mse), lpips_values.mean().item(), error


def draw(path, rows, labels, picks, zoom, patch):
    """rows: [(N, C, H, W) in [0, 1]] -> one figure; the last two columns enlarge `patch` of images `zoom`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, size = len(picks), rows[0].shape[-1]
    fig, axes = plt.subplots(len(rows), n + 2, figsize=(1.3 * (n + 2) + 2.4, 1.35 * len(rows)), squeeze=False)
    top, left, side = patch
    for r, (images, label) in enumerate(zip(rows, labels)):
        tiles = [images[i] for i in picks] + [
            F.interpolate(images[i:i + 1, :, top:top + side, left:left + side], scale_factor=size // side * 1.0,
                          mode="nearest")[0] for i in zoom]
        for c, tile in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(tile.clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 and c >= n:
                ax.set_title("4x patch", fontsize=8)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, in the order of the rows")
    p.add_argument("--out", default="ladder.png", help="the figure (default: ladder.png)")
    p.add_argument("--images", type=int, default=6, help="test images shown, evenly spaced (default: 6)")
    p.add_argument("--labels", nargs="+", default=None, help="one row label per run (default: the script's)")
    p.add_argument("--lpips-random-backbone", action="store_true",
                   help="score with the random backbone even where the ImageNet one loads (default: off)")
    args = p.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        common.fail(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    loaded = [load_run(folder) for folder in args.runs]
    data = {(a.dataset, a.data_dir, a.image_size) for _, a, _ in loaded}
    if len(data) > 1:
        common.fail(f"the runs were trained on different data: {sorted(data)}; a ladder compares one data set")
    _, test, _ = common.load_data(loaded[0][1])
    originals = test.float() / 255
    picks = torch.linspace(0, len(test) - 1, min(args.images, len(test))).round().long().tolist()
    perceptual, backbone = perceptual_metric(args.lpips_random_backbone)
    rows, labels = [originals], ["originals"]
    for i, (folder, (script, run_args, model)) in enumerate(zip(args.runs, loaded)):
        recon = reconstruct(model, test, run_args.recon)
        psnr, lpips_value, error = scores(recon, originals, perceptual)
        kl = json.loads((Path(folder) / "summary.json").read_text()).get("test_kl", float("nan"))
        rows.append(recon)
        name = args.labels[i] if args.labels else LABELS.get(script, script)
        labels.append(f"{name}\nPSNR {psnr:.1f} dB\nLPIPS {lpips_value:.3f}\nspectrum {error:.2f}")
        print(f"{folder}: {script}  PSNR {psnr:.2f} dB  LPIPS {lpips_value:.4f} ({backbone} AlexNet)  "
              f"spectrum error {error:.3f}  KL {kl:.0f} nats")
    size = test.shape[-1]
    detail = [(originals[i, :, 1:] - originals[i, :, :-1]).abs().mean().item() for i in picks]
    zoom = [picks[j] for j in sorted(range(len(picks)), key=lambda j: -detail[j])[:2]]  # the most fine detail
    draw(args.out, rows, labels, picks, zoom, patch=(size // 4, size // 4, size // 4))
    print(f"wrote {args.out} ({len(test)} test images scored; LPIPS with the {backbone} AlexNet backbone)")


if __name__ == "__main__":
    main()
