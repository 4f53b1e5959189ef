"""Real photos for the `folder` data set, offline: square crops of the photos that scikit-image
ships (not a requirement of the scripts; `pip install scikit-image` for this tool only).

    python -m tools.photo_tiles data/photo_tiles
    python 03_lpips_frozen.py --dataset folder --data-dir data/photo_tiles

Each of 18 photos is split in two: its right-hand strip, a third of its shorter side wide, gives
the test crops, the rest the training crops, so no test pixel is ever trained on while train and
test hold the same kinds of picture. Crops sit at random places in their part, with sides between
a quarter and a third of the photo's shorter side, and are saved as 128-px PNGs; the scripts
resize them to --image-size (default 64). Grey photos stay grey (the folder loader makes them RGB).
"""
import argparse
from pathlib import Path

import torch

import common  # tools/__init__.py puts the repository's root on sys.path

# Photographs only: scikit-image also ships drawings and test patterns (logo, horse, checkerboard, phantom).
# (cat is chelsea under another name, so it is left out; motorcycle is the left view of stereo_motorcycle.)
PHOTOS = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page", "retina", "rocket", "text"]


def crop_boxes(h, w, n_train, n_test, g):
    """[(split, top, left, side)] for one h x w photo: test crops inside its right-hand strip (a third of the
    shorter side wide), training crops left of it; sides from a quarter to a third of the shorter side."""
    short = min(h, w)
    strip = short // 3
    boxes = []
    for split, n, x0, x1 in [("train", n_train, 0, w - strip), ("test", n_test, w - strip, w)]:
        for _ in range(n):
            side = int(torch.randint(short // 4, strip + 1, (1,), generator=g))
            top = int(torch.randint(0, h - side + 1, (1,), generator=g))
            left = int(torch.randint(x0, x1 - side + 1, (1,), generator=g))
            boxes.append((split, top, left, side))
    return boxes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the crops to (its train/ and test/ must not hold images yet)")
    p.add_argument("--crops", type=int, default=150, help="crops per photo, one in six for test/ (default: 150)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--photos", nargs="+", choices=PHOTOS, default=PHOTOS, help="which photos (default: all 18)")
    args = p.parse_args()
    if args.crops < 6:
        common.fail("--crops must be at least 6 (one in six is a test crop)")
    if any(any((Path(args.out) / split).glob("*.png")) for split in ("train", "test")):
        common.fail(f"{args.out} already holds crops; old ones would mix with the new split: "
                    "remove it or give another folder")
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        common.fail("this tool needs scikit-image, which the scripts do not: pip install scikit-image")
    g = torch.Generator().manual_seed(args.seed)
    n_test = args.crops // 6
    for split in ("train", "test"):
        (Path(args.out) / split).mkdir(parents=True, exist_ok=True)
    for name in args.photos:
        try:
            photo = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        except Exception as e:  # a scikit-image version that lacks it, or fetches it from the network
            common.fail(f"scikit-image could not give its photo {name!r} ({type(e).__name__}: {e})")
        h, w = photo.shape[:2]  # (H, W) or (H, W, 3) uint8
        counts = {"train": 0, "test": 0}
        for split, top, left, side in crop_boxes(h, w, args.crops - n_test, n_test, g):
            crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((128, 128), Image.LANCZOS)
            crop.save(Path(args.out) / split / f"{name}_{counts[split]:03d}.png")
            counts[split] += 1
    print(f"{args.out}: train/ {len(args.photos) * (args.crops - n_test)} and test/ {len(args.photos) * n_test} crops "
          f"of {len(args.photos)} photos")


if __name__ == "__main__":
    main()
