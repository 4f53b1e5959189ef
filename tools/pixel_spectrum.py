"""How unequal are a data set's most important directions? The variances of its leading principal
components (pixels in [0, 1], 20,000 training images), each divided by the first.

    python -m tools.pixel_spectrum                                   # shapes, 64 px
    python -m tools.pixel_spectrum --dataset fashion-mnist --data-dir data

02 uses it to explain its switch-on steps: at small capacity a VAE spends its nats much as PCA
would, on the directions of largest variance. A steep spectrum (one direction far ahead of the
next) lets the dims switch on one at a time; a flat one, with near-equal variances, lets several
switch on together.
"""
import argparse

import torch

import common  # tools/__init__.py puts the repository's root on sys.path


def leading_variances(images, k=10):
    """uint8 (N, C, H, W) -> the k largest principal-component variances, divided by the largest."""
    x = images.flatten(1).double() / 255
    x = x - x.mean(0)
    variances = torch.linalg.eigvalsh(x.T @ x / len(x)).flip(0)[:k]  # ascending -> descending
    return (variances / variances[0]).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=common.DATASETS, default="shapes")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=None, help="(default: the scripts' default for the data set)")
    p.add_argument("--images", type=int, default=20_000, help="training images used (default: 20000)")
    args = p.parse_args()
    args.image_size = args.image_size or (64 if args.dataset in ("shapes", "celeba", "folder") else 32)
    train, _ = common.load_data(args)
    ratios = leading_variances(train[:args.images])
    print(f"{args.dataset}, {args.image_size} px: leading PCA variances / first: "
          + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
