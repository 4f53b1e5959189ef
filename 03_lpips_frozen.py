"""03 - A perceptual loss (LPIPS) beside the pixel loss, frozen whole.

01 and 02 blur: under a Gaussian likelihood the best reconstruction of
an uncertain edge is the average of its possible positions, a soft ramp. LPIPS (Zhang et al. 2018)
compares images through the features of a fixed network (AlexNet by default) with learned
per-channel weights ("lin" heads), so a blurred edge costs more than under MSE. We add it to 02:

    loss = [sum (x - m)^2 + lpips_weight * P * LPIPS] / (2 sigma^2) + gamma * |KL - C|

where P = channels x height x width of one image. LPIPS is one number per image (a mean over
positions), while the squared error is a sum over P values, so we scale LPIPS by P, as
latent-diffusion does when it adds LPIPS to every pixel's loss: lpips_weight = 1 then means "one
unit of LPIPS weighs as much as one unit of squared error at every pixel value", at any image size,
and both are priced by the decoder's sigma (--decoder-std, 01).

The trap this script is about: lpips.LPIPS freezes only its backbone. Its lin heads (1,152
weights for alex) still require grad; if they reach an optimizer, the optimizer lowers the loss
the cheap way, by driving those weights below zero. The "distance" then turns negative and the
decoder is rewarded for adding the very differences LPIPS should penalise: ripple noise. So we
freeze the whole module, keep it in eval mode and outside the model and optimizer, and check it
before training. --unfreeze-lpips replays the incident on purpose and detects it.

Run:   python 03_lpips_frozen.py                          # needs the ImageNet AlexNet file, see --help
       python 03_lpips_frozen.py --lpips-random-backbone  # offline smoke run: NOT a perceptual metric
       python 03_lpips_frozen.py --lpips-random-backbone --unfreeze-lpips   # the incident
See:   recon.png, curves.png (the LPIPS term), summary.json (test_lpips, spectrum_error,
       lpips_trainable_params, lpips_incident_step) in runs/03_lpips_frozen/<dataset>-<time>/.
Measured (shapes, 2-core CPU, random backbone: this machine cannot download the ImageNet one): the
default run (1 epoch, 781 steps, 100 s) against 02 at the same length: LPIPS 0.0148 against 0.0182
(both scored by tools/ladder with the untrained metric), spectrum error 0.86 against 1.38, PSNR
21.6 against 22.0 dB. On photos (README) 03 wins back 0.7 dB of what 02's capacity term costs.
Defaults against 02's: one epoch instead of four and a 500-step ramp, so the run stays well within
5 minutes on a 2-core CPU (LPIPS costs about 2.5 times a step of 01 at 64 px).
The incident (--unfreeze-lpips, same run): a lin weight below zero at step 1, an image's LPIPS
below zero at step 78, then noise: the trained "LPIPS" ends at -6.3 on the test set, PSNR 6.9 dB.
Weights: the backbone comes from torchvision, downloaded once into $TORCH_HOME/hub/checkpoints
(alexnet-owt-7be5be79.pth, vgg16-397923af.pth or squeezenet1_1-b8a52dc0.pth); on an offline
machine, copy the file there. The lin heads ship inside the lpips package.
Papers: Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"; the loss layout follows Rombach et al. 2022 (latent-diffusion's autoencoder).
"""
import contextlib
import io
import math
import time
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import common

SCRIPT = Path(__file__).stem
BACKBONE_WEIGHTS = {"alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,  # what lpips.LPIPS loads
                    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
                    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1}


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, epochs=1)
    parser.add_argument("--gamma", type=float, default=100.0,
                        help="weight of |KL - C|; large, so the KL must follow C (default: 100)")
    parser.add_argument("--capacity-max", type=float, default=None,
                        help="final capacity C_max, nats (default: 25; for a code map, see common.default_capacity)")
    parser.add_argument("--capacity-steps", type=int, default=500,
                        help="optimizer steps over which C rises from 0 to C_max (default: 500)")
    parser.add_argument("--lpips-weight", type=float, default=1.0,
                        help="weight of LPIPS per pixel value, see the docstring (default: 1)")  # NEW
    parser.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex",
                        help="LPIPS backbone; vgg is ~10x slower (default: alex)")  # NEW
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="random backbone, no download: for offline smoke runs, not a perceptual metric (default: off)")
    parser.add_argument("--unfreeze-lpips", action="store_true",
                        help="train LPIPS's lin heads too, to reproduce the incident (default: off)")  # NEW
    args = common.parse_args(parser, argv)
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if args.gamma < 0 or args.capacity_max < 0 or args.capacity_steps < 0 or args.lpips_weight < 0:
        common.fail("--gamma, --capacity-max, --capacity-steps and --lpips-weight must not be negative")
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
    """NEW: the LPIPS module, frozen whole. Exit 2 with what to do when the backbone cannot load."""
    weights = BACKBONE_WEIGHTS[net]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:  # quiet: torchvision's deprecation warning and the hub's messages would break the one-line error
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            perceptual = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as e:  # offline download (URLError), truncated or foreign file (RuntimeError, ...)
        common.fail(f"cannot load the ImageNet {net} backbone for LPIPS ({type(e).__name__}: {str(e)[:150]}). "
                    f"Put {Path(weights.url).name} (from {weights.url}) in {folder}, or set TORCH_HOME to a "
                    f"folder holding hub/checkpoints/{Path(weights.url).name}; for an offline smoke run only, "
                    f"pass --lpips-random-backbone")
    # lpips.LPIPS sets requires_grad=False on its backbone only; its lin heads stay trainable.
    # Freeze all of it, and keep it in eval mode: it is a fixed metric, not part of the model.
    return perceptual.to(device).eval().requires_grad_(False)


def lpips_distance(perceptual, reconstruction, x):
    """NEW: LPIPS per image, (B,). Both inputs in [-1, 1], as LPIPS expects (normalize=False).
    Grey images are repeated to 3 channels; images under 32 px are enlarged, as AlexNet-LPIPS's
    pooling needs at least 32 x 32."""
    if x.shape[1] == 1:
        reconstruction, x = reconstruction.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
    if x.shape[-1] < 32:
        reconstruction, x = (F.interpolate(t, size=32, mode="bilinear", align_corners=False) for t in (reconstruction, x))
    return perceptual(reconstruction, x).flatten()


def lowest_lin_weight(perceptual):
    """Smallest weight of the lin heads: 0 or above in the released heads, below 0 once trained."""
    return torch.stack([p.min() for p in perceptual.lins.parameters()]).min()


# ----------------------------------------------------------------------------- training
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    perceptual = build_lpips(args.lpips_net, args.lpips_random_backbone, device)  # NEW
    batches = common.Batches(train, args.batch_size, args.seed, device)
    out = common.create_run_folder(args, SCRIPT, device)  # only now: bad input leaves no folder behind
    backbone = "random" if args.lpips_random_backbone else "imagenet"
    if backbone == "random":
        print("warning: LPIPS has a RANDOM backbone (--lpips-random-backbone): its numbers are not a perceptual metric")
    total_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images {tuple(train.shape[1:])}, "
          f"{total_steps} steps on {device}, LPIPS-{args.lpips_net} ({backbone} backbone), output in {out}")

    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, "mse",
                       channel_mean=common.channel_mean(train), centre_mu=True,  # centre_mu: see 02
                       spatial=args.latent == "spatial").to(device)
    trained = list(model.parameters())
    if args.unfreeze_lpips:  # NEW: the incident, on purpose: the lin heads join the optimizer
        perceptual.lins.requires_grad_(True)
        trained += list(perceptual.lins.parameters())
        print("warning: --unfreeze-lpips: LPIPS's lin heads are TRAINED; expect the incident (ripple noise)")
    else:  # NEW: checked, not assumed
        if any(p.requires_grad for p in perceptual.parameters()):
            raise RuntimeError("an LPIPS parameter still requires grad")
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    lpips_trainable = sum(p.numel() for p in perceptual.parameters() if p.requires_grad)
    running, start_step = common.RunningMeans(), 0
    # NEW: first step a lin weight goes below zero / the LPIPS of an image goes below zero (0 = not yet);
    # kept on the device so checking them every step costs no host sync.
    negative_weight_step, negative_lpips_step = (torch.zeros((), dtype=torch.long, device=device) for _ in range(2))
    if args.resume:
        checkpoint = common.load_checkpoint(args.resume)
        model.load_state_dict(checkpoint["model"])
        perceptual.lins.load_state_dict(checkpoint["lpips_lins"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        running.load_state_dict(checkpoint["running"], device)
        negative_weight_step.fill_(checkpoint["negative_steps"][0]), negative_lpips_step.fill_(checkpoint["negative_steps"][1])
        start_step = checkpoint["step"]
        common.restore_rng(checkpoint)
    train_model = torch.compile(model) if args.compile else model
    log = common.MetricsLog(out / "metrics.csv", resume_step=start_step if args.resume else None)

    def save_checkpoint(step):
        common.save_checkpoint(out / "checkpoint.pt", script=SCRIPT, args=vars(args), step=step,
                               model=model.state_dict(), lpips_lins=perceptual.lins.state_dict(),
                               optimizer=optimizer.state_dict(), running=running.state_dict(),
                               negative_steps=[int(negative_weight_step), int(negative_lpips_step)])

    reported = set()
    bar = tqdm(total=total_steps, initial=start_step, desc=SCRIPT, dynamic_ncols=True)
    timer, timed_steps, train_time = time.perf_counter(), 0, 0.0
    for step in range(start_step, total_steps):
        x = common.to_model_range(batches(step))  # (B, C, H, W) in [-1, 1], on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)
        with common.autocast(device, args):
            raw, mu, logvar = train_model(x)
        recon = recon_loss(raw.float(), x, args.decoder_std).mean()  # summed over pixels, averaged over the batch
        kl_per_dim = common.kl_per_dim(mu, logvar)  # (D,) nats
        # NEW: LPIPS of each image (B,), in fp32, inputs in [-1, 1]; scaled by P = C*H*W (see the docstring)
        perceptual_per_image = lpips_distance(perceptual, torch.tanh(raw.float()), x)
        pixels = x[0].numel()
        lpips_term = args.lpips_weight * pixels * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)  # NEW
        loss = recon + lpips_term + args.gamma * (kl_per_dim.sum() - target).abs()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.unfreeze_lpips:  # NEW: incident detection, on the device (0 = not seen yet)
            negative_weight_step.masked_fill_((negative_weight_step == 0) & (lowest_lin_weight(perceptual) < 0), step + 1)
        negative_lpips_step.masked_fill_((negative_lpips_step == 0) & (perceptual_per_image.min() < 0), step + 1)

        running.add(loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(),
                    lpips=perceptual_per_image.mean(), kl_dim=kl_per_dim)
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
                       "lpips_lin_min": lowest_lin_weight(perceptual).item(),
                       "images_per_s": timed_steps * args.batch_size / elapsed})
            bar.set_postfix(loss=f"{row['loss']:.1f}", recon=f"{row['recon']:.1f}", lpips=f"{row['lpips']:.3f}",
                            kl=f"{row['kl']:.2f}", C=f"{target:.2f}")
            timer, timed_steps = time.perf_counter(), 0
            for what, first in [("a lin weight went below zero", negative_weight_step),
                                ("an image's LPIPS went below zero", negative_lpips_step)]:
                if int(first) and what not in reported:  # NEW: say it loudly, once each, and keep training
                    reported.add(what)
                    bar.write(f"LPIPS INCIDENT at step {int(first)}: {what}. The perceptual loss is being trained, "
                              f"not used: expect ripple noise in the reconstructions. Freeze it (drop --unfreeze-lpips).")
        if done % batches.steps_per_epoch == 0 or done == total_steps:
            if not common.all_finite(model, *running.sums.values()):
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
    incident = [s for s in (int(negative_weight_step), int(negative_lpips_step)) if s > 0]
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started,
               "train_images_per_s": (total_steps - start_step) * args.batch_size / max(train_time, 1e-9),
               **metrics,
               "capacity_final": capacity(total_steps, args.capacity_max, args.capacity_steps),
               "kl_capacity_correlation": follows,
               "lpips_net": args.lpips_net,  # NEW
               "lpips_backbone": backbone,  # NEW: "random" is not a perceptual metric
               "lpips_trainable_params": lpips_trainable,  # NEW: 0 unless --unfreeze-lpips
               "lpips_incident_step": min(incident) if incident else None,  # NEW
               "lpips_negative_weight_step": int(negative_weight_step) or None,
               "lpips_negative_value_step": int(negative_lpips_step) or None}
    if test_factors is not None:
        summary["mig"], summary["mig_per_factor"] = common.mutual_information_gap(mu, test_factors[:len(mu)])
    common.write_json(out / "summary.json", summary)
    common.save_pictures(out, model, test, device, kl_per_dim=metrics["kl_per_dim"])
    marks = {"LPIPS incident": min(incident)} if incident else None
    common.save_curves(out / "curves.png", log.rows, [("reconstruction (nats)", ["recon"]),
                                                     (f"LPIPS ({backbone} backbone)", ["lpips"]),
                                                     ("KL follows C (nats/image)", ["kl", "capacity"])], marks)
    common.save_kl_heatmap(out / "kl_per_dim.png", log.rows, args.latent_dim)
    print(f"test: recon {metrics['test_recon']:.1f}  LPIPS {metrics['test_lpips']:.4f} ({backbone} backbone)  "
          f"KL {metrics['test_kl']:.2f} nats  PSNR {metrics['test_psnr_db']:.2f} dB  "
          f"spectrum error {metrics['spectrum_error']:.3f}  hf power {metrics['hf_power_ratio']:.3f}  LPIPS params trained: {lpips_trainable}"
          + (f"  incident at step {min(incident)}" if incident else ""))


if __name__ == "__main__":
    main()
