"""What the four chapters share and none of them teaches: data, model blocks (plain and Stable Diffusion's), the KL,
LPIPS on images, the exported autoencoder's loader, and the helpers that make a torchrun step one process's step."""
import contextlib
import datetime
import functools
import hashlib
import math
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DATASETS = ["shapes", "mnist", "fashion-mnist", "cifar10", "celeba", "folder"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

class BadInput(Exception):
    """Input the user must fix (missing data, unreadable weights): the message says what to do."""

def fail(message, code=2):
    """One `error:` line, no traceback, exit 2 (bad input) or 3 (diverged). Under torchrun every process comes here
    with the same code; torchrun stops the others once one has ended, so each leaves with this code on that signal
    too, after waiting for the others (5 s at most)."""
    if message and os.environ.get("RANK", "0") == "0":  # one voice: rank 0's
        print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    if not dist.is_initialized():
        sys.exit(code)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    with contextlib.suppress(RuntimeError):  # a process that never arrives: leave anyway
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=5))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

# ----------------------------------------------------------------------------- torchrun: one step, many processes
# Each of torchrun's processes trains on its slice of every batch and DDP averages their gradients; where a loss needs
# the whole batch (the KL's mean, the noise) these give each process one process's value. Without torchrun: plain torch.
def rank():
    return dist.get_rank() if dist.is_initialized() else 0

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def mean_over_processes(t):
    """t averaged over the processes (t itself without torchrun); no gradient."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t / world_size()

def batch_mean(per_image):
    """Mean over the global batch of (B, ...) values: the slices' mean, with the gradient of this slice's mean (DDP's
    average of those is the global batch's gradient)."""
    local = per_image.mean(0)
    return local + (mean_over_processes(local) - local).detach()

def randn_like(t):
    """N(0, I) noise for this process's slice, drawn for the whole batch from the generator all seeded alike."""
    if not dist.is_initialized():
        return torch.randn_like(t)
    return torch.randn(len(t) * world_size(), *t.shape[1:], device=t.device).split(len(t))[rank()]

def each_machine_first(work, *args):
    """work(*args) on each machine's first process, then on its others, which find what it wrote (a folder's decoded
    cache, LPIPS's weights). A BadInput anywhere ends every process with its message (exit 2)."""
    result, first = None, os.environ.get("LOCAL_RANK", "0") == "0"
    for turn in (True, False):  # the first processes, then the others
        message = None
        if first == turn:
            try:
                result = work(*args)
            except BadInput as e:
                message = str(e)
        messages = [message] * world_size()
        if dist.is_initialized():
            dist.all_gather_object(messages, message)
        if any(messages):
            fail(next(m for m in messages if m))
    return result

# ----------------------------------------------------------------------------- data
SHAPE_FACTORS = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}  # dSprites' grid

def draw_shapes(factors, size):
    """dSprites-style binary images from factor indices (N, 5) -> uint8 (N, 1, size, size): the pixel centres near
    each shape, mapped into its frame (shift, rotate, scale) and tested against its equation; no loop per image."""
    f = factors.float()
    radius = 0.15 * (0.5 + 0.5 * f[:, 1] / 5).view(-1, 1, 1)  # scale 0.5..1 of 15% of the width
    angle = (2 * math.pi * f[:, 2] / 40).view(-1, 1, 1)
    centre_x, centre_y = [(0.2 + 0.6 * f[:, i] / 31).view(-1, 1, 1) for i in (3, 4)]  # keeps shapes inside
    half = math.ceil(0.19 * size)  # every shape lies within 0.17 of the width of its centre
    cols, rows = [(c.view(-1, 1) * size).long() + torch.arange(-half, half) for c in (centre_x, centre_y)]
    dx = (cols.unsqueeze(1) + 0.5) / size - centre_x  # (N, 1, 2 half), from pixel centres
    dy = (rows.unsqueeze(2) + 0.5) / size - centre_y  # (N, 2 half, 1)
    u = (torch.cos(angle) * dx + torch.sin(angle) * dy) / radius  # (N, 2 half, 2 half), the shape's frame
    v = (-torch.sin(angle) * dx + torch.cos(angle) * dy) / radius
    square, ellipse = torch.maximum(u.abs(), v.abs()) <= 0.8, u ** 2 + (v / 0.5) ** 2 <= 1
    hx, hy = 1.1 * u, -1.1 * v + 0.1  # the heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, upright
    heart = (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
    shape = factors[:, 0].view(-1, 1, 1)
    inside = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
    images, index = torch.zeros(len(factors), size, size, dtype=torch.uint8), torch.arange(len(factors)).view(-1, 1, 1)
    images[index, rows.unsqueeze(2), cols.unsqueeze(1)] = inside.to(torch.uint8) * 255
    return images.unsqueeze(1)

def make_shapes(n_train, n_test, size, seed=1234):
    """-> (train, test, test factors): distinct random cells of the dSprites grid (737,280), drawn in chunks."""
    counts = torch.tensor(list(SHAPE_FACTORS.values()))
    cells = torch.randperm(int(counts.prod()), generator=torch.Generator().manual_seed(seed))[: n_train + n_test]
    strides = torch.cat([counts.flip(0).cumprod(0).flip(0)[1:], torch.tensor([1])])
    factors = (cells.view(-1, 1) // strides) % counts  # mixed-radix digits, (N, 5)
    images = torch.cat([draw_shapes(chunk, size) for chunk in factors.split(4096)])
    return images[:n_train], images[n_train:], factors[n_train:]

def read_image(path, size, box=None):
    """One file -> (3, size, size) uint8 (a centred square of side `box`, default the largest), or None."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            side = min(img.size) if box is None else box
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            img = img.convert("RGB").resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    except Exception:  # truncated, not an image, an unsupported mode: skipped and counted
        return None
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)

def image_bytes(path, size):
    """read_image as bytes, or None: what a decoding process sends back."""
    x = read_image(path, size)
    return None if x is None else x.numpy().tobytes()

def decode_folder(root, size, cache):
    """Every image below `root`, in path order, decoded on every core into cache/{train,test}.u8, uint8 (N, 3, size,
    size): split by train/ and test/ inside, else every tenth readable image held out."""
    import multiprocessing
    parts = [root / "train", root / "test"] if (root / "train").is_dir() and (root / "test").is_dir() else [root]
    part, counts, skipped = cache.with_name(f"{cache.name}.{socket.gethostname()}.part"), {"train": 0, "test": 0}, 0
    shutil.rmtree(part, ignore_errors=True)  # what an interrupted decoding left (one writer per machine)
    part.mkdir(parents=True)
    with open(part / "train.u8", "wb") as train, open(part / "test.u8", "wb") as test, multiprocessing.Pool() as pool:
        for folder in parts:
            paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for image in pool.imap(functools.partial(image_bytes, size=size), paths, chunksize=16):
                if image is None:
                    skipped += 1
                    continue
                split = folder.name if len(parts) == 2 else "test" if sum(counts.values()) % 10 == 0 else "train"
                (train if split == "train" else test).write(image)
                counts[split] += 1
    if min(counts.values()) < 1:
        shutil.rmtree(part)
        raise BadInput(f"found {sum(counts.values())} readable images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                       f"below {root}; need at least one to train on and one to test on")
    try:
        os.replace(part, cache)
    except OSError:  # another machine finished first (a shared disk): keep its copy
        shutil.rmtree(part)
    print(f"{root}: {sum(counts.values())} images read, {skipped} unreadable files skipped; decoded once: {cache}")

def load_folder(root, size):
    """-> (train, test) uint8, memory-mapped from a decoded cache in root/.decoded/ (a set larger than memory
    trains), made again when a file is added, removed or changed."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"image folder {root} does not exist; pass --data-dir with a folder of images")
    files = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
             if p.suffix.lower() in IMAGE_EXTENSIONS and ".decoded" not in p.relative_to(root).parts]
    cache = root / ".decoded" / f"{size}px-{hashlib.sha1(repr(files).encode()).hexdigest()[:16]}"
    if not cache.is_dir():
        for old in (root / ".decoded").glob(f"{size}px-*"):  # the folder changed: its old decoding goes
            if not old.name.startswith(cache.name):
                shutil.rmtree(old)
        decode_folder(root, size, cache)
    return [torch.from_file(str(f), shared=False, size=f.stat().st_size, dtype=torch.uint8).view(-1, 3, size, size)
            for f in (cache / "train.u8", cache / "test.u8")]

def load_data(args):
    """-> (train, test): uint8 (N, C, H, W) tensors on the CPU, for --dataset at --image-size."""
    if args.dataset == "shapes":
        return make_shapes(50_000, 5_000, args.image_size)[:2]  # one fixed data set, whatever --seed
    if args.dataset == "folder":  # decoded by each machine's first process, memory-mapped by all
        return each_machine_first(load_folder, args.data_dir, args.image_size)
    from tools import datasets  # the sets torchvision downloads, and CelebA
    return datasets.load(args)

class Batches:
    """Training batches cut from a uint8 tensor on the training device, each epoch in an order seeded by (seed, epoch):
    step s always sees the same batch, so resuming needs only s. Under torchrun each process takes its slice."""
    def __init__(self, images, batch_size, seed, device):
        if len(images) < batch_size:
            fail(f"--batch-size {batch_size} is larger than the {len(images)} training images; pass a smaller one")
        fits = device.type != "cuda" or images.numel() < 0.4 * torch.cuda.mem_get_info(device)[0]
        self.images = images.to(device) if fits else images  # else each batch is copied over
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, None
        self.steps_per_epoch = len(images) // batch_size  # the ragged last batch is dropped
        share = batch_size // world_size()
        self.mine = slice(rank() * share, (rank() + 1) * share)

    def __call__(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            seeded = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self.order, self.epoch = torch.randperm(len(self.images), generator=seeded).to(self.images.device), epoch
        batch = self.order[i * self.batch_size:(i + 1) * self.batch_size][self.mine]
        return self.images[batch].to(self.device, non_blocking=True)

def to_model_range(x, recon="mse"):
    """uint8 -> [-1, 1] for a Gaussian decoder, [0, 1] for a Bernoulli one (recon="bce")."""
    return x.float() / 255 if recon == "bce" else x.float() / 127.5 - 1

def channel_mean(images):
    """Each channel's mean of uint8 (N, C, H, W) images, in [0, 1], a chunk at a time."""
    total = sum(chunk.sum((0, 2, 3), dtype=torch.float64) for chunk in images.split(4096))
    return (total / (images[:, 0].numel() * 255)).float()

# ----------------------------------------------------------------------------- the plain stack
class Encoder(nn.Module):
    """x (B, C, H, W) -> mu, logvar (B, D): stride-2 convolutions down to 4 x 4, then 256 units (Higgins et al.
    2017: 64 px -> channels w, w, 2w, 2w). centre_mu (02): mu = W BatchNorm(h), no bias after it."""
    def __init__(self, channels, image_size, latent_dim, width, centre_mu=False, hidden=256):
        super().__init__()
        n = int(math.log2(image_size)) - 2
        stages = [width * (1 if i < n // 2 else 2) for i in range(n)]
        layers = [m for c_in, c in zip([channels] + stages, stages) for m in (nn.Conv2d(c_in, c, 4, 2, 1), nn.ReLU())]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(stages[-1] * 16, hidden), nn.ReLU())
        centre = nn.BatchNorm1d(hidden, affine=False) if centre_mu else nn.Identity()
        self.to_mu = nn.Sequential(centre, nn.Linear(hidden, latent_dim, bias=not centre_mu))
        self.to_logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x):
        h = self.features(x)
        # log s^2 clamped to [-10, 10]: exp() stays finite, and a std near 0 cannot send the KL to infinity
        return self.to_mu(h).float(), self.to_logvar(h).float().clamp(-10.0, 10.0)

class Decoder(nn.Module):
    """z (B, D) -> raw output (B, C, H, W): the encoder mirrored, with transposed convolutions."""
    def __init__(self, channels, image_size, latent_dim, width, hidden=256):
        super().__init__()
        n = int(math.log2(image_size)) - 2
        stages = [width * (1 if i < n // 2 else 2) for i in range(n)][::-1]
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, stages[0] * 16),
                                  nn.ReLU(), nn.Unflatten(1, (stages[0], 4, 4)))
        self.body = nn.Sequential(*[m for c_in, c in zip(stages, stages[1:])
                                    for m in (nn.ConvTranspose2d(c_in, c, 4, 2, 1), nn.ReLU())])
        self.conv_out = nn.ConvTranspose2d(stages[-1], channels, 4, stride=2, padding=1)

    def forward(self, z):
        return self.conv_out(self.body(self.head(z)))

class MapEncoder(Encoder):
    """x -> mu, logvar (B, c, H/f, W/f), f = downsample: convolutions only, so the map keeps the image's layout; at
    f = 4 a code sees an 18 x 18 pixel window around its 4 x 4 patch."""
    def __init__(self, channels, latent_channels, width, downsample=4):
        nn.Module.__init__(self)  # Encoder's forward, with these layers
        f8 = [nn.Conv2d(2 * width, 2 * width, 4, 2, 1), nn.ReLU()] if downsample == 8 else []  # a third halving
        self.features = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(), *f8,
                                      nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.to_mu, self.to_logvar = (nn.Conv2d(2 * width, latent_channels, 1) for _ in range(2))

class MapDecoder(nn.Module):
    """z (B, c, H/f, W/f) -> raw output (B, C, H, W). It repeats pixels, then convolves, as Stable Diffusion's
    decoder does: a transposed convolution paints a checkerboard a discriminator amplifies (Odena et al. 2016)."""
    def __init__(self, channels, latent_channels, width, downsample=4):
        super().__init__()
        up = nn.Upsample(scale_factor=2)
        f8 = [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), up] if downsample == 8 else []  # a 3rd doubling
        self.body = nn.Sequential(nn.Conv2d(latent_channels, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), up, *f8,
                                  nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), up)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(self.body(z))

# ----------------------------------------------------------------------------- Stable Diffusion's blocks (--arch sd)
# latent-diffusion's Encoder and Decoder (ldm/modules/diffusionmodules/model.py), layer for layer; at --width 128
# --downsample 8 its KL-f8 autoencoder, 83,653,863 weights. The layers are its own, in the same order; their names
# are shorter, and tools/sd_vae.py maps them to latent-diffusion's and diffusers' to load and export its weights.
def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # 32 groups, as Stable Diffusion's: channels k x 32

class ResnetBlock(nn.Module):
    """x + two rounds of (GroupNorm, SiLU, 3x3 conv); the input passes a 1x1 conv where the channels change."""
    def __init__(self, c_in, c_out=None):
        super().__init__()
        c_out = c_out or c_in
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))

class AttnBlock(nn.Module):
    """x + single-head self-attention over every position of the map: each code can see the whole image."""
    def __init__(self, c):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = group_norm(c), *(nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, H W, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(h.transpose(1, 2).reshape(x.shape))

def sd_levels(width, downsample):
    """Channels of each level, the map halved between two: SD's multipliers (1, 2, 4, 4) on --width (f4: (1, 2, 4))."""
    return [width * m for m in (1, 2, 4, 4)[:int(math.log2(downsample)) + 1]]

class SDEncoder(nn.Module):
    """x -> mu, logvar (B, c, H/f, W/f): 3x3 conv in, two ResnetBlocks per level, a stride-2 conv between levels
    (padded right and bottom only, as SD), the middle, GroupNorm + SiLU + 3x3 conv out to 2c channels, a 1x1 conv."""
    def __init__(self, channels, latent_channels, width, downsample):
        super().__init__()
        levels, layers = sd_levels(width, downsample), []
        for i, (c_in, c) in enumerate(zip([width] + levels, levels)):
            layers += [ResnetBlock(c_in, c), ResnetBlock(c)]
            if i < len(levels) - 1:
                layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2)]
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down, self.mid = nn.Sequential(*layers), nn.Sequential(ResnetBlock(c), AttnBlock(c), ResnetBlock(c))
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        mu, logvar = self.quant_conv(self.conv_out(F.silu(self.norm_out(h)))).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # as latent diffusion's DiagonalGaussianDistribution

class SDDecoder(nn.Module):
    """z -> raw output (B, C, H, W): a 1x1 conv, 3x3 conv in, the middle, three ResnetBlocks per level from the
    widest, nearest-neighbour doubling + a 3x3 conv between levels, GroupNorm + SiLU + 3x3 conv out. No tanh."""
    def __init__(self, channels, latent_channels, width, downsample):
        super().__init__()
        levels, layers = sd_levels(width, downsample)[::-1], []
        for i, (c_in, c) in enumerate(zip(levels[:1] + levels, levels)):
            layers += [ResnetBlock(c_in, c), ResnetBlock(c), ResnetBlock(c)]
            if i < len(levels) - 1:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)]
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.conv_in = nn.Conv2d(latent_channels, levels[0], 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(levels[0]), AttnBlock(levels[0]), ResnetBlock(levels[0]))
        self.up, self.norm_out = nn.Sequential(*layers), group_norm(width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(self.post_quant_conv(z)))))))

# ----------------------------------------------------------------------------- the autoencoder
class VAE(nn.Module):
    """An encoder (x -> mu, logvar) and a decoder (z -> raw output), whose mean image is sigmoid(raw) for a Bernoulli
    decoder (recon="bce"), tanh(raw) for the plain Gaussian one (tanh keeps it among the values pixels can take), raw
    for Stable Diffusion's (trained without tanh). channel_mean (C,) in [0, 1] starts the output at the data's mean
    colour: else on shapes (3% lit) the first steps darken everything, cutting z off."""
    def __init__(self, channels, image_size, latent_dim, width, recon="mse", centre_mu=False, spatial=False,
                 downsample=4, arch="plain", channel_mean=None):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, latent_dim=latent_dim, width=width, recon=recon,
                           centre_mu=centre_mu, spatial=spatial, downsample=downsample, arch=arch)  # rebuilds it
        if arch == "sd":
            self.encoder = SDEncoder(channels, latent_dim, width, downsample)
            self.decoder = SDDecoder(channels, latent_dim, width, downsample)
        elif spatial:
            self.encoder = MapEncoder(channels, latent_dim, width, downsample)
            self.decoder = MapDecoder(channels, latent_dim, width, downsample)
        else:
            self.encoder = Encoder(channels, image_size, latent_dim, width, centre_mu)
            self.decoder = Decoder(channels, image_size, latent_dim, width)
        self.latent_shape = (latent_dim, *[image_size // downsample] * 2) if spatial else (latent_dim,)
        self.recon, self.arch = recon, arch
        if channel_mean is not None:
            m = torch.as_tensor(channel_mean, dtype=torch.float32).clamp(0.01, 0.99)
            bias = torch.logit(m) if recon == "bce" else 2 * m - 1 if arch == "sd" else torch.atanh(2 * m - 1)
            self.decoder.conv_out.bias.data.copy_(bias)

    def mean(self, raw):
        """The decoder's mean image in the model's range: [0, 1] for bce, [-1, 1] for mse (sd: unbounded)."""
        if self.recon == "bce":
            return torch.sigmoid(raw)
        return raw if self.arch == "sd" else torch.tanh(raw)

    def encode(self, x):
        """Images in [-1, 1], (B, C, H, W) -> (mu, logvar) of q(z|x), each (B, *latent_shape)."""
        return self.encoder(x if self.recon == "mse" else (x + 1) / 2)

    def decode(self, z):
        """Codes (B, *latent_shape) -> the decoder's mean image in [-1, 1] (sd: its raw output, unclamped)."""
        m = self.mean(self.decoder(z))
        return m * 2 - 1 if self.recon == "bce" else m

def load_checkpoint(path):
    """A file torch.save wrote, on the CPU (exit 2 if it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a checkpoint
        fail(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

def load_autoencoder(path):
    """An autoencoder.pt -> its VAE in eval mode, with encode, decode and latent_scale_factor (codes times it have
    unit std on the training images, as a diffusion model wants them). Needs only this file of the project."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or "autoencoder" not in saved:
        fail(f"{path} is not an autoencoder.pt (a checkpoint.pt holds a whole training state); every run writes "
             "autoencoder.pt beside it, and python -m tools.sd_vae import makes one of Stable Diffusion's weights")
    model = VAE(**saved["autoencoder"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        fail(f"{path} does not fit the model its own description builds ({str(e)[:200]})")
    model.latent_scale_factor = saved["latent_scale_factor"]
    return model.eval().requires_grad_(False)  # for use; requires_grad_(True) to train it further

def load_weights(model, path):
    """--init-from: `model` takes the weights of the autoencoder.pt at `path`; exit 2 if it is another model."""
    saved = load_autoencoder(path)
    try:
        if (saved.arch, saved.recon) != (model.arch, model.recon):
            raise RuntimeError(f"--arch {saved.arch}, --recon {saved.recon}")
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        fail(f"{path} holds another model than these flags build ({saved.config}: {str(e)[:150]}); pass its flags")

# ----------------------------------------------------------------------------- the KL
def kl_divergence(mu, logvar):
    """KL(N(mu, s^2) || N(0, 1)) of each latent value, nats: 1/2 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar).
    Elementwise: (B, D) for a code vector, (B, c, h, w) for a code map. (Kingma & Welling 2014, appendix B)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)

def kl_per_dim(mu, logvar):
    """The batch-mean KL of each latent dim, nats, (D,); a code map's dim is a channel, summed over positions.
    Under torchrun: the global batch's mean."""
    kl = batch_mean(kl_divergence(mu, logvar))
    return kl.reshape(len(kl), -1).sum(1)

# ----------------------------------------------------------------------------- LPIPS (03, 04, tools/evaluate.py)
def lpips_distance(perceptual, reconstruction, x):
    """LPIPS of each image, (B,); inputs in [-1, 1]; grey to 3 channels; under 32 px enlarged (AlexNet needs 32)."""
    if x.shape[1] == 1:
        reconstruction, x = reconstruction.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
    if x.shape[-1] < 32:
        reconstruction, x = (F.interpolate(t, 32, mode="bilinear", align_corners=False) for t in (reconstruction, x))
    return perceptual(reconstruction, x).flatten()
