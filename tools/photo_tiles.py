"""Real photos for the `folder` data set, offline: square crops of the photos that scikit-image
ships (not a requirement of the scripts; `pip install scikit-image` for this tool only).

    python -m tools.photo_tiles data/photo_tiles
    python 03_lpips_frozen.py --dataset folder --data-dir data/photo_tiles

Each photo gives --crops crops at random places, with sides between a quarter and a half of the
photo's shorter side, saved as 128-px PNGs; the scripts resize them to --image-size (default 64).
Whole photos are held out: the crops of astronaut, brick and chelsea (a face and hair, a brick
wall, cat fur) go to test/, those of the other 15 to train/, so the test measures how well a model
codes photos it has never seen. Grey photos stay grey (the folder loader converts them to RGB).
"""
import argparse
from pathlib import Path

import torch

from tools import ROOT  # noqa: F401,E402  also puts the repository root on sys.path
import common  # noqa: E402

# Photographs only: scikit-image also ships drawings and test patterns (logo, checkerboard, phantom).
# (cat is chelsea under another name, so it is left out.)
TEST_PHOTOS = ["astronaut", "brick", "chelsea"]
TRAIN_PHOTOS = ["camera", "cell", "clock", "coffee", "coins", "grass", "gravel", "horse", "hubble_deep_field",
                "immunohistochemistry", "moon", "page", "retina", "rocket", "text"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the crops to")
    p.add_argument("--crops", type=int, default=150, help="crops per photo (default: 150)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    args = p.parse_args()
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        common.fail("this tool needs scikit-image, which the scripts do not: pip install scikit-image")
    g = torch.Generator().manual_seed(args.seed)
    for name in TEST_PHOTOS + TRAIN_PHOTOS:
        out = Path(args.out) / ("test" if name in TEST_PHOTOS else "train")
        out.mkdir(parents=True, exist_ok=True)
        try:
            photo = getattr(skimage.data, name)()  # (H, W) or (H, W, 3) uint8
        except Exception as e:  # a scikit-image version that lacks it, or fetches it from the network
            common.fail(f"scikit-image could not give its photo {name!r} ({type(e).__name__}: {e})")
        h, w = photo.shape[:2]
        short = min(h, w)
        for i in range(args.crops):
            side = int(torch.randint(short // 4, short // 2 + 1, (1,), generator=g))
            top, left = (int(torch.randint(0, n - side + 1, (1,), generator=g)) for n in (h, w))
            crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((128, 128), Image.LANCZOS)
            crop.save(out / f"{name}_{i:03d}.png")
    print(f"{args.out}: train/ {len(TRAIN_PHOTOS) * args.crops} crops of {len(TRAIN_PHOTOS)} photos, "
          f"test/ {len(TEST_PHOTOS) * args.crops} crops of {len(TEST_PHOTOS)} photos")


if __name__ == "__main__":
    main()
