"""How does a shapes run code the sprite's position? For pos_x and pos_y, take the curve of mean
codes E[mu | position] over the 32 positions and measure its shape.

    python -m tools.position_code runs/02_burgess_capacity/shapes-<time>    # any 01-04 shapes run

A position coded along one direction of z (one dim, or one mix of dims) draws a straight line:
the first direction holds nearly all of the curve's variance. A position coded as a loop through
two dims, like a sine and a cosine of the position, splits the variance about evenly between two
directions, and the curve turns most of the way round a circle in their plane. 02 uses it to
explain why the dims of x and y switch on as a group of four. It draws both curves, each in its
own plane, into position_code.png in the run folder, and prints MIG (Chen et al. 2018) and which true
factor each dim that switched on knows most about.
"""
import argparse
import json
import math
from pathlib import Path

import torch

import common
from tools import load_run


def run_codes(out):
    """(mu, true factors) of the shapes test images, from the run's autoencoder.pt: true factors are known only for
    shapes, drawn again at the run's image size."""
    _, a, model = load_run(out, dataset="shapes")
    _, test, factors = common.make_shapes(50_000, 5_000, a.image_size)  # the run's own test set
    with torch.no_grad():
        mu = torch.cat([model.encode(chunk.float() / 127.5 - 1)[0] for chunk in test.split(500)])
    return mu, factors


def factor_information(mu, factors, bins=20):
    """What each latent dim knows about each true factor: mutual information between dim j of mu (N, D),
    cut into `bins` equal-width bins, and factor k (N, K), over the factor's entropy -> (D, K) in [0, 1]."""
    codes = ((mu - mu.min(0).values) / (mu.max(0).values - mu.min(0).values + 1e-12) * bins).long().clamp(max=bins - 1)

    def mutual_information(a, b):  # discrete, in nats, from the joint histogram
        joint = torch.bincount(a * (b.max() + 1) + b, minlength=int((a.max() + 1) * (b.max() + 1))).double()
        joint = (joint / joint.sum()).view(int(a.max()) + 1, -1)
        independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        return (joint * (joint / independent).log()).nan_to_num().sum().item()
    entropy = [mutual_information(factors[:, k], factors[:, k]) for k in range(factors.shape[1])]  # I(v; v) = H(v)
    return torch.tensor([[mutual_information(codes[:, j], factors[:, k]) / entropy[k] for k in range(factors.shape[1])]
                         for j in range(mu.shape[1])])


def mutual_information_gap(mu, factors, bins=20):
    """MIG (Chen et al. 2018), the histogram estimate on mu as disentanglement_lib computes it: for each
    factor, the gap between the two dims that know most about it -> (mean over factors, {factor: gap})."""
    top2 = factor_information(mu, factors, bins).topk(2, dim=0).values  # (2, K)
    gaps = {name: (top2[0, k] - top2[1, k]).item() for k, name in enumerate(common.SHAPE_FACTORS)}
    return sum(gaps.values()) / len(gaps), gaps


def curve_shape(mu, values, n_values):
    """mu (N, D) codes, values (N,) factor values 0..n_values-1 -> (share of the curve's variance in
    its first direction, in its first two, degrees the curve turns around its centre in that plane,
    the curve in that plane (n_values, 2))."""
    means = torch.stack([mu[values == v].mean(0) for v in range(n_values)]).double()  # (n_values, D)
    centred = means - means.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    shares = s.pow(2) / s.pow(2).sum()
    plane = centred @ vt[:2].T  # (n_values, 2)
    angle = torch.atan2(plane[:, 1], plane[:, 0])
    turns = (angle.diff() + math.pi) % (2 * math.pi) - math.pi  # each step's turn, in (-pi, pi]
    return shares[0].item(), shares[:2].sum().item(), math.degrees(turns.sum().abs().item()), plane


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a shapes run's output folder (it holds checkpoint.pt)")
    args = p.parse_args()
    mu, factors = run_codes(args.run)
    info, names = factor_information(mu, factors), list(common.SHAPE_FACTORS)  # (D, K)
    mig, gaps = mutual_information_gap(mu, factors)
    print(f"MIG {mig:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in gaps.items()) + ")")
    for e in json.loads((Path(args.run) / "summary.json").read_text())["switch_on"]:
        print(f"z{e['dim']} (switched on at step {e['step']}) knows most about {names[info[e['dim']].argmax()]}: "
              f"{info[e['dim']].max():.2f} of its entropy")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (k, name) in zip(axes, [(3, "pos_x"), (4, "pos_y")]):
        first, two, turn, plane = curve_shape(mu, factors[:, k], common.SHAPE_FACTORS[name])
        print(f"{name}: E[mu | {name}] has {first:.0%} of its variance in one direction, {two:.0%} in two; "
              f"in that plane it turns {turn:.0f} degrees around its centre")
        ax.plot(*plane.T, color="lightgray", zorder=1)
        dots = ax.scatter(*plane.T, c=range(len(plane)), cmap="viridis", zorder=2)
        ax.plot(0, 0, "k+")
        ax.set_title(f"E[mu | {name}]: turns {turn:.0f} degrees", fontsize=10)
        ax.set_xlabel(f"first direction ({first:.0%})")
        ax.set_ylabel(f"second direction ({two - first:.0%})")
        ax.set_aspect("equal", "datalim")
        fig.colorbar(dots, ax=ax, shrink=0.8, label=f"{name} (0 = left/top)")
    fig.tight_layout()
    fig.savefig(Path(args.run) / "position_code.png", dpi=100)
    print(f"drawn in {Path(args.run) / 'position_code.png'}")


if __name__ == "__main__":
    main()
