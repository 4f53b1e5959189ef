"""tools/sd_vae.py: Stable Diffusion's VAE weights in and out. Random weights under latent diffusion's public names
against a forward pass written here from its model.py; diffusers' names from a table written here; round trips
through both formats; diffusers itself, where installed; the error messages. Tiny sizes: width 32, 32 px."""
import json
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import common
from conftest import assert_clean_error, run_cli
from tools import sd_vae

WIDTH, SIZE, LATENT = 32, 32, 4
LEVELS = {4: 3, 8: 4}  # downsample -> levels: channel multipliers (1, 2, 4) and (1, 2, 4, 4)


# ----------------------------------------------------------------------------- latent diffusion's layout, by hand
def compvis_weights(downsample, seed=0):
    """Random weights under latent diffusion's names (ldm/modules/diffusionmodules/model.py's Encoder and Decoder,
    ch=32, num_res_blocks=2, double_z, attention only in the middle, plus the autoencoder's quant convs)."""
    g, w = torch.Generator().manual_seed(seed), {}

    def conv(name, c_in, c_out, k):
        w[name + ".weight"] = torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5
        w[name + ".bias"] = 0.1 * torch.randn(c_out, generator=g)

    def norm(name, c):
        w[name + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        w[name + ".bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name, c_in, c_out):
        norm(name + ".norm1", c_in)
        conv(name + ".conv1", c_in, c_out, 3)
        norm(name + ".norm2", c_out)
        conv(name + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(name + ".nin_shortcut", c_in, c_out, 1)

    def middle(part, c):
        resnet(f"{part}.mid.block_1", c, c)
        norm(f"{part}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{part}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{part}.mid.block_2", c, c)

    levels = LEVELS[downsample]
    widths = [WIDTH * m for m in (1, 2, 4, 4)[:levels]]
    conv("encoder.conv_in", 3, WIDTH, 3)
    c = WIDTH
    for i in range(levels):
        for j in range(2):
            resnet(f"encoder.down.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    middle("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, 2 * LATENT, 3)
    conv("quant_conv", 2 * LATENT, 2 * LATENT, 1)
    w["quant_conv.bias"][LATENT:] += torch.tensor([60.0, -60.0, 0.0, 0.0])  # logvar past both clamps
    conv("post_quant_conv", LATENT, LATENT, 1)
    conv("decoder.conv_in", LATENT, c, 3)
    middle("decoder", c)
    for i in reversed(range(levels)):
        for j in range(3):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)
    return w


# ----------------------------------------------------------------------------- latent diffusion's forward, by hand
def group_norm(w, name, h):
    return F.group_norm(h, 32, w[name + ".weight"], w[name + ".bias"], eps=1e-6)


def conv(w, name, h, **kwargs):
    return F.conv2d(h, w[name + ".weight"], w[name + ".bias"], **kwargs)


def resnet(w, name, x):
    h = conv(w, name + ".conv1", F.silu(group_norm(w, name + ".norm1", x)), padding=1)
    h = conv(w, name + ".conv2", F.silu(group_norm(w, name + ".norm2", h)), padding=1)
    return (conv(w, name + ".nin_shortcut", x) if name + ".nin_shortcut.weight" in w else x) + h


def attention(w, name, x):
    """AttnBlock: one head, softmax(q^T k C^-1/2) over every position, written with bmm as model.py has it."""
    h = group_norm(w, name + ".norm", x)
    q, k, v = (conv(w, f"{name}.{p}", h) for p in ("q", "k", "v"))
    b, c, height, width = q.shape
    weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    h = torch.bmm(v.reshape(b, c, -1), torch.softmax(weights, dim=2).permute(0, 2, 1)).reshape(b, c, height, width)
    return x + conv(w, name + ".proj_out", h)


def middle(w, part, h):
    return resnet(w, f"{part}.mid.block_2", attention(w, f"{part}.mid.attn_1", resnet(w, f"{part}.mid.block_1", h)))


def reference_encode(w, x, levels):
    h = conv(w, "encoder.conv_in", x, padding=1)
    for i in range(levels):
        for j in range(2):
            h = resnet(w, f"encoder.down.{i}.block.{j}", h)
        if i != levels - 1:  # Downsample(with_conv): pad right and bottom by one, 3x3 conv of stride 2
            h = conv(w, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = conv(w, "encoder.conv_out", F.silu(group_norm(w, "encoder.norm_out", middle(w, "encoder", h))), padding=1)
    mean, logvar = conv(w, "quant_conv", h).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # DiagonalGaussianDistribution


def reference_decode(w, z, levels):
    h = middle(w, "decoder", conv(w, "decoder.conv_in", conv(w, "post_quant_conv", z), padding=1))
    for i in reversed(range(levels)):
        for j in range(3):
            h = resnet(w, f"decoder.up.{i}.block.{j}", h)
        if i != 0:  # Upsample(with_conv): nearest x2, 3x3 conv
            h = conv(w, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
    return conv(w, "decoder.conv_out", F.silu(group_norm(w, "decoder.norm_out", h)), padding=1)


# ----------------------------------------------------------------------------- diffusers' names, by hand
DIFFUSERS_RENAMES = [  # latent diffusion's name -> diffusers' AutoencoderKL's, in order
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),  # level numbers reversed below
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.q\.", ".mid_block.attentions.0.to_q."),
    (r"\.mid\.attn_1\.k\.", ".mid_block.attentions.0.to_k."),
    (r"\.mid\.attn_1\.v\.", ".mid_block.attentions.0.to_v."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # older diffusers folders


def diffusers_weights(compvis, levels, old_names=False):
    """The same weights under diffusers' names; the attention's 1x1 convs as Linear weights (C, C)."""
    out = {}
    for key, tensor in compvis.items():
        for pattern, replacement in DIFFUSERS_RENAMES:
            key = re.sub(pattern, replacement, key)
        # diffusers numbers the decoder's levels from the deepest, latent diffusion from the finest
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.", key)
        if ".attentions.0.to_" in key and key.endswith(".weight"):
            tensor = tensor[:, :, 0, 0]
        if old_names:
            key = re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{OLD_NAMES[m[1]]}.", key)
        out[key] = tensor
    return out


def diffusers_folder(folder, compvis, downsample, old_names=False, bin_file=False, **config):
    levels = LEVELS[downsample]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 64, 128, 128][:levels],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": 3, "out_channels": 3, "latent_channels": LATENT, "layers_per_block": 2,
        "norm_num_groups": 32, "sample_size": 64, "scaling_factor": 0.5, **config}))
    weights = diffusers_weights(compvis, levels, old_names)
    if bin_file:
        torch.save(weights, folder / "diffusion_pytorch_model.bin")
    else:
        safetensors.torch.save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return folder


def save_compvis(path, weights):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(weights, path)
    else:
        torch.save({"state_dict": weights, "global_step": 1}, path)
    return path


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def images(n=2, seed=1):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- known answer
@pytest.mark.parametrize("downsample,suffix", [(4, ".ckpt"), (8, ".safetensors")])
def test_imported_weights_compute_latent_diffusions_forward(tmp_path, downsample, suffix):
    weights = compvis_weights(downsample)
    path = save_compvis(tmp_path / f"vae{suffix}", {**weights, "loss.logvar": torch.zeros(())})  # loss.* left out
    model, scale_factor, _ = sd_vae.import_weights(path)
    assert scale_factor == 0.18215 and model.config["image_size"] == 256
    assert model.config["downsample"] == downsample and model.config["width"] == WIDTH
    x, levels = images(), LEVELS[downsample]
    with torch.no_grad():
        mu, logvar = model.encode(x)
        expected_mu, expected_logvar = reference_encode(weights, x, levels)
        assert mu.shape == (2, LATENT, SIZE // downsample, SIZE // downsample)
        assert logvar[:, 0].eq(20.0).all() and logvar[:, 1].eq(-30.0).all()  # both clamps reached
        torch.testing.assert_close(mu, expected_mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar, expected_logvar, atol=1e-5, rtol=1e-5)
        z = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.decode(z), reference_decode(weights, z, levels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("old_names,bin_file", [(False, False), (True, True)])
def test_diffusers_names_load_the_same_weights(tmp_path, old_names, bin_file):
    weights = compvis_weights(8)
    from_compvis, _, _ = sd_vae.import_weights(save_compvis(tmp_path / "vae.safetensors", weights))
    folder = diffusers_folder(tmp_path / "vae", weights, 8, old_names=old_names, bin_file=bin_file)
    from_diffusers, scale_factor, _ = sd_vae.import_weights(folder)
    assert_same_weights(from_compvis, from_diffusers)
    assert scale_factor == 0.5 and from_diffusers.config["image_size"] == 64  # the config's, not SD 1.x's


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("downsample", [4, 8])
def test_export_and_import_again_gives_the_same_tensors_and_names(tmp_path, downsample):
    weights = compvis_weights(downsample)
    model, _, _ = sd_vae.import_weights(save_compvis(tmp_path / "in.safetensors", weights))
    for out in (tmp_path / "out.safetensors", tmp_path / "out.ckpt"):
        sd_vae.export_weights(model, 0.3, out, "compvis")
        saved = sd_vae.read_tensors(out)
        assert (saved if out.suffix == ".safetensors" else saved["state_dict"]).keys() == weights.keys()
        assert_same_weights(model, sd_vae.import_weights(out)[0])
    folder = tmp_path / "diffusers"
    sd_vae.export_weights(model, 0.3, folder, "diffusers")
    saved = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == diffusers_weights(weights, LEVELS[downsample]).keys()
    again, scale_factor, _ = sd_vae.import_weights(folder)
    assert_same_weights(model, again)
    assert scale_factor == 0.3 and again.config == model.config


def test_diffusers_loads_the_exported_folder_and_computes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers = pytest.importorskip("diffusers")
    model, _, _ = sd_vae.import_weights(save_compvis(tmp_path / "in.safetensors", compvis_weights(8)))
    sd_vae.export_weights(model, 0.18215, tmp_path / "vae", "diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.18215
    x = images()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        latent = theirs.encode(x).latent_dist
        torch.testing.assert_close(latent.mean, mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(latent.logvar, logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(mu).sample, model.decode(mu), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the command line
def test_cli_imports_a_whole_stable_diffusion_checkpoint(tmp_path):
    weights = compvis_weights(4)
    whole = {"first_stage_model." + k: v for k, v in weights.items()}
    whole.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
                  "first_stage_model.loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999)})
    out = tmp_path / "sd.pt"
    result = run_cli("tools.sd_vae", "import", save_compvis(tmp_path / "sd.ckpt", whole), out,
                     "--image-size", "48", "--scale-factor", "0.25")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KL-f4" in result.stdout and "4 keys that are not the VAE's left out" in result.stdout
    model = common.load_autoencoder(out)
    assert model.latent_scale_factor == 0.25 and model.config["image_size"] == 48
    assert_same_weights(model, sd_vae.import_weights(save_compvis(tmp_path / "vae.ckpt", weights))[0])
    result = run_cli("tools.sd_vae", "export", out, tmp_path / "back", "--format", "diffusers")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "back" / "config.json").read_text())["scaling_factor"] == 0.25


def broken(tmp_path, case):
    """A source that must be refused, and a fragment of its message."""
    weights = compvis_weights(4)
    if case == "missing key":
        del weights["decoder.up.1.block.2.conv2.bias"]
        return save_compvis(tmp_path / "vae.safetensors", weights), "decoder.up.1.block.2.conv2.bias"
    if case == "unknown key":
        weights["decoder.up.1.block.2.extra.weight"] = torch.zeros(3)
        return save_compvis(tmp_path / "vae.ckpt", weights), "decoder.up.1.block.2.extra.weight"
    if case == "wrong shape":
        weights["encoder.mid.attn_1.q.weight"] = torch.zeros(128, 64, 1, 1)
        return save_compvis(tmp_path / "vae.ckpt", weights), "encoder.mid.attn_1.q.weight has shape (128, 64, 1, 1)"
    if case == "other multipliers":
        return diffusers_folder(tmp_path / "vae", weights, 4, block_out_channels=[32, 64, 64]), "[32, 64, 64]"
    if case == "layers per block":
        return diffusers_folder(tmp_path / "vae", weights, 4, layers_per_block=1), "1 ResnetBlocks"
    if case == "three blocks a level":
        weights.update({k.replace(".block.1.", ".block.2."): v for k, v in weights.items() if ".down.0.block.1." in k})
        return save_compvis(tmp_path / "vae.ckpt", weights), "3 ResnetBlocks"
    if case == "not a checkpoint":
        (tmp_path / "vae.ckpt").write_text("not a checkpoint")
        return tmp_path / "vae.ckpt", "cannot read"
    (tmp_path / "vae.safetensors").write_bytes(b"\x00" * 64)
    return tmp_path / "vae.safetensors", "cannot read"


@pytest.mark.parametrize("case", ["missing key", "unknown key", "wrong shape", "other multipliers",
                                  "layers per block", "three blocks a level", "not a checkpoint", "not safetensors"])
def test_import_refuses_what_is_not_stable_diffusions_vae(tmp_path, case):
    source, mentions = broken(tmp_path, case)
    result = run_cli("tools.sd_vae", "import", source, tmp_path / "out.pt")
    assert result.returncode == 2
    assert_clean_error(result.stderr, mentions)
    assert not (tmp_path / "out.pt").exists()


def test_export_refuses_the_plain_stack(tmp_path):
    model = common.VAE(3, 32, 4, 32, spatial=True)
    torch.save({"autoencoder": model.config, "state_dict": model.state_dict(), "script": "test", "dataset": "shapes",
                "latent_scale_factor": 1.0}, tmp_path / "plain.pt")
    result = run_cli("tools.sd_vae", "export", tmp_path / "plain.pt", tmp_path / "out", "--format", "diffusers")
    assert result.returncode == 2
    assert_clean_error(result.stderr, "--arch plain")
    assert not (tmp_path / "out").exists()
