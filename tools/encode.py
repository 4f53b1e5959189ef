"""Encode a folder of images with a trained autoencoder: the latents a diffusion model trains on.

    python -m tools.encode runs/04_vae_gan_warmup/folder-<time> --data-dir my_photos --out latents.pt

RUN_OR_FILE is a run folder (its autoencoder.pt is used) or an autoencoder.pt. Every image below --data-dir
(png, jpg, jpeg, bmp, webp), in sorted path order, is centre-cropped and resized to the size the autoencoder
was trained at, encoded, and its mean code mu multiplied by latent_scale_factor, so the latents have unit
std on the training images (Stable Diffusion uses a fixed 0.18215: stable-diffusion's v1-inference.yaml
scale_factor). latents.pt holds
{"latents": (N, *latent shape) float32, "files": [paths], "latent_scale_factor": float}. Back to pictures:

    model = common.load_autoencoder("runs/.../autoencoder.pt")
    images = model.decode(torch.load("latents.pt")["latents"] / model.latent_scale_factor)  # [-1, 1]
"""
import argparse
from pathlib import Path

import torch

import common  # tools/__init__.py puts the repository's root on sys.path


@torch.no_grad()
def encode_folder(model, folder, batch_size=64):
    """-> (latents mu x latent_scale_factor, the files they came from) for every readable image below `folder`,
    read as the folder data set reads them, a batch at a time."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in common.IMAGE_EXTENSIONS)
    latents, files = [], []
    for start in range(0, len(paths), batch_size):
        read = [(p, common.read_image(p, model.config["image_size"])) for p in paths[start:start + batch_size]]
        read = [(p, x) for p, x in read if x is not None]  # unreadable files are skipped
        if read:
            x = torch.stack([x for _, x in read])
            if model.config["channels"] == 1:  # an autoencoder of grey images (shapes, MNIST)
                x = x.float().mean(1, keepdim=True).round()
            latents.append(model.encode(x.float() / 127.5 - 1)[0] * model.latent_scale_factor)
            files += [str(p) for p, _ in read]
    if not files:
        common.fail(f"no readable image ({', '.join(sorted(common.IMAGE_EXTENSIONS))}) below {folder}")
    return torch.cat(latents), files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_or_file", help="a run folder, or an autoencoder.pt")
    p.add_argument("--data-dir", required=True, help="the folder of images to encode")
    p.add_argument("--out", default="latents.pt", help="(default: latents.pt)")
    args = p.parse_args()
    path = Path(args.run_or_file)
    model = common.load_autoencoder(path / "autoencoder.pt" if path.is_dir() else path)
    if not Path(args.data_dir).is_dir():
        common.fail(f"--data-dir {args.data_dir} is not a folder")
    latents, files = encode_folder(model, args.data_dir)
    torch.save({"latents": latents, "files": files, "latent_scale_factor": model.latent_scale_factor}, args.out)
    print(f"wrote {args.out}: {len(files)} images -> latents {tuple(latents.shape)}, std {latents.std():.3f} "
          f"(x latent_scale_factor {model.latent_scale_factor:.4f})")


if __name__ == "__main__":
    main()
