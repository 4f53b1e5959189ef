"""02 - Burgess et al.'s capacity objective: set how many nats the code carries, and raise them slowly.

01's beta and sigma set the price of a nat, not how many the code holds. Burgess et al. (2018) pin the KL to a
target C:  loss = recon + gamma * |KL - C|,  C rising linearly from 0 to C_max, then held. gamma is large, so the
KL follows C, and while C is small its few nats go where they help most: dims switch on (KL > 0.5 nats) one by
one. The KL pays for one shift of every code (offset), codes spread wider or narrower than N(0, 1) (scale), and
information (info_bound bounds it; common.kl_split). C is bought by the cheapest route, so a code vector's mu is
centred (BatchNorm with no bias after it): no offset. The scale route stays open, and the measure shows what it takes.

Run:   python 02_burgess_capacity.py                  # shapes, 64 px: KL 24.9, info <= 16.9
       python 02_burgess_capacity.py --no-centring    # KL 24.6 nats, 22.7 of them offset: info 0.0
See:   runs/02_burgess_capacity/<dataset>-<time>/: curves.png (KL against C), kl_per_dim.png, traversals.png.
Papers: Burgess et al. 2018; Higgins et al. 2017 (beta-VAE, and the encoder's layer sizes).
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=3000)
    parser.add_argument("--recon", choices=["mse", "bce"], default="mse",
                        help="Gaussian likelihood on [-1, 1] (tanh) or Bernoulli on [0, 1] (logits) (default: mse)")
    parser.add_argument("--gamma", type=float, default=100.0, help="weight of |KL - C| (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None, help="C_max, nats (default: 25; 1.5 per map value)")
    parser.add_argument("--capacity-steps", type=int, default=2000, help="steps for C to reach C_max (default: 2000)")
    parser.add_argument("--no-centring", action="store_true",
                        help="do not centre a code vector's mu: C may then be a shift of every code (default: off)")
    args = common.parse_args(parser, argv)
    if min(args.gamma, args.capacity_max, args.capacity_steps) < 0:
        common.fail("--gamma, --capacity-max and --capacity-steps must not be negative")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, recon, decoder_std):
    """-log p(x|z) of each image, summed over its P pixel values: (B,) nats. bce: Bernoulli with logits `raw`,
    x in [0, 1]: -sum[x log p + (1 - x) log(1 - p)]. mse: Gaussian, mean m = tanh(raw), fixed std sigma, x in
    [-1, 1]: -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)); the constant has no
    gradient and is left out here (common.evaluate adds it back for test_neg_elbo)."""
    if recon == "bce":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").flatten(1).sum(1)
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held."""
    return capacity_max * min(1.0, step / capacity_steps) if capacity_steps else capacity_max


# ----------------------------------------------------------------------------- training
def main(argv=None):
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, _ = common.load_data(args)  # (and shapes' true factors, for tools)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial",
                       centre_mu=not args.no_centring, downsample=args.downsample, arch=args.arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    run = common.Run(args, SCRIPT, device, train, test=test, model=model, optimizer=optimizer)  # log, resume
    encoder, decoder = common.prepare(args, model.encoder, model.decoder)  # --compile; DDP under torchrun

    for step in run.steps():
        x = common.to_model_range(run.batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # torch.randn_like; under torchrun too
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()  # nats per image
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + args.gamma * (kl_per_dim.sum() - target).abs()  # Burgess et al.'s objective
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the batch's KL split: offset + scale (no information) + a bound on the information (common.kl_split)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), **common.kl_split(mu, logvar), capacity=target,
                kl_dim=kl_per_dim)

    # ------------------------------------------------------------------------- evaluation and outputs
    # train: the training images, for BatchNorm's statistics and latent_scale_factor (1 / std of the codes)
    metrics, _ = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                 device, args, train=train)
    ramp = torch.tensor([[r["kl"], r["capacity"]] for r in run.rows if r["step"] <= args.capacity_steps])
    follows = {"kl_capacity_correlation": torch.corrcoef(ramp.T)[0, 1].item(),  # does the KL follow C, in shape
               "kl_capacity_gap": (ramp[:, 0] - ramp[:, 1]).abs().mean().item()} if len(ramp) > 2 else {}  # in nats
    run.finish(model, test, metrics,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                ("KL follows C (nats)", ["kl", "capacity", "info_bound", "kl_scale", "kl_offset"])],
               capacity_at=lambda step: capacity(step, args.capacity_max, args.capacity_steps), **follows)


if __name__ == "__main__":
    main()
