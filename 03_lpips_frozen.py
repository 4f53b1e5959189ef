"""03 - A perceptual loss (LPIPS) beside the pixel loss, frozen whole.

01 and 02 blur: under a Gaussian likelihood the best guess at an uncertain edge is the average of its
possible positions, a soft ramp. LPIPS (Zhang et al. 2018) compares images through the features of a
fixed network (AlexNet) with learned per-channel weights (the "lin" heads), and a blurred edge costs
more there. Added to 02, per pixel value (P = C x H x W, as latent-diffusion does) and priced by sigma:

    loss = [sum (x - m)^2 + lpips_weight * P * LPIPS(m, x)] / (2 sigma^2) + gamma * |KL - C|

The trap: lpips.LPIPS freezes only its backbone. If its lin heads reach an optimizer, it lowers the
loss the cheap way, driving them below zero; the "distance" turns negative and the decoder is paid
to add the differences LPIPS should punish: ripple noise. So the module is frozen whole, kept in eval
mode and out of the optimizer, and checked. --unfreeze-lpips replays the incident and detects it.

Run:   python 03_lpips_frozen.py                          # needs the ImageNet AlexNet file, see README
       python 03_lpips_frozen.py --lpips-random-backbone  # offline: runs, but NOT a perceptual metric
       python 03_lpips_frozen.py --lpips-random-backbone --unfreeze-lpips   # the incident
See:   runs/03_lpips_frozen/<dataset>-<time>/: recon.png, curves.png (the LPIPS term), summary.json
       (test_lpips, lpips_incident_step). On photos (README) it keeps structure that 02 blurs away.
Papers: Zhang et al. 2018 (LPIPS); Rombach et al. 2022 (latent diffusion's autoencoder loss).
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=750)
    parser.add_argument("--gamma", type=float, default=100.0, help="weight of |KL - C| (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None, help="C_max, nats (default: 25; code map: 1.5 per value)")
    parser.add_argument("--capacity-steps", type=int, default=500, help="steps over which C rises to C_max (default: 500)")
    parser.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS per pixel value (default: 1)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex", help="LPIPS backbone (default: alex)")
    parser.add_argument("--lpips-random-backbone", action="store_true", help="no download; NOT a perceptual metric (default: off)")
    parser.add_argument("--unfreeze-lpips", action="store_true", help="train LPIPS's lin heads: the incident (default: off)")
    args = common.parse_args(parser, argv)
    args.recon = "mse"  # LPIPS compares images in [-1, 1]
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if min(args.gamma, args.capacity_max, args.capacity_steps, args.lpips_weight) < 0:
        common.fail("--gamma, --capacity-max, --capacity-steps and --lpips-weight must not be negative")
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
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held. A function
    of the step alone, so a resumed run continues C exactly where it stopped."""
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
    if args.lpips_random_backbone:
        print("warning: LPIPS has a RANDOM backbone (--lpips-random-backbone): its numbers are not a perceptual metric")
    # centre_mu: mu = W BatchNorm(h), BN without scale or shift and no bias after it: in training the batch mean of mu is 0
    # and the information-free KL 1/2 ||E[mu]||^2 is closed (a code map: per channel)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial", centre_mu=True).to(device)
    trained = list(model.parameters())
    if args.unfreeze_lpips:  # the incident, on purpose: the lin heads join the optimizer
        perceptual.lins.requires_grad_(True)
        trained += list(perceptual.lins.parameters())
    elif any(p.requires_grad for p in perceptual.parameters()):  # frozen: checked, not assumed
        raise RuntimeError("an LPIPS parameter still requires grad")
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    # the first step at which a lin weight, and an image's LPIPS, went below zero (0 = not yet), on the device
    negative_weight_step, negative_lpips_step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    run = common.Run(args, SCRIPT, device, train, model=model, optimizer=optimizer, lpips_lins=perceptual.lins,
                     negative_weight_step=negative_weight_step, negative_lpips_step=negative_lpips_step)
    reported = set()  # incidents already reported
    encoder, decoder = (torch.compile(m) if args.compile else m for m in (model.encoder, model.decoder))

    for step in run.steps():
        x = common.to_model_range(run.batch(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and sigma
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()  # nats per image
        perceptual_per_image = common.lpips_distance(perceptual, torch.tanh(raw.float()), x)  # (B,), in float32
        # KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) per dim, batch mean, (D,)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        lpips_term = args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        loss = recon + lpips_term + args.gamma * (kl_per_dim.sum() - target).abs()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.unfreeze_lpips:  # incident detection, on the device: no host sync per step
            negative_weight_step.masked_fill_((negative_weight_step == 0) & (lowest_lin_weight(perceptual) < 0), step + 1)
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)
        # kl_offset: the KL that one shift of every code costs, information-free (02 closes that route)
        row = run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(), capacity=target,
                      kl_dim=kl_per_dim, lpips=perceptual_per_image.mean(), lpips_lin_min=lowest_lin_weight(perceptual))
        for what, first in [("a lin weight", negative_weight_step), ("an image's LPIPS", negative_lpips_step)]:
            if row and int(first) and what not in reported:  # say it loudly, once, and train on
                reported.add(what)
                run.bar.write(f"LPIPS INCIDENT at step {int(first)}: {what} went below zero. LPIPS is being trained, "
                              "not used: expect ripple noise. Freeze it (drop --unfreeze-lpips).")

    # ------------------------------------------------------------------------- evaluation and outputs
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                  device, args, train=train,
                                  extra=lambda x, mean: {"test_lpips": common.lpips_distance(perceptual, mean.float(), x)})
    ramp = [[r["kl"], r["capacity"]] for r in run.rows if r["step"] <= args.capacity_steps]  # does the KL follow C?
    follows = torch.corrcoef(torch.tensor(ramp).T)[0, 1].item() if len(ramp) > 2 else None
    incident = [s for s in (int(negative_weight_step), int(negative_lpips_step)) if s > 0]
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
