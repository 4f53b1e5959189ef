"""How does a shapes run code the sprite's position? For pos_x and pos_y, take the curve of mean
codes E[mu | position] over the 32 positions and measure its shape.

    python -m tests.position_code runs/02_burgess_capacity/shapes-<time>    # any 01-04 shapes run

A position coded along one direction of z (one dim, or one mix of dims) draws a straight line:
the first direction holds nearly all of the curve's variance. A position coded as a loop through
two dims, like a sine and a cosine of the position, splits the variance about evenly between two
directions, and the curve turns most of the way round a circle in their plane. 02 uses it to
explain why the dims of x and y switch on as a group of four.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for common
import common  # noqa: E402
from tests.conftest import checkpoint_codes  # noqa: E402


def curve_shape(mu, values, n_values):
    """mu (N, D) codes, values (N,) factor values 0..n_values-1 -> (share of the curve's variance in
    its first direction, in its first two, degrees the curve turns around its centre in that plane)."""
    means = torch.stack([mu[values == v].mean(0) for v in range(n_values)]).double()  # (n_values, D)
    centred = means - means.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    shares = s.pow(2) / s.pow(2).sum()
    plane = centred @ vt[:2].T  # (n_values, 2)
    angle = torch.atan2(plane[:, 1], plane[:, 0])
    turns = (angle.diff() + math.pi) % (2 * math.pi) - math.pi  # each step's turn, in (-pi, pi]
    return shares[0].item(), shares[:2].sum().item(), math.degrees(turns.sum().abs().item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a shapes run's output folder (it holds checkpoint.pt)")
    args = p.parse_args()
    mu, factors = checkpoint_codes(args.run)
    for k, name in enumerate(common.SHAPE_FACTORS):
        if name.startswith("pos"):
            first, two, turn = curve_shape(mu, factors[:, k], common.SHAPE_FACTORS[name])
            print(f"{name}: E[mu | {name}] has {first:.0%} of its variance in one direction, {two:.0%} in two; "
                  f"in that plane it turns {turn:.0f} degrees around its centre")


if __name__ == "__main__":
    main()
