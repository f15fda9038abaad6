"""The fast model against the reference and against the official code's golden outputs."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import load_golden, rel_err

import fastmae
from fastmae import reference


def _pair(seed=0, **cfg):
    """A reference model and a fast model holding the same (perturbed) weights."""
    cfg.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    torch.manual_seed(seed)
    ref = reference.MaskedAutoencoderViT(**cfg)
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    fast = fastmae.MaskedAutoencoderViT(**cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _run(model, imgs, mask_ratio, noise):
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), pred.detach(), mask, grads


def assert_same_outputs(a, b, loss_tol=1e-5, pred_tol=1e-5, grad_tol=1e-4):
    (la, pa, ma, ga), (lb, pb, mb, gb) = a, b
    assert torch.equal(ma, mb), "masks differ"
    assert abs(la.item() - lb.item()) <= loss_tol * abs(lb.item()), (la.item(), lb.item())
    assert rel_err(pa, pb) <= pred_tol, rel_err(pa, pb)
    assert ga.keys() == gb.keys()
    worst = max(ga, key=lambda n: rel_err(ga[n], gb[n]))
    assert rel_err(ga[worst], gb[worst]) <= grad_tol, (worst, rel_err(ga[worst], gb[worst]))


SMALL = dict(embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=2,
             decoder_num_heads=4, mlp_ratio=2.0)
CASES = {
    "p8_square": dict(img_size=32, patch_size=8, in_chans=3, **SMALL),
    "p14": dict(img_size=56, patch_size=14, in_chans=3, **SMALL),
    "one_channel_p4": dict(img_size=16, patch_size=4, in_chans=1, **SMALL),
    "nonsquare_64x96": dict(img_size=(64, 96), patch_size=8, in_chans=3, **SMALL),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("mask_ratio,batch", [(0.75, 3), (0.5, 1), (0.9, 2)])
def test_fast_matches_reference(case, norm_pix_loss, mask_ratio, batch, backend):
    cfg = dict(CASES[case], norm_pix_loss=norm_pix_loss)
    ref, fast = _pair(**cfg)
    H, W = reference.to_2tuple(cfg["img_size"], "img_size")
    imgs = torch.randn(batch, cfg["in_chans"], H, W)
    noise = torch.rand(batch, ref.patch_embed.num_patches)
    assert_same_outputs(_run(fast, imgs, mask_ratio, noise), _run(ref, imgs, mask_ratio, noise))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_gradient_for_the_images(norm_pix_loss, backend):
    """Images that require grad (saliency, attacks) get the official gradient, through the
    patch embedding and through the loss's target alike."""
    ref, fast = _pair(**CASES["p8_square"], norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    grads = []
    for model in (fast, ref):
        x = imgs.clone().requires_grad_()
        model(x, mask_ratio=0.75, noise=noise)[0].backward()
        grads.append(x.grad)
    assert rel_err(grads[0], grads[1]) <= 1e-5


@pytest.mark.slow
def test_vit_base_matches_reference():
    torch.manual_seed(0)
    ref = reference.mae_vit_base_patch16(norm_pix_loss=True)
    fast = fastmae.mae_vit_base_patch16(norm_pix_loss=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    assert_same_outputs(_run(fast, imgs, 0.75, noise), _run(ref, imgs, 0.75, noise))




@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.slow)],
                         indirect=True)  # triton: the interpreter takes ~30 s over the golden cases
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_golden_official_outputs(golden, impl, backend):
    """Both models reproduce what the official facebookresearch/mae code computed."""
    if impl == "reference" and backend != "torch":
        pytest.skip("the reference model does not use the fused ops")
    for name, case in golden["cases"].items():
        cfg = dict(case["config"])
        eps = cfg.pop("layer_norm_eps")
        cls = reference.MaskedAutoencoderViT if impl == "reference" else fastmae.MaskedAutoencoderViT
        model = cls(**cfg, norm_layer=partial(nn.LayerNorm, eps=eps))
        model.load_state_dict(case["state_dict"], strict=True)
        loss, pred, mask, grads = _run(model, case["imgs"], case["mask_ratio"], case["noise"])
        assert torch.equal(mask, case["mask"]), name
        assert abs(loss.item() - case["loss"].item()) <= 1e-5 * abs(case["loss"].item()), name
        assert rel_err(pred, case["pred"]) <= 1e-5, name
        assert grads.keys() == case["grads"].keys(), name
        for k, g in case["grads"].items():
            assert rel_err(grads[k], g) <= 1e-4, (name, k, rel_err(grads[k], g))


def test_position_tables_match_official(golden):
    for case in golden["cases"].values():
        cfg = {k: v for k, v in case["config"].items() if k != "layer_norm_eps"}
        model = fastmae.MaskedAutoencoderViT(**cfg)
        assert torch.equal(model.pos_embed, case["state_dict"]["pos_embed"])
        assert torch.equal(model.decoder_pos_embed, case["state_dict"]["decoder_pos_embed"])
        assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_vit_base_parameter_count(golden):
    for factory in (fastmae.mae_vit_base_patch16, reference.mae_vit_base_patch16):
        model = factory()
        assert sum(p.numel() for p in model.parameters()) == golden["mae_vit_base_patch16_num_params"] == 111_907_840


def test_position_tables_on_a_non_square_grid():
    """Patch l = i*w + j (patchify's order): the first half of the channels encodes its column j,
    the second its row i, as the official layout does (a square grid would hide a swap)."""
    import numpy as np

    def one_d(dim, positions):  # the official get_1d_sincos_pos_embed_from_grid, in numpy
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", np.asarray(positions, dtype=np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    model = fastmae.MaskedAutoencoderViT(img_size=(24, 40), patch_size=8, **SMALL)  # grid 3 x 5
    for table in (model.pos_embed[0], model.decoder_pos_embed[0]):
        D = table.shape[1]
        cols, rows = one_d(D // 2, range(5)), one_d(D // 2, range(3))
        assert table.shape[0] == 1 + 15 and not table[0].any()
        for i in range(3):
            for j in range(5):
                want = np.concatenate([cols[j], rows[i]]).astype(np.float32)
                assert np.allclose(table[1 + i * 5 + j].numpy(), want, atol=1e-6), (i, j)


def test_factories_and_create_model():
    for name in ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]:
        for full in (name, name + "_dec512d8b"):
            assert callable(getattr(fastmae, full))
    m = fastmae.create_model("mae_vit_base_patch16", img_size=32, depth=1, decoder_depth=1)
    assert isinstance(m, fastmae.MaskedAutoencoderViT) and m.patch_embed.num_patches == 4
    r = fastmae.create_model("mae_vit_huge_patch14_dec512d8b", reference_impl=True, img_size=28,
                             depth=1, decoder_depth=1)
    assert type(r) is reference.MaskedAutoencoderViT and r.patch_embed.patch_size == (14, 14)
    with pytest.raises(ValueError, match="unknown model 'mae_vit_tiny'; choose one of .*mae_vit_micro_patch8"):
        fastmae.create_model("mae_vit_tiny")
    tiny = fastmae.create_model("mae_vit_tiny_patch8", img_size=64)  # the demo's small configuration
    assert (tiny.patch_embed.patch_size, tiny.patch_embed.num_patches, len(tiny.blocks)) == ((8, 8), 64, 6)
    micro = fastmae.create_model("mae_vit_micro_patch8", reference_impl=True, img_size=32, norm_pix_loss=True)
    assert type(micro) is reference.MaskedAutoencoderViT and micro.norm_pix_loss


def test_state_dict_round_trip(tmp_path):
    ref, fast = _pair(**CASES["nonsquare_64x96"])
    assert list(ref.state_dict()) == list(fast.state_dict())
    path = tmp_path / "ckpt.pth"
    torch.save(fast.state_dict(), path)
    back = reference.MaskedAutoencoderViT(**CASES["nonsquare_64x96"])
    back.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_patchify_unpatchify_round_trip_nonsquare():
    model = reference.MaskedAutoencoderViT(img_size=(24, 40), patch_size=8, in_chans=2, **SMALL)
    imgs = torch.randn(2, 2, 24, 40)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 15, 128)
    assert torch.equal(patches[0, 6, :2], imgs[0, :, 8, 8])  # patch (1, 1): pixel (0, 0), channels in order
    assert torch.equal(model.unpatchify(patches), imgs)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [reference.MaskedAutoencoderViT, fastmae.MaskedAutoencoderViT])
def test_bad_input_errors(cls):
    model = cls(img_size=32, patch_size=8, **SMALL)
    good = torch.randn(2, 3, 32, 32)
    cases = [
        (torch.randn(2, 1, 32, 32), {}, "channels"),
        (torch.randn(2, 3, 36, 32), {}, "not divisible by the patch size"),
        (torch.randn(2, 3, 48, 48), {}, "built for 32x32"),
        (torch.randn(3, 32, 32), {}, r"\[N, C, H, W\]"),
        (good, {"mask_ratio": 1.0}, r"mask_ratio must lie in \[0, 1\)"),
        (good, {"mask_ratio": -0.1}, r"mask_ratio must lie in \[0, 1\)"),
        (good, {"mask_ratio": 0.0}, "masks no patch"),
        (good, {"mask_ratio": 0.99}, "leaves no visible patch"),
        (good, {"noise": torch.rand(2, 15)}, r"noise must have shape \[N, L\] = \[2, 16\]"),
        (good, {"noise": torch.rand(3, 16)}, r"noise must have shape"),
        (good, {"noise": torch.rand(2, 16, device="meta")}, "noise is on meta but the images are on cpu"),
        (good, {"mask_ratio": "0.5"}, r"mask_ratio must be a number in \[0, 1\), got '0.5'"),
        (good, {"mask_ratio": None}, r"mask_ratio must be a number"),
    ]
    for imgs, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(imgs, **kwargs)


def test_constructor_rejects_nondivisible_image_size():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        fastmae.MaskedAutoencoderViT(img_size=30, patch_size=8, **SMALL)
    for kwargs, msg in [(dict(img_size=32.0), "img_size must be a positive int or an .H, W. pair"),
                        (dict(img_size=(32, -32)), "img_size must be a positive int"),
                        (dict(img_size=8), "the image holds 1 patch.*at least 2"),
                        (dict(in_chans=0), "in_chans must be a positive integer, got 0"),
                        (dict(mlp_ratio=0), "mlp_ratio must be a positive number, got 0")]:
        for cls in (reference.MaskedAutoencoderViT, fastmae.MaskedAutoencoderViT):
            with pytest.raises(ValueError, match=msg):
                cls(**dict(dict(img_size=32, patch_size=8, **SMALL), **kwargs))
    assert fastmae.MaskedAutoencoderViT(img_size=[32, 48], patch_size=8, **SMALL).patch_embed.num_patches == 24
    with pytest.raises(ValueError, match="unknown attention backend"):
        fastmae.MaskedAutoencoderViT(img_size=32, patch_size=8, attn_backend="flash9", **SMALL)
