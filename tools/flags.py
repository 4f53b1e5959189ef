"""The flags every chapter takes (data, model, length, the run's files) and the defaults that depend on the data set;
each chapter adds the flags of its idea and reads them all in its own loop. Help strings end in (default: X)."""
import argparse
import math

import common


def at_least(low, kind=int, strictly=False):
    """An argparse type: a finite number of `kind`, at least `low` (above it, strictly); argparse reports anything
    else as bad input (exit 2). A check of its own catches nan, which passes every comparison's test."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}")
        if not math.isfinite(value) or value < low or strictly and value == low:
            raise argparse.ArgumentTypeError(f"must be {'above' if strictly else 'at least'} {low}, got {text}")
        return value
    return number


def parser(script, doc, steps):
    """The shared flags; `steps`: the chapter's default length, in whole epochs."""
    p = argparse.ArgumentParser(script + ".py", description=doc, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=common.DATASETS, default="shapes", help="(default: shapes, drawn by code)")
    p.add_argument("--data-dir", help="where data sets live; for folder, the image folder (default: data)")
    p.add_argument("--image-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="(default: 64; mnist, fashion-mnist, cifar10: 32)")
    p.add_argument("--latent", choices=["vector", "spatial"],
                   help="one code per image, or a map of codes (default: a map for photos and --arch sd)")
    p.add_argument("--latent-dim", type=at_least(1), help="a vector's dims, a map's channels (default: 10, 64, 4)")
    p.add_argument("--downsample", type=int, choices=[4, 8], help="a map's pixels per code, a side (default: 4)")
    p.add_argument("--arch", choices=["plain", "sd"], default="plain", help="a map's blocks: plain, or Stable "
                   "Diffusion's (its KL-f8 at --width 128 --downsample 8) (default: plain)")
    p.add_argument("--width", type=at_least(1), default=32, help="channels of the first conv (default: 32)")
    p.add_argument("--decoder-std", type=at_least(0.0, float, strictly=True),
                   help="the Gaussian decoder's sigma: the price of detail, see 01 (default: 0.7071; 0.1 for a map)")
    p.add_argument("--epochs", type=at_least(1), help=f"passes over the data (default: whole ones, >= {steps:,} steps)")
    p.add_argument("--max-steps", type=at_least(0), default=0, help="cap on optimizer steps, 0 = none (default: 0)")
    p.add_argument("--batch-size", type=at_least(2), default=64, help="the global batch (default: 64)")
    p.add_argument("--lr", type=at_least(0.0, float, strictly=True), default=1e-3,
                   help="Adam's learning rate (default: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="(default: auto, CUDA's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, on CUDA or a CPU with bf16 (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (default: off)")
    p.add_argument("--init-from", help="start from this autoencoder.pt's weights, as a new run (default: none)")
    p.add_argument("--train", choices=["all", "decoder"], default="all",
                   help="decoder: the encoder stays frozen, and with it the codes (default: all)")
    p.add_argument("--ema", type=at_least(0.0, float), default=0.0, help="decay in [0, 1) of a moving average of the "
                   "weights and BatchNorm's statistics, which is scored and exported (default: 0, off)")
    p.add_argument("--out", help="output folder (default: runs/<script>/<dataset>-<time>)")
    p.add_argument("--resume", help="continue the run saved in this checkpoint.pt (default: none)")
    p.add_argument("--log-every", type=at_least(1), default=50, help="steps between metrics rows (default: 50)")
    p.add_argument("--checkpoint-every", type=at_least(0), default=0,
                   help="a checkpoint every N steps too (default: 0: at each epoch's end and the run's only)")
    p.add_argument("--eval-every", type=at_least(0), default=0, help="steps between eval.csv rows (default: 0)")
    p.add_argument("--eval-images", type=at_least(0), default=0,
                   help="test images scored at the end (default: 0, a quarter of those trained on, 256 to 10,000)")
    p.set_defaults(steps=steps)
    return p


def parse(p, argv=None, saved=None):
    """Parse; `saved` (a checkpoint's flags, for --resume) are the values the flags given now override. Then the
    defaults that depend on the data set, and the checks across flags (exit 2)."""
    args = p.parse_args(argv, namespace=argparse.Namespace(**(saved or {})))
    photos = args.dataset in ("cifar10", "celeba", "folder")
    args.image_size = args.image_size or (32 if args.dataset in ("mnist", "fashion-mnist", "cifar10") else 64)
    args.latent = args.latent or ("spatial" if photos or args.arch == "sd" else "vector")
    args.latent_dim = args.latent_dim or (4 if args.latent == "spatial" else 64 if photos else 10)
    args.decoder_std = args.decoder_std or (0.1 if args.latent == "spatial" else math.sqrt(0.5))
    if args.dataset == "shapes" and args.data_dir is not None:
        common.fail("--data-dir is for data read from files; shapes is drawn by code (a folder: --dataset folder)")
    if args.dataset != "shapes":
        args.data_dir = args.data_dir or "data"
    if args.latent == "spatial":
        args.downsample = args.downsample or 4
    elif args.downsample or args.arch == "sd":
        common.fail("--downsample and --arch sd make a code map; this run has a code vector (drop --latent vector)")
    if args.arch == "sd" and args.width % 32:
        common.fail(f"--arch sd normalises in GroupNorm's 32 groups: --width must be a multiple of 32, "
                    f"not {args.width}")
    if getattr(args, "capacity_max", 0) is None:  # 02-04's C_max: 25 nats for a code vector (Burgess et al.),
        codes = args.latent_dim * (args.image_size // args.downsample) ** 2 if args.latent == "spatial" else 0
        args.capacity_max = 1.5 * codes if codes else 25.0  # 1.5 for each value of a code map
    if args.ema >= 1:
        common.fail(f"--ema is a decay: below 1 (0.99 averages about the last 100 steps), not {args.ema}")
    if args.train == "decoder" and not args.init_from:
        common.fail("--train decoder keeps the encoder of a trained model: name it with --init-from MODEL.pt")
    return args
