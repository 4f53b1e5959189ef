"""How fast a chapter trains, and where the time of its loop goes.

    python -m tools.benchmark 01_vanilla_vae                            # shapes, 64 px, 200 steps
    python -m tools.benchmark 04_vae_gan_warmup -- --disc-start 0 --lpips-random-backbone
    python -m tools.benchmark 01_vanilla_vae --conventional             # + 01's model fed by a DataLoader

The chapter's main() runs in this process under cProfile for --steps steps (flags after -- go to the chapter). The
report: images per second at steady state (the median of metrics.csv's rows after the first, which holds one-off
set-up), and the share of the loop's time in each of its parts, from the time of the calls main() makes itself:
the networks' forward passes, backward passes, optimizer steps, the batch, the metrics row and progress bar,
checkpoints. Set-up, evaluation and pictures are left out of the loop. cProfile adds about a microsecond per Python
call. On a GPU the work is queued and the time lands where the CPU waits for it: there only images per second hold.
--conventional adds the tutorial way of feeding 01's model: a DataLoader over a Dataset that turns each image into a
tensor, reshuffled every epoch, and the loss read with .item() every step (pytorch/examples' vae).
"""
import argparse
import cProfile
import csv
import pstats
import tempfile
import time
from pathlib import Path

import torch

import common
from tools import load_script

PARTS = {  # the functions main() calls, by name -> the part of the loop they are
    "_wrapped_call_impl": "forward", "lpips_distance": "forward", "mean": "forward",
    "backward": "backward", "adaptive_weight": "adaptive weight, D's pull",
    "adv_rec_grad_ratio": "adaptive weight, D's pull",
    "wrapper": "optimizer", "zero_grad": "optimizer", "clip_grad_norm_": "optimizer", "update_parameters": "optimizer",
    "__call__": "batch", "to_model_range": "batch",
    "recon_loss": "loss terms", "kl_per_dim": "loss terms", "kl_penalty": "loss terms", "capacity": "loss terms",
    "kl_weight": "loss terms", "hinge_d_loss": "loss terms", "r1_penalty": "loss terms",
    "lowest_lin_weight": "loss terms",
    "kl_split": "row and bar", "mean_over_processes": "row and bar", "write_rows": "row and bar",
    "update": "row and bar",
    "set_postfix": "row and bar", "collapse_symptoms": "row and bar", "write": "row and bar",
    "save": "checkpoint", "state_dict": "checkpoint", "replace": "checkpoint", "<genexpr>": "checkpoint",
}
OUTSIDE = {"decorate_context", "save_curves", "save_kl_heatmap", "load_data", "parse_args", "load_lpips",  # set-up,
           "load_weights", "load_checkpoint", "__init__", "channel_mean", "switch_on"}  # evaluation (no_grad), pictures


def profile_chapter(stem, steps, flags, out):
    """-> ({part: seconds}, images per second at steady state) of `steps` steps of the chapter `stem`."""
    module = load_script(stem)
    profiler = cProfile.Profile()
    profiler.runcall(module.main, [*flags, "--max-steps", str(steps), "--log-every", str(max(1, steps // 10)),
                                   "--out", str(out)])
    stats = pstats.Stats(profiler).stats
    main = next(key for key in stats if key[2] == "main" and key[0].endswith(f"{stem}.py"))
    parts = {"the loop's own lines": stats[main][2]}  # main's own time, outside any call
    for (filename, line, name), (_, _, _, _, callers) in stats.items():
        if main in callers and name not in OUTSIDE:
            part = PARTS.get(name, "other")
            parts[part] = parts.get(part, 0.0) + callers[main][3]  # the cumulative time of the calls from main
    with open(out / "metrics.csv") as f:
        speeds = [float(row["images_per_s"]) for row in csv.DictReader(f)][1:]
    return parts, sorted(speeds)[len(speeds) // 2]


class ToTensorImages(torch.utils.data.Dataset):
    """What a torchvision data set does per item: a PIL image, then transforms.ToTensor()."""
    def __init__(self, images):
        from torchvision import transforms
        self.images, self.to_tensor = images.numpy(), transforms.ToTensor()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        image = self.images[i]
        return self.to_tensor(Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)))


def conventional_loop(size, steps, warmup=5, num_workers=1):
    """01's model and loss fed the tutorial way -> images per second over `steps` steps after `warmup`."""
    vae01 = load_script("01_vanilla_vae")
    train, _, _ = common.make_shapes(50_000, 10, size)
    loader = torch.utils.data.DataLoader(ToTensorImages(train), batch_size=64, shuffle=True, drop_last=True,
                                         num_workers=num_workers)
    model = common.VAE(1, size, 10, 32, channel_mean=common.channel_mean(train))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i, x in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            return steps * 64 / (time.perf_counter() - start)
        x = x * 2 - 1
        mu, logvar = model.encoder(x)
        raw = model.decoder(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
        loss = vae01.recon_loss(raw, x, model, 0.5 ** 0.5).mean() + common.kl_divergence(mu, logvar).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
    raise RuntimeError("not enough batches for the requested steps")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chapter", choices=["01_vanilla_vae", "02_burgess_capacity", "03_lpips_frozen", "04_vae_gan_warmup"])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps profiled (default: 200)")
    p.add_argument("--conventional", action="store_true", help="also 01's model fed by a DataLoader (default: off)")
    p.add_argument("flags", nargs="*", help="the chapter's flags, after -- (default: none)")
    args = p.parse_args()
    if args.steps < 20:
        common.fail("--steps must be at least 20: the first of its ten rows holds one-off set-up")
    with tempfile.TemporaryDirectory() as folder:
        parts, speed = profile_chapter(args.chapter, args.steps, args.flags, Path(folder) / "run")
    loop = sum(parts.values())
    print(f"{args.chapter} {' '.join(args.flags)}: {speed:.0f} images/s at steady state; {args.steps} steps, "
          f"{loop:.1f} s in the loop, of which:")
    for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {100 * seconds / loop:5.1f}%  {part}")
    if args.conventional:
        size = 64 if "--image-size" not in args.flags else int(args.flags[args.flags.index("--image-size") + 1])
        print(f"01's model fed by a DataLoader (ToTensor per image, 1 worker), {size} px: "
              f"{conventional_loop(size, min(args.steps, 100)):.0f} images/s")


if __name__ == "__main__":
    main()
