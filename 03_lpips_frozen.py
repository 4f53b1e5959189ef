"""03 - A perceptual loss (LPIPS) beside the pixel loss, frozen whole.

Under a Gaussian likelihood the best guess at an uncertain edge is the average of its positions: blur.
LPIPS (Zhang et al. 2018) compares images through a fixed network's features (AlexNet) weighted by
learned "lin" heads, where a blurred edge costs more. Added to 02 per pixel value (P = C x H x W, as
latent diffusion scales it):  loss = [sum (x - m)^2 + lpips_weight * P * LPIPS] / (2 sigma^2) + gamma * |KL - C|.
The trap: lpips.LPIPS freezes only its backbone. Lin heads that reach an optimizer are driven below
zero, the "distance" turns negative, and the decoder is paid to paint ripple noise. So LPIPS is frozen
whole, in eval mode, out of the optimizer, and checked; --unfreeze-lpips replays the incident.

Run:   python 03_lpips_frozen.py --lpips-random-backbone   # offline, NOT a perceptual metric (README)
See:   runs/03_lpips_frozen/<dataset>-<time>/: recon.png, curves.png, summary.json (test_lpips).
Papers: Zhang et al. 2018 (LPIPS); Rombach et al. 2022 (latent diffusion's autoencoder loss).
"""
from pathlib import Path

import torch

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=750)  # 02's 3,000 / 4 (with C's ramp): a step with LPIPS costs over 2x
    parser.add_argument("--gamma", type=float, default=100.0, help="weight of |KL - C| (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None, help="C_max, nats (default: 25; code map: 1.5 per value)")
    parser.add_argument("--capacity-steps", type=int, default=500, help="steps over which C rises to C_max (default: 500)")
    parser.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS per pixel value (default: 1)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex", help="LPIPS backbone (default: alex)")
    parser.add_argument("--lpips-random-backbone", action="store_true", help="no download; NOT a perceptual metric (default: off)")
    parser.add_argument("--unfreeze-lpips", action="store_true", help="train LPIPS's lin heads: the incident (default: off)")
    args = common.parse_args(parser, argv)
    args.recon = "mse"  # from here on a Gaussian decoder: LPIPS compares images in [-1, 1]
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if min(args.gamma, args.capacity_max, args.capacity_steps, args.lpips_weight) < 0:
        common.fail("--gamma, --capacity-max, --capacity-steps and --lpips-weight must not be negative")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, decoder_std):
    """-log N(x; tanh(raw), sigma^2) of each image, up to 01's constant: sum (x - m)^2 / (2 sigma^2), (B,) nats."""
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held."""
    return capacity_max * min(1.0, step / capacity_steps) if capacity_steps else capacity_max


def lowest_lin_weight(perceptual):
    """The smallest weight of the lin heads: 0 or above as released, below 0 once trained."""
    return torch.stack([p.min() for p in perceptual.lins.parameters()]).min()


# ----------------------------------------------------------------------------- training
def main(argv=None):
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    perceptual = common.load_lpips(args.lpips_net, args.lpips_random_backbone, device)  # exit 2 if it cannot load
    # lpips.LPIPS freezes only its backbone; its lin heads still require grad. Freeze all of it, in eval
    # mode: it is a fixed metric, not part of the model.
    perceptual.eval().requires_grad_(False)
    # centre_mu: mu = W BatchNorm(h), no scale, shift or bias after the centring: batch mean of mu 0 (code map: per channel)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial", centre_mu=True).to(device)
    perceptual.lins.requires_grad_(args.unfreeze_lpips)  # --unfreeze-lpips: the incident, on purpose
    if not args.unfreeze_lpips and any(p.requires_grad for p in perceptual.parameters()):  # checked, not assumed
        raise RuntimeError("an LPIPS parameter still requires grad")
    optimizer = torch.optim.Adam([*model.parameters(), *(p for p in perceptual.parameters() if p.requires_grad)], lr=args.lr)
    negative_weight_step, negative_lpips_step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    run = common.Run(args, SCRIPT, device, train, model=model, optimizer=optimizer, lpips_lins=perceptual.lins,
                     negative_weight_step=negative_weight_step, negative_lpips_step=negative_lpips_step)
    encoder, decoder = (torch.compile(m) if args.compile else m for m in (model.encoder, model.decoder))

    for step in run.steps():
        x = common.to_model_range(run.batch(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.decoder_std).mean()  # nats per image
        perceptual_per_image = common.lpips_distance(perceptual, torch.tanh(raw.float()), x)  # (B,), in float32
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (a code map's dim is a channel, summed over positions)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        lpips_term = args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        loss = recon + lpips_term + args.gamma * (kl_per_dim.sum() - target).abs()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the first step at which a lin weight, or an image's LPIPS, went below zero; on the device: no host sync
        if args.unfreeze_lpips:
            negative_weight_step.masked_fill_((negative_weight_step == 0) & (lowest_lin_weight(perceptual) < 0), step + 1)
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)
        # kl_offset: the KL of one shift of every code, no information (from 02 on, centring closes it for a code vector)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(), capacity=target,
                kl_dim=kl_per_dim, lpips=perceptual_per_image.mean(), lpips_lin_min=lowest_lin_weight(perceptual))

    # ------------------------------------------------------------------------- evaluation and outputs
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.decoder_std),
                                  device, args, train=train,  # train: BatchNorm statistics (02 on) recomputed with the final weights
                                  extra=lambda x, mean: {"test_lpips": common.lpips_distance(perceptual, mean.float(), x)})
    ramp = [[r["kl"], r["capacity"]] for r in run.rows if r["step"] <= args.capacity_steps]  # does the KL follow C?
    follows = torch.corrcoef(torch.tensor(ramp).T)[0, 1].item() if len(ramp) > 2 else None
    incident = [s for s in (int(negative_weight_step), int(negative_lpips_step)) if s > 0]
    for what, first in [("a lin weight", negative_weight_step), ("an image's LPIPS", negative_lpips_step)]:
        if int(first):  # say it loudly
            print(f"LPIPS INCIDENT at step {int(first)}: {what} went below zero. LPIPS was trained, not used: "
                  "expect ripple noise. Freeze it (drop --unfreeze-lpips).")
    run.finish(model, test, metrics, mu, test_factors,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]), ("KL follows C", ["kl", "capacity", "kl_offset"]),
                ("LPIPS", ["lpips"])], {"LPIPS incident": min(incident)} if incident else None,
               capacity_at=lambda step: capacity(step, args.capacity_max, args.capacity_steps), kl_capacity_correlation=follows,
               lpips_net=args.lpips_net, lpips_backbone="random" if args.lpips_random_backbone else "imagenet",
               lpips_trainable_params=sum(p.numel() for p in perceptual.parameters() if p.requires_grad),
               lpips_incident_step=min(incident) if incident else None,
               lpips_negative_weight_step=int(negative_weight_step) or None, lpips_negative_value_step=int(negative_lpips_step) or None)


if __name__ == "__main__":
    main()
