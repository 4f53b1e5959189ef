"""tools/datasets.py: the data sets in torchvision's layout (MNIST's zero border, CelebA's crop and cache, the files
to place by hand when a download fails)."""
import argparse

import pytest
import torch

import common
from conftest import assert_clean_error, no_network
from tools import datasets
from tools import evaluate


def test_celeba_layout_and_cache(tmp_path, capsys):
    folder = tmp_path / "celeba" / "img_align_celeba"
    from PIL import Image
    folder.mkdir(parents=True)
    lines = []
    for i in range(5):
        Image.new("RGB", (178, 218), (40 * i, 100, 200)).save(folder / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {[0, 0, 0, 1, 2][i]}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    train, test = datasets.load_celeba(tmp_path, 64)
    assert train.shape == (3, 3, 64, 64) and test.shape == (1, 3, 64, 64)  # split 1 (validation) unused
    assert list(tmp_path.glob("celeba/cache_64*.pt"))
    assert torch.equal(datasets.load_celeba(tmp_path, 64)[0], train)
    args = argparse.Namespace(dataset="celeba", data_dir=str(tmp_path / "nowhere"), image_size=64)
    with pytest.raises(SystemExit) as e:
        common.load_data(args)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "list_eval_partition.txt", "img_align_celeba")


def test_celeba_crop_is_the_148_px_box_at_the_centre(tmp_path):
    # The customary crop: a 148 x 148 box at the centre of the 178 x 218 image, then resized. A frame
    # drawn just outside that box must not show; one just inside must.
    from PIL import Image, ImageDraw
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    img = Image.new("RGB", (178, 218), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    left, top = (178 - 148) // 2, (218 - 148) // 2  # 15, 35
    draw.rectangle((left - 6, top - 6, left + 153, top + 153), outline=(255, 0, 0), width=5)  # outside
    draw.rectangle((left, top, left + 147, top + 147), outline=(0, 255, 0), width=8)  # inside, at the edge
    img.save(folder / "000001.jpg", format="PNG")  # lossless, whatever the name says
    img.save(folder / "000002.jpg", format="PNG")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 2\n")
    train, _ = datasets.load_celeba(tmp_path, 64)
    assert train[0, 0].max() < 40  # no red: the frame outside the box is cut away
    assert train[0, 1, 1].float().mean() > 150 and train[0, 1, :, 1].float().mean() > 150  # green edge kept


def test_mnist_is_padded_with_a_zero_border_keeping_every_pixel(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(1, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split, imgs in zip(["train", "t10k"], images):
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + imgs.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    args = argparse.Namespace(dataset="mnist", data_dir=str(tmp_path), image_size=32)
    train, test = common.load_data(args)
    assert train.shape == (3, 1, 32, 32)
    assert torch.equal(train[:, 0, 2:30, 2:30], images[0]) and torch.equal(test[:, 0, 2:30, 2:30], images[1])
    border = train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    assert torch.equal(evaluate.original_pixels(train, "mnist"), images[0].unsqueeze(1))
    assert evaluate.original_pixels(train, "cifar10").shape == train.shape


def test_failed_download_exits_2_saying_where_to_put_files(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    args = argparse.Namespace(dataset="fashion-mnist", data_dir=str(tmp_path), image_size=32)
    with pytest.raises(SystemExit) as e:
        common.load_data(args)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "fashion-mnist", "FashionMNIST/raw/", str(tmp_path))


def test_recompressed_gz_files_load_offline(tmp_path, monkeypatch):
    # Gzipped IDX files whose checksums are not torchvision's (here: compressed by us, as a Linux
    # package does) must load without the network, not trigger a download.
    import gzip
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (2, 5, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split, imgs in zip(["train", "t10k"], images):  # the IDX format: magic, sizes (big-endian), bytes
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + imgs.numpy().tobytes()))
        labels = (2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(range(5))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    for split, train in [(0, True), (1, False)]:
        data = datasets.load_torchvision("fashion-mnist", str(tmp_path), train=train)
        assert torch.equal(data, images[split].unsqueeze(1))
    assert not list(raw.glob("*.part"))


def test_resize_crops_the_centre_then_resizes():
    img = torch.zeros(1, 1, 40, 60, dtype=torch.uint8)
    img[..., :, 10:50] = 200  # the centred 40x40 square
    out = datasets.resize_uint8(img, 32)
    assert out.shape == (1, 1, 32, 32) and (out == 200).all()
