"""03 - A perceptual loss (LPIPS) beside the pixel loss, frozen whole.

Under a Gaussian likelihood the best guess at an uncertain edge is the average of its positions: blur. LPIPS
(Zhang et al. 2018) compares images through a fixed ImageNet network's features, weighted by learned "lin" heads:
there a blur costs more than a plausible texture. Added per pixel value, as latent diffusion scales it (its
contperceptual.py): loss = [sum (x - m)^2 + lpips_weight * P * LPIPS] / (2 sigma^2) + gamma * |KL - C|, P = x[0].numel()
Where the code is unsure, the decoder now draws a texture, not a blur (shapes: speckled blobs). The trap: lpips.LPIPS
freezes only its backbone; lin heads in an optimizer go below zero, and the decoder is paid to paint noise.

Run:   python 03_lpips_frozen.py                              # shapes, 64 px
       python 03_lpips_frozen.py --unfreeze-lpips --epochs 1  # the incident
See:   runs/03_lpips_frozen/<dataset>-<time>/: recon.png, summary.json: test_lpips (the net trained against),
       test_lpips_vgg (VGG16). Against 02 on this schedule: LPIPS-VGG 0.175 (0.199), PSNR 21.2 dB (21.9).
"""
from pathlib import Path

import torch

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=750)  # 02's 3,000 / 4, C's ramp too: a short CPU run
    parser.add_argument("--gamma", type=float, default=100.0, help="weight of |KL - C| (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None, help="C_max, nats (default: 25; 1.5 per map value)")
    parser.add_argument("--capacity-steps", type=int, default=500, help="steps for C to reach C_max (default: 500)")
    parser.add_argument("--no-centring", action="store_true",
                        help="do not centre a code vector's mu: C may then be a shift of every code (default: off)")
    parser.add_argument("--lpips-weight", type=float, default=1.0, help="weight of LPIPS per pixel value (default: 1)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone (default: alex)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="for tests and smoke runs only: NOT a perceptual metric (default: off)")
    parser.add_argument("--unfreeze-lpips", action="store_true", help="train the lin heads: an incident (default: off)")
    args = common.parse_args(parser, argv)
    args.recon = "mse"  # from here on a Gaussian decoder: LPIPS compares images in [-1, 1]
    if min(args.gamma, args.capacity_max, args.capacity_steps) < 0:
        common.fail("--gamma, --capacity-max and --capacity-steps must not be negative")
    if args.lpips_weight < 0:
        common.fail("--lpips-weight must not be negative")
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
    train, test, _ = common.load_data(args)  # (and shapes' true factors, for tools)
    perceptual, backbone_file = common.load_lpips(args.lpips_net, args.lpips_random_backbone, device)  # or exit 2
    lpips_vgg = None if args.lpips_random_backbone else common.load_lpips("vgg", False, device, required=False)[0]
    # lpips.LPIPS freezes only its backbone: freeze all of it, in eval mode (--unfreeze-lpips thaws the lin heads below)
    perceptual.eval().requires_grad_(False)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial",
                       centre_mu=not args.no_centring, downsample=args.downsample, arch=args.arch).to(device)
    perceptual.lins.requires_grad_(args.unfreeze_lpips)  # --unfreeze-lpips: the incident, on purpose
    if not args.unfreeze_lpips and any(p.requires_grad for p in perceptual.parameters()):
        raise RuntimeError("an LPIPS parameter still requires grad")
    trained = [*model.parameters(), *(p for p in perceptual.parameters() if p.requires_grad)]  # LPIPS: only if unfrozen
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    negative_weight_step, negative_lpips_step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    run = common.Run(args, SCRIPT, device, train, test=test, perceptual=perceptual, model=model, optimizer=optimizer,
                     lpips_lins=perceptual.lins, negative_weight_step=negative_weight_step,
                     negative_lpips_step=negative_lpips_step)
    encoder, decoder = common.prepare(args, model.encoder, model.decoder)  # --compile; DDP under torchrun

    for step in run.steps():
        x = common.to_model_range(run.batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # torch.randn_like; under torchrun too
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.decoder_std).mean()  # nats per image
        perceptual_per_image = common.lpips_distance(perceptual, torch.tanh(raw.float()), x)  # (B,), in float32
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + args.gamma * (kl_per_dim.sum() - target).abs()  # Burgess et al.'s objective
        loss = loss + args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the first step at which a lin weight, or an image's LPIPS, went below zero; on the device: no host sync
        if args.unfreeze_lpips:
            negative_weight_step.masked_fill_((negative_weight_step == 0) & (lowest_lin_weight(perceptual) < 0),
                                              step + 1)
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)
        # the batch's KL split: offset + scale (no information) + a bound on the information (common.kl_split)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), **common.kl_split(mu, logvar), capacity=target,
                kl_dim=kl_per_dim, lpips=perceptual_per_image.mean(), lpips_lin_min=lowest_lin_weight(perceptual))

    # ------------------------------------------------------------------------- evaluation and outputs
    # train: the training images, for BatchNorm's statistics and latent_scale_factor (1 / std of the codes)
    metrics, _ = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.decoder_std),
                                 device, args, train=train,
                                 extra=lambda x, mean: {"test_lpips": common.lpips_distance(perceptual, mean, x)})
    if lpips_vgg is not None:  # on 1,000 test images: a VGG step costs ~45x AlexNet's (docs/speed.md)
        metrics.update(common.vgg_scores(lpips_vgg, common.reconstructions(model, test[:1000], device, args)))
    ramp = torch.tensor([[r["kl"], r["capacity"]] for r in run.rows if r["step"] <= args.capacity_steps])
    follows = {"kl_capacity_correlation": torch.corrcoef(ramp.T)[0, 1].item(),  # does the KL follow C, in shape
               "kl_capacity_gap": (ramp[:, 0] - ramp[:, 1]).abs().mean().item()} if len(ramp) > 2 else {}  # in nats
    incident = [s for s in (int(negative_weight_step), int(negative_lpips_step)) if s > 0]
    for what, first in [("a lin weight", negative_weight_step), ("an image's LPIPS", negative_lpips_step)]:
        if int(first):  # say it loudly
            print(f"LPIPS INCIDENT at step {int(first)}: {what} went below zero; LPIPS was trained. Freeze it.")
    run.finish(model, test, metrics,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                ("KL follows C (nats)", ["kl", "capacity", "info_bound", "kl_scale", "kl_offset"]),
                ("LPIPS", ["lpips"])], {"LPIPS incident": min(incident)} if incident else None,
               capacity_at=lambda step: capacity(step, args.capacity_max, args.capacity_steps), **follows,
               lpips_net=args.lpips_net, lpips_backbone="random" if args.lpips_random_backbone else "imagenet",
               lpips_backbone_file=backbone_file, lpips_incident_step=min(incident) if incident else None,
               lpips_trainable_params=sum(p.numel() for p in perceptual.parameters() if p.requires_grad),
               lpips_negative_weight_step=int(negative_weight_step) or None,
               lpips_negative_value_step=int(negative_lpips_step) or None)


if __name__ == "__main__":
    main()
