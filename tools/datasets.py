"""The data sets read from torchvision's layout: mnist, fashion-mnist and cifar10 (downloaded when missing) and
celeba (placed by the user). common.load_data hands these to load(); shapes and folder are common.py's own."""
import gzip
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.nn.functional as F

import common

PADDED = {"mnist": 2, "fashion-mnist": 2}  # border added around the 28 x 28 originals, pixels


def load(args):
    """-> (train, test): uint8 (N, C, H, W) at --image-size, decoded by each machine's first process first."""
    if args.dataset == "celeba":
        return common.each_machine_first(load_celeba, args.data_dir, args.image_size)
    train, test = [common.each_machine_first(load_torchvision, args.dataset, args.data_dir, t) for t in (True, False)]
    if args.dataset in PADDED:  # 28 x 28 -> 32 x 32 with a zero border: every original pixel kept
        train, test = [F.pad(t, (PADDED[args.dataset],) * 4) for t in (train, test)]
    return resize_uint8(train, args.image_size), resize_uint8(test, args.image_size)


def resize_uint8(images, size):
    """(N, C, h, w) uint8 -> (N, C, size, size): the centred square, then an antialiased resize."""
    (h, w), s = images.shape[-2:], min(images.shape[-2:])
    images = images[..., (h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    if s == size:
        return images.contiguous()
    resized = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True) for c in images.split(2048)]
    return torch.cat(resized).round().clamp(0, 255).to(torch.uint8)


def load_torchvision(name, root, train):
    import torchvision.datasets
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    # torchvision reads a .gz only with the original's checksum (else it goes online), an unpacked file always
    for packed in (Path(root) / cls.__name__ / "raw").glob("*-ubyte.gz"):
        if not packed.with_suffix("").exists():
            with gzip.open(packed, "rb") as src, open(packed.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            packed.with_suffix(".part").replace(packed.with_suffix(""))  # no half file if interrupted
    try:
        data = torch.as_tensor(cls(root, train=train, download=True).data)
    except Exception as e:  # offline, a proxy, a half-written file: say what to place where
        layout = "cifar-10-batches-py/" if name == "cifar10" else f"{cls.__name__}/raw/*-ubyte.gz"
        raise common.BadInput(f"could not load or download {name} ({type(e).__name__}: {e}); on a machine "
                              f"without network, place {layout} under {Path(root).resolve()}")
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)


def load_celeba(root, size):
    """torchvision's CelebA layout; a 148 x 148 box at the image's centre, resized; decoded once, cached."""
    folder, cache = Path(root) / "celeba", Path(root) / "celeba" / f"cache_{size}_box148.pt"
    if cache.exists():
        return torch.load(cache)
    partition = folder / "list_eval_partition.txt"  # file name -> 0 train, 1 validation, 2 test
    if not partition.exists() or not (folder / "img_align_celeba").is_dir():
        raise common.BadInput(f"CelebA needs {folder}/img_align_celeba/*.jpg and {partition} (torchvision's "
                              "layout); download them from the CelebA site and place them there")
    split = dict(line.split() for line in partition.read_text().splitlines() if line.strip())
    train, test = [torch.stack([x for x in (common.read_image(folder / "img_align_celeba" / f, size, box=148)
                                            for f, s in split.items() if s == part) if x is not None]) for part in "02"]
    part = cache.with_name(f"{cache.name}.{socket.gethostname()}.part")  # one writer per machine
    torch.save((train, test), part)
    os.replace(part, cache)  # whole, or not there
    return train, test
