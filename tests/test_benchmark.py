"""tools/benchmark.py measures what it says: a delay planted in the batch shows up in the batch's share, and in no
other part; the conventional baseline sees the same pixels as the chapters. No speed thresholds."""
import time

import pytest
import torch

import common
from tools import benchmark


@pytest.mark.slow
def test_a_delay_planted_in_the_batch_shows_in_its_part(monkeypatch, tmp_path):
    flags = ["--image-size", "32"]
    plain, _ = benchmark.profile_chapter("01_vanilla_vae", 30, flags, tmp_path / "plain")
    original = common.Batches.__call__

    def __call__(self, step):  # the profile knows a function by its name: the one it stands in for
        time.sleep(0.02)
        return original(self, step)
    monkeypatch.setattr(common.Batches, "__call__", __call__)
    delayed, _ = benchmark.profile_chapter("01_vanilla_vae", 30, flags, tmp_path / "delayed")
    assert 0.55 < delayed["batch"] - plain["batch"] < 0.8  # 30 steps x 20 ms
    for part in ["forward", "backward", "optimizer"]:
        assert 0 < plain[part] and abs(delayed[part] - plain[part]) < 0.5 * plain[part] + 0.1, part


def test_conventional_dataset_gives_our_pixels():
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    data = benchmark.ToTensorImages(images)
    for i in range(4):
        assert torch.equal(data[i], images[i].float() / 255)
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(benchmark.ToTensorImages(rgb)[1], rgb[1].float() / 255)


@pytest.mark.parametrize("argv", [["04_vae_gan_warmup", "--steps", "30", "--", "--disc-start", "0"],
                                  ["04_vae_gan_warmup", "--", "--disc-start", "0", "--steps", "9"]])
def test_the_chapters_flags_are_those_after_the_double_dash(argv):
    args = benchmark.parse(argv)
    assert args.chapter == "04_vae_gan_warmup"
    assert args.flags == argv[argv.index("--") + 1:]
    assert args.steps == (30 if argv[1] == "--steps" else 200)


def test_benchmark_without_double_dash_takes_no_chapter_flags():
    assert benchmark.parse(["01_vanilla_vae", "--conventional"]).flags == []
