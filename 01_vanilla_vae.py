"""01 - The vanilla VAE: the ELBO, the reparameterization trick, and why it blurs.

The encoder maps an image x to a Gaussian q(z|x) = N(mu, s^2), a draw z goes through the decoder
back to an image, and training maximises  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x),
i.e. minimises reconstruction + KL, in nats per image. Blur: the decoder is a Gaussian with a fixed
sigma, so an error costs (x - m)^2 / (2 sigma^2) nats and sigma is the price of detail. The default
(sigma^2 = 1/2 for a code vector) is wide against this model's errors (summary.json: effective_beta 31),
so the code stays small and the decoder averages away what it cannot hold. Posterior collapse: if the
KL wins, q(z|x) = N(0, I) for every x and the decoder ignores z; the run warns when the KL is under
1 nat or at most one dim carries 0.1 nat. Remedies: --beta < 1, annealing, --free-bits.

Run:   python 01_vanilla_vae.py                              # shapes, 64 px, ~3 min on a 2-core CPU
       python 01_vanilla_vae.py --beta 50 --max-steps 300    # posterior collapse, and its warning
See:   runs/01_vanilla_vae/<dataset>-<time>/: recon.png (originals above reconstructions), samples.png,
       curves.png, summary.json. Default run: PSNR 24.25 dB, KL 19.5 nats, spectrum error 0.70.
Papers: Kingma & Welling 2014; Bowman et al. 2016; Fu et al. 2019; Kingma et al. 2016; Lucas et al. 2019.
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
    parser.add_argument("--kl-warmup-steps", type=int, default=0, help="ramp beta up from 0 over these steps (default: 0)")
    parser.add_argument("--kl-cycles", type=int, default=0, help="repeat a 0 -> beta ramp this many times (default: 0)")
    parser.add_argument("--free-bits", type=float, default=0.0, help="KL floor per dim (code map: per channel), nats (default: 0)")
    args = common.parse_args(parser, argv)
    if min(args.beta, args.free_bits, args.kl_warmup_steps, args.kl_cycles) < 0:
        common.fail("--beta, --free-bits, --kl-warmup-steps and --kl-cycles must not be negative")
    if args.kl_warmup_steps and args.kl_cycles:
        common.fail("choose one annealing schedule: --kl-warmup-steps or --kl-cycles")
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


def kl_weight(step, beta, warmup_steps, cycles, total_steps):
    """beta_t = beta * (annealing factor in [0, 1]) at optimizer step `step`."""
    if cycles:  # cyclical (Fu et al. 2019): each of `cycles` periods ramps 0 -> 1 over its first half
        period = total_steps / cycles
        return beta * min(1.0, 2.0 * (step % period) / period)
    if warmup_steps:  # linear warm-up (Bowman et al. 2016): 0 at step 0, beta from warmup_steps on
        return beta * min(1.0, step / warmup_steps)
    return beta


def kl_penalty(kl_per_dim, free_bits):
    """sum_i max(free_bits, KL_i), KL_i averaged over the batch (Kingma et al. 2016). Below the floor a
    dim's KL has no gradient: the encoder may spend up to free_bits nats on it unopposed."""
    return kl_per_dim.clamp(min=free_bits).sum()


# ----------------------------------------------------------------------------- training
def main(argv=None):
    args = parse_args(argv)
    device = common.choose_device(args)  # also seeds torch
    train, test, test_factors = common.load_data(args)
    model = common.VAE(train.shape[1], args.image_size, args.latent_dim, args.width, args.recon,
                       channel_mean=common.channel_mean(train), spatial=args.latent == "spatial").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    run = common.Run(args, SCRIPT, device, train, model=model, optimizer=optimizer)  # folder, log, resume
    if run.resumed and args.kl_cycles and run.resumed["total_steps"] != run.total_steps:
        common.fail("--kl-cycles spreads its cycles over the whole run: a resumed run must keep its length")
    encoder, decoder = (torch.compile(m) if args.compile else m for m in (model.encoder, model.decoder))

    for step in run.steps():
        x = common.to_model_range(run.batch(step), args.recon)  # (B, C, H, W), on the device already
        beta = kl_weight(step, args.beta, args.kl_warmup_steps, args.kl_cycles, run.total_steps)
        with common.autocast(device, args):
            mu, logvar = encoder(x)  # q(z|x) = N(mu, exp(logvar)), one Gaussian per latent dim
            # the reparameterization trick: z ~ q(z|x) as a differentiable function of mu and s = exp(logvar / 2)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            raw = decoder(z)
        recon = recon_loss(raw.float(), x, args.recon, args.decoder_std).mean()  # nats per image
        # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar), per dim, batch mean, (D,)
        # (a code map's dim is a channel, summed over positions)
        kl_per_dim = common.kl_per_dim(mu, logvar)
        loss = recon + beta * kl_penalty(kl_per_dim, args.free_bits)  # -ELBO (up to a constant) at beta 1, no free bits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # kl_offset: the KL of one shift of every code, no information (from 02 on, centring closes it for a code vector)
        run.log(step, loss=loss, recon=recon, kl=kl_per_dim.sum(), kl_offset=0.5 * mu.mean(0).pow(2).sum(), beta=beta,
                kl_dim=kl_per_dim)

    # ------------------------------------------------------------------------- evaluation and outputs
    metrics, mu = common.evaluate(model, test, lambda raw, x: recon_loss(raw, x, args.recon, args.decoder_std),
                                  device, args, train=train)  # train: BatchNorm statistics (02 on) recomputed with the final weights
    run.finish(model, test, metrics, mu, test_factors,
               [("loss (nats/image)", ["loss"]), ("reconstruction", ["recon"]), ("KL", ["kl", "kl_offset"]), ("KL weight", ["beta"])],
               effective_beta=args.beta * args.decoder_std ** 2 / metrics["decoder_std_fit"] ** 2 if args.recon == "mse" else None)
    if metrics["test_kl"] < 1.0 or metrics["informative_dims"] <= 1 < args.latent_dim:  # z unused, or all but one of its dims
        print(f"warning: posterior collapse - {metrics['informative_dims']} of {args.latent_dim} dims carry over 0.1 nat, KL {metrics['test_kl']:.2f} "
              "nats in all: the decoder ignores (most of) z. Counter it with a smaller --beta, --kl-warmup-steps or --kl-cycles, or --free-bits.")


if __name__ == "__main__":
    main()
