"""02 - Burgess et al.'s capacity objective: set how many nats the code carries, and raise them slowly.

01's beta and sigma set the price of a nat, not their number. Burgess et al. (2018) pin the KL, a bound
on the nats the code carries about an image, to a target C:  loss = recon + gamma * |KL - C|,  with C
rising linearly from 0 to C_max, then held. gamma is large, so the KL follows C; while C is small the
encoder spends its few nats where they help most, so the dims switch on (KL > 0.5 nats) one after
another. Below C any KL is rewarded, even a shift of every code (1/2 ||E[mu]||^2 nats, no information):
the encoder centres mu (a code map: per channel only), closing that route for a code vector (kl_offset).

Run:   python 02_burgess_capacity.py                     # shapes, 64 px
See:   runs/02_burgess_capacity/<dataset>-<time>/: curves.png (KL against C), kl_per_dim.png, traversals.png,
       summary.json. Default run: the KL follows C (correlation 1.00) to 24.9 nats; dims switch on at
       C 2.5, 3.1 (two), 5.0 and 5.6 nats.
Papers: Burgess et al. 2018, "Understanding disentangling in beta-VAE"; Higgins et al. 2017 (beta-VAE).
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
    parser.add_argument("--capacity-max", type=float, default=None, help="C_max, nats (default: 25; code map: 1.5 per value)")
    parser.add_argument("--capacity-steps", type=int, default=2000, help="steps over which C rises to C_max (default: 2000)")
    args = common.parse_args(parser, argv)
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if min(args.gamma, args.capacity_max, args.capacity_steps) < 0:
        common.fail("--gamma, --capacity-max and --capacity-steps must not be negative")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, recon, decoder_std):
    """-log p(x|z) of each image, summed over its P pixel values: (B,) nats.
    bce: Bernoulli with logits `raw`, x in [0, 1]:  -sum[x log p + (1 - x) log(1 - p)].
    mse: Gaussian, mean m = tanh(raw), fixed std sigma, x in [-1, 1]:
         -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)); the constant
         has no gradient and is left out here (common.evaluate adds it back for test_neg_elbo)."""
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
    train, test, test_factors = common.load_data(args)
    # centre_mu: mu = W BatchNorm(h), no scale, shift or bias after the centring: batch mean of mu 0 (code map: per channel)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial", centre_mu=True).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    run = common.Run(args, SCRIPT, device, train, model=model, optimizer=optimizer)  # folder, log, resume
    encoder, decoder = (torch.compile(m) if args.compile else m for m in (model.encoder, model.decoder))

    for step in run.steps():
        x = common.to_model_range(run.batch(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()  # nats per image
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (a code map's dim is a channel, summed over positions)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + args.gamma * (kl_per_dim.sum() - target).abs()  # Burgess et al.'s objective
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # kl_offset: the KL of one shift of every code, no information (from 02 on, centring closes it for a code vector)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(), capacity=target,
                kl_dim=kl_per_dim)

    # ------------------------------------------------------------------------- evaluation and outputs
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                  device, args, train=train)  # train: BatchNorm statistics (02 on) recomputed with the final weights
    ramp = [[r["kl"], r["capacity"]] for r in run.rows if r["step"] <= args.capacity_steps]  # does the KL follow C?
    follows = torch.corrcoef(torch.tensor(ramp).T)[0, 1].item() if len(ramp) > 2 else None
    run.finish(model, test, metrics, mu, test_factors,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]), ("KL follows C", ["kl", "capacity", "kl_offset"])],
               capacity_at=lambda step: capacity(step, args.capacity_max, args.capacity_steps), kl_capacity_correlation=follows)


if __name__ == "__main__":
    main()
