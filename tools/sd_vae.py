"""Stable Diffusion's released VAE weights in and out of this project's autoencoder.pt.

    python -m tools.sd_vae import sd-vae-ft-mse sd.pt                      # a diffusers AutoencoderKL folder
    python -m tools.sd_vae import v1-5-pruned-emaonly.safetensors sd.pt    # a CompVis checkpoint, whole or VAE only
    python -m tools.sd_vae export runs/04_vae_gan_warmup/<run>/autoencoder.pt my-vae --format diffusers
    python -m tools.sd_vae export runs/04_vae_gan_warmup/<run>/autoencoder.pt my-vae.safetensors --format compvis

--arch sd builds latent diffusion's Encoder and Decoder (ldm/modules/diffusionmodules/model.py) layer for layer, so
the weights only change names: ours index the nn.Sequentials of common.SDEncoder and common.SDDecoder, latent
diffusion's ("CompVis", as in its .ckpt files) name blocks and levels, and diffusers renames those again. layer_names
below lists the three names of every layer. Import reads the width, the levels (3: f4, 4: f8), the image channels and
the latent channels from the weights; the latent scale factor from the diffusers config's scaling_factor (0.18215,
Stable Diffusion 1.x's, for a CompVis file). In a whole Stable Diffusion checkpoint the VAE is first_stage_model.*;
the rest (the UNet, the text encoder, the training loss) is left out. Either way the model computes the same
encode (mu, logvar) and decode, to float tolerance. Then:

    model = common.load_autoencoder("sd.pt")   # or: python -m tools.evaluate sd.pt --dataset folder --data-dir ...
"""
import argparse
import json
import math
import re
from pathlib import Path

import safetensors.torch
import torch

import common

NAMINGS = ("ours", "compvis", "diffusers")
VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # a CompVis checkpoint's VAE keys start so
SD_1_SCALE_FACTOR = 0.18215  # stable-diffusion's v1-inference.yaml scale_factor
SD_CONFIG = {"act_fn": "silu", "norm_num_groups": 32, "mid_block_add_attention": True, "use_quant_conv": True,
             "use_post_quant_conv": True, "shift_factor": None}  # diffusers' config of Stable Diffusion's VAE

# The layers inside a block, named (ours, latent diffusion's, diffusers').
RESNET_LAYERS = [("norm1",) * 3, ("conv1",) * 3, ("norm2",) * 3, ("conv2",) * 3,
                 ("shortcut", "nin_shortcut", "conv_shortcut")]  # the 1x1 conv where the channels change
ATTENTION_LAYERS = [("norm", "norm", "group_norm"), ("q", "q", "to_q"), ("k", "k", "to_k"), ("v", "v", "to_v"),
                    ("proj_out", "proj_out", "to_out.0")]
OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # older folders


def block(ours, compvis, diffusers, layers):
    return [(f"{ours}.{a}", f"{compvis}.{b}", f"{diffusers}.{c}") for a, b, c in layers]


def middle(part):
    """The encoder's or the decoder's middle: a ResnetBlock, the attention, a ResnetBlock."""
    return (block(f"{part}.mid.0", f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", RESNET_LAYERS)
            + block(f"{part}.mid.1", f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", ATTENTION_LAYERS)
            + block(f"{part}.mid.2", f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", RESNET_LAYERS))


def layer_names(levels):
    """(ours, latent diffusion's, diffusers') name of every layer with weights, input to output, in an autoencoder of
    `levels` levels. Our encoder's level i is 4 layers of its Sequential (two ResnetBlocks, a ZeroPad2d, the stride-2
    conv; the deepest level has no halving); our decoder's level k is 5 (three ResnetBlocks, an Upsample, a conv),
    the deepest first. Latent diffusion numbers the decoder's levels from the finest and runs them in reverse; diffusers
    numbers them from the deepest, as we do. quant_conv and post_quant_conv sit outside latent diffusion's and
    diffusers' encoder and decoder, inside ours."""
    names = [("encoder.conv_in",) * 3]
    for i in range(levels):
        for j in range(2):
            names += block(f"encoder.down.{4 * i + j}", f"encoder.down.{i}.block.{j}",
                           f"encoder.down_blocks.{i}.resnets.{j}", RESNET_LAYERS)
        if i < levels - 1:
            names.append((f"encoder.down.{4 * i + 3}", f"encoder.down.{i}.downsample.conv",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    names += middle("encoder") + [("encoder.norm_out", "encoder.norm_out", "encoder.conv_norm_out"),
                                  ("encoder.conv_out",) * 3, ("encoder.quant_conv", "quant_conv", "quant_conv")]
    names += [("decoder.post_quant_conv", "post_quant_conv", "post_quant_conv"), ("decoder.conv_in",) * 3]
    names += middle("decoder")
    for k in range(levels):
        i = levels - 1 - k  # latent diffusion's number for our (and diffusers') level k
        for j in range(3):
            names += block(f"decoder.up.{5 * k + j}", f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                           RESNET_LAYERS)
        if k < levels - 1:
            names.append((f"decoder.up.{5 * k + 4}", f"decoder.up.{i}.upsample.conv",
                          f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    return names + [("decoder.norm_out", "decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out",) * 3]


def renamed(state, levels, source, target):
    """`state` (every key a layer of layer_names, then .weight or .bias) with `target`'s names for `source`'s."""
    table = {names[NAMINGS.index(source)]: names[NAMINGS.index(target)] for names in layer_names(levels)}
    return {table[key.rpartition(".")[0]] + "." + key.rpartition(".")[2]: tensor for key, tensor in state.items()}


def is_linear_attention(key):
    """diffusers keeps the attention's 1x1 convs as Linear layers: weights (C, C) for our (C, C, 1, 1)."""
    return ".attentions.0.to_" in key and key.endswith(".weight")


# ----------------------------------------------------------------------------- reading
def read_tensors(path):
    """The dict of a .safetensors file, or of a file torch.save wrote (exit 2 if it cannot be read as one)."""
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # not a safetensors file, truncated
            common.fail(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    state = common.load_checkpoint(path)
    if not isinstance(state, dict):
        common.fail(f"{path} holds a {type(state).__name__}, not a checkpoint's dict of weights")
    return state


def read_diffusers(folder):
    """-> (weights, config) of a diffusers AutoencoderKL folder, old attention names made new."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        common.fail(f"{folder} is not a diffusers AutoencoderKL folder: no readable config.json ({e})")
    if not isinstance(config, dict):
        common.fail(f"{folder}/config.json holds a {type(config).__name__}, not a diffusers config")
    files = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
    if not any(f.exists() for f in files):
        common.fail(f"{folder} has no diffusion_pytorch_model.safetensors or .bin beside its config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        common.fail(f"{folder} holds a diffusers {config['_class_name']}; only an AutoencoderKL is Stable Diffusion's")
    state = read_tensors(next(f for f in files if f.exists()))
    old = re.compile(r"\.attentions\.0\.(" + "|".join(OLD_DIFFUSERS_ATTENTION) + r")\.")
    state = {old.sub(lambda m: f".attentions.0.{OLD_DIFFUSERS_ATTENTION[m[1]]}.", k): v for k, v in state.items()}
    return state, config


def read_compvis(path):
    """-> (the VAE's weights, how many other keys were left out) of a CompVis .ckpt or .safetensors: a bare VAE's,
    or a whole Stable Diffusion checkpoint's first_stage_model.*."""
    state = read_tensors(path)
    if "autoencoder" in state:
        common.fail(f"{path} is already an autoencoder.pt; common.load_autoencoder reads it as it is")
    if isinstance(state.get("state_dict"), dict):  # a training checkpoint (PyTorch Lightning) wraps the weights
        state = state["state_dict"]
    vae = state
    if any(key.startswith("first_stage_model.") for key in state):  # a whole checkpoint: the VAE's keys only
        vae = {key[len("first_stage_model."):]: v for key, v in state.items() if key.startswith("first_stage_model.")}
    vae = {key: v for key, v in vae.items() if key.split(".")[0] in VAE_PARTS and isinstance(v, torch.Tensor)}
    if not vae:
        common.fail(f"{path} holds no VAE weights (keys {', '.join(p + '.*' for p in VAE_PARTS)}, bare or under "
                    "first_stage_model.); pass a Stable Diffusion or latent diffusion KL autoencoder checkpoint")
    return vae, len(state) - len(vae)


def needed(state, key, source):
    if key not in state:
        common.fail(f"{source} lacks {key}: not the weights of a Stable Diffusion VAE")
    return state[key]


def sd_layout(state, config, source):
    """(image channels, width, latent channels, levels) of the VAE in `state`: the channels from the weights, the
    levels from the diffusers config or the CompVis weights. Exit 2 unless it is Stable Diffusion's layout:
    multipliers (1, 2, 4, 4) (f8) or (1, 2, 4) (f4) on the width, two ResnetBlocks per encoder level, and SD_CONFIG."""
    channels = needed(state, "encoder.conv_in.weight", source).shape[1]  # named alike in both
    latent_channels = needed(state, "post_quant_conv.weight", source).shape[0]
    if config is not None:
        widths, per_level = config.get("block_out_channels", []), config.get("layers_per_block", 1)  # diffusers'
        differs = {k: config[k] for k, v in SD_CONFIG.items() if k in config and config[k] != v}
        if differs or config.get("in_channels", 3) != config.get("out_channels", 3):
            common.fail(f"{source}/config.json says {differs or 'in_channels != out_channels'}; Stable Diffusion's "
                        f"VAE has {SD_CONFIG} and as many channels out as in")
    else:
        levels = 1 + max((int(m[1]) for key in state if (m := re.match(r"encoder\.down\.(\d+)\.", key))), default=0)
        widths = [needed(state, f"encoder.down.{i}.block.0.conv1.weight", source).shape[0] for i in range(levels)]
        per_level = len({m[1] for key in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))})
    if len(widths) not in (3, 4) or widths[0] % 32 or widths != [widths[0] * m for m in (1, 2, 4, 4)[:len(widths)]]:
        common.fail(f"{source} has levels of {list(widths)} channels; Stable Diffusion's are a multiple of 32 times "
                    "(1, 2, 4, 4) (f8) or (1, 2, 4) (f4)")
    if per_level != 2:
        common.fail(f"{source} has {per_level} ResnetBlocks per encoder level (layers_per_block); "
                    "Stable Diffusion's VAE has 2")
    return channels, widths[0], latent_channels, len(widths)


def import_weights(source, image_size=None, scale_factor=None):
    """A diffusers folder or a CompVis file -> (our VAE holding its weights, its latent scale factor, a line to
    print). Every layer must be there in the shape it has in Stable Diffusion's VAE, and nothing else."""
    source = Path(source)
    if not source.exists():
        common.fail(f"{source} does not exist; pass a diffusers AutoencoderKL folder or a CompVis .ckpt/.safetensors")
    if source.is_dir():
        (state, config), naming, left_out = read_diffusers(source), "diffusers", 0
        state = {k: v.view(*v.shape, 1, 1) if is_linear_attention(k) and v.dim() == 2 else v for k, v in state.items()}
    else:
        (state, left_out), naming, config = read_compvis(source), "compvis", None
    channels, width, latent_channels, levels = sd_layout(state, config, source)
    if image_size is None:
        image_size = (config or {}).get("sample_size", 256)
    downsample = 2 ** (levels - 1)
    if not isinstance(image_size, int) or image_size <= 0 or image_size % downsample:
        common.fail(f"image size {image_size} (--image-size, else the config's sample_size) is not a positive "
                    f"multiple of the autoencoder's {downsample} pixels per code")
    model = common.VAE(channels, image_size, latent_channels, width, spatial=True, downsample=downsample, arch="sd")
    wanted = renamed(model.state_dict(), levels, "ours", naming)
    unknown, missing = sorted(set(state) - set(wanted)), sorted(set(wanted) - set(state))
    if unknown or missing:
        found = [f"{len(keys)} keys {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in [("missing", missing), ("unknown", unknown)] if keys]
        common.fail(f"{source} does not fit Stable Diffusion's f{downsample} VAE of width {width}: {'; '.join(found)}")
    for key, tensor in state.items():
        if tensor.shape != wanted[key].shape:
            common.fail(f"{source}: {key} has shape {tuple(tensor.shape)}; Stable Diffusion's f{downsample} VAE of "
                        f"width {width} has {tuple(wanted[key].shape)} there")
    model.load_state_dict(renamed(state, levels, naming, "ours"))
    if scale_factor is None:
        scale_factor = float((config or {}).get("scaling_factor", SD_1_SCALE_FACTOR))
    weights = sum(t.numel() for t in model.state_dict().values())
    summary = (f"KL-f{downsample}, width {width}, {channels} -> {latent_channels} channels, {weights:,} weights, "
               f"latent_scale_factor {scale_factor:g}, image size {image_size}"
               + (f"; {left_out} keys that are not the VAE's left out" if left_out else ""))
    return model.eval(), scale_factor, summary


# ----------------------------------------------------------------------------- writing
def export_weights(model, scale_factor, out, form):
    """Write `model` (arch sd) as a diffusers AutoencoderKL folder or a CompVis file at `out`."""
    levels = int(math.log2(model.config["downsample"])) + 1
    state = renamed({k: v.contiguous() for k, v in model.state_dict().items()}, levels, "ours", form)
    if form == "compvis":
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            safetensors.torch.save_file(state, out)
        else:
            torch.save({"state_dict": state}, out)
        return
    c = model.config
    config = {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": c["channels"],
              "out_channels": c["channels"], "latent_channels": c["latent_dim"],
              "block_out_channels": common.sd_levels(c["width"], c["downsample"]), "layers_per_block": 2,
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "norm_num_groups": 32, "sample_size": c["image_size"], "scaling_factor": scale_factor}
    state = {k: v.flatten(1) if is_linear_attention(k) else v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    safetensors.torch.save_file(state, out / "diffusion_pytorch_model.safetensors")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    load = commands.add_parser("import", help="Stable Diffusion's weights -> an autoencoder.pt")
    load.add_argument("source", help="a diffusers AutoencoderKL folder, or a CompVis .ckpt or .safetensors")
    load.add_argument("out", help="the autoencoder.pt to write")
    load.add_argument("--image-size", type=int, default=None,
                      help="the size tools.encode reads images at (default: the config's sample_size, else 256)")
    load.add_argument("--scale-factor", type=float, default=None,
                      help="latent_scale_factor (default: the config's scaling_factor, else 0.18215)")
    save = commands.add_parser("export", help="an autoencoder.pt of --arch sd -> Stable Diffusion's formats")
    save.add_argument("model", help="an autoencoder.pt of --arch sd")
    save.add_argument("out", help="a folder (diffusers), or a .safetensors or .ckpt file (compvis)")
    save.add_argument("--format", choices=["diffusers", "compvis"], required=True,
                      help="diffusers: config.json + diffusion_pytorch_model.safetensors; compvis: bare latent "
                           "diffusion keys (required)")
    args = p.parse_args()
    out = Path(args.out)
    if args.command == "import":
        if args.scale_factor is not None and not args.scale_factor > 0:
            common.fail(f"--scale-factor {args.scale_factor} must be positive")
        model, scale_factor, summary = import_weights(args.source, args.image_size, args.scale_factor)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"autoencoder": model.config, "state_dict": model.state_dict(), "script": "tools.sd_vae",
                    "dataset": f"imported from {args.source}", "latent_scale_factor": scale_factor}, out)
        print(f"wrote {out}: {summary}")
        return
    model = common.load_autoencoder(args.model)
    if model.arch != "sd" or model.recon != "mse":
        common.fail(f"{args.model} is an autoencoder of --arch {model.arch} --recon {model.recon}; only --arch sd "
                    "--recon mse has Stable Diffusion's layers and outputs, so only it can be exported")
    if args.format == "compvis" and out.is_dir() or args.format == "diffusers" and out.is_file():
        common.fail(f"{out} is a {'folder' if out.is_dir() else 'file'}; --format {args.format} writes a "
                    f"{'file' if args.format == 'compvis' else 'folder'}")
    export_weights(model, model.latent_scale_factor, out, args.format)
    print(f"wrote {out} ({args.format}); latent_scale_factor {model.latent_scale_factor:g}"
          + (" (latent diffusion's config: scale_factor)" if args.format == "compvis" else " (scaling_factor)"))


if __name__ == "__main__":
    main()
