"""Real photos for the `folder` data set, offline: square crops of the photos that scikit-image
ships (not a requirement of the scripts; `pip install scikit-image` for this tool only).

    python -m tools.photo_tiles data/photo_tiles
    python 01_vanilla_vae.py --dataset folder --data-dir data/photo_tiles --epochs 30

Each photo gives --crops crops at random places, with sides between a quarter and a half of the
photo's shorter side, saved as 128-px PNGs; the scripts resize them to --image-size (default 64).
Grey photos stay grey (the folder loader converts every image to RGB). The test split (every tenth
file) holds other crops of the same photos, so it measures fitting, not generalisation to new photos.
"""
import argparse
from pathlib import Path

import torch

from tools import ROOT  # noqa: F401,E402  also puts the repository root on sys.path
import common  # noqa: E402

# Photographs only: scikit-image also ships drawings and test patterns (logo, checkerboard, phantom).
PHOTOS = ["astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
          "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text"]


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    for name in PHOTOS:
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
    print(f"{len(PHOTOS) * args.crops} crops of {len(PHOTOS)} photos in {out}")


if __name__ == "__main__":
    main()
