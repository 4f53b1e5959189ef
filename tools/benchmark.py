"""Speed benchmark: images per second of each script's training loop, the share of step time spent
outside forward, backward and optimizer steps, and a conventional DataLoader loop for comparison.
Not part of the default test run (it measures time, which tests must not assert on).

    python -m tools.benchmark                        # CPU (or --device cuda), 32 and 64 px, ~7 min on 2 cores
    python -m tools.benchmark --quality --data-dir data   # + Fashion-MNIST: 01 vs an MLP VAE, ~5 min more

How "outside" is measured: the loop's non-model work - cutting the batch (common.Batches), the
conversion to [-1, 1], adding loss terms to the running means, writing metric rows, the progress
bar, checkpoints and finiteness checks - is wrapped in timers that are switched on for steps
[warmup, warmup + steps). On CUDA each timed call is fenced by torch.cuda.synchronize() so that
queued GPU work is not billed to it; the fences slow the loop a little, so img/s is taken from a
second, unfenced run of the same length. Everything else in the window (forward, losses, backward,
optimizer steps, and the loop's few remaining Python statements) is "model".
"""
import argparse
import functools
import json
import tempfile
import time
import csv
import math
from pathlib import Path

import torch
import tqdm

from tools import load_script  # also puts the repository root on sys.path
import common  # noqa: E402

SCRIPTS = ["01_vanilla_vae", "02_burgess_capacity", "03_lpips_frozen", "04_vae_gan_warmup"]
EXTRA_FLAGS = {"03_lpips_frozen": ["--lpips-random-backbone"],  # same compute as the ImageNet backbone
               "04_vae_gan_warmup": ["--lpips-random-backbone", "--disc-start", "0"]}  # D on in the window
OUTSIDE = [(common.Batches, "__call__"), (common, "to_model_range"), (common.Run, "log"), (tqdm.tqdm, "update"),
           (tqdm.tqdm, "set_postfix"), (common, "save_checkpoint")]


class OutsideTimer:
    """Patches the OUTSIDE functions with timers, active for training steps [warmup, warmup + steps).
    The window opens and closes inside Batches.__call__(step), at the top of a loop iteration."""

    def __init__(self, warmup, steps, device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.active, self.depth, self.outside, self.counts, self.window = False, 0, {}, {}, None
        self.saved = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, owner, name):
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if label == "Batches.__call__":
                step = args[1]
                if step == self.warmup:
                    self.sync()
                    self.active, self.window = True, time.perf_counter()
                elif step == self.warmup + self.steps and self.active:
                    self.sync()
                    self.active, self.window = False, time.perf_counter() - self.window
            if not self.active or self.depth:
                return original(*args, **kwargs)
            self.sync()
            self.depth, start = 1, time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.outside[label] = self.outside.get(label, 0.0) + time.perf_counter() - start
                self.depth, self.counts[label] = 0, self.counts.get(label, 0) + 1
        return timed

    def __enter__(self):
        for owner, name in OUTSIDE:
            self.saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self.wrap(owner, name))
        return self

    def __exit__(self, *exc):
        for owner, name, original in self.saved:
            setattr(owner, name, original)

    def result(self):
        """{'window_s', 'outside_s', 'outside_share', 'by_part' (shares), 'counts' (calls)} for the window."""
        if self.active or self.window is None:
            raise RuntimeError("the measuring window never closed: run at least warmup + steps + 1 steps")
        total = sum(self.outside.values())
        return {"window_s": self.window, "outside_s": total, "outside_share": total / self.window,
                "by_part": {k: v / self.window for k, v in sorted(self.outside.items(), key=lambda kv: -kv[1])},
                "counts": self.counts}


def measure_script(stem, size, device, warmup, steps, out):
    """One script's loop: outside share (fenced run) and img/s (plain run on CUDA; the same run on CPU)."""
    module = load_script(stem)
    argv = ["--image-size", str(size), "--device", device.type, "--max-steps", str(warmup + steps + 1),
            *EXTRA_FLAGS.get(stem, [])]
    with OutsideTimer(warmup, steps, device) as timer:
        module.main([*argv, "--out", str(out / f"{stem}-{size}-fenced")])
    result = timer.result()
    result["images_per_s"] = steps * 64 / result["window_s"]
    if device.type == "cuda":  # the fences cost time on CUDA: take img/s from an unfenced run
        plain = out / f"{stem}-{size}"
        module.main([*argv, "--out", str(plain)])
        with open(plain / "metrics.csv") as f:
            rows = [r for r in ({k: float(v) for k, v in r.items()} for r in csv.DictReader(f)) if r["step"] > warmup]
        result["images_per_s"] = sum(r["images_per_s"] for r in rows) / len(rows)
    return result


class ToTensorImages(torch.utils.data.Dataset):
    """What a torchvision data set does per item: a PIL image, then transforms.ToTensor()."""

    def __init__(self, images):
        from torchvision import transforms
        self.images, self.to_tensor = images.numpy(), transforms.ToTensor()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        image = self.images[i]
        return self.to_tensor(Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)))


def conventional_loop(size, device, warmup, steps, num_workers=1):
    """01's model and loss fed the tutorial way: DataLoader over per-image ToTensor, shuffle, loss.item()
    every step (pytorch/examples/vae). Returns images per second over `steps` steps after `warmup`."""
    vae01 = load_script("01_vanilla_vae")
    train, _, _ = common.make_shapes(50_000, 10, size, seed=1234)
    loader = torch.utils.data.DataLoader(ToTensorImages(train), batch_size=64, shuffle=True, drop_last=True,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    model = common.VAE(1, size, 10, 32, "mse", channel_mean=common.channel_mean(train)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total_loss = 0.0
    for i, x in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            return steps * 64 / (time.perf_counter() - start)
        x = x.to(device) * 2 - 1
        mu, logvar = model.encoder(x)
        raw = model.decoder(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
        loss = vae01.recon_loss(raw, x, "mse", math.sqrt(0.5)).mean() + common.kl_divergence(mu, logvar).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    raise RuntimeError("not enough batches for the requested steps")


# ----------------------------------------------------------------------------- quality at equal time
class MLPVAE(torch.nn.Module):
    """pytorch/examples' VAE: pixels -> 400 -> 20 (mu, logvar) -> 400 -> pixels, Bernoulli logits."""

    def __init__(self, pixels, hidden=400, latent=20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (torch.nn.Linear(pixels, hidden), torch.nn.Linear(hidden, latent),
                                          torch.nn.Linear(hidden, latent))
        self.fc3, self.fc4 = torch.nn.Linear(latent, hidden), torch.nn.Linear(hidden, pixels)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.fc4(torch.relu(self.fc3(z))), mu, logvar


def neg_elbo(logits, x, mu, logvar):
    """BCE summed over pixels + KL summed over dims, per image (B,): nats."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
    return bce + common.kl_divergence(mu, logvar).sum(1)


def mlp_vae_for(seconds, data_dir, batch_size=128, lr=1e-3):
    """Train the MLP VAE on the 784 original pixels of Fashion-MNIST (those 01's test_neg_elbo scores)
    for `seconds` of wall clock, the pytorch/examples way; returns (test -ELBO nats/image, epochs done)."""
    args = argparse.Namespace(dataset="fashion-mnist", data_dir=data_dir, image_size=32)
    train, test = (common.original_pixels(t, "fashion-mnist") for t in common.load_data(args)[:2])
    loader = torch.utils.data.DataLoader(ToTensorImages(train), batch_size=batch_size, shuffle=True, num_workers=1)
    torch.manual_seed(0)
    model = MLPVAE(28 * 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for x in loader:
            logits, mu, logvar = model(x)
            loss = neg_elbo(logits, x, mu, logvar).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(x)
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        x = test.float() / 255
        total = 0.0
        for chunk in x.split(1000):
            logits, mu, logvar = model(chunk)  # one sample of z, as 01's test_neg_elbo
            total += neg_elbo(logits, chunk, mu, logvar).sum().item()
    return total / len(x), images / len(train)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="(default: 32 64)")
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, help="(default: all four)")
    p.add_argument("--warmup", type=int, default=20, help="steps before the window (default: 20)")
    p.add_argument("--steps", type=int, default=100, help="steps measured (default: 100)")
    p.add_argument("--quality", action="store_true", help="also the Fashion-MNIST comparison (default: off)")
    p.add_argument("--data-dir", default="data", help="holds FashionMNIST/raw for --quality (default: data)")
    p.add_argument("--json", default=None, help="also write the results here (default: none)")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {"device": name, "torch": torch.__version__, "loops": {}, "conventional": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for stem in args.scripts:
                r = measure_script(stem, size, device, args.warmup, args.steps, Path(tmp))
                results["loops"][f"{stem} {size}px"] = r
            results["conventional"][f"{size}px"] = conventional_loop(size, device, args.warmup, args.steps)
        if args.quality:
            vae01, out = load_script("01_vanilla_vae"), Path(tmp) / "quality"
            vae01.main(["--dataset", "fashion-mnist", "--recon", "bce", "--data-dir", args.data_dir, "--out", str(out)])
            ours = json.loads((out / "summary.json").read_text())
            mlp, epochs = mlp_vae_for(ours["wall_s"], args.data_dir)
            results["quality"] = {"wall_s": ours["wall_s"], "ours_test_neg_elbo": ours["test_neg_elbo"],
                                  "ours_epochs": ours["epochs"], "mlp_test_neg_elbo": mlp, "mlp_epochs": epochs}
    print(f"\n{name}, torch {torch.__version__}")
    print(f"{'script':28s} {'img/s':>8s} {'outside':>8s}  largest outside parts")
    for key, r in results["loops"].items():
        parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(r["by_part"].items())[:3])
        print(f"{key:28s} {r['images_per_s']:8.0f} {100 * r['outside_share']:7.1f}%  {parts}")
    for size, ips in results["conventional"].items():
        ours = results["loops"].get(f"01_vanilla_vae {size}")
        ratio = f"  (01's loop: {ours['images_per_s'] / ips:.1f}x)" if ours else ""
        print(f"{'conventional DataLoader ' + size:28s} {ips:8.0f}{ratio}")
    if "quality" in results:
        q = results["quality"]
        print(f"Fashion-MNIST, 784 pixels, {q['wall_s']:.0f} s each: 01 --recon bce -ELBO "
              f"{q['ours_test_neg_elbo']:.1f} nats ({q['ours_epochs']:.1f} epochs), "
              f"MLP VAE {q['mlp_test_neg_elbo']:.1f} nats ({q['mlp_epochs']:.1f} epochs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
