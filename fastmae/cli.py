"""The ``fastmae`` command (placeholder until the full pretrain/visualize commands land):
trains a small MAE for a few steps on random crops of scikit-image's bundled photographs."""
from __future__ import annotations

import argparse

import torch


def _sample_batch(images, size, batch, gen):
    from torchvision.transforms import v2
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    out = [crop(images[int(torch.randint(len(images), (1,), generator=gen))]) for _ in range(batch)]
    return torch.stack(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fastmae", description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)

    import skimage.data
    from . import MaskedAutoencoderViT

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry"]
    images = [torch.from_numpy(getattr(skimage.data, n)()).permute(2, 0, 1).float() / 255 for n in names]
    model = MaskedAutoencoderViT(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                 decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4,
                                 norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(args.steps):
        imgs = _sample_batch(images, 64, args.batch_size, gen)
        loss, _, _ = model(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
