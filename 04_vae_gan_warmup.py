"""04 - An adversarial loss (PatchGAN) on top of 03, made safe by warm-up and an adaptive weight.

03's LPIPS term sharpens what MSE blurs, but fine texture is still averaged away. Stable
Diffusion's autoencoder adds a discriminator D that judges small patches real or fake; the decoder
is rewarded for patches D cannot tell from data. Added naively it wrecks the run: at
step 0 the reconstructions are blobs, D wins at once, its gradients dwarf the reconstruction's and
pull the decoder towards whatever fools D - the run "collapses": a spike in the decoder's gradient
norm, the reconstruction loss rebounding, the KL draining, outputs saturating into noise. Two
guards, from latent-diffusion's LPIPSWithDiscriminator:

    warm-up:          disc_factor = 0 until --disc-start (D neither trains nor reaches the decoder);
                      latent-diffusion uses a fixed step, our default 'auto' waits for recon to level off
    adaptive weight:  lambda = ||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4), clamped to [0, 1e4],
                      detached, times --disc-weight; W = the decoder's last layer (decoder.conv_out)
    loss = L_rec + gamma * |KL - C| + disc_factor * lambda * L_adv,
    L_rec = [sum (x - m)^2 + lpips_weight * P * LPIPS] / (2 sigma^2)   (03's loss without the KL term)

L_adv = -mean D(x_hat) (hinge generator loss). With lambda, the norm of the adversarial gradient at
the last layer is disc_weight times the reconstruction gradient's there (unless the clamp acts),
whatever the scales of the two losses. Deeper in the decoder the two are free to differ:
metrics.csv's adv_rec_grad_ratio measures them over all decoder parameters. D: three 4x4 stride-2
convolutions and a 4x4 stride-1 one, LeakyReLU 0.2, a logit per patch, spectral norm; "collapse"
here is the GAN's failure, not 01's posterior collapse. Hinge loss 0.5 (mean relu(1 - D(x)) +
mean relu(1 + D(x_hat))) on detached reconstructions, its own Adam (betas 0.5, 0.9).

Run:   python 04_vae_gan_warmup.py --lpips-random-backbone     # guarded default
       python 04_vae_gan_warmup.py --lpips-random-backbone --disc-start 0 --no-adaptive-weight \
           --disc-weight 1000 --max-steps 400                  # unguarded: the collapse and its warnings
Measured (shapes, 2-core CPU, random LPIPS backbone): the guarded default starts D at step 1,100
(auto) and ends with spectrum error 0.30 against 03's 0.90 at the same length (LPIPS 0.0139
against 0.0135, PSNR 21.72 against 22.29 dB), no collapse warning, 278 s; D's pull on the whole
decoder (adv_rec_grad_ratio) stays at 0.2-0.4 of the reconstruction's. Unguarded, the pull is
1.6-11.5 times the reconstruction's and the run collapses: at step 150 a gradient spike (11x) and
a recon rebound (916 against its best 518), then blank outputs (PSNR 15.0, spectrum error 3.33).
See:   curves.png (dashed line: D starts), recon.png, summary.json (spectrum_error, disc_start_step,
       max_dec_grad_norm, collapse_warnings) in runs/04_vae_gan_warmup/<dataset>-<time>/.
The LPIPS backbone is handled as in 03 (see its docstring); --unfreeze-lpips, 03's demo, is not kept.
Papers: Esser et al. 2021 (VQGAN: adaptive weight, PatchGAN), Rombach et al. 2022 (latent
diffusion's KL autoencoder), Isola et al. 2017 (PatchGAN), Mescheder et al. 2018 (R1).
"""
import contextlib
import io
import math
import time
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import common

SCRIPT = Path(__file__).stem
BACKBONE_WEIGHTS = {"alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,  # what lpips.LPIPS loads
                    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
                    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1}
# NEW: --disc-start auto starts D once the reconstruction term has saturated: the mean of `recon` over
# the last AUTO_WINDOW steps improved on the mean of the AUTO_WINDOW steps before by less than
# AUTO_THRESHOLD (relative), and C has reached C_max (while C rises, recon keeps improving by design).
AUTO_WINDOW, AUTO_THRESHOLD = 200, 0.02
# NEW: collapse monitor thresholds, checked at every metrics row.
SPIKE_FACTOR = 10.0  # decoder gradient norm above 10x the median of the rows so far (healthy runs: < 5x)
REBOUND_FACTOR = 1.5  # recon 50% above its best since D started
KL_DRAIN_FACTOR = 0.25  # KL below a quarter of its highest since D started
SATURATED_SHARE = 0.05  # 5% of output pixels stuck wrong: |pre-tanh| > 5 (tanh's gradient < 2e-4), error > 1


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, epochs=2)
    parser.add_argument("--gamma", type=float, default=100.0,
                        help="weight of |KL - C|; large, so the KL must follow C (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None,
                        help="final capacity C_max, nats (default: 25; for a code map, see common.default_capacity)")
    parser.add_argument("--capacity-steps", type=int, default=500,
                        help="optimizer steps over which C rises from 0 to C_max (default: 500)")
    parser.add_argument("--lpips-weight", type=float, default=1.0,
                        help="weight of LPIPS per pixel value, see 03 (default: 1)")
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex",
                        help="LPIPS backbone; vgg is ~10x slower (default: alex)")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="random backbone, no download: for offline smoke runs, not a perceptual metric (default: off)")
    parser.add_argument("--disc-start", default="auto",
                        help="optimizer step at which D starts, or 'auto' once recon has saturated (default: auto)")  # NEW
    parser.add_argument("--disc-weight", type=float, default=0.5,
                        help="scale of the adaptive weight, or the adversarial weight itself with "
                             "--no-adaptive-weight (default: 0.5, latent-diffusion's)")  # NEW
    parser.add_argument("--no-adaptive-weight", action="store_true", help="use --disc-weight alone (default: off)")  # NEW
    parser.add_argument("--disc-lr", type=float, default=1e-4, help="discriminator Adam learning rate (default: 0.0001)")
    parser.add_argument("--r1-gamma", type=float, default=0.0,
                        help="R1 penalty gamma/2 E||grad_x D(x)||^2 on real images, 0 = off (default: 0)")  # NEW
    parser.add_argument("--no-spectral-norm", action="store_true", help="drop D's spectral norm (default: spectral norm on)")
    parser.add_argument("--grad-clip", type=float, default=0.0,
                        help="clip the VAE's gradient norm to this, 0 = off (default: 0)")  # NEW
    args = common.parse_args(parser, argv)
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if args.disc_start != "auto":
        try:
            args.disc_start = int(args.disc_start)
        except ValueError:
            common.fail(f"--disc-start must be a step number or 'auto', got {args.disc_start!r}")
    for name in ["gamma", "capacity_max", "capacity_steps", "lpips_weight", "disc_weight", "r1_gamma", "grad_clip"]:
        if getattr(args, name) < 0:
            common.fail(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.disc_start != "auto" and args.disc_start < 0:
        common.fail(f"--disc-start must not be negative, got {args.disc_start}")
    if args.disc_lr <= 0:
        common.fail(f"--disc-lr must be positive, got {args.disc_lr}")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, decoder_std):
    """-log N(x; tanh(raw), sigma^2) per image up to a constant: sum over pixels of (x - m)^2 / (2 sigma^2), (B,)."""
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step` (02): 0 -> capacity_max linearly, then held."""
    if capacity_steps == 0:
        return capacity_max
    return capacity_max * min(1.0, step / capacity_steps)


def build_lpips(net, random_backbone, device):
    """The LPIPS module, frozen whole (03). Exit 2 with what to do when the backbone cannot load."""
    weights = BACKBONE_WEIGHTS[net]
    try:  # quiet: torchvision's deprecation warning would break the one-line error
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            perceptual = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as e:  # offline download (URLError), truncated or foreign file (RuntimeError, ...)
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        common.fail(f"cannot load the ImageNet {net} backbone for LPIPS ({type(e).__name__}: {str(e)[:150]}). "
                    f"Put {Path(weights.url).name} (from {weights.url}) in {folder}, or set TORCH_HOME to a "
                    f"folder holding hub/checkpoints/{Path(weights.url).name}; for an offline smoke run only, "
                    f"pass --lpips-random-backbone")
    return perceptual.to(device).eval().requires_grad_(False)


def lpips_distance(perceptual, reconstruction, x):
    """LPIPS per image (B,), inputs in [-1, 1]; grey repeated to 3 channels, under 32 px enlarged (03)."""
    if x.shape[1] == 1:
        reconstruction, x = reconstruction.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
    if x.shape[-1] < 32:
        reconstruction, x = (F.interpolate(t, size=32, mode="bilinear", align_corners=False) for t in (reconstruction, x))
    return perceptual(reconstruction, x).flatten()


class PatchDiscriminator(nn.Module):
    """NEW: PatchGAN (Isola et al. 2017). Three 4x4 stride-2 convolutions halve the image three times,
    a 4x4 stride-1 convolution gives one logit per overlapping patch of about 46 px, so on images
    larger than that D judges local texture rather than the layout the reconstruction loss gets right
    (at 64 px a patch is most of the image; at 32 px every logit sees all of it).
    Spectral norm where latent-diffusion's NLayerDiscriminator has BatchNorm: it holds each layer's
    largest singular value at 1, so D cannot become arbitrarily steep, and D's verdict on an image
    does not depend on the other images in its batch."""

    def __init__(self, channels, width, spectral_norm=True):
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        self.layers = nn.Sequential(
            norm(nn.Conv2d(channels, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # (B, w, 32, 32)
            norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # (B, 2w, 16, 16)
            norm(nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # (B, 4w, 8, 8)
            norm(nn.Conv2d(4 * width, 1, 4, stride=1, padding=1)))  # (B, 1, 7, 7) logits

    def forward(self, x):
        return self.layers(x)


def hinge_d_loss(logits_real, logits_fake):
    """NEW: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]): D wants real logits >= 1, fake <= -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def r1_penalty(disc, real, r1_gamma):
    """NEW: gamma/2 * E_x ||grad_x D(x)||^2 on real images (Mescheder et al. 2018): a flat D around the
    data, so it cannot answer the decoder with steep, exploding gradients. Summed over patch logits."""
    real = real.detach().requires_grad_(True)
    grad, = torch.autograd.grad(disc(real).float().sum(), real, create_graph=True)
    return 0.5 * r1_gamma * grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(rec_loss, adv_loss, last_layer, disc_weight):
    """NEW: lambda = ||grad_W rec|| / (||grad_W adv|| + 1e-4), clamped to [0, 1e4], detached, times
    disc_weight, with W the decoder's last layer: the adversarial gradient's norm there is then disc_weight
    times the reconstruction gradient's, whatever the losses' scales (unless the clamp acts)."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def adv_rec_grad_ratio(rec_loss, adv_term, params):
    """NEW: ||grad_theta adv_term|| / ||grad_theta rec_loss|| over all the decoder's parameters theta,
    adv_term = lambda * L_adv. The adaptive weight fixes this ratio at disc_weight on the last layer
    only; over the whole decoder it is free, so it says how hard D really pulls against the
    reconstruction. Two extra backward passes: measured on logged steps only."""
    rec = torch.autograd.grad(rec_loss, params, retain_graph=True)
    adv = torch.autograd.grad(adv_term, params, retain_graph=True)
    norm = lambda grads: torch.stack([g.norm() for g in grads]).norm()  # noqa: E731
    return (norm(adv) / (norm(rec) + 1e-12)).detach()


def auto_disc_start(rows, capacity_steps, window=AUTO_WINDOW, threshold=AUTO_THRESHOLD):
    """NEW: True once recon has saturated (see AUTO_WINDOW): relative improvement of the mean recon of
    the last `window` steps over the `window` before it below `threshold`, both windows with C at C_max."""
    if not rows or rows[-1]["step"] < capacity_steps + 2 * window:  # both windows after the ramp
        return False
    last = rows[-1]["step"]
    recent = [r["recon"] for r in rows if last - window < r["step"] <= last]
    before = [r["recon"] for r in rows if last - 2 * window < r["step"] <= last - window]
    if not recent or not before:
        return False
    old, new = sum(before) / len(before), sum(recent) / len(recent)
    return (old - new) / abs(old) < threshold


def collapse_symptoms(rows, disc_start_step):
    """NEW: the collapse signature in the metrics rows -> {symptom: message} (empty when healthy).
    The gradient spike is judged against the median of all earlier rows; the rebound and the KL drain
    against the rows since D started (from the last row before the start, when there is one)."""
    if len(rows) < 2:
        return {}
    row, found = rows[-1], {}
    norms = sorted(r["dec_grad_norm"] for r in rows[:-1])
    median = max(norms[(len(norms) - 1) // 2], 1e-8)  # the lower median: a rising run cannot drag it up
    if row["dec_grad_norm"] > SPIKE_FACTOR * median:
        found["gradient spike"] = (f"decoder gradient norm {row['dec_grad_norm']:.3g} is "
                                   f"{row['dec_grad_norm'] / median:.0f}x the median of the rows before")
    if disc_start_step is not None and row["step"] > disc_start_step:
        first = max([i for i, r in enumerate(rows) if r["step"] <= disc_start_step], default=0)
        since = rows[first:-1]  # the baseline: from just before D started up to the previous row
        if since and row["recon"] > REBOUND_FACTOR * min(r["recon"] for r in since):
            found["recon rebound"] = (f"recon {row['recon']:.1f} against its best {min(r['recon'] for r in since):.1f} "
                                      f"since D started")
        if since and row["kl"] < KL_DRAIN_FACTOR * max(r["kl"] for r in since):
            found["KL drain"] = f"KL {row['kl']:.2f} nats against {max(r['kl'] for r in since):.2f} since D started"
    if row["saturated"] > SATURATED_SHARE:
        found["saturated outputs"] = f"{100 * row['saturated']:.0f}% of output pixels stuck at the wrong extreme"
    return found


# ----------------------------------------------------------------------------- training
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    perceptual = build_lpips(args.lpips_net, args.lpips_random_backbone, device)
    batches = common.Batches(train, args.batch_size, args.seed, device)
    out = common.create_run_folder(args, SCRIPT, device)  # only now: bad input leaves no folder behind
    backbone = "random" if args.lpips_random_backbone else "imagenet"
    if backbone == "random":
        print("warning: LPIPS has a RANDOM backbone (--lpips-random-backbone): its numbers are not a perceptual metric")
    total_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images {tuple(train.shape[1:])}, "
          f"{total_steps} steps on {device}, LPIPS-{args.lpips_net} ({backbone} backbone), "
          f"D starts at {args.disc_start}, output in {out}")

    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, "mse",
                       channel_mean=common.channel_mean(train), centre_mu=True,  # centre_mu: see 02
                       spatial=args.latent == "spatial").to(device)
    disc = PatchDiscriminator(train.shape[1], args.width, spectral_norm=not args.no_spectral_norm).to(device)  # NEW
    if any(p.requires_grad for p in perceptual.parameters()):
        raise RuntimeError("an LPIPS parameter still requires grad")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))  # NEW
    running, start_step = common.RunningMeans(), 0
    disc_start_step = args.disc_start if args.disc_start != "auto" else None  # NEW: None = not yet
    negative_lpips_step = torch.zeros((), dtype=torch.long, device=device)
    if args.resume:
        checkpoint = common.load_checkpoint(args.resume)
        model.load_state_dict(checkpoint["model"])
        disc.load_state_dict(checkpoint["disc"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        disc_optimizer.load_state_dict(checkpoint["disc_optimizer"])
        running.load_state_dict(checkpoint["running"], device)
        disc_start_step, start_step = checkpoint["disc_start_step"], checkpoint["step"]
        if args.disc_start != checkpoint["args"]["disc_start"]:  # --disc-start given with --resume wins
            disc_start_step = args.disc_start if args.disc_start != "auto" else None
        negative_lpips_step.fill_(checkpoint["negative_lpips_step"])
        common.restore_rng(checkpoint)
    if args.compile:  # the adaptive weight backpropagates twice through the same graph (retain_graph),
        # which compiled backward functions refuse while they reuse ("donate") their buffers
        torch._functorch.config.donated_buffer = False
    train_model = torch.compile(model) if args.compile else model
    train_disc = torch.compile(disc) if args.compile else disc
    log = common.MetricsLog(out / "metrics.csv", resume_step=start_step if args.resume else None)
    warnings_seen = {}  # NEW: symptom -> first message, for collapse_warnings

    def save_checkpoint(step):
        common.save_checkpoint(out / "checkpoint.pt", script=SCRIPT, args=vars(args), step=step,
                               model=model.state_dict(), disc=disc.state_dict(), optimizer=optimizer.state_dict(),
                               disc_optimizer=disc_optimizer.state_dict(), running=running.state_dict(),
                               disc_start_step=disc_start_step, negative_lpips_step=int(negative_lpips_step),
                               max_dec_grad_norm=float(max_dec_grad_norm))

    bar = tqdm(total=total_steps, initial=start_step, desc=SCRIPT, dynamic_ncols=True)
    timer, timed_steps, train_time = time.perf_counter(), 0, 0.0
    zero, grad_ratio = torch.zeros((), device=device), 0.0
    max_dec_grad_norm = torch.tensor(checkpoint["max_dec_grad_norm"] if args.resume else 0.0, device=device)
    for step in range(start_step, total_steps):
        x = common.to_model_range(batches(step))  # (B, C, H, W) in [-1, 1], on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)
        # NEW: warm-up. Before the start D is neither run nor trained, and nothing of it reaches the decoder.
        disc_factor = 1.0 if disc_start_step is not None and step >= disc_start_step else 0.0
        with common.autocast(device, args):
            raw, mu, logvar = train_model(x)
        reconstruction = torch.tanh(raw.float())
        recon = recon_loss(raw.float(), x, args.decoder_std).mean()  # summed over pixels, averaged over the batch
        kl_per_dim = common.kl_per_dim(mu, logvar)  # (D,) nats
        perceptual_per_image = lpips_distance(perceptual, reconstruction, x)
        lpips_term = args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        rec_loss = recon + lpips_term  # L_rec of the docstring
        loss = rec_loss + args.gamma * (kl_per_dim.sum() - target).abs()
        weight, g_loss, d_loss, logits_real, logits_fake = (zero,) * 5
        if disc_factor > 0:
            disc.requires_grad_(False)  # this pass trains the VAE only
            with common.autocast(device, args):
                logits_fake = train_disc(reconstruction).float()
            g_loss = -logits_fake.mean()  # hinge generator loss: raise D's opinion of the reconstructions
            weight = adaptive_weight(rec_loss, g_loss, model.decoder.conv_out.weight, args.disc_weight)
            if args.no_adaptive_weight:
                weight = torch.tensor(args.disc_weight, device=device)
            if (step + 1) % args.log_every == 0 or step + 1 == total_steps:  # NEW: for the metrics row
                grad_ratio = float(adv_rec_grad_ratio(rec_loss, weight * g_loss, list(model.decoder.parameters())))
            loss = loss + disc_factor * weight * g_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # NEW: the decoder's gradient norm, before clipping: the collapse monitor watches it for spikes
        dec_grad_norm = torch.stack([p.grad.norm() for p in model.decoder.parameters()]).norm()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        if disc_factor > 0:  # NEW: D's step, on detached reconstructions: it must not train the decoder
            disc.requires_grad_(True)
            with common.autocast(device, args):
                logits_real, logits_fake = train_disc(x).float(), train_disc(reconstruction.detach()).float()
            d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
            if args.r1_gamma > 0:
                d_loss = d_loss + r1_penalty(disc, x, args.r1_gamma)  # eager: compiled graphs lack double backward
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()
            logits_real, logits_fake = logits_real.mean(), logits_fake.mean()
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)

        running.add(loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(),
                    lpips=perceptual_per_image.mean(),
                    d_loss=d_loss, g_loss=g_loss, adaptive_weight=weight, dec_grad_norm=dec_grad_norm,
                    logits_real=logits_real, logits_fake=logits_fake,
                    # share of pixels stuck in tanh's flat tail on the wrong side: confidently wrong, and no
                    # gradient to fix them (on shapes most pixels are legitimately deep in the black tail)
                    saturated=((raw.detach().abs() > 5) & ((reconstruction.detach() - x).abs() > 1)).float().mean(),
                    kl_dim=kl_per_dim)
        max_dec_grad_norm = torch.maximum(max_dec_grad_norm, dec_grad_norm)  # no host sync: read at the end
        bar.update(1)
        timed_steps += 1
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            row = running.pop()  # the host sync of this row
            if not all(map(math.isfinite, row.values())):
                common.diverged(done, out)
            elapsed = time.perf_counter() - timer
            train_time += elapsed
            log.write({"step": done, "epoch": step // batches.steps_per_epoch, **row, "capacity": target,
                       "disc_factor": disc_factor, "adv_rec_grad_ratio": grad_ratio,
                       "images_per_s": timed_steps * args.batch_size / elapsed})
            grad_ratio = 0.0
            bar.set_postfix(recon=f"{row['recon']:.1f}", lpips=f"{row['lpips']:.3f}", kl=f"{row['kl']:.2f}",
                            d=f"{row['d_loss']:.2f}", w=f"{row['adaptive_weight']:.2g}")
            timer, timed_steps = time.perf_counter(), 0
            if disc_start_step is None and auto_disc_start(log.rows, args.capacity_steps):  # NEW
                disc_start_step = done
                bar.write(f"step {done}: recon has saturated, the discriminator starts")
            for symptom, message in collapse_symptoms(log.rows, disc_start_step).items():  # NEW
                if symptom not in warnings_seen:
                    warnings_seen[symptom] = f"step {done}: {symptom}: {message}"
                    bar.write(f"COLLAPSE WARNING {warnings_seen[symptom]}")
        if done % batches.steps_per_epoch == 0 or done == total_steps:
            if not common.all_finite(model, disc, *running.sums.values()):
                common.diverged(done, out)
            save_checkpoint(done)
    bar.close()

    # ------------------------------------------------------------------------- evaluation and outputs
    common.recalibrate_batchnorm(model, train)  # exact BN statistics for mu's centring (see common)
    save_checkpoint(total_steps)  # so a model loaded from checkpoint.pt has them too
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.decoder_std), device, args,
                                  extra=lambda x, mean: {"test_lpips": lpips_distance(perceptual, mean.float(), x)})
    ramp = [r for r in log.rows if r["step"] <= args.capacity_steps]
    follows = common.correlation([r["kl"] for r in ramp], [r["capacity"] for r in ramp]) if len(ramp) > 2 else None
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started,
               "train_images_per_s": (total_steps - start_step) * args.batch_size / max(train_time, 1e-9),
               **metrics,
               "capacity_final": capacity(total_steps, args.capacity_max, args.capacity_steps),
               "kl_capacity_correlation": follows,
               "lpips_net": args.lpips_net, "lpips_backbone": backbone,
               "lpips_trainable_params": sum(p.numel() for p in perceptual.parameters() if p.requires_grad),
               "lpips_incident_step": int(negative_lpips_step) or None,
               "disc_start_step": disc_start_step,  # NEW: None if D never started
               "max_dec_grad_norm": float(max_dec_grad_norm),  # NEW: largest of any single step
               "max_adv_rec_grad_ratio": max(r["adv_rec_grad_ratio"] for r in log.rows),  # NEW
               "collapse_warnings": list(warnings_seen.values())}  # NEW
    if test_factors is not None:
        summary["mig"], summary["mig_per_factor"] = common.mutual_information_gap(mu, test_factors[:len(mu)])
    common.write_json(out / "summary.json", summary)
    common.save_pictures(out, model, test, device, kl_per_dim=metrics["kl_per_dim"])
    marks = {"D starts": disc_start_step} if disc_start_step is not None and disc_start_step <= total_steps else None
    common.save_curves(out / "curves.png", log.rows, [("reconstruction (nats)", ["recon"]),
                                                     (f"LPIPS ({backbone} backbone)", ["lpips"]),
                                                     ("KL follows C (nats/image)", ["kl", "capacity"]),
                                                     ("discriminator", ["d_loss", "logits_real", "logits_fake"]),
                                                     ("decoder grad norm", ["dec_grad_norm"]),
                                                     ("D's pull on the decoder", ["adv_rec_grad_ratio"])], marks)
    common.save_kl_heatmap(out / "kl_per_dim.png", log.rows, args.latent_dim)
    print(f"test: recon {metrics['test_recon']:.1f}  LPIPS {metrics['test_lpips']:.4f} ({backbone} backbone)  "
          f"KL {metrics['test_kl']:.2f} nats  PSNR {metrics['test_psnr_db']:.2f} dB  "
          f"spectrum error {metrics['spectrum_error']:.3f}  hf power {metrics['hf_power_ratio']:.3f}  D started at {disc_start_step}  "
          f"collapse warnings: {len(warnings_seen)}")


if __name__ == "__main__":
    main()
