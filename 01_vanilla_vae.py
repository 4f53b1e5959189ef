"""01 - The vanilla VAE: the ELBO, the reparameterization trick, and why it blurs.

A VAE is an autoencoder whose code is a distribution. The encoder maps an image x to a Gaussian
q(z|x) = N(mu, sigma^2); we draw z = mu + sigma * eps (eps ~ N(0, I)), so the draw is a
differentiable function of mu and sigma; the decoder maps z back to an image. Training maximises
the evidence lower bound

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I))  <=  log p(x)

i.e. it minimises  reconstruction (nats) + KL (nats). The KL keeps every q(z|x) near the prior,
which is what lets us decode samples z ~ N(0, I) into new images; averaged over images it is an
upper bound on the information the code carries. z is a vector of --latent-dim dims, or for photos
(folder, celeba, cifar10) a map of codes, one per 4 x 4 patch, whose "dims" are its channels.

Why the reconstructions are blurry. The decoder is a Gaussian N(x; m, sigma^2) with a fixed sigma,
so a pixel's error costs (x - m)^2 / (2 sigma^2) nats: sigma is the price of detail in the code's
nats. Times 2 sigma^2 the loss reads  sum (x - m)^2 + 2 sigma^2 * beta * KL, so a wide sigma acts
like a large beta. The default sigma^2 = 1/2 (on [-1, 1] pixels; a code map's default is sigma 0.1)
is much wider than the errors the model ends with on shapes: against the sigma that fits them, beta = 1 acts like beta = 31
(summary.json: decoder_std_fit, effective_beta). The code stays small and whatever it cannot
hold the decoder averages away. --decoder-std 0.12 prices detail at the fitted sigma.

Posterior collapse: if the KL wins, q(z|x) equals the prior for every x and the decoder ignores
z (KL -> 0). The run warns when fewer than two dims carry 0.1 nat or the KL is under 1 nat.
Remedies: a smaller --beta, KL annealing (--kl-warmup-steps; --kl-cycles repeats the ramp over
the whole run) and --free-bits.

Run:   python 01_vanilla_vae.py                      # shapes, 64 px, CPU or GPU
       python 01_vanilla_vae.py --decoder-std 0.12
       python 01_vanilla_vae.py --dataset fashion-mnist --recon bce
See:   recon.png (originals above reconstructions), samples.png, interpolation.png, curves.png,
       summary.json in runs/01_vanilla_vae/<dataset>-<time>/. spectrum error: how far the
       reconstructions' power spectrum lies from the data's (0 = the same; blur and noise raise it).
Measured (2-core CPU, default run, 156 s): test PSNR 24.25 dB, KL 19.5 nats, spectrum error
0.70. With --decoder-std 0.12 the code carries 53.5 nats and the spectrum moves towards the data's
(error 0.58), but PSNR gains only 0.2 dB (24.46): at this length the decoder limits the pixels.
Bernoulli (--recon bce) on grey-level pixels such as Fashion-MNIST's is not a normalised
likelihood (x is not 0 or 1), so its nats are comparable only with other BCE numbers.
Papers: Kingma & Welling 2014 (VAE); Bowman et al. 2016 (KL annealing); Fu et al. 2019 (cyclical
       annealing); Kingma et al. 2016 (free bits); Burda et al. 2016 (active units); Lucas et al.
       2019 and Rybkin et al. 2021 (the decoder variance as the blur knob).
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, epochs=4)
    parser.add_argument("--recon", choices=["mse", "bce"], default="mse",
                        help="Gaussian likelihood on [-1, 1] (tanh) or Bernoulli on [0, 1] (logits) (default: mse)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL; 1 = the true ELBO (default: 1.0)")
    parser.add_argument("--kl-warmup-steps", type=int, default=0,
                        help="ramp the KL weight linearly from 0 to beta over this many steps (default: 0 = off)")
    parser.add_argument("--kl-cycles", type=int, default=0,
                        help="cyclical annealing: repeat a 0 -> beta ramp this many times (default: 0 = off)")
    parser.add_argument("--free-bits", type=float, default=0.0,
                        help="per-dim KL floor in nats; below it a dim is not penalised (default: 0 = off)")
    args = common.parse_args(parser, argv)
    if args.beta < 0 or args.free_bits < 0 or args.kl_warmup_steps < 0 or args.kl_cycles < 0:
        common.fail("--beta, --free-bits, --kl-warmup-steps and --kl-cycles must not be negative")
    if args.kl_warmup_steps and args.kl_cycles:
        common.fail("choose one annealing schedule: --kl-warmup-steps or --kl-cycles")
    return args


# ----------------------------------------------------------------------------- the ELBO's pieces
def recon_loss(raw, x, recon, decoder_std):
    """-log p(x|z) for each image, summed over its P pixel values: (B,) nats.
    bce: Bernoulli with logits `raw`, x in [0, 1]:  -sum[x log p + (1 - x) log(1 - p)].
    mse: Gaussian with mean m = tanh(raw) and fixed std sigma, x in [-1, 1]:
         -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)).
         The constant has no gradient: dropped here, added back for test_neg_elbo (gaussian_constant)."""
    if recon == "bce":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").flatten(1).sum(1)
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def gaussian_constant(pixels, decoder_std):
    """The part of -log N(x; m, sigma^2) that recon_loss drops, for `pixels` values: P log(sigma sqrt(2 pi))."""
    return pixels * math.log(decoder_std * math.sqrt(2 * math.pi))


def kl_weight(step, beta, warmup_steps, cycles, total_steps):
    """beta_t = beta * (annealing factor in [0, 1]) at optimizer step `step`."""
    if cycles:  # cyclical (Fu et al. 2019): each of `cycles` periods ramps 0 -> 1 over its first half
        period = total_steps / cycles
        return beta * min(1.0, 2.0 * (step % period) / period)
    if warmup_steps:  # linear warm-up (Bowman et al. 2016): 0 at step 0, beta from warmup_steps on
        return beta * min(1.0, step / warmup_steps)
    return beta


def kl_penalty(kl_per_dim, free_bits):
    """sum_i max(free_bits, KL_i) over latent dims, KL_i averaged over the batch (Kingma et al. 2016).
    Below the floor a dim's KL has no gradient, so the encoder may spend up to free_bits nats
    per dim without being pushed back to the prior. free_bits = 0 is the plain KL."""
    return kl_per_dim.clamp(min=free_bits).sum()


# ----------------------------------------------------------------------------- training
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    batches = common.Batches(train, args.batch_size, args.seed, device)
    total_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    if args.resume and args.kl_cycles and common.load_checkpoint(args.resume)["total_steps"] != total_steps:
        common.fail("--kl-cycles spreads its cycles over the whole run, so a resumed cyclical run "
                    "must keep its --epochs and --max-steps")
    out = common.create_run_folder(args, SCRIPT, device)  # only now: bad input leaves no folder behind
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images {tuple(train.shape[1:])}, "
          f"{total_steps} steps on {device}, output in {out}")

    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train),
                       spatial=args.latent == "spatial").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    running, start_step = common.RunningMeans(), 0
    if args.resume:
        checkpoint = common.load_checkpoint(args.resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        running.load_state_dict(checkpoint["running"], device)
        start_step = checkpoint["step"]
        common.restore_rng(checkpoint)
    train_model = torch.compile(model) if args.compile else model
    log = common.MetricsLog(out / "metrics.csv", resume_step=start_step if args.resume else None)

    def save_checkpoint(step):
        common.save_checkpoint(out / "checkpoint.pt", script=SCRIPT, args=vars(args), step=step, total_steps=total_steps,
                               model=model.state_dict(), optimizer=optimizer.state_dict(), running=running.state_dict())

    bar = tqdm(total=total_steps, initial=start_step, desc=SCRIPT, dynamic_ncols=True)
    timer, timed_steps, train_time = time.perf_counter(), 0, 0.0
    for step in range(start_step, total_steps):
        x = common.to_model_range(batches(step), args.recon)  # (B, C, H, W), on the device already
        beta = kl_weight(step, args.beta, args.kl_warmup_steps, args.kl_cycles, total_steps)
        with common.autocast(device, args):
            raw, mu, logvar = train_model(x)
        # Reconstruction summed over pixels, KL summed over latent dims, both averaged over the batch:
        # loss = E_x[-log p(x|z)] + beta_t * sum_i max(free_bits, E_x[KL_i])   (nats per image)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()
        kl_per_dim = common.kl_per_dim(mu, logvar)  # (D,) nats
        loss = recon + beta * kl_penalty(kl_per_dim, args.free_bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # kl_offset: the KL that one shift of every code costs, information-free (02 closes that route)
        running.add(loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum())
        bar.update(1)
        timed_steps += 1
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            row = running.pop()  # the host sync of this row
            if not all(map(math.isfinite, row.values())):
                common.diverged(done, out)
            elapsed = time.perf_counter() - timer
            train_time += elapsed
            log.write({"step": done, "epoch": step // batches.steps_per_epoch, **row, "beta": beta,
                       "images_per_s": timed_steps * args.batch_size / elapsed})
            bar.set_postfix(loss=f"{row['loss']:.1f}", recon=f"{row['recon']:.1f}", kl=f"{row['kl']:.2f}", beta=f"{beta:.2f}")
            timer, timed_steps = time.perf_counter(), 0
        if done % batches.steps_per_epoch == 0 or done == total_steps:
            if not common.all_finite(model, *running.sums.values()):
                common.diverged(done, out)
            save_checkpoint(done)
    bar.close()

    # ------------------------------------------------------------------------- evaluation and outputs
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                  device, args)
    pixels = common.original_pixels(test[:1], args.dataset).numel()  # MNIST at 32 px: the 784 original ones
    constant = 0.0 if args.recon == "bce" else gaussian_constant(pixels, args.decoder_std)
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started,
               "train_images_per_s": (total_steps - start_step) * args.batch_size / max(train_time, 1e-9),
               **metrics,
               # single-sample estimate of -ELBO, nats per image; for mse a density on [-1, 1]-scaled pixels
               "test_neg_elbo": metrics["test_recon_original"] + constant + metrics["test_kl"],
               "informative_dims": sum(kl > 0.1 for kl in metrics["kl_per_dim"])}  # dims carrying > 0.1 nat
    if args.recon == "mse":  # the sigma that fits the test error, and the beta the run's sigma amounts to there
        # the sigma that maximises E_q[log p(x|z)] on the test set: sigma_fit^2 = mean (x - m)^2, sampled z
        summary["decoder_std_fit"] = math.sqrt(2 * args.decoder_std ** 2 * metrics["test_recon_original"] / pixels)
        summary["effective_beta"] = args.beta * args.decoder_std ** 2 / summary["decoder_std_fit"] ** 2
    if test_factors is not None:  # shapes knows its true factors: MIG (histogram estimate on mu), 02 compares
        summary["mig"], summary["mig_per_factor"] = common.mutual_information_gap(mu, test_factors[:len(mu)])
    common.write_json(out / "summary.json", summary)
    common.save_pictures(out, model, test, device)
    common.save_curves(out / "curves.png", log.rows, [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                                                     ("KL (nats/image)", ["kl", "kl_offset"]), ("KL weight", ["beta"])])
    print(f"test: recon {metrics['test_recon']:.1f}  KL {metrics['test_kl']:.2f} nats  PSNR {metrics['test_psnr_db']:.2f} dB  "
          f"dims > 0.1 nat {summary['informative_dims']}/{args.latent_dim}  "
          f"spectrum error {metrics['spectrum_error']:.3f}  hf power {metrics['hf_power_ratio']:.3f}"
          + (f"  MIG {summary['mig']:.3f}" if "mig" in summary else ""))
    if metrics["test_kl"] < 1.0 or summary["informative_dims"] <= 1:  # the code carries (almost) nothing
        print(f"warning: posterior collapse - KL {metrics['test_kl']:.2f} nats, {summary['informative_dims']} of "
              f"{args.latent_dim} latent dims carry more than 0.1 nat (the decoder ignores z). Counter it with a "
              "smaller --beta, --kl-warmup-steps or --kl-cycles (KL annealing), or --free-bits.")


if __name__ == "__main__":
    main()
