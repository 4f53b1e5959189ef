"""01 on 02's encoder: the vanilla ELBO with mu centred by BatchNorm (no bias after it), so that 02
can be compared with 01 on the same model. Takes 01's flags.

    python -m tools.centred_01 --out runs/01_centred

It runs 01_vanilla_vae.py unchanged, with every VAE built with centre_mu=True; common.evaluate
recomputes BatchNorm's statistics over training images before the evaluation, as for 02.
"""
import runpy
import sys

from tools import ROOT
import common  # noqa: E402


def main():
    signature = common.VAE.__init__.__defaults__  # (recon, channel_mean, centre_mu, spatial)
    common.VAE.__init__.__defaults__ = (signature[0], signature[1], True, signature[3])
    sys.argv = ["01_vanilla_vae.py", *sys.argv[1:]]
    runpy.run_path(str(ROOT / "01_vanilla_vae.py"), run_name="__main__")


if __name__ == "__main__":
    main()
