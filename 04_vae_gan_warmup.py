r"""04 - An adversarial loss (PatchGAN) on top of 03, and the two guards that keep it from wrecking the decoder.

A discriminator D judges 46-px patches real or fake (hinge loss on real and detached reconstructed images, its own
Adam); the decoder is rewarded for patches D takes for real, priced per pixel value like LPIPS in 03:
    loss = L_rec + gamma * |KL - C| + lambda * L_adv,  L_adv = -P mean D(x_hat) / (2 sigma^2),  L_rec: 03's terms
Added naively (D from step 0, lambda fixed at 0.5, no spectral norm), D takes over within 50 steps and the decoder
draws one sprite wherever the shape is. Two guards from VQGAN each prevent it. Warm-up: D is off until --disc-start
(half the run, after C reaches C_max), so it refines a decoder that already reconstructs. The adaptive weight:
lambda = ||grad_W L_rec|| / ||grad_W L_adv|| * --disc-weight (0.1) at the decoder's last layer W. Alone, spectral
norm on D (on by default), --grad-clip or --r1-gamma does not prevent it. The run says GAN COLLAPSE WARNING (the
decoder giving way to D) when D pulls on the decoder harder than L_rec, a step's gradient is 10x the median before,
or recon rises 50% above its best since D started.

Run:   python 04_vae_gan_warmup.py                   # shapes, both guards and spectral norm, 1,562 steps
       python 04_vae_gan_warmup.py --max-steps 300 --capacity-steps 150 --log-every 25 --disc-weight 0.5 \
           --disc-start 0 --no-adaptive-weight --no-spectral-norm  # the failure, on purpose
See:   runs/04_vae_gan_warmup/<dataset>-<time>/: curves.png (dashed: D starts), recon.png, summary.json. README.
Papers: Esser et al. 2021 (VQGAN); Rombach et al. 2022; Isola et al. 2017 (PatchGAN); Miyato et al. 2018.
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
from tools.lpips_weights import load_lpips

SCRIPT = Path(__file__).stem


def parse_args(argv=None, saved=None):
    """The flags: the ones every chapter takes (tools/flags.py), then this chapter's. `saved`: see flags.parse."""
    p = flags.parser(SCRIPT, __doc__, steps=1500)  # 2x 03's: the first half is the warm-up
    p.add_argument("--gamma", type=at_least(0.0, float), default=100.0, help="weight of |KL - C| (default: 100)")
    p.add_argument("--capacity-max", type=at_least(0.0, float), help="C_max, nats (default: 25; 1.5 per map value)")
    p.add_argument("--capacity-steps", type=at_least(0), default=500, help="steps to C_max (default: 500)")
    p.add_argument("--no-centring", action="store_true",
                   help="do not centre a code vector's mu: C may then be a shift of every code (default: off)")
    p.add_argument("--lpips-weight", type=at_least(0.0, float), default=1.0, help="LPIPS per pixel value (default: 1)")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS's backbone (default: alex)")
    p.add_argument("--lpips-random-backbone", action="store_true",
                   help="for tests and smoke runs only: NOT a perceptual metric (default: off)")
    p.add_argument("--unfreeze-lpips", action="store_true", help="train the lin heads: an incident (default: off)")
    p.add_argument("--pixel-loss", choices=["l2", "l1"], default="l2", help="l1: |x - m| for 03's (x - m)^2, as "
                   "latent diffusion and sd-vae-ft-EMA (default: l2)")
    p.add_argument("--disc-start", type=at_least(0), help="D's first step (default: half the run, after C_max)")
    p.add_argument("--disc-weight", type=at_least(0.0, float), default=0.1, help="D's gradient over the "
                   "reconstruction's at the decoder's last layer; with --no-adaptive-weight, lambda (default: 0.1)")
    p.add_argument("--no-adaptive-weight", action="store_true", help="a fixed lambda = --disc-weight (default: off)")
    p.add_argument("--no-spectral-norm", action="store_true", help="D without spectral norm (default: off)")
    p.add_argument("--disc-lr", type=at_least(0.0, float, strictly=True), default=1e-4,
                   help="D's Adam learning rate (default: 0.0001)")
    p.add_argument("--grad-clip", type=at_least(0.0, float), default=0.0, help="cap on the decoder's gradient norm "
                   "(~1e3 here), from step 0 (default: 0 = off)")
    p.add_argument("--r1-gamma", type=at_least(0.0, float), default=0.0, help="R1 weight g: g/2 E_real ||grad_x "
                   "D(x)||^2 (default: 0 = off)")
    args = flags.parse(p, argv, saved)
    args.recon = "mse"  # from here on a Gaussian decoder: LPIPS compares images in [-1, 1]
    if args.r1_gamma and args.compile:
        common.fail("--r1-gamma backpropagates through a gradient, which torch.compile does not: drop --compile")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(mean, x, decoder_std, pixel_loss="l2"):
    """-log N(x; m, sigma^2) of each image, up to 01's constant: sum (x - m)^2 / (2 sigma^2), (B,) nats; m = mean.
    l1: sum |x - m| / (2 sigma^2), priced as l2 is, so LPIPS and D keep their weights (test_recon stays l2's)."""
    error = (mean - x).abs() if pixel_loss == "l1" else (mean - x).pow(2)
    return error.flatten(1).sum(1) / (2 * decoder_std ** 2)


def capacity(step, capacity_max, capacity_steps):
    """The target C in nats at optimizer step `step`: 0 -> capacity_max linearly, then held."""
    return capacity_max * min(1.0, step / capacity_steps) if capacity_steps else capacity_max


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al. 2017): a logit per overlapping patch of 46 px. Spectral norm (Miyato et al. 2018) where
    latent diffusion has BatchNorm: D cannot grow arbitrarily steep, nor judge by the batch."""
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
    """R1 (Mescheder et al. 2018): E_real ||grad_x D(x)||^2, D(x) an image's mean patch logit (x requires grad)."""
    grad, = torch.autograd.grad(logits_real.flatten(1).mean(1).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(rec_loss, adv_loss, last_layer, disc_weight, limit=1e4):
    """lambda = ||grad_W rec|| / (||grad_W adv|| + 1e-4), clamped to [0, limit], detached, times disc_weight: at the
    decoder's last layer W, D's gradient is disc_weight times L_rec's (unless clamped). -> (lambda, bound?)"""
    rec_grad, adv_grad = (common.mean_over_processes(torch.autograd.grad(loss, last_layer, retain_graph=True)[0])
                          for loss in (rec_loss, adv_loss))  # the global batch's (torchrun): one lambda everywhere
    ratio = (rec_grad.norm() / (adv_grad.norm() + 1e-4)).detach()
    return ratio.clamp(0.0, limit) * disc_weight, ratio > limit


def adv_rec_grad_ratio(rec_loss, adv_term, params):
    """||grad adv_term|| / ||grad rec_loss|| over `params` (the whole decoder's), adv_term = lambda * L_adv: how hard D
    really pulls (lambda fixes it at the last layer only). Two more backward passes: on logged steps only."""
    def norm(loss):  # of the global batch's gradient, under torchrun too
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.stack([common.mean_over_processes(g).norm() for g in grads]).norm()
    return (norm(adv_term) / (norm(rec_loss) + 1e-12)).detach()


def collapse_symptoms(rows, disc_start_step, pull_limit=1.0, spike=10.0, rebound=1.5):
    """The collapse signature in the rows -> {symptom: message}, empty when healthy or before D acts: D's pull above 1,
    a step's decoder gradient norm 10x the median of the rows' before, recon 50% above its best since D started."""
    row, found = rows[-1], {}
    if row["step"] <= disc_start_step:  # before D acts, nothing here is D's doing
        return found
    if row["adv_rec_grad_ratio"] > pull_limit:
        found["D outpulls the reconstruction"] = f"D's pull on the decoder is {row['adv_rec_grad_ratio']:.2g}x L_rec's"
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
    """The smallest weight of LPIPS's lin heads: 0 or above as released, below 0 once trained."""
    return torch.stack([p.min() for p in perceptual.lins.parameters()]).min()


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
    perceptual, backbone_file = load_lpips(args.lpips_net, args.lpips_random_backbone, device)  # or exit 2
    lpips_vgg = None if args.lpips_random_backbone else load_lpips("vgg", False, device, required=False)[0]
    # lpips.LPIPS freezes only its backbone: freeze all of it, in eval mode (--unfreeze-lpips thaws the lin heads)
    perceptual.eval().requires_grad_(False)
    perceptual.lins.requires_grad_(args.unfreeze_lpips)  # --unfreeze-lpips: the incident, on purpose
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
    trained = [p for p in [*model.parameters(), *perceptual.parameters()] if p.requires_grad]  # LPIPS: if unfrozen
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    disc = PatchDiscriminator(train.shape[1], args.width, spectral_norm=not args.no_spectral_norm).to(device)
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))  # as latent diffusion
    if args.disc_start is None:  # warm-up: half the run, after C's ramp if the encoder trains; kept by --resume
        args.disc_start = max(args.capacity_steps if args.train == "all" else 0, total_steps // 2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    stateful = {"model": model, "optimizer": optimizer, **({"ema": ema} if ema else {})}  # saved by state_dict()
    stateful.update(lpips_lins=perceptual.lins, disc=disc, disc_optimizer=disc_optimizer)  # lins: --unfreeze-lpips
    start, rows, evals, row_sum, row_steps = 0, [], [], None, 0
    first_negative = torch.zeros(2, dtype=torch.long, device=device)  # 1st step a lin weight, an image's LPIPS < 0
    clamped_steps = torch.zeros((), dtype=torch.long, device=device)  # steps at which the adaptive weight's clamp bound
    row_max, warnings_seen = None, {}  # the decoder's largest gradient norm in this row; symptom -> its first warning
    if checkpoint:  # the step, weights, optimizer, random state and rows where the run stopped
        try:
            for name, thing in stateful.items():
                thing.load_state_dict(checkpoint[name])
            first_negative.copy_(checkpoint["first_negative"])
            clamped_steps.copy_(checkpoint["clamped_steps"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            common.fail(f"{args.resume} does not fit this model ({str(e)[:200]}); resume with its own flags")
        start, rows, evals = checkpoint["step"], checkpoint["rows"], checkpoint["evals"]
        row_steps = checkpoint["row_steps"]  # and the sums of the row under way, on the device the loop adds to
        row_sum = checkpoint["row_sum"].to(device) if row_steps else None
        row_max, warnings_seen = checkpoint["row_max"].to(device) if row_steps else None, checkpoint["warnings_seen"]
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
    if args.disc_start >= total_steps:
        print(f"note: D would start at step {args.disc_start}, after the run's end: this run is 03 (see --disc-start)")
    gamma = args.gamma if args.train == "all" else 0.0  # no capacity pull on a frozen encoder
    if args.train == "decoder":
        print("--train decoder: the KL trains nothing (the encoder is frozen); it is logged, not minimised")
    encoder, decoder = model.encoder, model.decoder
    if world > 1 and device.type == "cuda":  # the centring's BatchNorm: the global batch's statistics
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)  # (on a CPU, each process's slice's)
    if world > 1:  # DDP: gradients averaged over the processes during backward
        encoder, decoder = [DistributedDataParallel(m) if any(p.requires_grad for p in m.parameters()) else m
                            for m in (encoder, decoder)]
    discriminator = DistributedDataParallel(disc) if world > 1 else disc
    if args.compile:  # the adaptive weight backpropagates three times through one graph, so compiled backward passes
        # must not reuse or overwrite tensors a later pass still reads (else an error, or in torch 2.14 wrong gradients)
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        functorch_config.donated_buffer = inductor_config.inplace_buffers = False
        encoder, decoder, discriminator = torch.compile(encoder), torch.compile(decoder), torch.compile(discriminator)

    names = ["loss", "recon", "kl", "kl_offset", "kl_scale", "info_bound", "capacity", "lpips", "lpips_lin_min",
             "d_loss", "g_loss", "adv_weight", "logits_real", "logits_fake", "dec_grad_norm", "disc_factor"]
    names += [f"kl_dim_{i}" for i in range(args.latent_dim)]
    bar = tqdm(total=total_steps, initial=start, desc=SCRIPT, dynamic_ncols=True, disable=rank > 0)
    clock, timed = time.perf_counter(), 0
    for step in range(start, total_steps):
        x = common.to_model_range(batches(step), args.recon)  # (B, C, H, W), on the device already
        target = capacity(step, args.capacity_max, args.capacity_steps)  # C at this step, nats
        d_on = step >= args.disc_start  # warm-up: before it, D does nothing
        if step == args.disc_start:
            bar.write(f"step {step}: the discriminator starts")
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # as torch.randn_like, under torchrun too
            raw = decoder(z)
        reconstruction = model.mean(raw.float())  # the decoder's mean image, in [-1, 1] (SD's decoder: unbounded)
        recon = recon_loss(reconstruction, x, args.decoder_std, args.pixel_loss).mean()  # nats per image
        perceptual_per_image = common.lpips_distance(perceptual, reconstruction, x)  # (B,), in float32
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        lpips_term = args.lpips_weight * x[0].numel() * perceptual_per_image.mean() / (2 * args.decoder_std ** 2)
        rec_loss = recon + lpips_term  # L_rec
        loss = rec_loss + gamma * (kl_per_dim.sum() - target).abs()
        weight = g_loss = d_loss = logits_real = logits_fake = pull = torch.zeros((), device=device)
        if d_on:
            disc.requires_grad_(False)  # this pass trains the VAE only
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits_fake = discriminator(reconstruction).float()
            g_loss = -logits_fake.mean()  # hinge generator loss: raise D's opinion of the reconstructions
            adv_loss = x[0].numel() * g_loss / (2 * args.decoder_std ** 2)  # L_adv, priced per pixel value like LPIPS
            if args.no_adaptive_weight:  # a fixed lambda
                weight = torch.tensor(args.disc_weight, device=device)
            else:  # conv_out: the decoder's last layer
                weight, clamped = adaptive_weight(rec_loss, adv_loss, model.decoder.conv_out.weight, args.disc_weight)
                clamped_steps += clamped  # on the device: no waiting
            if (step + 1) % args.log_every == 0 or step + 1 == total_steps:  # D's pull, on the steps that end a row
                pull = adv_rec_grad_ratio(rec_loss, weight * adv_loss, list(model.decoder.parameters()))
            loss = loss + weight * adv_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the decoder's gradient norm (DDP's average), watched for spikes; --grad-clip G scales it to a norm <= G
        dec_grad_norm = nn.utils.clip_grad_norm_(model.decoder.parameters(), args.grad_clip or float("inf"))
        if args.unfreeze_lpips and world > 1:  # the lin heads are outside DDP: their gradients averaged here
            for p in perceptual.lins.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if d_on:  # D's step, on detached reconstructions: it must not train the decoder
            disc.requires_grad_(True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                x_real = x.detach().requires_grad_(args.r1_gamma > 0)  # R1 differentiates D(x) with respect to x
                logits_real, logits_fake = discriminator(x_real).float(), discriminator(reconstruction.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            if args.r1_gamma:  # R1: a flat D around the real images
                d_loss = d_loss + args.r1_gamma / 2 * r1_penalty(logits_real, x_real)
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()

        # the row: each term's mean since the last row, summed where the model runs (a GPU need not wait for the CPU)
        split = evaluate.kl_split(mu.detach(), logvar.detach())  # the KL in three parts (02 explains them)
        lowest = torch.stack([lowest_lin_weight(perceptual), perceptual_per_image.min()]).detach()
        first_negative.masked_fill_((first_negative == 0) & (lowest < 0), step + 1)  # each not yet seen: set now
        terms = torch.stack([loss, recon, kl_per_dim.sum(), *split.values(), torch.tensor(target, device=device),
                             perceptual_per_image.mean(), lowest[0], d_loss, g_loss, weight, logits_real.mean(),
                             logits_fake.mean(), dec_grad_norm, torch.tensor(float(d_on), device=device)])  # 0, 1
        row_max = dec_grad_norm.detach() if row_max is None else torch.maximum(row_max, dec_grad_norm.detach())
        terms = torch.cat([terms.detach(), kl_per_dim.detach()])
        row_sum = terms if row_sum is None else row_sum + terms
        row_steps, timed, done = row_steps + 1, timed + 1, step + 1
        bar.update()
        if done % args.log_every == 0 or done == total_steps:
            means = common.mean_over_processes(row_sum / row_steps).tolist()  # the one wait for a GPU in the row
            if not all(math.isfinite(v) for v in means):
                diverged(done, out)
            rows.append({"step": done, "epoch": step // batches.steps_per_epoch, **dict(zip(names, means)),
                         "dec_grad_norm_max": row_max.item(), "adv_rec_grad_ratio": pull.item(),
                         "images_per_s": timed * args.batch_size / (time.perf_counter() - clock)})
            for symptom, message in collapse_symptoms(rows, args.disc_start).items():
                if symptom not in warnings_seen:  # before the checkpoint below: a resumed run knows of it
                    warnings_seen[symptom] = f"step {done}: {symptom}: {message}"
                    bar.write(f"GAN COLLAPSE WARNING {warnings_seen[symptom]}")
            if rank == 0:
                write_rows(out / "metrics.csv", rows)
            bar.set_postfix({k: f"{rows[-1][k]:.4g}" for k in ("loss", "recon", "kl")})
            row_sum, row_max, row_steps, clock, timed = None, None, 0, time.perf_counter(), 0
        epoch_end = done % batches.steps_per_epoch == 0
        if epoch_end or done == total_steps or args.checkpoint_every and done % args.checkpoint_every == 0:
            if not all(bool(torch.isfinite(p).all()) for p in [*model.parameters(), *disc.parameters()]):
                diverged(done, out)
            if rank == 0:  # written whole, then renamed over the last one: a kill mid-save leaves that one intact
                torch.save({"script": SCRIPT, "args": vars(args), "step": done,
                            **{name: thing.state_dict() for name, thing in stateful.items()},
                            "first_negative": first_negative,
                            "clamped_steps": clamped_steps, "row_max": row_max, "warnings_seen": warnings_seen,
                            "rows": rows, "evals": evals, "row_sum": row_sum, "row_steps": row_steps,
                            "rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                           out / "checkpoint.pt.tmp")
                os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")
        if args.eval_every and done % args.eval_every == 0 and done < total_steps and rank == 0:
            scored = ema.module if ema else model
            evals.append({"step": done, **evaluate.quick_scores(scored, test, device, args.amp, perceptual)})
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
                                perceptual=perceptual, vgg=lpips_vgg, vgg_images=min(1000, max(32, images_seen // 40)))
    if args.train == "decoder":  # the loaded encoder's codes, so the scale a diffusion model trained on them expects
        metrics["latent_scale_factor"] = common.load_autoencoder(args.init_from).latent_scale_factor
    negative = [int(s) for s in first_negative if s > 0]
    incident = min(negative) if negative else None  # the first step of the LPIPS incident
    speeds = [r["images_per_s"] for r in rows[1:] or rows]  # the first row holds one-off set-up
    summary = {"script": SCRIPT, "dataset": args.dataset, "image_size": args.image_size, "latent_dim": args.latent_dim,
               "device": str(device), "steps": total_steps, "epochs": total_steps / batches.steps_per_epoch,
               "wall_s": time.time() - started, "train_images_per_s": sorted(speeds)[len(speeds) // 2],
               "world_size": world, "parameters": sum(p.numel() for p in model.parameters()), **metrics,
               "switch_on": [dict(e, capacity=capacity(e["step"] - 1, args.capacity_max, args.capacity_steps))
                             for e in pictures.switch_on(rows, args.latent_dim)],
               "capacity_final": capacity(total_steps, args.capacity_max, args.capacity_steps),
               "lpips_backbone": "random" if args.lpips_random_backbone else "imagenet",
               "lpips_backbone_file": backbone_file, "lpips_incident_step": incident,
               "lpips_trainable_params": sum(p.numel() for p in perceptual.parameters() if p.requires_grad),
               "disc_start_step": args.disc_start, "disc_steps": max(0, total_steps - args.disc_start),
               "adaptive_weight_clamped_steps": int(clamped_steps),
               "max_dec_grad_norm": max(r["dec_grad_norm_max"] for r in rows),
               "collapse_warnings": list(warnings_seen.values())}
    ramp = torch.tensor([[r["kl"], r["capacity"]] for r in rows if r["step"] <= args.capacity_steps])
    if len(ramp) > 2:  # does the KL follow C: in shape (correlation) and in nats (mean gap)
        summary["kl_capacity_correlation"] = torch.corrcoef(ramp.T)[0, 1].item()
        summary["kl_capacity_gap"] = (ramp[:, 0] - ramp[:, 1]).abs().mean().item()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save({"autoencoder": final.config, "state_dict": final.state_dict(), "script": SCRIPT,
                "dataset": args.dataset, "latent_scale_factor": metrics["latent_scale_factor"]}, out / "autoencoder.pt")
    pictures.save_pictures(out, final, test, device, kl_per_dim=metrics["kl_per_dim"])
    pictures.save_curves(out / "curves.png", rows, [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                         ("KL follows C (nats)", ["kl", "capacity", "info_bound", "kl_scale", "kl_offset"]),
                         ("LPIPS", ["lpips"]), ("discriminator", ["d_loss", "logits_real", "logits_fake"]),
                         ("decoder grad norm", ["dec_grad_norm", "dec_grad_norm_max"]),
                         ("D's pull on the decoder", ["adv_rec_grad_ratio"])],
                         {"D starts": args.disc_start} if args.disc_start < total_steps else None)
    pictures.save_kl_heatmap(out / "kl_per_dim.png", rows, args.latent_dim)
    shown = {"test_psnr_db": "PSNR (dB)", "test_ssim": "SSIM", "test_lpips": "LPIPS", "test_lpips_vgg": "LPIPS-VGG",
             "test_fd_vgg": "FD-VGG", "spectrum_error": "spectrum error", "test_kl": "KL (nats)"}
    print(f"test, {metrics['eval_images']} images: "
          + ", ".join(f"{label} {metrics[k]:.4g}" for k, label in shown.items() if k in metrics))
    on = [f"z{e['dim']} at step {e['step']} (C {e['capacity']:.1f})" for e in summary["switch_on"]]
    print("dims switched on (KL > 0.5 nats): " + (", ".join(on) or "none"))
    for what, first in zip(["a lin weight", "an image's LPIPS"], first_negative.tolist()):
        if first:  # say it loudly
            print(f"LPIPS INCIDENT at step {first}: {what} went below zero; LPIPS was trained. Freeze it.")


if __name__ == "__main__":
    main()
