"""Plumbing shared by the numbered scripts: data, model blocks, the Gaussian KL, evaluation,
run bookkeeping (arguments, logs, checkpoints) and pictures.

Nothing here is a chapter's idea. The loss of each chapter, its schedules and its tricks live in
the numbered script that introduces them, so each script can be read top to bottom on its own.
"""
import argparse
import csv
import gzip
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DATASETS = ["shapes", "mnist", "fashion-mnist", "cifar10", "celeba", "folder"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PADDED = {"mnist": 2, "fashion-mnist": 2}  # border added around the 28 x 28 originals, pixels


def fail(message, code=2):
    """Bad input: one `error:` line on stderr (library messages folded onto it), no traceback, exit 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------- arguments
def base_parser(script, doc, epochs):
    """The flags every script takes; each script adds its own after these."""
    p = argparse.ArgumentParser(prog=f"{script}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="shapes", help="(default: shapes, drawn by code, no download)")
    p.add_argument("--data-dir", default="data", help="where data sets live; for folder, the image folder (default: data)")
    p.add_argument("--image-size", type=int, default=None, help="(default: 64 for shapes, celeba, folder; 32 otherwise)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training set (default: {epochs})")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps, 0 = no cap (default: 0)")
    p.add_argument("--decoder-std", type=float, default=None,
                   help="sigma of the Gaussian decoder on [-1, 1] pixels: the price of detail, see 01 "
                        "(default: 0.7071, i.e. variance 1/2; 0.1 for a code map)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--latent", choices=["vector", "spatial"], default=None,
                   help="one code vector per image, or a map of codes, one per 4 x 4 pixel patch "
                        "(default: spatial for cifar10, celeba, folder; vector otherwise)")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="dims of the code vector, or channels of the code map (default: 10 vector, 4 spatial)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv; 64-128 on a GPU (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="(default: auto)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<script>/<dataset>-<time>)")
    p.add_argument("--resume", default=None, help="continue the run saved in this checkpoint.pt (default: none)")
    p.add_argument("--log-every", type=int, default=50, help="steps between metric rows (default: 50)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast on CUDA; for models this small it has not paid off (default: off)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile (default: off)")
    return p


def parse_args(parser, argv=None):
    """Parse, fill the data-set dependent defaults, check ranges. With --resume, the saved run's
    arguments come back, and only the flags given on this command line override them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume:
        saved = load_checkpoint(args.resume)
        if saved.get("script") + ".py" != parser.prog:
            fail(f"{args.resume} was written by {saved.get('script')}.py, not {parser.prog}")
        given = {a.dest for a in parser._actions for o in a.option_strings
                 if any(t == o or t.startswith(o + "=") for t in argv)}
        merged = dict(saved["args"], **{k: v for k, v in vars(args).items() if k in given})
        merged["out"] = merged["out"] if "out" in given else str(Path(args.resume).parent)
        args = argparse.Namespace(**merged)
    big = args.dataset in ("shapes", "celeba", "folder")
    args.image_size = args.image_size or (64 if big else 32)
    photos = args.dataset in ("cifar10", "celeba", "folder")
    args.latent = args.latent or ("spatial" if photos else "vector")
    args.latent_dim = args.latent_dim or (4 if args.latent == "spatial" else 64 if photos else 10)
    if args.decoder_std is None:  # a code map carries photos only if detail is priced near the errors' sigma
        args.decoder_std = 0.1 if args.latent == "spatial" else math.sqrt(0.5)
    for name, low in [("epochs", 1), ("batch_size", 2), ("latent_dim", 1), ("width", 1),
                      ("log_every", 1), ("max_steps", 0)]:
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("lr", "decoder_std"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.image_size not in (16, 32, 64, 128, 256):
        fail(f"--image-size must be 16, 32, 64, 128 or 256, got {args.image_size}")
    return args


# ----------------------------------------------------------------------------- run set-up
def choose_device(args):
    """Seed torch and pick the device."""
    torch.manual_seed(args.seed)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device = args.device
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available[device]:
            fail(f"--device {device} is not available on this machine; use --device auto or cpu")
    return torch.device(device)


def create_run_folder(args, script, device):
    """Create the output folder and write config.json. The scripts call it once the data (and 03-04's
    LPIPS weights) have loaded, so a run that stops on bad input leaves no folder behind."""
    out = Path(args.out or f"runs/{script}/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {out}: {e.strerror}")
    args.out = str(out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    write_json(out / "config.json", {
        "script": script, "args": vars(args), "command": " ".join(sys.argv), "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(), "versions": {"python": platform.python_version(), **{
            package: importlib.metadata.version(package) for package in ("torch", "torchvision", "lpips", "matplotlib")}}})
    return out


def autocast(device, args):
    """bf16 autocast on CUDA with --amp; the losses are always computed in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.amp)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- data
SHAPE_FACTORS = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}  # dSprites' grid


def draw_shapes(factors, size):
    """Draw dSprites-style binary images from factor indices (N, 5) -> uint8 (N, 1, size, size).
    Each pixel centre near a shape is mapped into the shape's own frame (shift, rotate, scale) and
    tested against the shape's implicit equation; all images at once, no Python loop per image."""
    f = factors.float()
    radius = 0.15 * (0.5 + 0.5 * f[:, 1] / 5).view(-1, 1, 1)  # scale 0.5..1 of 15% of the width
    angle = (2 * math.pi * f[:, 2] / 40).view(-1, 1, 1)
    centre_x, centre_y = [(0.2 + 0.6 * f[:, i] / 31).view(-1, 1, 1) for i in (3, 4)]  # keep shapes inside
    # Every shape lies within 1.15 radii (0.17 of the width) of its centre: only look at that window.
    half = math.ceil(0.19 * size)
    offsets = torch.arange(-half, half)
    cols = (centre_x.view(-1, 1) * size).long() + offsets  # (N, 2 half) pixel indices
    rows = (centre_y.view(-1, 1) * size).long() + offsets
    dx = (cols.unsqueeze(1) + 0.5) / size - centre_x  # (N, 1, 2 half), from pixel centres
    dy = (rows.unsqueeze(2) + 0.5) / size - centre_y  # (N, 2 half, 1)
    u = (torch.cos(angle) * dx + torch.sin(angle) * dy) / radius  # (N, 2 half, 2 half), shape's frame
    v = (-torch.sin(angle) * dx + torch.cos(angle) * dy) / radius
    square = torch.maximum(u.abs(), v.abs()) <= 0.8
    ellipse = u ** 2 + (v / 0.5) ** 2 <= 1
    hx, hy = 1.1 * u, -1.1 * v + 0.1  # the heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, upright
    heart = (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
    shape = factors[:, 0].view(-1, 1, 1)
    inside = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
    images = torch.zeros(len(factors), size, size, dtype=torch.uint8)
    images[torch.arange(len(factors)).view(-1, 1, 1), rows.unsqueeze(2), cols.unsqueeze(1)] = inside.to(torch.uint8) * 255
    return images.unsqueeze(1)


def make_shapes(n_train, n_test, size, seed):
    """Distinct random cells of the dSprites factor grid (737,280 combinations), drawn in chunks."""
    counts = torch.tensor(list(SHAPE_FACTORS.values()))
    cells = torch.randperm(int(counts.prod()), generator=torch.Generator().manual_seed(seed))[: n_train + n_test]
    strides = torch.cat([counts.flip(0).cumprod(0).flip(0)[1:], torch.tensor([1])])
    factors = (cells.view(-1, 1) // strides) % counts  # mixed-radix digits, (N, 5)
    images = torch.cat([draw_shapes(chunk, size) for chunk in factors.split(4096)])
    return images[:n_train], images[n_train:], factors[n_train:]


def resize_uint8(images, size):
    """(N, C, h, w) uint8 -> (N, C, size, size): centre-crop to a square, then antialiased resize."""
    h, w = images.shape[-2:]
    side = min(h, w)
    images = images[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side == size:
        return images.contiguous()
    resized = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
               for c in images.split(2048)]
    return torch.cat(resized).round().clamp(0, 255).to(torch.uint8)


def load_torchvision(name, root, train):
    import torchvision.datasets as tvd
    cls, layout = {"mnist": (tvd.MNIST, "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
                   "fashion-mnist": (tvd.FashionMNIST, "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
                   "cifar10": (tvd.CIFAR10, "cifar-10-batches-py/ (or cifar-10-python.tar.gz)")}[name]
    # torchvision accepts a .gz only if its checksum matches the original download; a recompressed
    # copy (a Linux distribution's package, say) makes it try the network. Unpacked files it reads.
    for packed in (Path(root) / cls.__name__ / "raw").glob("*-ubyte.gz"):
        if not packed.with_suffix("").exists():
            part = packed.with_suffix(".part")  # renamed when complete: an interrupted unpack leaves no half file
            with gzip.open(packed, "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.replace(packed.with_suffix(""))
    try:
        data = cls(root, train=train, download=True).data
    except Exception as e:  # offline, a proxy, a half-written file: say what to place where
        fail(f"could not load or download {name} ({type(e).__name__}: {e}); "
             f"on a machine without network, place {layout} under {Path(root).resolve()}")
    data = torch.as_tensor(data)
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)


def read_image(path, size, box=None):
    """One file -> (3, size, size) uint8, or None when it cannot be decoded. A square of side `box`
    at the image centre (default: the largest that fits) is cut out, then resized to size x size."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            w, h = img.size
            side = min(w, h) if box is None else box
            left, top = (w - side) // 2, (h - side) // 2
            img = img.convert("RGB").resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    except Exception:  # truncated, not an image, unsupported mode: skip it and count it
        return None
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def read_folder(root, size, need):
    """Every image below `root`, sorted by path -> uint8 (N, 3, size, size); unreadable files skipped."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    images = [read_image(p, size) for p in paths]
    good = [x for x in images if x is not None]
    if len(good) < need:
        fail(f"found {len(good)} readable images ({', '.join(sorted(IMAGE_EXTENSIONS))}) below {root}; need at least {need}")
    print(f"folder {root}: {len(good)} images read, {len(images) - len(good)} unreadable files skipped")
    return torch.stack(good)


def load_folder(root, size):
    """A folder with train/ and test/ inside is split that way; any other folder holds out every tenth
    image (a fixed 10%)."""
    root = Path(root)
    if not root.is_dir():
        fail(f"image folder {root} does not exist; pass --data-dir with a folder of images")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return read_folder(root / "train", size, need=1), read_folder(root / "test", size, need=1)
    images = read_folder(root, size, need=2)
    is_test = torch.arange(len(images)) % 10 == 0  # every tenth file in sorted order
    return images[~is_test], images[is_test]


def load_celeba(root, size):
    folder = Path(root) / "celeba"
    cache = folder / f"cache_{size}_box148.pt"
    if cache.exists():
        return torch.load(cache)
    partition = folder / "list_eval_partition.txt"
    if not partition.exists() or not (folder / "img_align_celeba").is_dir():
        fail(f"CelebA needs {folder}/img_align_celeba/*.jpg and {partition} (torchvision's layout); "
             "download them from the CelebA site and place them there")
    split = dict(line.split() for line in partition.read_text().split("\n") if line.strip())
    out = {}
    for part, name in [("0", "train"), ("2", "test")]:  # 0 train, 1 validation, 2 test
        files = [folder / "img_align_celeba" / f for f, s in split.items() if s == part]
        decoded = [read_image(f, size, box=148) for f in files]  # a 148 x 148 box at the face's centre
        out[name] = torch.stack([x for x in decoded if x is not None])
    torch.save((out["train"], out["test"]), cache)
    return out["train"], out["test"]


def load_data(args):
    """-> (train, test, test_factors): uint8 (N, C, H, W) tensors on the CPU; factors only for shapes."""
    if args.dataset == "shapes":
        return make_shapes(50_000, 5_000, args.image_size, seed=1234)  # one fixed data set, whatever --seed
    if args.dataset == "folder":
        train, test = load_folder(args.data_dir, args.image_size)
    elif args.dataset == "celeba":
        train, test = load_celeba(args.data_dir, args.image_size)
    else:
        train, test = [load_torchvision(args.dataset, args.data_dir, t) for t in (True, False)]
        if args.dataset in PADDED:  # 28 x 28 -> 32 x 32 with a zero border: every original pixel kept
            train, test = [F.pad(t, (PADDED[args.dataset],) * 4) for t in (train, test)]
        train, test = resize_uint8(train, args.image_size), resize_uint8(test, args.image_size)
    return train, test, None


def original_pixels(images, dataset):
    """The pixels a data set really has: the 28 x 28 centre of a padded MNIST image, else all."""
    b = PADDED.get(dataset, 0) if images.shape[-1] == 32 else 0
    return images[..., b:images.shape[-2] - b, b:images.shape[-1] - b]


class Batches:
    """Training batches cut from a uint8 tensor on the training device. The order of each epoch is a
    permutation seeded by (seed, epoch), so step s always sees the same batch: resume needs only s."""

    def __init__(self, images, batch_size, seed, device):
        if len(images) < batch_size:
            fail(f"--batch-size {batch_size} is larger than the {len(images)} training images; "
                 f"pass --batch-size {len(images)} or less")
        fits = device.type != "cuda" or images.numel() < 0.4 * torch.cuda.mem_get_info(device)[0]
        self.images = images.to(device) if fits else images.pin_memory()  # else: copy each batch over
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, None
        self.steps_per_epoch = len(images) // batch_size  # drop the ragged last batch

    def __call__(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            self.order, self.epoch = order.to(self.images.device), epoch
        batch = self.images[self.order[i * self.batch_size:(i + 1) * self.batch_size]]
        return batch.to(self.device, non_blocking=True)


def channel_mean(images):
    """Mean of each channel of uint8 (N, C, H, W) images, in [0, 1]."""
    return images.sum((0, 2, 3), dtype=torch.float64).float() / (images[:, 0].numel() * 255)


def to_model_range(x, recon="mse"):
    """uint8 -> [-1, 1] for a Gaussian (tanh) decoder, [0, 1] for a Bernoulli (logits) decoder."""
    return x.float() / 255 if recon == "bce" else x.float() / 127.5 - 1


# ----------------------------------------------------------------------------- model blocks
def stage_channels(image_size, width):
    """Channels after each stride-2 stage, down to a 4x4 map: 64 px -> [w, w, 2w, 2w], the encoder
    layout of Higgins et al. 2017 (beta-VAE)."""
    n = int(math.log2(image_size)) - 2
    return [width * (1 if i < n // 2 else 2) for i in range(n)]


class Encoder(nn.Module):
    def __init__(self, channels, image_size, latent_dim, width, hidden=256, centre_mu=False):
        super().__init__()
        layers, c_in = [], channels
        for c in stage_channels(image_size, width):  # (B, C, 64, 64) -> (B, w, 32, 32) -> ... -> (B, 2w, 4, 4)
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, hidden), nn.ReLU())  # (B, 256)
        # centre_mu: mu = W (h - mean_batch h) / std_batch h, with no bias after the centring, so the
        # batch mean of mu is exactly 0 in training; 02 explains why.
        centre = nn.BatchNorm1d(hidden, affine=False) if centre_mu else nn.Identity()
        self.to_mu = nn.Sequential(centre, nn.Linear(hidden, latent_dim, bias=not centre_mu))  # (B, D)
        self.to_logvar = nn.Linear(hidden, latent_dim)  # (B, D)

    def forward(self, x):
        h = self.features(x)
        mu, logvar = self.to_mu(h).float(), self.to_logvar(h).float()
        # Clamp log sigma^2 to [-10, 10]: exp() stays finite (also in bf16) and a sigma collapsing to 0
        # cannot send -log sigma^2, and with it the KL, to infinity.
        return mu, logvar.clamp(-10.0, 10.0)


class Decoder(nn.Module):
    def __init__(self, channels, image_size, latent_dim, width, hidden=256):
        super().__init__()
        chs = stage_channels(image_size, width)
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, chs[-1] * 16), nn.ReLU(),
                                  nn.Unflatten(1, (chs[-1], 4, 4)))  # (B, 2w, 4, 4)
        layers = []
        for c_in, c in zip(chs[::-1], chs[::-1][1:]):  # (B, 2w, 4, 4) -> (B, 2w, 8, 8) -> ... -> (B, w, 32, 32)
            layers += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.conv_out = nn.ConvTranspose2d(chs[0], channels, 4, stride=2, padding=1)  # (B, C, 64, 64), no activation

    def forward(self, z):
        return self.conv_out(self.body(self.head(z)))


SPATIAL_FACTOR = 4  # a spatial latent has one code per 4 x 4 pixel patch: 64 px images -> 16 x 16 codes
CAPACITY_PER_VALUE = 1.5  # nats per value of a code map, for 02-04's default C_max


def default_capacity(args):
    """02-04's C_max in nats when --capacity-max is not given: 25 for a code vector (Burgess et al.);
    for a code map, CAPACITY_PER_VALUE nats for each of its values (1,536 for 4 x 16 x 16 at 64 px),
    since the information a map can carry grows with its number of values."""
    if args.latent == "vector":
        return 25.0
    return CAPACITY_PER_VALUE * args.latent_dim * (args.image_size // SPATIAL_FACTOR) ** 2


class SpatialEncoder(Encoder):
    """x (B, C, H, W) -> mu, logvar (B, c, H/4, W/4). Convolutions only, so each code describes its own
    patch and the code map keeps the image's layout, as in Stable Diffusion's KL autoencoders."""

    def __init__(self, channels, latent_channels, width, centre_mu=False):
        nn.Module.__init__(self)  # Encoder's forward, with these layers
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU(),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),  # (B, 2w, H/4, W/4)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        centre = nn.BatchNorm2d(2 * width, affine=False) if centre_mu else nn.Identity()  # as Encoder's
        self.to_mu = nn.Sequential(centre, nn.Conv2d(2 * width, latent_channels, 1, bias=not centre_mu))
        self.to_logvar = nn.Conv2d(2 * width, latent_channels, 1)  # (B, c, H/4, W/4)


class SpatialDecoder(nn.Module):
    """z (B, c, H/4, W/4) -> raw output (B, C, H, W). It upsamples by repeating pixels and then
    convolving, as Stable Diffusion's decoder does: a strided transposed convolution would paint a
    checkerboard, which a discriminator (04) then amplifies (Odena et al. 2016)."""

    def __init__(self, channels, latent_channels, width):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(),  # (B, w, H/2, W/2)
            nn.Upsample(scale_factor=2))
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)  # (B, C, H, W), no activation

    def forward(self, z):
        return self.conv_out(self.body(z))


class VAE(nn.Module):
    """Encoder -> (mu, logvar); z = mu + sigma * eps; decoder -> raw output. The raw output is the
    Bernoulli logits for recon='bce', and pre-tanh for recon='mse' (tanh gives the Gaussian mean).

    channel_mean (C,) in [0, 1] starts the decoder's output bias at the data's mean colour. Without
    it the untrained decoder paints grey, its first large steps go into turning the background
    dark, and on sparse images (shapes: 2% of pixels lit) that route can cut z off for good: the
    decoder learns the dark background first and never starts reading z."""

    def __init__(self, channels, image_size, latent_dim, width, recon="mse", channel_mean=None, centre_mu=False,
                 spatial=False):
        super().__init__()
        if spatial:  # latent_dim channels at each of (image_size / 4)^2 positions
            self.encoder = SpatialEncoder(channels, latent_dim, width, centre_mu=centre_mu)
            self.decoder = SpatialDecoder(channels, latent_dim, width)
            self.latent_shape = (latent_dim, image_size // SPATIAL_FACTOR, image_size // SPATIAL_FACTOR)
        else:
            self.encoder = Encoder(channels, image_size, latent_dim, width, centre_mu=centre_mu)
            self.decoder = Decoder(channels, image_size, latent_dim, width)
            self.latent_shape = (latent_dim,)
        self.recon = recon
        if channel_mean is not None:
            m = torch.as_tensor(channel_mean, dtype=torch.float32).clamp(0.01, 0.99)
            bias = torch.logit(m) if recon == "bce" else torch.atanh(2 * m - 1)  # inverse of the output map
            self.decoder.conv_out.bias.data.copy_(bias)

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar

    def mean(self, raw):
        """The decoder's mean image in model range: sigmoid(logits) or tanh(raw)."""
        return torch.sigmoid(raw) if self.recon == "bce" else torch.tanh(raw)

    def to_unit(self, raw):
        """Mean image in [0, 1], for metrics and pictures."""
        mean = self.mean(raw.float())
        return mean if self.recon == "bce" else (mean + 1) / 2


def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps with eps ~ N(0, I): the sample is a differentiable function of mu, logvar."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) of each latent value, nats: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2).
    Elementwise: (B, D) for a code vector, (B, c, h, w) for a code map. (Kingma & Welling 2014, App. B)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_per_dim(mu, logvar):
    """Batch-mean KL of each latent dim, nats, (D,). A code map's dim is a channel: its KL summed over
    the positions."""
    kl = kl_divergence(mu, logvar).mean(0)
    return kl.reshape(len(kl), -1).sum(1)


# ----------------------------------------------------------------------------- evaluation
def power_spectrum(images):
    """|FFT|^2 of (B, C, H, W) images, summed over images and channels -> (H, W), float64 on the CPU."""
    return torch.fft.fft2(images.float()).abs().pow(2).sum((0, 1)).double().cpu()


def spectrum_metrics(power_recon, power_data):
    """Compare two power spectra (H, W) of square images -> (hf_power_ratio, spectrum_error).
    hf_power_ratio: power above 1/4 cycle per pixel, reconstructions over originals; 1 = as much
        fine-scale energy as the data. Noise raises it as much as detail does.
    spectrum_error: mean over the rings r = 1 .. H/2 (radius in cycles per image, rounded) of
        |log10 P_recon(r) - log10 P_data(r)|; 0 = the data's spectrum. Blur (power missing at high r)
        and noise (power added) both raise it."""
    h = power_data.shape[0]
    f = torch.fft.fftfreq(h, dtype=torch.float64)
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt()  # cycles per pixel
    high = radius > 0.25
    hf_power_ratio = (power_recon[high].sum() / power_data[high].sum()).item()
    ring = (radius * h).round().long().flatten()
    rings = [torch.bincount(ring, weights=p.flatten(), minlength=h)[1:h // 2 + 1] for p in (power_recon, power_data)]
    spectrum_error = (rings[0].clamp(min=1e-30).log10() - rings[1].clamp(min=1e-30).log10()).abs().mean().item()
    return hf_power_ratio, spectrum_error


@torch.no_grad()
def recalibrate_batchnorm(model, images, batch_size=256, max_images=12_800, seed=0):
    """Recompute BatchNorm's running statistics with the final weights, exactly, over a seeded random
    subset of the training images (storage order can be sorted, as a folder's is).
    During training BN makes the loss blind to shifts of its input, so that input's mean drifts from
    step to step, and the running average (momentum 0.1) lags behind it; with mu's features as
    narrow as they become under the capacity objective, that lag moves mu at test time."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = next(model.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]
    for chunk in images[subset].split(batch_size):
        model.encoder(to_model_range(chunk.to(device), model.recon))
    for m in norms:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def evaluate(model, test, recon_loss, device, args, extra=None, max_images=10_000):
    """Held-out metrics for summary.json -> (metrics dict, mu of every test image).
    recon_loss(raw, x) -> (B,) is the script's own reconstruction term (test_recon; test_recon_original
    is the same on the pixels the data set really has, see original_pixels); extra(x, mean) ->
    {name: (B,)} adds per-image metrics. The ELBO terms use one sample z ~ q(z|x) (a fixed noise draw); pixel
    metrics and spectra use the decoding of z = mu, i.e. the reconstruction shown in recon.png."""
    model.eval()
    noise = torch.Generator().manual_seed(args.seed)
    sums, kl_sum, power_recon, power_data, mus, variances = {}, 0.0, 0.0, 0.0, [], 0.0
    test = test[:max_images]
    for chunk in test.split(256):
        original = chunk.to(device).float() / 255  # [0, 1]
        x = to_model_range(chunk.to(device), model.recon)
        with autocast(device, args):
            mu, logvar = model.encoder(x)
            eps = torch.randn(mu.shape, generator=noise).to(device)
            raw_sample, raw_mean = model.decoder(reparameterize(mu, logvar, eps)), model.decoder(mu)
        kl = kl_divergence(mu, logvar).flatten(2 if mu.dim() > 2 else 1)  # (B, D) or (B, c, h * w), nats
        recon = model.to_unit(raw_mean)
        original_only = lambda t: original_pixels(t, args.dataset)  # noqa: E731  MNIST without its border
        per_image = {"test_recon": recon_loss(raw_sample.float(), x), "test_kl": kl.flatten(1).sum(1),
                     "test_recon_original": recon_loss(original_only(raw_sample.float()), original_only(x)),
                     "test_mse": (original_only(recon) - original_only(original)).pow(2).flatten(1).mean(1)}
        per_image.update(extra(x, model.mean(raw_mean.float())) if extra else {})
        for k, v in per_image.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
        kl_sum = kl_sum + kl.sum(0).reshape(kl.shape[1], -1).sum(1)  # (D,): per dim, or per channel
        power_recon, power_data = power_recon + power_spectrum(recon), power_data + power_spectrum(original)
        mus.append(mu.cpu())
        variances = variances + logvar.exp().sum(0).cpu()
    model.train()
    metrics = {k: v / len(test) for k, v in sums.items()}
    mu = torch.cat(mus)
    metrics["test_psnr_db"] = 10 * math.log10(1.0 / max(metrics["test_mse"], 1e-12))
    metrics["active_units"] = int((mu.flatten(1).var(0) > 0.01).sum())  # Cov_x(E_q[z_i|x]) > 0.01, Burda et al. 2016
    metrics["kl_per_dim"] = (kl_sum / len(test)).tolist()
    # The part of the KL that a shift of every code by the same vector costs: KL without information.
    metrics["test_kl_offset"] = 0.5 * mu.mean(0).pow(2).sum().item()
    # What the code could carry as a Gaussian channel: signal Var_x(mu_i) over noise E_x[sigma_i^2],
    # 1/2 ln(1 + S/N) nats per dim, summed. KL above it pays for something other than information.
    metrics["test_channel_nats"] = (0.5 * (1 + mu.var(0) / (variances / len(test))).log()).sum().item()
    metrics["hf_power_ratio"], metrics["spectrum_error"] = spectrum_metrics(power_recon, power_data)
    return metrics, mu


def correlation(a, b):
    """Pearson correlation of two equal-length sequences."""
    return torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1].item()


def factor_information(mu, factors, bins=20):
    """How much each latent dim knows about each true factor: the mutual information between
    dim j of the codes mu (N, D), cut into `bins` equal-width bins, and factor k of the true factor
    indices (N, K), divided by the factor's entropy -> (D, K), 0 = nothing, 1 = all of it."""
    codes = ((mu - mu.min(0).values) / (mu.max(0).values - mu.min(0).values + 1e-12) * bins).long().clamp(max=bins - 1)

    def mutual_information(a, b):  # discrete, in nats, from the joint histogram
        joint = torch.bincount(a * (b.max() + 1) + b, minlength=int((a.max() + 1) * (b.max() + 1))).double()
        joint = (joint / joint.sum()).view(int(a.max()) + 1, -1)
        outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        return (joint * (joint / outer).log()).nan_to_num().sum().item()  # 0 log 0 = 0

    return torch.tensor([[mutual_information(codes[:, j], factors[:, k]) / mutual_information(factors[:, k], factors[:, k])
                          for k in range(factors.shape[1])] for j in range(mu.shape[1])])  # I(v; v) = H(v)


def mutual_information_gap(mu, factors, bins=20):
    """MIG (Chen et al. 2018): for each factor, the gap between the two latent dims that know most
    about it (factor_information), averaged over factors -> (MIG, {factor name: gap}). This is the
    histogram estimate on the mean codes mu, as disentanglement_lib computes it, not Chen et al.'s
    sampling estimator; on one short run a difference of 0.01 is noise, not a finding.
    1 = each factor read off one latent dim alone; 0 = no dim stands out."""
    top2 = factor_information(mu, factors, bins).topk(2, dim=0).values  # (2, K)
    gaps = {name: (top2[0, k] - top2[1, k]).item() for k, name in enumerate(SHAPE_FACTORS)}
    return sum(gaps.values()) / len(gaps), gaps


# ----------------------------------------------------------------------------- logs and checkpoints
class RunningMeans:
    """Loss terms summed on the device between log rows, so the hot loop never waits for the host.
    All terms live in one vector, so adding a step costs two kernel launches however many terms
    there are (on a GPU this loop is launch-bound). A vector term `kl_dim` of length D becomes the
    columns kl_dim_0 ... kl_dim_{D-1}."""

    def __init__(self):
        self.total, self.names, self.count = None, [], 0

    def add(self, **terms):
        values = torch.cat([v.detach().float().reshape(-1) for v in terms.values()])
        if self.total is None:
            self.names = [n for k, v in terms.items() for n in ([k] if v.dim() == 0 else [f"{k}_{i}" for i in range(v.numel())])]
            self.total = torch.zeros_like(values)
        self.total += values
        self.count += 1

    @property
    def sums(self):
        return {} if self.total is None else {"total": self.total}

    def pop(self):
        """Means since the last row as floats (the one host sync per row), then reset."""
        row = dict(zip(self.names, (self.total / self.count).tolist()))
        self.total, self.count = None, 0
        return row

    def state_dict(self):
        return {"total": None if self.total is None else self.total.cpu(), "names": self.names, "count": self.count}

    def load_state_dict(self, state, device):
        self.names, self.count = state["names"], state["count"]
        self.total = None if state["total"] is None else state["total"].to(device)


class MetricsLog:
    """metrics.csv, one row per --log-every steps. A resumed run drops the rows after its checkpoint."""

    def __init__(self, path, resume_step=None):
        self.path, self.rows = Path(path), []
        if resume_step is not None and self.path.exists():
            with open(self.path) as f:
                self.rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            self.rows = [r for r in self.rows if r["step"] <= resume_step]

    def write(self, row):
        self.rows.append(row)
        with open(self.path, "w", newline="") as f:  # rewritten whole: a few kB, once per row
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows({k: f"{v:.6g}" for k, v in r.items()} for r in self.rows)


def all_finite(*items):
    """True when every tensor, and every parameter of every module, is finite (syncs with the host)."""
    tensors = [p for m in items for p in (m.parameters() if isinstance(m, nn.Module) else [m])]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_checkpoint(path, **state):
    """Atomic: write a temporary file, then rename it over the old checkpoint."""
    state["rng"] = torch.get_rng_state()
    state["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a checkpoint
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def restore_rng(checkpoint):
    torch.set_rng_state(checkpoint["rng"])
    if checkpoint["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])


def diverged(step, out):
    fail(f"training diverged at step {step} (non-finite loss or weights); "
         f"the last good checkpoint {Path(out) / 'checkpoint.pt'} is kept", code=3)


# ----------------------------------------------------------------------------- pictures
def save_grid(path, images, nrow):
    """[0, 1] images -> one PNG; tiles under 64 px are enlarged (nearest) so they can be seen."""
    from torchvision.utils import save_image
    if images.shape[-1] < 64:
        images = F.interpolate(images, scale_factor=64 // images.shape[-1], mode="nearest")
    save_image(images.float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=0.5)


@torch.no_grad()
def save_pictures(out, model, test, device, kl_per_dim=None):
    """recon.png, samples.png, interpolation.png, and traversals.png when kl_per_dim is given.
    Works for any number of test images: up to 32 in recon.png, up to 8 pairs interpolated."""
    model.eval()
    decode = lambda z: model.to_unit(model.decoder(z))  # noqa: E731  mean image in [0, 1]
    cols = min(8, len(test))
    x = test[:cols * min(4, len(test) // cols)].to(device)  # whole rows of `cols` images
    mu, _ = model.encoder(to_model_range(x, model.recon))
    originals, recons = x.float() / 255, decode(mu)
    rows = torch.stack([originals.view(-1, cols, *x.shape[1:]), recons.view(-1, cols, *x.shape[1:])], 1)
    save_grid(out / "recon.png", rows.flatten(0, 2), nrow=cols)  # originals above their reconstructions
    noise = torch.randn(64, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)  # fixed
    save_grid(out / "samples.png", decode(noise), nrow=8)
    t = torch.linspace(0, 1, 10, device=device).view(1, -1, *[1] * (mu.dim() - 1))
    ends = mu.roll(-len(mu) // 2, 0)  # image i -> image i + n/2
    path = (1 - t) * mu[:8, None] + t * ends[:8, None]  # (pairs, 10 steps, *latent) straight lines in z
    save_grid(out / "interpolation.png", decode(path.flatten(0, 1)), nrow=10)
    if kl_per_dim is not None:  # one row per latent dim (a code map's channel, everywhere), most informative first
        order = torch.tensor(kl_per_dim).argsort(descending=True)
        z = mu[0].repeat(len(order), 10, *[1] * (mu.dim() - 1))  # (D, 10, *latent)
        z[torch.arange(len(order)), :, order] = torch.linspace(-3, 3, 10, device=device).view(10, *[1] * (mu.dim() - 2))
        save_grid(out / "traversals.png", decode(z.flatten(0, 1)), nrow=10)
    model.train()


def save_curves(path, rows, panels, marks=None):
    """curves.png: one panel per (title, [metrics.csv columns]); marks = {label: step} as dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (title, columns) in zip(axes[0], panels):
        for c in columns:
            ax.plot(steps, [r[c] for r in rows], label=c)
        for label, step in (marks or {}).items():
            ax.axvline(step, color="gray", linestyle="--", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_kl_heatmap(path, rows, latent_dim, switch_on=()):
    """kl_per_dim.png: the KL of each latent dim (rows) over steps. switch_on [(dim, step)]: those dims
    come first, in that order, each with a white mark where it switched on, so dims that switch on one
    at a time draw a staircase; the other dims follow, most informative at the end first. The colour
    scale is a square root, so a dim's first half nat is visible next to another's 8 nats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    kl = torch.tensor([[r[f"kl_dim_{i}"] for r in rows] for i in range(latent_dim)])  # (D, rows)
    first = [dim for dim, _ in switch_on]
    order = first + [int(i) for i in kl[:, -1].argsort(descending=True) if int(i) not in first]
    fig, ax = plt.subplots(figsize=(8, 0.3 * latent_dim + 1.5))
    image = ax.imshow(kl[order].numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=PowerNorm(0.5, vmin=0.0, vmax=max(kl.max().item(), 1e-6)),
                      extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, latent_dim - 0.5, -0.5))
    if switch_on:
        ax.scatter([step for _, step in switch_on], range(len(switch_on)), marker="|", s=120, color="white",
                   label="switched on (KL > 0.5 nats)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.6)
    ax.set_yticks(range(latent_dim), [f"z{i}" for i in order])
    ax.set_xlabel("step")
    ax.set_title("KL per latent dim (nats)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
