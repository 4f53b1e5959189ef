"""02 - Burgess et al.'s capacity objective: control how much information the code may carry, and
raise that budget slowly.

01's knobs, beta and the decoder's sigma, set the price of a nat, not the number of nats: a large
price gives a small, half-collapsed code, a small one a rich but tangled code. Burgess et al. (2018)
control the amount instead. With the KL as a bound on the nats the code carries about an image,
they pin it to a target capacity C:

    loss = recon + gamma * |KL - C|,    C rising linearly from 0 to C_max nats, then held

gamma is large, so the KL has to follow C. While C is small the encoder can afford only a few nats
and spends them where they lower the reconstruction most, so the dims should switch on one after
another, the most useful first.

The objective rewards any KL while KL < C, and some KL is cheaper than information. One shift of
every code by the same vector costs 1/2 ||E[mu]||^2 nats and tells the decoder nothing; the encoder
here closes that route by centring mu (BatchNorm without a bias after it, so in training the batch
mean of mu is exactly 0; metrics.csv: kl_offset). A code map is centred per channel, so offsets
that differ between positions remain, and kl_offset shows them. Other KL is no information either: spread that the
decoder cannot resolve, and beyond ln N nats (10.8 for 50,000 images) no code can say more about
which training image it saw. summary.json's test_channel_nats, the Gaussian-channel estimate
sum_i 1/2 ln(1 + Var_x(mu_i) / E_x[sigma_i^2]), shows how much of the KL could be information.

Run:   python 02_burgess_capacity.py                 # shapes, 64 px
       python 02_burgess_capacity.py --dataset fashion-mnist --epochs 8 --capacity-steps 6000
See:   curves.png (KL against its target C), kl_per_dim.png (each dim's KL over training, a mark
       where it switched on), traversals.png (one row per dim, most informative first, swept over
       -3..3), recon.png, samples.png, summary.json (switch_on: the step and C at which each dim's
       KL passed 0.5 nats) in runs/02_burgess_capacity/<dataset>-<time>/.
Measured (2-core CPU, default run): the KL follows C (correlation 1.00) to 24.9 nats; dims switch on
at C 2.5, 3.1 (two), 5.0 and 5.6 nats, each holding position. Against 01 at the same length: more
KL (24.9 against 19.5 nats) but a worse reconstruction (PSNR 22.5 against 24.2 dB, spectrum error
1.29 against 0.70). Not because of the ramp (C = 25 from step 0: 22.5 dB), hardly because of the
centring (01 on this encoder, python -m tools.centred_01: 24.0 dB), but because of gamma: the pull
of |KL - C| drowns the reconstruction's, and the KL meets C with less information in it
(test_channel_nats 14.7 against 22.5 for 01 on this encoder). --gamma 10 gives 21.6 nats and
23.0 dB, but six dims switch on together: the strong pull that costs information orders the dims.
Defaults against the paper (dSprites, Bernoulli likelihood, gamma 1000, C 0 -> 25 nats over 100k
steps, latent 10, batch 64, Adam 5e-4): the same C_max, latent size and batch; a Gaussian decoder
(sigma^2 = 1/2, so gamma is on another scale), gamma 100, Adam 1e-3 and a 2,000-step ramp so a CPU
run shows the whole ramp. MIG is the histogram estimate on mu (see common.py).
Papers: Burgess et al. 2018, "Understanding disentangling in beta-VAE"; Higgins et al. 2017
(beta-VAE, the encoder layout); Chen et al. 2018 (MIG).
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
    parser.add_argument("--gamma", type=float, default=100.0,
                        help="weight of |KL - C|; large, so the KL must follow C (default: 100)")  # NEW
    parser.add_argument("--capacity-max", type=float, default=None,
                        help="final capacity C_max, nats (default: 25; for a code map, see common.default_capacity)")  # NEW
    parser.add_argument("--capacity-steps", type=int, default=2000,
                        help="optimizer steps over which C rises from 0 to C_max (default: 2000)")  # NEW
    args = common.parse_args(parser, argv)
    args.capacity_max = common.default_capacity(args) if args.capacity_max is None else args.capacity_max
    if args.gamma < 0 or args.capacity_max < 0 or args.capacity_steps < 0:
        common.fail("--gamma, --capacity-max and --capacity-steps must not be negative")
    return args


# ----------------------------------------------------------------------------- the ELBO's pieces
def recon_loss(raw, x, recon, decoder_std):
    """-log p(x|z) for each image, summed over its P pixel values: (B,) nats.
    bce: Bernoulli with logits `raw`, x in [0, 1]:  -sum[x log p + (1 - x) log(1 - p)].
    mse: Gaussian with mean m = tanh(raw) and fixed std sigma, x in [-1, 1]:
         -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)).
         The constant has no gradient, so it is dropped."""
    if recon == "bce":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").flatten(1).sum(1)
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """NEW: the target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held.
    A pure function of the step count: evaluation never advances it, and a resumed run, which
    restores the step, continues C exactly where it stopped."""
    if capacity_steps == 0:
        return capacity_max
    return capacity_max * min(1.0, step / capacity_steps)


def switch_on_steps(rows, latent_dim, threshold=0.5):
    """NEW: for each latent dim, the first logged step at which its KL passed `threshold` nats ->
    [(dim, step)] in order of that step; dims that never passed it are left out. In Burgess et al.'s
    long runs these steps are spread out: one factor after another."""
    steps = {}
    for row in rows:
        for i in range(latent_dim):
            if i not in steps and row[f"kl_dim_{i}"] > threshold:
                steps[i] = int(row["step"])
    return sorted(steps.items(), key=lambda item: item[1])


# ----------------------------------------------------------------------------- training
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    batches = common.Batches(train, args.batch_size, args.seed, device)
    out = common.create_run_folder(args, SCRIPT, device)  # only now: bad input leaves no folder behind
    total_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images {tuple(train.shape[1:])}, "
          f"{total_steps} steps on {device}, output in {out}")

    # NEW: centre_mu=True. While KL < C the objective rewards any KL, and the cheapest is an offset: one
    # shift of mu for every image costs 1/2 ||E[mu]||^2 nats and carries no information. The encoder
    # then computes mu = W BatchNorm(h) with no bias, so in training the batch mean of mu is exactly 0
    # and that route is closed (metrics.csv: kl_offset, the offset's share of the KL).
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), centre_mu=True,
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
        common.save_checkpoint(out / "checkpoint.pt", script=SCRIPT, args=vars(args), step=step,
                               model=model.state_dict(), optimizer=optimizer.state_dict(), running=running.state_dict())

    bar = tqdm(total=total_steps, initial=start_step, desc=SCRIPT, dynamic_ncols=True)
    timer, timed_steps, train_time = time.perf_counter(), 0, 0.0
    for step in range(start_step, total_steps):
        x = common.to_model_range(batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # NEW: C at this step, nats
        with common.autocast(device, args):
            raw, mu, logvar = train_model(x)
        # Reconstruction summed over pixels, KL summed over latent dims, both averaged over the batch
        # (the paper's reductions):  loss = E_x[-log p(x|z)] + gamma * |E_x[KL] - C|
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()
        kl_per_dim = common.kl_per_dim(mu, logvar)  # (D,) nats
        loss = recon + args.gamma * (kl_per_dim.sum() - target).abs()  # NEW
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        running.add(loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(),
                    kl_dim=kl_per_dim)  # NEW: per-dim KL too
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
                       "images_per_s": timed_steps * args.batch_size / elapsed})
            bar.set_postfix(loss=f"{row['loss']:.1f}", recon=f"{row['recon']:.1f}", kl=f"{row['kl']:.2f}", C=f"{target:.2f}")
            timer, timed_steps = time.perf_counter(), 0
        if done % batches.steps_per_epoch == 0 or done == total_steps:
            if not common.all_finite(model, *running.sums.values()):
                common.diverged(done, out)
            save_checkpoint(done)
    bar.close()

    # ------------------------------------------------------------------------- evaluation and outputs
    common.recalibrate_batchnorm(model, train)  # exact BN statistics for mu's centring (see common)
    save_checkpoint(total_steps)  # so a model loaded from checkpoint.pt has them too
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                  device, args)
    # NEW: does the KL follow C? Correlation over the ramp's log rows, and the final KL against C_max.
    ramp = [r for r in log.rows if r["step"] <= args.capacity_steps]
    follows = common.correlation([r["kl"] for r in ramp], [r["capacity"] for r in ramp]) if len(ramp) > 2 else None
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started,
               "train_images_per_s": (total_steps - start_step) * args.batch_size / max(train_time, 1e-9),
               **metrics,
               "capacity_final": capacity(total_steps, args.capacity_max, args.capacity_steps),  # NEW
               "kl_capacity_correlation": follows}  # NEW
    # NEW: when did each dim switch on, and (on shapes) which true factor does it know most about?
    summary["switch_on"] = [{"dim": i, "step": step, "capacity": capacity(step, args.capacity_max, args.capacity_steps),
                             "test_kl": metrics["kl_per_dim"][i]} for i, step in switch_on_steps(log.rows, args.latent_dim)]
    if test_factors is not None:  # shapes knows its true factors, so disentanglement can be scored
        summary["mig"], summary["mig_per_factor"] = common.mutual_information_gap(mu, test_factors[:len(mu)])
        info = common.factor_information(mu, test_factors[:len(mu)])  # (D, K)
        for entry in summary["switch_on"]:
            k = int(info[entry["dim"]].argmax())
            entry["knows_most_about"], entry["information"] = list(common.SHAPE_FACTORS)[k], info[entry["dim"], k].item()
    common.write_json(out / "summary.json", summary)
    common.save_pictures(out, model, test, device, kl_per_dim=metrics["kl_per_dim"])
    common.save_curves(out / "curves.png", log.rows, [("loss", ["loss"]), ("reconstruction", ["recon"]),
                                                     ("KL follows C (nats/image)", ["kl", "capacity", "kl_offset"])])
    common.save_kl_heatmap(out / "kl_per_dim.png", log.rows, args.latent_dim,  # NEW
                           switch_on=[(e["dim"], e["step"]) for e in summary["switch_on"]])
    print(f"test: recon {metrics['test_recon']:.1f}  KL {metrics['test_kl']:.2f} nats (C {summary['capacity_final']:.1f})  "
          f"PSNR {metrics['test_psnr_db']:.2f} dB  active units {metrics['active_units']}/{math.prod(model.latent_shape)}  "
          f"spectrum error {metrics['spectrum_error']:.3f}  hf power {metrics['hf_power_ratio']:.3f}  "
          f"KL offset {metrics['test_kl_offset']:.2f}" + (f"  MIG {summary['mig']:.3f}" if "mig" in summary else ""))
    switched = [f"z{e['dim']} step {e['step']} (C {e['capacity']:.1f}"
                + (f", {e['knows_most_about']} {e['information']:.2f})" if "information" in e else ")") for e in summary["switch_on"]]
    print("dims switched on (KL > 0.5 nats) at: " + (", ".join(switched) or "none"))


if __name__ == "__main__":
    main()
