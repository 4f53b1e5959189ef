r"""04 - An adversarial loss (PatchGAN) on top of 03, and the two guards that keep it from wrecking the decoder.

A discriminator D judges 46-px patches real or fake (hinge loss on real and detached reconstructed images, its own
Adam); the decoder is rewarded for patches D takes for real, priced per pixel value like LPIPS in 03:
    loss = L_rec + gamma * |KL - C| + lambda * L_adv,  L_adv = -P mean D(x_hat) / (2 sigma^2),  L_rec: 03's terms
Added naively (D from step 0, lambda fixed at 0.5, no spectral norm), D takes over within 50 steps and PSNR ends
5.7 dB below a guarded run. Two guards from VQGAN each prevent it. Warm-up: D is off until --disc-start (half the
run, after C reaches C_max), so it refines a decoder that already reconstructs. The adaptive weight: lambda =
||grad_W L_rec|| / ||grad_W L_adv|| * --disc-weight (0.1) at the decoder's last layer W, the ratio clamped at 1e4
(it never bound here). Alone, spectral norm on D (default on), --grad-clip or --r1-gamma (off) does not prevent it.
GAN COLLAPSE WARNING (the decoder giving way to D, not 01's posterior collapse), once D acts: D's pull on the decoder
(adv_rec_grad_ratio) above 1, a step's decoder gradient 10x the median before, recon 50% above its best since D began.

Run:   python 04_vae_gan_warmup.py                   # shapes, both guards and spectral norm, 1,562 steps
       python 04_vae_gan_warmup.py --max-steps 300 --capacity-steps 150 --log-every 25 --disc-weight 0.5 \
           --disc-start 0 --no-adaptive-weight --no-spectral-norm  # the failure, on purpose: 3 warnings, 13.7 dB
See:   runs/04_vae_gan_warmup/<dataset>-<time>/: curves.png (dashed: D starts), recon.png, summary.json. README.
Papers: Esser et al. 2021 (VQGAN); Rombach et al. 2022; Isola et al. 2017 (PatchGAN); Miyato et al. 2018.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=1500)  # 2x 03's: the first half is the warm-up
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
    parser.add_argument("--disc-start", type=int, default=None,
                        help="step at which D starts (default: half the run, and not before C reaches C_max)")
    parser.add_argument("--disc-weight", type=float, default=0.1,
                        help="D's gradient against the reconstruction's at the decoder's last layer; with "
                             "--no-adaptive-weight, lambda itself (default: 0.1)")
    parser.add_argument("--no-adaptive-weight", action="store_true",
                        help="lambda = --disc-weight, fixed, as a naive GAN has it (default: off)")
    parser.add_argument("--no-spectral-norm", action="store_true", help="D without spectral norm (default: off)")
    parser.add_argument("--disc-lr", type=float, default=1e-4, help="D's Adam learning rate (default: 0.0001)")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="cap on the decoder's gradient norm, from step 0; "
                        "its norms here are ~1e3 (default: 0 = off)")
    parser.add_argument("--r1-gamma", type=float, default=0.0, help="R1 weight g: g/2 E_real ||grad_x D(x)||^2, D(x) "
                        "the mean patch logit (default: 0 = off)")
    args = common.parse_args(parser, argv)
    args.recon = "mse"  # from here on a Gaussian decoder: LPIPS compares images in [-1, 1]
    if min(args.gamma, args.capacity_max, args.capacity_steps) < 0:
        common.fail("--gamma, --capacity-max and --capacity-steps must not be negative")
    if args.lpips_weight < 0:
        common.fail("--lpips-weight must not be negative")
    if min(args.disc_weight, args.disc_start or 0, args.grad_clip, args.r1_gamma) < 0 or args.disc_lr <= 0:
        common.fail("--disc-weight, --disc-start, --grad-clip, --r1-gamma must not be negative; --disc-lr positive")
    if args.r1_gamma and args.compile:
        common.fail("--r1-gamma backpropagates through a gradient, which torch.compile does not: drop --compile")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, decoder_std):
    """-log N(x; tanh(raw), sigma^2) of each image, up to 01's constant: sum (x - m)^2 / (2 sigma^2), (B,) nats."""
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held."""
    return capacity_max * min(1.0, step / capacity_steps) if capacity_steps else capacity_max


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al. 2017): a logit per overlapping patch of 46 px. Spectral norm (Miyato et al.
    2018; estimated per layer) where latent-diffusion has BatchNorm: D cannot grow arbitrarily steep, nor
    judge by the batch."""

    def __init__(self, channels, width, spectral_norm=True):
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        super().__init__(norm(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),  # (B, w, H/2, W/2)
                         norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),  # (B, 2w, H/4, W/4)
                         norm(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2),  # (B, 4w, H/8, W/8)
                         norm(nn.Conv2d(4 * width, 1, 4, stride=1, padding=1)))  # (B, 1, H/8 - 1, W/8 - 1) logits


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]): D wants real logits >= 1, fake <= -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def r1_penalty(logits_real, x):
    """R1 (Mescheder et al. 2018): E_real ||grad_x D(x)||^2, D(x) an image's mean patch logit. x must require grad;
    create_graph: D's own backward then goes through this gradient, flattening D around the real images."""
    grad, = torch.autograd.grad(logits_real.flatten(1).mean(1).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(rec_loss, adv_loss, last_layer, disc_weight, limit=1e4):
    """lambda = ||grad_W rec|| / (||grad_W adv|| + 1e-4), clamped to [0, limit], detached, times disc_weight: at the
    decoder's last layer W, D's gradient is then disc_weight times the reconstruction's, unless the clamp binds
    (where D's gradient vanishes; or, with an unpriced L_adv, against a summed pixel loss). -> (lambda, bound?)"""
    rec_grad, adv_grad = (common.mean_over_processes(torch.autograd.grad(loss, last_layer, retain_graph=True)[0])
                          for loss in (rec_loss, adv_loss))  # the global batch's (torchrun): one lambda everywhere
    ratio = (rec_grad.norm() / (adv_grad.norm() + 1e-4)).detach()
    return ratio.clamp(0.0, limit) * disc_weight, ratio > limit


def adv_rec_grad_ratio(rec_loss, adv_term, params):
    """||grad adv_term|| / ||grad rec_loss|| over all of `params` (the decoder's), adv_term = lambda * L_adv.
    lambda fixes it at the last layer only; over the whole decoder it says how hard D really pulls.
    Two extra backward passes: measured on logged steps only."""
    def norm(loss):  # of the global batch's gradient, under torchrun too
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.stack([common.mean_over_processes(g).norm() for g in grads]).norm()
    return (norm(adv_term) / (norm(rec_loss) + 1e-12)).detach()


def collapse_symptoms(rows, disc_start_step, pull_limit=1.0, spike=10.0, rebound=1.5):
    """The collapse signature in the rows -> {symptom: message}, empty when healthy or before D acts:
    D's pull on the decoder above the reconstruction's (the README's runs that do not fail: < 0.8), one step's decoder
    gradient norm 10x the median of the rows' mean norms before, recon 50% above its best since the row before D."""
    row, found = rows[-1], {}
    if row["step"] <= disc_start_step:  # before D acts, nothing here is D's doing
        return found
    if row.get("adv_rec_grad_ratio", 0.0) > pull_limit:
        found["D outpulls the reconstruction"] = (f"D's pull on the decoder is {row['adv_rec_grad_ratio']:.2g}x "
                                                  "the reconstruction's")
    norms = sorted(r["dec_grad_norm"] for r in rows[:-1]) or [float("inf")]  # the first row has none before it
    median = max(norms[(len(norms) - 1) // 2], 1e-8)  # the lower median of the rows before this one
    if row["dec_grad_norm_max"] > spike * median:  # the row's largest single step, not its mean
        found["gradient spike"] = (f"a step's decoder gradient norm {row['dec_grad_norm_max']:.3g}, "
                                   f"{row['dec_grad_norm_max'] / median:.0f}x the median before")
    since = rows[max([i for i, r in enumerate(rows) if r["step"] <= disc_start_step], default=0):-1]
    best = min([r["recon"] for r in since], default=float("inf"))  # since the row before D
    if row["recon"] > rebound * best:
        found["recon rebound"] = f"recon {row['recon']:.1f} against its best {best:.1f} since D started"
    return found


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
    disc = PatchDiscriminator(train.shape[1], args.width, spectral_norm=not args.no_spectral_norm).to(device)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))  # as latent diffusion
    warnings_seen = {}  # symptom -> its first warning
    negative_weight_step, negative_lpips_step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    clamped_steps = torch.zeros((), dtype=torch.long, device=device)  # steps at which the adaptive weight's clamp bound
    run = common.Run(args, SCRIPT, device, train, test=test, perceptual=perceptual, model=model, optimizer=optimizer,
                     lpips_lins=perceptual.lins, negative_weight_step=negative_weight_step,
                     negative_lpips_step=negative_lpips_step, disc=disc, disc_optimizer=disc_optimizer,
                     clamped_steps=clamped_steps, extra=lambda: {"warnings_seen": warnings_seen})
    warnings_seen.update(run.resumed["warnings_seen"] if run.resumed else {})  # the collapse warnings so far
    # warm-up: D acts from this 0-based step on (by default half the run, once C has reached C_max)
    disc_start_step = max(args.capacity_steps, run.total_steps // 2) if args.disc_start is None else args.disc_start
    if disc_start_step >= run.total_steps:
        print(f"note: D would start at step {disc_start_step}, but the run ends at step {run.total_steps}: "
              "it never acts, and this run is 03 (pass a smaller --disc-start, or more steps)")
    if args.compile:  # the adaptive weight backpropagates three times through one graph: compiled backward functions
        from torch._functorch import config as functorch_config  # must not reuse or overwrite tensors a later pass
        from torch._inductor import config as inductor_config  # still reads (else an error, and, in torch 2.14,
        functorch_config.donated_buffer = inductor_config.inplace_buffers = False  # wrong gradients in early layers)
    encoder, decoder = common.prepare(args, model.encoder, model.decoder)  # --compile; DDP under torchrun
    discriminator, = common.prepare(args, disc)

    for step in run.steps():
        x = common.to_model_range(run.batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        d_on = step >= disc_start_step  # warm-up: before it, D does nothing
        if step == disc_start_step:
            run.bar.write(f"step {step}: the discriminator starts")
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # torch.randn_like; under torchrun too
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.decoder_std).mean()  # nats per image
        reconstruction = torch.tanh(raw.float())  # the decoder's mean, in [-1, 1], for LPIPS and D
        perceptual_per_image = common.lpips_distance(perceptual, reconstruction, x)  # (B,), in float32
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        lpips_term = args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        rec_loss = recon + lpips_term  # L_rec
        loss = rec_loss + args.gamma * (kl_per_dim.sum() - target).abs()
        weight = g_loss = d_loss = logits_real = logits_fake = torch.zeros((), device=device)
        grad_ratio = 0.0 if run.ends_row(step) else None  # D's pull: measured when a row ends (None: not measured)
        if d_on:
            disc.requires_grad_(False)  # this pass trains the VAE only
            with common.autocast(device, args):
                logits_fake = discriminator(reconstruction).float()
            g_loss = -logits_fake.mean()  # hinge generator loss: raise D's opinion of the reconstructions
            adv_loss = x[0].numel() * g_loss / (2 * args.decoder_std ** 2)  # L_adv, priced per pixel value like LPIPS
            if args.no_adaptive_weight:  # a fixed lambda
                weight = torch.tensor(args.disc_weight, device=device)
            else:  # conv_out: the decoder's last layer, tanh follows it
                weight, clamped = adaptive_weight(rec_loss, adv_loss, model.decoder.conv_out.weight, args.disc_weight)
                clamped_steps += clamped  # on the device: no host sync
            if run.ends_row(step):  # over the whole decoder
                grad_ratio = float(adv_rec_grad_ratio(rec_loss, weight * adv_loss, list(model.decoder.parameters())))
            loss = loss + weight * adv_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the decoder's gradient norm, watched for spikes; with --grad-clip G the gradient is scaled to norm <= G
        dec_grad_norm = nn.utils.clip_grad_norm_(model.decoder.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        if d_on:  # D's step, on detached reconstructions: it must not train the decoder
            disc.requires_grad_(True)
            with common.autocast(device, args):
                x_real = x.detach().requires_grad_(args.r1_gamma > 0)  # R1 differentiates D(x) with respect to x
                logits_real, logits_fake = discriminator(x_real).float(), discriminator(reconstruction.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            if args.r1_gamma:  # R1: a flat D around the real images
                d_loss = d_loss + args.r1_gamma / 2 * r1_penalty(logits_real, x_real)
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()
        # the first step at which a lin weight, or an image's LPIPS, went below zero; on the device: no host sync
        if args.unfreeze_lpips:
            negative_weight_step.masked_fill_((negative_weight_step == 0) & (lowest_lin_weight(perceptual) < 0),
                                              step + 1)
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)
        # the batch's KL split: offset + scale (no information) + a bound on the information (common.kl_split)
        row = run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), **common.kl_split(mu, logvar), capacity=target,
                      kl_dim=kl_per_dim, lpips=perceptual_per_image.mean(), lpips_lin_min=lowest_lin_weight(perceptual),
                      d_loss=d_loss, g_loss=g_loss, adv_weight=weight, logits_real=logits_real.mean(),
                      logits_fake=logits_fake.mean(), dec_grad_norm=dec_grad_norm, adv_rec_grad_ratio=grad_ratio,
                      disc_factor=float(d_on), peaks={"dec_grad_norm_max": dec_grad_norm})
        for symptom, message in (collapse_symptoms(run.rows, disc_start_step) if row else {}).items():
            if symptom not in warnings_seen:
                warnings_seen[symptom] = f"step {row['step']}: {symptom}: {message}"
                run.bar.write(f"GAN COLLAPSE WARNING {warnings_seen[symptom]}")

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
                ("LPIPS", ["lpips"]), ("discriminator", ["d_loss", "logits_real", "logits_fake"]),
                ("decoder grad norm", ["dec_grad_norm", "dec_grad_norm_max"]),
                ("D's pull on the decoder", ["adv_rec_grad_ratio"])],
               {"D starts": disc_start_step} if disc_start_step < run.total_steps else None,
               capacity_at=lambda step: capacity(step, args.capacity_max, args.capacity_steps), **follows,
               lpips_net=args.lpips_net, lpips_backbone="random" if args.lpips_random_backbone else "imagenet",
               lpips_backbone_file=backbone_file, lpips_incident_step=min(incident) if incident else None,
               lpips_trainable_params=sum(p.numel() for p in perceptual.parameters() if p.requires_grad),
               lpips_negative_weight_step=int(negative_weight_step) or None,
               lpips_negative_value_step=int(negative_lpips_step) or None,
               disc_start_step=disc_start_step, disc_steps=max(0, run.total_steps - disc_start_step),
               adaptive_weight_clamped_steps=int(clamped_steps),
               max_dec_grad_norm=max([r["dec_grad_norm_max"] for r in run.rows], default=0.0),
               max_adv_rec_grad_ratio=max([r["adv_rec_grad_ratio"] for r in run.rows], default=0.0),
               collapse_warnings=list(warnings_seen.values()))


if __name__ == "__main__":
    main()
