"""The ladder in one picture: the same test images, then one row of reconstructions per run.

    python -m tools.ladder runs/01_vanilla_vae/folder-* runs/02_burgess_capacity/folder-* \
        runs/03_lpips_frozen/folder-* runs/04_vae_gan_warmup/folder-* --out ladder.png

Every run must be on the same data (data set, --data-dir, --image-size). For each run it rebuilds the
model from autoencoder.pt, reconstructs the test set from z = mu and scores all runs the same way, as
the scripts do: PSNR, LPIPS-alex (what 03 and 04 train against), LPIPS-VGG (a network none of them
trains against) and FD-VGG (how far the reconstructions' VGG features are, as a distribution, from the
originals': tools.evaluate.vgg_scores), both on the first 1,000 test images, and spectrum error
(tools.evaluate.spectrum_metrics: 0 = the data's power spectrum; blur and noise both raise it). LPIPS needs the
ImageNet backbones (see 03: torchvision's files, or `python -m tools.lpips_weights`); a score whose file is
missing is left out.
Each row is labelled with the scores; the last two columns enlarge 4x the busiest patch of the two shown
images with the most fine detail, so texture can be seen. The numbers are also printed, one line per run.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from tools import evaluate
from tools import load_run
from tools.lpips_weights import load_lpips

LABELS = {"01_vanilla_vae": "01 ELBO", "02_burgess_capacity": "02 capacity", "03_lpips_frozen": "03 + LPIPS",
          "04_vae_gan_warmup": "04 + GAN"}


def reconstruct(model, images):
    """uint8 (N, C, H, W) -> reconstructions from z = mu, [0, 1]."""
    return torch.cat([(recon + 1) / 2 for _, recon in evaluate.reconstructions(model, images, torch.device("cpu"))])


@torch.no_grad()
def scores(recon, originals, metrics):
    """{PSNR (dB), spectrum error, and per LPIPS metric {name: (module, images scored)} its mean} of [0, 1]
    reconstructions against the originals."""
    mse = (recon - originals).pow(2).mean().item()
    _, error = evaluate.spectrum_metrics(evaluate.power_spectrum(recon), evaluate.power_spectrum(originals))
    found = {"PSNR": 10 * math.log10(1 / mse), "spectrum": error}
    for name, (perceptual, n) in metrics.items():
        if name == "LPIPS-VGG":  # and FD-VGG, from the same pass
            vgg = evaluate.vgg_scores(perceptual, zip((originals[:n] * 2 - 1).split(100),
                                                      (recon[:n] * 2 - 1).split(100)))
            found.update({"LPIPS-VGG": vgg["test_lpips_vgg"], "FD-VGG": vgg["test_fd_vgg"]})
        else:
            found[name] = torch.cat([common.lpips_distance(perceptual, r * 2 - 1, o * 2 - 1) for r, o in
                                     zip(recon[:n].split(200), originals[:n].split(200))]).mean().item()
    return found


def busiest_patch(image, side):
    """(top, left) of the side x side window, on a grid of half steps, with the most pixel-to-pixel change."""
    change = (image[:, 1:, 1:] - image[:, :-1, 1:]).abs().sum(0) + (image[:, 1:, 1:] - image[:, 1:, :-1]).abs().sum(0)
    windows = F.avg_pool2d(change[None, None], side - 1, stride=side // 2)[0, 0]  # (rows, cols) of windows
    row, col = divmod(int(windows.argmax()), windows.shape[1])
    return row * (side // 2), col * (side // 2)


def draw(path, rows, labels, picks, zoom, side):
    """rows: [(N, C, H, W) in [0, 1]] -> one figure; the last two columns enlarge a side x side patch of the
    images `zoom`: the patch of the original with the most detail."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, size = len(picks), rows[0].shape[-1]
    fig, axes = plt.subplots(len(rows), n + 2, figsize=(1.3 * (n + 2) + 2.4, 1.35 * len(rows)), squeeze=False)
    corners = [busiest_patch(rows[0][i], side) for i in zoom]  # rows[0]: the originals
    for r, (images, label) in enumerate(zip(rows, labels)):
        tiles = [images[i] for i in picks] + [
            F.interpolate(images[i:i + 1, :, top:top + side, left:left + side], scale_factor=size // side * 1.0,
                          mode="nearest")[0] for i, (top, left) in zip(zoom, corners)]
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
    p.add_argument("--show", type=int, nargs="+", default=None,
                   help="the test images to show instead, by position in the sorted test set (from 0)")
    p.add_argument("--labels", nargs="+", default=None, help="one row label per run (default: the script's)")
    p.add_argument("--lpips-random-backbone", action="store_true",
                   help="LPIPS-alex with a random backbone (seed 0, as 03 builds it); for tests only (default: off)")
    args = p.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        common.fail(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    loaded = [load_run(folder) for folder in args.runs]
    data = {(a.dataset, a.data_dir, a.image_size) for _, a, _ in loaded}
    if len(data) > 1:
        common.fail(f"the runs were trained on different data: {sorted(data)}; a ladder compares one data set")
    _, test = common.load_data(loaded[0][1])
    originals = test.float() / 255
    picks = args.show or torch.linspace(0, len(test) - 1, min(args.images, len(test))).round().long().tolist()
    if not all(0 <= i < len(test) for i in picks):
        common.fail(f"--show: the test set has {len(test)} images, numbered 0 to {len(test) - 1}")
    torch.manual_seed(0)  # the random backbone that a seed-0 run builds
    cpu = torch.device("cpu")
    alex, _ = load_lpips("alex", args.lpips_random_backbone, cpu, required=False)
    vgg, _ = (None, None) if args.lpips_random_backbone else load_lpips("vgg", False, cpu, required=False)
    metrics = {name: (m.eval(), n) for name, m, n in [("LPIPS-alex", alex, len(test)), ("LPIPS-VGG", vgg, 1000)]
               if m is not None}  # name -> (LPIPS, how many test images it scores)
    rows, labels = [originals], ["originals"]
    for i, (folder, (script, run_args, model)) in enumerate(zip(args.runs, loaded)):
        recon = reconstruct(model, test)
        found = scores(recon, originals, metrics)
        kl = json.loads((Path(folder) / "summary.json").read_text()).get("test_kl", float("nan"))
        rows.append(recon)
        name = args.labels[i] if args.labels else LABELS.get(script, script)
        shown = [k for k in ("LPIPS-alex", "LPIPS-VGG", "FD-VGG") if k in found]
        values = [f"{k} {found[k]:.0f}" if k == "FD-VGG" else f"{k} {found[k]:.3f}" for k in shown]
        labels.append("\n".join([name, f"PSNR {found['PSNR']:.1f} dB", *values, f"spectrum {found['spectrum']:.2f}"]))
        print(f"{folder}: {script}  PSNR {found['PSNR']:.2f} dB  " + "".join(f"{k} {found[k]:.4f}  " for k in shown) +
              f"spectrum error {found['spectrum']:.3f}  KL {kl:.0f} nats")
    size = test.shape[-1]
    detail = [(originals[i, :, 1:] - originals[i, :, :-1]).abs().mean().item() for i in picks]
    zoom = [picks[j] for j in sorted(range(len(picks)), key=lambda j: -detail[j])[:2]]  # the most fine detail
    draw(args.out, rows, labels, picks, zoom, side=size // 4)
    backbone = "random AlexNet (not a perceptual metric)" if args.lpips_random_backbone else "ImageNet"
    print(f"wrote {args.out} ({len(test)} test images; LPIPS: {', '.join(metrics) or 'none, no backbone file'}, "
          f"{backbone} backbones)")


if __name__ == "__main__":
    main()
