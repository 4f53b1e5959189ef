"""The held-out measures of an autoencoder, as every chapter reports them in summary.json.

    python -m tools.evaluate runs/03_lpips_frozen/shapes-<time>            # a run folder, on its own data
    python -m tools.evaluate sd.pt --dataset folder --data-dir my_photos   # any autoencoder.pt, on any data

It writes evaluation.json (beside the model, or --out) with summary.json's names, on the first --eval-images test
images (a chapter: as many as its run sizes):
- test_psnr_db: 10 log10(1 / MSE), images in [0, 1]; higher is closer, and a blur scores well.
- test_ssim: SSIM (Wang et al. 2004): local means, variances and covariance in an 11 x 11 Gaussian window (sigma
  1.5) of each channel, images in [0, 1], averaged over the window positions inside the image, then over images.
- test_lpips and test_lpips_vgg: LPIPS (Zhang et al. 2018), distance in an ImageNet network's features: the one 03
  and 04 train against (AlexNet's unless --lpips-net; this tool: AlexNet's), and VGG16's, which none trains against.
- test_fd_vgg: the Frechet distance of rFID (Heusel et al. 2017) with VGG16 relu4_3 features for Inception's, each
  8 x 8 pixel patch a sample: are the reconstructions' textures distributed like the originals'? 0 is theirs.
- spectrum_error, hf_power_ratio: the reconstructions' Fourier power spectrum against the originals'.
- test_kl, kl_per_dim, active_units, and the KL split test_kl_offset + test_kl_scale + test_info_bound (kl_split).
- latent_scale_factor: 1 / std of mu over (as many) training images: codes times it have unit std, as a diffusion
  model wants them (Stable Diffusion's config sets a constant, 0.18215, for the same purpose).
LPIPS-VGG and FD-VGG need VGG's ImageNet weights (python -m tools.lpips_weights); without them they are left out.
"""
import argparse
import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import common  # found beside the chapters: tools/__init__.py puts the repository's root on sys.path
from tools.datasets import PADDED
from tools.lpips_weights import load_lpips


def kl_split(mu, logvar):
    """The mean KL per image over a set of images x, split exactly into three sums over latent values i (a code
    map: each channel at each position), with t_i = Var_x(mu_i) + E_x[s_i^2], s^2 = exp(logvar):
        kl_offset   1/2 (E_x mu_i)^2              one shift of every code: no information
        kl_scale    1/2 (t_i - 1 - ln t_i)        codes spread wider or narrower than N(0, 1): no information
        info_bound  1/2 (ln t_i - E_x ln s_i^2)   a Gaussian's entropy bound: >= I(x; z_i), and their sum >= I(x; z)
    They add up to E_x KL, as E_x KL_i = 1/2 (E mu_i^2 + E s_i^2 - 1 - E ln s_i^2), E mu^2 = (E mu)^2 + Var mu."""
    t = mu.var(0, unbiased=False) + logvar.exp().mean(0)
    return {"kl_offset": 0.5 * mu.mean(0).pow(2).sum(), "kl_scale": 0.5 * (t - 1 - t.log()).sum(),
            "info_bound": 0.5 * (t.log() - logvar.mean(0)).sum()}


def original_pixels(images, dataset):
    """The pixels a data set really has: the 28 x 28 centre of a padded MNIST image, else all."""
    b = PADDED.get(dataset, 0) if images.shape[-1] == 32 else 0
    return images[..., b:images.shape[-2] - b, b:images.shape[-1] - b]


def as_unit(model, raw):
    """The decoder's raw output -> its mean image in [0, 1], as pictures show it (sd: clamped)."""
    mean = model.mean(raw.float())
    return (mean if model.recon == "bce" else (mean + 1) / 2).clamp(0, 1)


def sample(images, n, seed=0):
    """n of `images` at random (seeded), or all of them: a fair subset of a folder sorted by path too."""
    if n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def chunk_size(images):
    """Images per chunk when a whole set is read: 256 at 64 x 64 pixels, 16 at 256 x 256."""
    return max(1, 256 * 64 * 64 // images[0, 0].numel())


def ssim(x, y, window=11, sigma=1.5):
    """SSIM of each image pair, (B,), x and y in [0, 1]: the mean over window positions inside the image and over
    channels of (2 m_x m_y + C1)(2 s_xy + C2) / ((m_x^2 + m_y^2 + C1)(s_x^2 + s_y^2 + C2)), C1 = 0.01^2, C2 = 0.03^2,
    with Gaussian-weighted means, variances and covariance (Wang et al. 2004)."""
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - window // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype).to(x.device)
    channels = x.shape[1]
    def blur(t):  # the Gaussian window is separable: along the rows, then the columns; windows inside the image only
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(channels, 1, 1, window), groups=channels)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(channels, 1, window, 1), groups=channels)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).flatten(1).mean(1)


def power_spectrum(images):
    """|FFT|^2 of (B, C, H, W) images, summed over images and channels -> (H, W), float64 on the CPU."""
    return torch.fft.fft2(images.float()).abs().pow(2).sum((0, 1)).double().cpu()


def spectrum_metrics(power_recon, power_data):
    """Power spectra (H, W) -> hf_power_ratio (power above 1/4 cycle per pixel, reconstructions over originals) and
    spectrum_error: the mean over rings r = 1 .. H/2 of |log10 P_recon(r) - log10 P_data(r)| (blur, noise raise it)."""
    h = power_data.shape[0]
    f = torch.fft.fftfreq(h, dtype=torch.float64)
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt()  # cycles per pixel
    hf_power_ratio = (power_recon[radius > 0.25].sum() / power_data[radius > 0.25].sum()).item()
    ring = (radius * h).round().long().flatten()
    rings = [torch.bincount(ring, weights=p.flatten(), minlength=h)[1:h // 2 + 1].clamp(min=1e-30).log10()
             for p in (power_recon, power_data)]
    return hf_power_ratio, (rings[0] - rings[1]).abs().mean().item()


def frechet_distance(mean1, cov1, mean2, cov2):
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (FID's formula); tr (S1 S2)^(1/2) is the
    sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric."""
    w, v = torch.linalg.eigh(cov1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).clamp(min=0).sqrt().sum()
    return ((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


@torch.no_grad()
def vgg_scores(vgg, pairs):
    """LPIPS-VGG and FD-VGG of (originals, reconstructions) pairs in [-1, 1] -> {test_lpips_vgg, test_fd_vgg}; the
    features are those of LPIPS-VGG's own pass (relu4_3, 512 values for each 8 x 8 pixel patch)."""
    features, total, count = [], 0.0, 0
    hook = vgg.net.slice4.register_forward_hook(lambda module, inputs, output: features.append(output))
    moments = [[0.0, 0.0, 0] for _ in range(2)]  # per set: the sum of the samples, of their outer products, count
    for x, recon in pairs:
        total, count = total + common.lpips_distance(vgg, recon, x).sum().item(), count + len(x)
        for m, f in zip(moments, (features.pop(1), features.pop(0))):  # LPIPS runs the reconstruction first
            f = f.double().permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()  # (patches, 512)
            m[0], m[1], m[2] = m[0] + f.sum(0), m[1] + f.T @ f, m[2] + len(f)
    hook.remove()
    means = [total_f / n for total_f, _, n in moments]
    covs = [(outer - n * mean.outer(mean)) / (n - 1) for (_, outer, n), mean in zip(moments, means)]
    return {"test_lpips_vgg": total / count, "test_fd_vgg": frechet_distance(means[0], covs[0], means[1], covs[1])}


def reconstructions(model, images, device, amp=False):
    """(originals, reconstructions from z = mu), both in [-1, 1] (sd: clamped), a chunk at a time, in eval mode."""
    model.eval()
    for chunk in images.split(max(1, chunk_size(images) * 100 // 256)):
        x = chunk.to(device).float() / 127.5 - 1
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            yield x, model.decode(model.encode(x)[0]).float().clamp(-1, 1)


@torch.no_grad()
def quick_scores(model, test, device, amp=False, perceptual=None, images=1000):
    """--eval-every's scores: PSNR (and LPIPS) of the first `images` test images, from z = mu, in eval mode."""
    sse, lpips_sum, n = 0.0, 0.0, 0
    for x, recon in reconstructions(model, test[:images], device, amp):
        sse += ((recon - x) / 2).pow(2).flatten(1).mean(1).sum().item()  # on [0, 1]
        if perceptual is not None:
            lpips_sum += common.lpips_distance(perceptual, recon, x).sum().item()
        n += len(x)
    scores = {"test_psnr_db": 10 * math.log10(1 / max(sse / n, 1e-12))}
    if perceptual is not None:
        scores["test_lpips"] = lpips_sum / n
    return scores


@torch.no_grad()
def recalibrate_batchnorm(model, images, device):
    """BatchNorm's running statistics recomputed with the final weights over `images` (a plain average, a batch at a
    time): BN makes the loss blind to shifts of its input, which drifts, so its running average lags and moves mu."""
    batches = (common.to_model_range(c.to(device), model.recon) for c in images.split(min(256, chunk_size(images))))
    torch.optim.swa_utils.update_bn(batches, model.encoder)


@torch.no_grad()
def measures(model, test, train, device, *, decoder_std, dataset, recon_loss=None, perceptual=None, vgg=None,
             vgg_images=1000, amp=False, seed=0):
    """The held-out measures of `model` on uint8 `test` -> {summary.json's names: value}. recon_loss(raw, x) -> (B,):
    the chapter's reconstruction term (default: Gaussian with decoder_std, 03's). `train`: latent_scale_factor is
    measured on these images, and BatchNorm's statistics recomputed on them first, if any and if the encoder trained
    (a frozen one, --train decoder, in eval mode, keeps its own, and so its codes). The ELBO's terms use one
    sample z ~ q(z|x) (noise seeded by `seed`); the pixel measures decode z = mu, as recon.png shows. LPIPS-VGG and
    FD-VGG (with `vgg`) on the first `vgg_images` test images: a VGG pass costs ~45 AlexNet passes."""
    if recon_loss is None:
        def recon_loss(raw, x):
            return (model.mean(raw) - x).pow(2).flatten(1).sum(1) / (2 * decoder_std ** 2)
    if model.encoder.training and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        recalibrate_batchnorm(model, train, device)
    model.eval()
    noise, sums, powers, mus, logvars = torch.Generator().manual_seed(seed), {}, [0.0, 0.0], [], []
    only = functools.partial(original_pixels, dataset=dataset)  # MNIST's own 28 x 28 pixels
    for chunk in test.split(chunk_size(test)):
        original, x = chunk.to(device).float() / 255, common.to_model_range(chunk.to(device), model.recon)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            mu, logvar = model.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise).to(device)
            raw_sample, raw_mean = model.decoder(z).float(), model.decoder(mu).float()
        kl, recon = common.kl_divergence(mu, logvar), as_unit(model, raw_mean)
        per_image = {"test_recon": recon_loss(raw_sample, x), "test_kl": kl.flatten(1).sum(1),
                     "test_recon_original": recon_loss(only(raw_sample), only(x)),
                     "test_mse": (only(recon) - only(original)).pow(2).flatten(1).mean(1),
                     "test_ssim": ssim(recon, original),
                     "kl_per_dim": kl.flatten(2).sum(2) if kl.dim() > 2 else kl}
        if perceptual is not None:
            per_image["test_lpips"] = common.lpips_distance(perceptual, recon * 2 - 1, original * 2 - 1)
        sums = {k: sums.get(k, 0.0) + v.sum(0).double().cpu() for k, v in per_image.items()}
        powers = [powers[0] + power_spectrum(recon), powers[1] + power_spectrum(original)]
        mus, logvars = mus + [mu.cpu()], logvars + [logvar.cpu()]
    metrics, mu = {k: (v / len(test)).tolist() for k, v in sums.items()}, torch.cat(mus)
    metrics["test_psnr_db"] = 10 * math.log10(1.0 / max(metrics["test_mse"], 1e-12))
    metrics["active_units"] = int((mu.flatten(1).var(0) > 0.01).sum())  # Var_x(E_q[z_i|x]) > 0.01 (Burda et al.)
    metrics["informative_dims"] = sum(kl > 0.1 for kl in metrics["kl_per_dim"])  # dims with a KL above 0.1 nat
    metrics.update({"test_" + k: v.item() for k, v in kl_split(mu.double(), torch.cat(logvars).double()).items()})
    metrics["hf_power_ratio"], metrics["spectrum_error"] = spectrum_metrics(*powers)
    n, total, squares = 0, 0.0, 0.0  # count, sum and sum of squares of the training codes, a chunk at a time
    for chunk in train.split(chunk_size(train)):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            z = model.encoder(common.to_model_range(chunk.to(device), model.recon))[0].double()
        n, total, squares = n + z.numel(), total + z.sum().item(), squares + z.pow(2).sum().item()
    metrics["latent_scale_factor"] = 1 / math.sqrt((squares - total ** 2 / n) / (n - 1))
    pixels = only(test[:1]).numel()
    if model.recon == "mse":  # the sigma that maximises E_q[log p(x|z)] on the test set: sigma^2 = mean (x - m)^2
        metrics["decoder_std_fit"] = math.sqrt(2 * decoder_std ** 2 * metrics["test_recon_original"] / pixels)
    # -ELBO, nats per image, one sample; a Gaussian's term above lacks P log(sigma sqrt(2 pi)), added back here
    constant = pixels * math.log(decoder_std * math.sqrt(2 * math.pi)) if model.recon == "mse" else 0.0
    metrics["test_neg_elbo"] = metrics["test_recon_original"] + constant + metrics["test_kl"]
    if vgg is not None:
        metrics.update(vgg_scores(vgg, reconstructions(model, test[:vgg_images], device, amp)))
    metrics["eval_images"], metrics["vgg_images"] = len(test), min(len(test), vgg_images) if vgg else 0
    return metrics


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run folder (its autoencoder.pt, on its own data flags) or an autoencoder.pt")
    p.add_argument("--dataset", choices=common.DATASETS, default=None, help="(default: the run's; shapes for a file)")
    p.add_argument("--data-dir", default=None, help="(default: the run's; data for a file)")
    p.add_argument("--image-size", type=int, default=None, help="(default: the size the model was trained at)")
    p.add_argument("--eval-images", type=int, default=5000, help="test images scored (default: 5000)")
    p.add_argument("--decoder-std", type=float, default=None,
                   help="sigma of test_recon's Gaussian (default: the run's; 0.1 for a code map, 0.7071 for a vector)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="(default: auto)")
    p.add_argument("--out", default=None, help="(default: evaluation.json beside the model)")
    args = p.parse_args()
    path = Path(args.model)
    model = common.load_autoencoder(path / "autoencoder.pt" if path.is_dir() else path)
    run = {}
    if path.is_dir() and (path / "config.json").exists():  # the run's own data flags
        run = json.loads((path / "config.json").read_text())["args"]
    data = argparse.Namespace(dataset=args.dataset or run.get("dataset", "shapes"),
                              data_dir=args.data_dir or run.get("data_dir") or "data",
                              image_size=args.image_size or model.config["image_size"])
    decoder_std = args.decoder_std or run.get("decoder_std") or (0.1 if model.config["spatial"] else math.sqrt(0.5))
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if not model.config["spatial"] and data.image_size != model.config["image_size"]:
        common.fail(f"a code vector's model reads {model.config['image_size']} px images only, not {data.image_size}")
    train, test = common.load_data(data)
    if train.shape[1] != model.config["channels"]:
        common.fail(f"the model takes {model.config['channels']}-channel images, {data.dataset} has {train.shape[1]}")
    perceptual, _ = load_lpips("alex", False, device, required=False)
    vgg, _ = load_lpips("vgg", False, device, required=False)
    found = measures(model.to(device), test[:args.eval_images], sample(train, args.eval_images), device,
                     decoder_std=decoder_std, dataset=data.dataset, perceptual=perceptual, vgg=vgg,
                     seed=run.get("seed", 0))
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "evaluation.json"
    out.write_text(json.dumps({"model": str(path), **vars(data), **found}, indent=2) + "\n")
    shown = ["test_psnr_db", "test_ssim", "test_lpips", "test_lpips_vgg", "test_fd_vgg", "spectrum_error", "test_kl"]
    print("  ".join(f"{k} {found[k]:.4g}" for k in shown if k in found) + f"  ({found['eval_images']} test images)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
