"""Build a small MAE, run a pretraining forward/backward pass, save it and load it back.

python examples/quickstart.py [output_dir]
"""

import sys

import torch

from maekit import MAEConfig, MAEForPreTraining, MAEModel


def main(output_dir: str = "outputs/quickstart") -> None:
    config = MAEConfig.from_preset("vit-tiny-patch16", image_size=64, norm_pix_loss=True)
    model = MAEForPreTraining(config)
    pixels = torch.randn(4, 3, 64, 64)
    out = model(pixels)
    out.loss.backward()
    print(f"loss {out.loss.item():.4f}, logits {tuple(out.logits.shape)}, masked {int(out.mask[0].sum())}/16 patches")

    model.save_pretrained(output_dir)
    encoder = MAEModel.from_pretrained(output_dir).eval()
    features = encoder(pixels).last_hidden_state
    print(f"saved to {output_dir}; reloaded encoder gives features {tuple(features.shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
