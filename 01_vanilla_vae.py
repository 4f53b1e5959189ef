"""01 - The vanilla VAE: the ELBO, the reparameterization trick, and why it blurs.

The encoder maps x to a Gaussian q(z|x) = N(mu, s^2); a draw z goes through the decoder back to an image. Training
minimises -ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)) >= -log p(x), nats per image. Blur: the decoder's fixed
sigma prices an error at (x - m)^2 / (2 sigma^2) nats; the default sigma^2 = 1/2 (a plain sum of squared errors) is
wide against this model's errors (summary.json: effective_beta 33, beta against the sigma that fits them), so
the decoder averages away what the small code does not hold. Posterior collapse (Lucas et al. 2019): the KL wins,
q(z|x) = N(0, I); the run warns at a KL under 1 nat or at most one dim above 0.1 nat. Fix: smaller --beta, --free-bits.

Run:   python 01_vanilla_vae.py                              # shapes, 64 px, 2-6 min on a 2-core CPU
       python 01_vanilla_vae.py --beta 50 --max-steps 300    # posterior collapse, and its warning
See:   runs/01_vanilla_vae/<dataset>-<time>/: recon.png, samples.png, curves.png, summary.json (PSNR 24.4 dB).
Papers: Kingma & Welling 2014; Lucas et al. 2019; Sønderby et al. 2016; Fu et al. 2019; Kingma et al. 2016.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import common

SCRIPT = Path(__file__).stem


def parse_args(argv=None):
    parser = common.base_parser(SCRIPT, __doc__, steps=3000)
    parser.add_argument("--recon", choices=["mse", "bce"], default="mse",
                        help="Gaussian likelihood on [-1, 1] (tanh) or Bernoulli on [0, 1] (logits) (default: mse)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL; 1 = the true ELBO (default: 1.0)")
    parser.add_argument("--kl-warmup-steps", type=int, default=0, help="ramp beta from 0 over these steps (default: 0)")
    parser.add_argument("--kl-cycles", type=int, default=0, help="repeat a 0 -> beta ramp this many times (default: 0)")
    parser.add_argument("--free-bits", type=float, default=0.0, help="free KL nats per dim or channel (default: 0)")
    args = common.parse_args(parser, argv)
    if min(args.beta, args.free_bits, args.kl_warmup_steps, args.kl_cycles) < 0:
        common.fail("--beta, --free-bits, --kl-warmup-steps and --kl-cycles must not be negative")
    if args.kl_warmup_steps and args.kl_cycles:
        common.fail("choose one annealing schedule: --kl-warmup-steps or --kl-cycles")
    return args


# ----------------------------------------------------------------------------- the loss's pieces
def recon_loss(raw, x, recon, decoder_std):
    """-log p(x|z) of each image, summed over its P pixel values: (B,) nats. bce: Bernoulli with logits `raw`,
    x in [0, 1]: -sum[x log p + (1 - x) log(1 - p)]. mse: Gaussian, mean m = tanh(raw), fixed std sigma, x in
    [-1, 1]: -log N(x; m, sigma^2) = sum (x - m)^2 / (2 sigma^2) + P log(sigma sqrt(2 pi)); the constant has no
    gradient and is left out here (common.evaluate adds it back for test_neg_elbo)."""
    if recon == "bce":
        return F.binary_cross_entropy_with_logits(raw, x, reduction="none").flatten(1).sum(1)
    return (torch.tanh(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)


def kl_weight(step, beta, warmup_steps, cycles, total_steps):
    """beta_t = beta * (annealing factor in [0, 1]) at optimizer step `step`. Annealing changes the path: it can keep
    a code in use where the optimum has one, not where the optimum itself is collapse (as at beta 50)."""
    if cycles:  # cyclical (Fu et al. 2019): each of `cycles` periods ramps 0 -> 1 over its first half
        period = total_steps / cycles
        return beta * min(1.0, 2.0 * (step % period) / period)
    # linear warm-up (Sønderby et al. 2016; Bowman et al. 2016 used a sigmoid-shaped one)
    return beta * min(1.0, step / warmup_steps) if warmup_steps else beta


def kl_penalty(kl_per_dim, free_bits):
    """sum_i max(free_bits, KL_i), KL_i the batch mean (Kingma et al. 2016): up to free_bits nats per dim are free."""
    return kl_per_dim.clamp(min=free_bits).sum()


# ----------------------------------------------------------------------------- training
def main(argv=None):
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, _ = common.load_data(args)  # (and shapes' true factors, for tools)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial",
                       downsample=args.downsample, arch=args.arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    run = common.Run(args, SCRIPT, device, train, test=test, model=model, optimizer=optimizer)  # log, resume
    if run.resumed and args.kl_cycles and run.resumed["total_steps"] != run.total_steps:
        common.fail("--kl-cycles spreads its cycles over the whole run: a resumed run must keep its length")
    encoder, decoder = common.prepare(args, model.encoder, model.decoder)  # --compile; DDP under torchrun

    for step in run.steps():
        x = common.to_model_range(run.batches(step), args.recon)  # (B, C, H, W), on the device already
        beta = kl_weight(step, args.beta, args.kl_warmup_steps, args.kl_cycles, run.total_steps)
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * common.randn_like(mu)  # torch.randn_like; under torchrun too
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()  # nats per image
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (photos get a code map, a grid of codes, one per f x f patch: there a dim is a channel, summed)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + beta * kl_penalty(kl_per_dim, args.free_bits)  # -ELBO (up to a constant) at beta 1, no free bits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the batch's KL split: offset + scale (no information) + a bound on the information (common.kl_split)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), **common.kl_split(mu, logvar), beta=beta,
                kl_dim=kl_per_dim)

    # ------------------------------------------------------------------------- evaluation and outputs
    # train: the training images, for latent_scale_factor (1 / std of the codes; Stable Diffusion's is a fixed 0.18215)
    metrics, _ = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                 device, args, train=train)
    run.finish(model, test, metrics,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]),
                ("KL split (nats)", ["kl", "info_bound", "kl_scale", "kl_offset"]), ("KL weight", ["beta"])],
               effective_beta=args.beta * (args.decoder_std / metrics["decoder_std_fit"]) ** 2 if args.recon == "mse"
               else None)  # beta as it would be with the sigma that fits the errors (summary.json: decoder_std_fit)
    if metrics["test_kl"] < 1.0 or metrics["informative_dims"] <= 1 < args.latent_dim:  # z unused, or all but one dim
        print(f"warning: posterior collapse - {metrics['informative_dims']} of {args.latent_dim} dims over 0.1 nat "
              f"(KL {metrics['test_kl']:.2f} nats): the decoder ignores (most of) z. A smaller --beta, or --free-bits "
              "(nats per dim the KL does not price), moves the optimum; annealing only changes the path to it.")


if __name__ == "__main__":
    main()
