"""The pictures every chapter leaves in its run folder: recon.png, samples.png, interpolation.png, traversals.png
(the model's), curves.png and kl_per_dim.png (its metrics.csv rows)."""
import torch
import torch.nn.functional as F

from tools.evaluate import as_unit

DECODED_VALUES = 2 ** 20  # pixel values decoded at once: 256 images of 64 x 64, 16 of 256 x 256 x 3


def save_grid(path, images, nrow):
    """[0, 1] images -> one PNG; tiles under 64 px are enlarged (nearest neighbour) so they can be seen."""
    from torchvision.utils import save_image
    if images.shape[-1] < 64:
        images = F.interpolate(images, scale_factor=64 // images.shape[-1])
    save_image(images.float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=0.5)


@torch.no_grad()
def save_pictures(out, model, test, device, kl_per_dim=None, recon_only=False):
    """recon.png: up to 32 test images above their reconstructions from z = mu; samples.png: 64 decoded N(0, I)
    draws from a fixed noise tensor; interpolation.png: straight lines in z between 8 pairs of test images;
    traversals.png (given kl_per_dim): one row per latent dim, most informative first, swept from -3 to 3."""
    model.eval()
    def decode(z):  # a chunk at a time: a few hundred codes of a large image would not fit at once
        return torch.cat([as_unit(model, model.decoder(c)) for c in z.split(max(1, DECODED_VALUES // test[0].numel()))])
    cols = min(8, len(test))
    x = test[:cols * min(4, len(test) // cols)].to(device)  # whole rows of `cols` images
    mu, originals = model.encode(x.float() / 127.5 - 1)[0], x.float() / 255
    rows = torch.stack([originals.view(-1, cols, *x.shape[1:]), decode(mu).view(-1, cols, *x.shape[1:])], 1)
    save_grid(out / "recon.png", rows.flatten(0, 2), nrow=cols)  # originals above their reconstructions
    if recon_only:
        return
    noise = torch.randn(64, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    save_grid(out / "samples.png", decode(noise), nrow=8)
    t = torch.linspace(0, 1, 10, device=device).view(1, -1, *[1] * (mu.dim() - 1))
    ends = mu.roll(-len(mu) // 2, 0)  # image i -> image i + n/2
    path = (1 - t) * mu[:8, None] + t * ends[:8, None]  # (pairs, 10 steps, *latent)
    save_grid(out / "interpolation.png", decode(path.flatten(0, 1)), nrow=10)
    if kl_per_dim is not None:  # a code map's dim is a channel: swept everywhere at once
        order = torch.tensor(kl_per_dim).argsort(descending=True)
        z = mu[0].repeat(len(order), 10, *[1] * (mu.dim() - 1))  # (D, 10, *latent)
        z[torch.arange(len(order)), :, order] = torch.linspace(-3, 3, 10, device=device).view(10, *[1] * (mu.dim() - 2))
        save_grid(out / "traversals.png", decode(z.flatten(0, 1)), nrow=10)


def switch_on(rows, latent_dim, threshold=0.5):
    """[{dim, step}]: each dim's first logged step with a KL above `threshold` nats, in the order of those steps."""
    first = {}
    for row in rows:
        for i in range(latent_dim):
            if row[f"kl_dim_{i}"] > threshold and i not in first:
                first[i] = int(row["step"])
    return [{"dim": i, "step": step} for i, step in sorted(first.items(), key=lambda item: item[1])]


def save_curves(path, rows, panels, marks=None):
    """curves.png: one panel per (title, [metrics.csv columns]); marks = {label: step}, dashed lines."""
    from matplotlib.figure import Figure  # no pyplot: no window, no backend to choose
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for ax, (title, columns) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for c in columns:
            ax.plot([r["step"] for r in rows], [r[c] for r in rows], label=c)
        for label, step in (marks or {}).items():
            ax.axvline(step, color="gray", linestyle="--", label=label)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_kl_heatmap(path, rows, latent_dim):
    """kl_per_dim.png: each latent dim's KL over the steps, the dims in the order they switched on (a mark where each
    did: a staircase), then the rest. A square-root colour scale shows a first half nat beside 8 nats."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    kl = torch.tensor([[r[f"kl_dim_{i}"] for r in rows] for i in range(latent_dim)])  # (D, rows)
    on = [(e["dim"], e["step"]) for e in switch_on(rows, latent_dim)]
    first = [dim for dim, _ in on]
    order = first + [int(i) for i in kl[:, -1].argsort(descending=True) if int(i) not in first]
    fig = Figure(figsize=(8, 0.3 * latent_dim + 1.5))
    ax = fig.subplots()
    image = ax.imshow(kl[order].numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=PowerNorm(0.5, vmin=0.0, vmax=max(kl.max().item(), 1e-6)),
                      extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, latent_dim - 0.5, -0.5))
    if on:
        ax.scatter([step for _, step in on], range(len(on)), marker="|", s=120, color="white",
                   label="switched on (KL > 0.5 nats)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.6)
    ax.set_yticks(range(latent_dim), [f"z{i}" for i in order])
    ax.set(xlabel="step", title="KL per latent dim (nats)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
