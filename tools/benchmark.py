"""How fast a chapter trains, and where the time of its loop goes.

    python -m tools.benchmark 01_vanilla_vae                            # shapes, 64 px, 200 steps
    python -m tools.benchmark 04_vae_gan_warmup -- --disc-start 0 --lpips-random-backbone
    python -m tools.benchmark 01_vanilla_vae --conventional             # + 01's model fed by a DataLoader
    python -m tools.benchmark 01_vanilla_vae --against-diffusers data/photo_tiles -- --dataset folder \
        --data-dir data/photo_tiles --arch sd --downsample 8 --batch-size 16   # + diffusers' AutoencoderKL

The chapter's main() runs in this process under cProfile for --steps steps (flags after -- go to the chapter). The
report: images per second at steady state (the median of metrics.csv's rows after the first, which holds one-off
set-up), and the share of the loop's time in each of its parts, from the time of the calls main() makes itself:
the networks' forward passes, backward passes, optimizer steps, the batch, the metrics row and progress bar,
checkpoints. Set-up, evaluation and pictures are left out of the loop. cProfile adds about a microsecond per Python
call. On a GPU the work is queued and the time lands where the CPU waits for it: there only images per second hold.
--against-diffusers FOLDER times one training step of our --arch sd and of diffusers' AutoencoderKL of the same layers,
taking turns on the same data (it needs pip install diffusers). --conventional adds the tutorial way of feeding 01's
model: a DataLoader over a Dataset that turns each image into a tensor, reshuffled every epoch, and the loss read with
.item() every step (pytorch/examples' vae).
"""
import argparse
import cProfile
import csv
import pstats
import sys
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


def sd_blocks_against_diffusers(images, width, downsample, batch_size, steps, amp, warmup=3):
    """Images per second of one training step (encode, sample, decode, 01's Gaussian loss and KL, Adam) of our --arch sd
    and of diffusers' AutoencoderKL of the same layers, on the same batches of uint8 `images`, alternating runs."""
    import diffusers  # not a requirement of the scripts: pip install diffusers for this comparison only
    levels = common.sd_levels(width, downsample)
    theirs = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=levels,
                                     down_block_types=["DownEncoderBlock2D"] * len(levels), layers_per_block=2,
                                     up_block_types=["UpDecoderBlock2D"] * len(levels), norm_num_groups=32)
    ours = common.VAE(3, images.shape[-1], 4, width, spatial=True, downsample=downsample, arch="sd")

    def our_step(x):
        mu, logvar = ours.encoder(x)
        return ours.decoder(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)), mu, logvar

    def their_step(x):
        posterior = theirs.encode(x).latent_dist
        return theirs.decode(posterior.sample()).sample, posterior.mean, posterior.logvar
    speeds = {}
    for name, model, step in [("ours", ours, our_step), ("diffusers", theirs, their_step)] * 2:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            x = images[torch.randint(len(images), (batch_size,))].float() / 127.5 - 1
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                raw, mu, logvar = step(x)
            loss = (raw.float() - x).pow(2).flatten(1).sum(1).mean() / (2 * 0.1 ** 2) + \
                common.kl_divergence(mu.float(), logvar.float()).flatten(1).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        speeds[name] = max(speeds.get(name, 0.0), steps * batch_size / (time.perf_counter() - start))  # the better
    return speeds


def parse(argv):
    """The tool's flags, and the chapter's after -- (wherever the tool's own flags stand before it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python -m tools.benchmark CHAPTER [options] [-- the chapter's flags]")
    p.add_argument("chapter", choices=["01_vanilla_vae", "02_burgess_capacity", "03_lpips_frozen", "04_vae_gan_warmup"])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps profiled (default: 200)")
    p.add_argument("--conventional", action="store_true", help="also 01's model fed by a DataLoader (default: off)")
    p.add_argument("--against-diffusers", type=Path, default=None, metavar="FOLDER",
                   help="also our --arch sd against diffusers' AutoencoderKL, on this image folder, with the chapter's "
                        "--width, --downsample, --image-size, --batch-size and --amp (pip install diffusers) "
                        "(default: off)")
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.flags = argv[split + 1:]
    return args


def main():
    args = parse(sys.argv[1:])
    if args.steps < 20:
        common.fail("--steps must be at least 20: the first of its ten rows holds one-off set-up")
    with tempfile.TemporaryDirectory() as folder:
        parts, speed = profile_chapter(args.chapter, args.steps, args.flags, Path(folder) / "run")
    loop = sum(parts.values())
    print(f"{args.chapter} {' '.join(args.flags)}: {speed:.0f} images/s at steady state; {args.steps} steps, "
          f"{loop:.1f} s in the loop, of which:")
    for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {100 * seconds / loop:5.1f}%  {part}")
    if args.against_diffusers:
        chapter = load_script(args.chapter).parse_args(args.flags)
        train, _ = common.load_folder(args.against_diffusers, chapter.image_size)
        speeds = sd_blocks_against_diffusers(train, chapter.width, chapter.downsample, chapter.batch_size,
                                             min(args.steps, 20), chapter.amp)
        print(f"one training step of SD's blocks, {'bf16' if chapter.amp else 'fp32'}, alone (no bookkeeping): "
              + ", ".join(f"{name} {speed:.1f} images/s" for name, speed in speeds.items()))
    if args.conventional:
        size = 64 if "--image-size" not in args.flags else int(args.flags[args.flags.index("--image-size") + 1])
        print(f"01's model fed by a DataLoader (ToTensor per image, 1 worker), {size} px: "
              f"{conventional_loop(size, min(args.steps, 100)):.0f} images/s")


if __name__ == "__main__":
    main()
