"""02 - Burgess et al.'s capacity objective: set how many nats the code carries, and raise them slowly.

01's beta and sigma set the price of a nat, not how many the code holds. Burgess et al. (2018) pin the KL to a
target C:  loss = recon + gamma * |KL - C|,  C rising linearly from 0 to C_max, then held. gamma is large, so the
KL follows C, and while C is small its few nats go where they help most: dims switch on (KL > 0.5 nats) one or
two at a time. The KL pays for one shift of every code (offset), codes spread wider or narrower than N(0, 1)
(scale), and information (info_bound bounds it; tools/evaluate.py's kl_split). C is bought by the cheapest route, so
a code vector's mu is centred: mu = W BatchNorm(h), with no bias after it, has a batch mean of 0, so no offset. The
scale route stays open, and the split shows what it takes. 02 replaces 01's beta schedules and free bits.

Run:   python 02_burgess_capacity.py                  # shapes, 64 px, C: 0 -> 25 nats over 2,000 steps
       python 02_burgess_capacity.py --no-centring    # C bought by a shift of every code
See:   runs/02_burgess_capacity/<dataset>-<time>/: curves.png (KL against C), kl_per_dim.png, traversals.png.
Papers: Burgess et al. 2018; Higgins et al. 2017 (beta-VAE, and the encoder's layer sizes).
"""
import csv
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import common
from tools import evaluate
from tools import flags
from tools import pictures
from tools.flags import at_least

SCRIPT = Path(__file__).stem


def parse_args(argv=None, saved=None):
    """The flags: the ones every chapter takes (tools/flags.py), then this chapter's. `saved`: see flags.parse."""
    p = flags.parser(SCRIPT, __doc__, steps=3000)
    p.add_argument("--recon", choices=["mse", "bce"], default="mse", help="Gaussian likelihood on [-1, 1] pixels, or "
                   "Bernoulli on [0, 1] (default: mse)")
    p.add_argument("--gamma", type=at_least(0.0, float), default=100.0, help="weight of |KL - C| (default: 100)")
    p.add_argument("--capacity-max", type=at_least(0.0, float), help="C_max, nats (default: 25; 1.5 per map value)")
    p.add_argument("--capacity-steps", type=at_least(0), default=2000, help="steps to C_max (default: 2000)")
    p.add_argument("--no-centring", action="store_true",
                   help="do not centre a code vector's mu: C may then be a shift of every code (default: off)")
    args = flags.parse(p, argv, saved)
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, model, decoder_std):
    """-log p(x|z) of each image, summed over its P pixel values: (B,) nats. bce: Bernoulli with logits `raw`, x in
    [0, 1]: -sum[x log p + (1 - x) log(1 - p)]. mse: Gaussian with mean m = model.mean(raw) (tanh(raw); SD's: raw),
    fixed std sigma, x in [-1, 1]: -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)); the
    constant has no gradient and is left out here (tools/evaluate.py adds it back for test_neg_elbo)."""
    if model.recon == "bce":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").flatten(1).sum(1)
    return (model.mean(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held."""
    return capacity_max * min(1.0, step / capacity_steps) if capacity_steps else capacity_max


def diverged(step, out):
    """Stop every process with exit code 3, keeping the last checkpoint: it holds the last finite weights."""
    last = out / "checkpoint.pt"
    kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint had been saved"
    common.fail(f"training diverged at step {step} (a non-finite loss or weight); {kept}", code=3)


def write_rows(path, rows):
    """metrics.csv or eval.csv, written whole (a few kB a row)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" for k, v in row.items()} for row in rows)


# ----------------------------------------------------------------------------- training
def main(argv=None):
    args = parse_args(argv)
    checkpoint = common.load_checkpoint(args.resume) if args.resume else None
    if checkpoint:  # --resume: the saved run's flags; those given now win
        if checkpoint.get("script") != SCRIPT:
            common.fail(f"{args.resume} was written by {checkpoint.get('script')}.py, not {SCRIPT}.py")
        args = parse_args(argv, saved=dict(checkpoint["args"], out=str(Path(args.resume).parent)))
    started = time.time()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError):  # no such device here
        common.fail(f"--device {args.device} is not available on this machine; use --device auto or cpu")
    # torchrun starts one process per GPU (or per share of the CPU's cores); each trains on its slice of every batch,
    # DDP averages their gradients (below), and rank 0 alone prints and writes
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = common.rank(), common.world_size()
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    if args.batch_size % world:
        common.fail(f"--batch-size {args.batch_size} is the global batch: it must split evenly over {world} processes")
    torch.manual_seed(args.seed)  # the same in every process: the same first weights and the same noise

    train, test = common.load_data(args)  # uint8 (N, C, H, W)
    batches = common.Batches(train, args.batch_size, args.seed, device)
    epochs = args.epochs or math.ceil(args.steps / batches.steps_per_epoch)  # whole epochs, at least args.steps
    total_steps = min(epochs * batches.steps_per_epoch, args.max_steps or math.inf)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       spatial=args.latent == "spatial", downsample=args.downsample, arch=args.arch,
                       centre_mu=args.latent == "vector" and not args.no_centring,  # mu = W BatchNorm(h)
                       channel_mean=common.channel_mean(train)).to(device)
    if args.init_from and not checkpoint:  # another model's weights (tools.sd_vae import: Stable Diffusion's)
        common.load_weights(model, args.init_from)
    if args.train == "decoder":  # the codes stay the loaded model's: its encoder is frozen, in eval mode
        model.encoder.requires_grad_(False).eval()
    trained = [p for p in model.parameters() if p.requires_grad]  # --train decoder: the decoder's
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    stateful = {"model": model, "optimizer": optimizer, **({"ema": ema} if ema else {})}  # saved by state_dict()
    start, rows, evals, row_sum, row_steps = 0, [], [], None, 0
    if checkpoint:  # the step, weights, optimizer, random state and rows where the run stopped
        try:
            for name, thing in stateful.items():
                thing.load_state_dict(checkpoint[name])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            common.fail(f"{args.resume} does not fit this model ({str(e)[:200]}); resume with its own flags")
        start, rows, evals = checkpoint["step"], checkpoint["rows"], checkpoint["evals"]
        row_steps = checkpoint["row_steps"]  # and the sums of the row under way, on the device the loop adds to
        row_sum = checkpoint["row_sum"].to(device) if row_steps else None
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"])
    out = Path(args.out or f"runs/{SCRIPT}/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "lpips")}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
        (out / "config.json").write_text(json.dumps({
            "script": SCRIPT, "args": vars(args), "command": " ".join(sys.argv), "device": f"{device.type}: {name}",
            "world_size": world, "versions": {"python": platform.python_version(), **versions}}, indent=2) + "\n")
    print(f"{args.dataset}: {len(train)} training images, {total_steps} steps on {device}"
          + (f" in {world} processes" if world > 1 else "") + f"; output: {out}")
    gamma = args.gamma if args.train == "all" else 0.0  # no capacity pull on a frozen encoder
    if args.train == "decoder":
        print("--train decoder: the KL trains nothing (the encoder is frozen); it is logged, not minimised")
    encoder, decoder = model.encoder, model.decoder
    if world > 1 and device.type == "cuda":  # the centring's BatchNorm: the global batch's statistics
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)  # (on a CPU, each process's slice's)
    if world > 1:  # DDP: gradients averaged over the processes during backward
        encoder, decoder = [DistributedDataParallel(m) if any(p.requires_grad for p in m.parameters()) else m
                            for m in (encoder, decoder)]
    if args.compile:
        encoder, decoder = torch.compile(encoder), torch.compile(decoder)

    names = ["loss", "recon", "kl", "kl_offset", "kl_scale", "info_bound", "capacity"]
    names += [f"kl_dim_{i}" for i in range(args.latent_dim)]
    bar = tqdm(total=total_steps, initial=start, desc=SCRIPT, dynamic_ncols=True, disable=rank > 0)
    clock, timed = time.perf_counter(), 0
    for step in range(start, total_steps):
        x = common.to_model_range(batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # as torch.randn_like, under torchrun too
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, model, args.decoder_std).mean()  # nats per image
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + gamma * (kl_per_dim.sum() - target).abs()  # Burgess et al.'s objective
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)

        # the row: each term's mean since the last row, summed where the model runs (a GPU need not wait for the CPU)
        split = evaluate.kl_split(mu.detach(), logvar.detach())  # the KL in three parts (02 explains them)
        terms = torch.stack([loss, recon, kl_per_dim.sum(), *split.values(), torch.tensor(target, device=device)])
        terms = torch.cat([terms.detach(), kl_per_dim.detach()])
        row_sum = terms if row_sum is None else row_sum + terms
        row_steps, timed, done = row_steps + 1, timed + 1, step + 1
        bar.update()
        if done % args.log_every == 0 or done == total_steps:
            means = common.mean_over_processes(row_sum / row_steps).tolist()  # the one wait for a GPU in the row
            if not all(math.isfinite(v) for v in means):
                diverged(done, out)
            rows.append({"step": done, "epoch": step // batches.steps_per_epoch, **dict(zip(names, means)),
                         "images_per_s": timed * args.batch_size / (time.perf_counter() - clock)})
            if rank == 0:
                write_rows(out / "metrics.csv", rows)
            bar.set_postfix({k: f"{rows[-1][k]:.4g}" for k in ("loss", "recon", "kl")})
            row_sum, row_steps, clock, timed = None, 0, time.perf_counter(), 0
        epoch_end = done % batches.steps_per_epoch == 0
        if epoch_end or done == total_steps or args.checkpoint_every and done % args.checkpoint_every == 0:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                diverged(done, out)
            if rank == 0:  # written whole, then renamed over the last one: a kill mid-save leaves that one intact
                torch.save({"script": SCRIPT, "args": vars(args), "step": done,
                            **{name: thing.state_dict() for name, thing in stateful.items()},
                            "rows": rows, "evals": evals, "row_sum": row_sum, "row_steps": row_steps,
                            "rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                           out / "checkpoint.pt.tmp")
                os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")
        if args.eval_every and done % args.eval_every == 0 and done < total_steps and rank == 0:
            scored = ema.module if ema else model
            evals.append({"step": done, **evaluate.quick_scores(scored, test, device, args.amp)})
            write_rows(out / "eval.csv", evals)
            pictures.save_pictures(out, scored, test, device, recon_only=True)
            bar.write(f"eval at step {done}: PSNR {evals[-1]['test_psnr_db']:.2f} dB")
            model.train()
            model.encoder.train(args.train == "all")
    bar.close()
    if world > 1:
        dist.destroy_process_group()
        if rank > 0:
            return

    # ------------------------------------------------------------------------- evaluation and outputs (rank 0)
    final = ema.module if ema else model  # --ema: the averaged weights are the ones scored and exported
    images_seen = total_steps * args.batch_size  # in training: the evaluation is sized to the run (or --eval-images):
    n = args.eval_images or min(10_000, max(256, images_seen // 4))  # test images, and training images
    metrics = evaluate.measures(final, test[:n], evaluate.sample(train, n), device, decoder_std=args.decoder_std,
                                dataset=args.dataset, amp=args.amp, seed=args.seed,
                                recon_loss=lambda raw, x: recon_loss(raw, x, final, args.decoder_std))
    if args.train == "decoder":  # the loaded encoder's codes, so the scale a diffusion model trained on them expects
        metrics["latent_scale_factor"] = common.load_autoencoder(args.init_from).latent_scale_factor
    speeds = [r["images_per_s"] for r in rows[1:] or rows]  # the first row holds one-off set-up
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started, "train_images_per_s": sorted(speeds)[len(speeds) // 2],
               "world_size": world, "parameters": sum(p.numel() for p in model.parameters()), **metrics,
               "switch_on": [dict(e, capacity=capacity(e["step"] - 1, args.capacity_max, args.capacity_steps))
                             for e in pictures.switch_on(rows, args.latent_dim)],
               "capacity_final": capacity(total_steps, args.capacity_max, args.capacity_steps)}
    ramp = torch.tensor([[r["kl"], r["capacity"]] for r in rows if r["step"] <= args.capacity_steps])
    if len(ramp) > 2:  # does the KL follow C: in shape (correlation) and in nats (mean gap)
        summary["kl_capacity_correlation"] = torch.corrcoef(ramp.T)[0, 1].item()
        summary["kl_capacity_gap"] = (ramp[:, 0] - ramp[:, 1]).abs().mean().item()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save({"autoencoder": final.config, "state_dict": final.state_dict(), "script": SCRIPT,
                "dataset": args.dataset, "latent_scale_factor": metrics["latent_scale_factor"]}, out / "autoencoder.pt")
    pictures.save_pictures(out, final, test, device, kl_per_dim=metrics["kl_per_dim"])
    pictures.save_curves(out / "curves.png", rows, [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                         ("KL follows C (nats)", ["kl", "capacity", "info_bound", "kl_scale", "kl_offset"])])
    pictures.save_kl_heatmap(out / "kl_per_dim.png", rows, args.latent_dim)
    shown = {"test_psnr_db": "PSNR (dB)", "test_ssim": "SSIM", "test_lpips": "LPIPS", "test_lpips_vgg": "LPIPS-VGG",
             "test_fd_vgg": "FD-VGG", "spectrum_error": "spectrum error", "test_kl": "KL (nats)"}
    print(f"test, {metrics['eval_images']} images: "
          + ", ".join(f"{label} {metrics[k]:.4g}" for k, label in shown.items() if k in metrics))
    on = [f"z{e['dim']} at step {e['step']} (C {e['capacity']:.1f})" for e in summary["switch_on"]]
    print("dims switched on (KL > 0.5 nats): " + (", ".join(on) or "none"))


if __name__ == "__main__":
    main()
