"""fastmae.masking: the MAE family's masking strategies, their noise form and the schedule.

- the noise representation: ``mask_to_noise`` + ``random_masking_ids`` keep exactly the mask's kept
  patches, ``exact_mask_ratio`` makes the official ``int(L * (1 - r))`` hit K, ``fix_mask_count``;
- UM-MAE: one kept patch per 2x2 window from the official balanced pool, secondary masking of
  kept patches only, with the official count; its noise through the reference MAE;
- BEiT: rectangles of the requested aspect, the strict "smaller than the grid" rule, exact counts;
- MaskAlign: the official ``torch.multinomial`` draw, as ids and as noise;
- VideoMAE tube / random masks; VideoMAE V2's running cell against hand-written patterns;
- the mask-ratio schedule; reproducibility (same generator state, same mask) and every bad input.
"""
import ast
import inspect
import math

import pytest
import torch

from fastmae import masking, reference
from fastmae._checks import num_kept
from fastmae.masking import (MaskRatioSchedule, attentive_keep, attentive_noise, block_mask, cls_attention,
                             exact_mask_ratio, fix_mask_count, mask_to_noise, random_mask, random_noise,
                             running_cell_mask, tube_mask, uniform_mask)
from fastmae.ops import random_masking_ids


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def kept_by_model(noise, K):
    """The mask [N, L] bool the MAE model derives from noise (True = removed)."""
    return random_masking_ids(noise, K)[3].bool()


# ============================================================================ the representation
def test_mask_to_noise_keeps_exactly_the_masks_kept_patches():
    mask = torch.rand(5, 37, generator=gen(1)).argsort(1) < 26  # 26 masked, 11 kept per sample
    noise = mask_to_noise(mask, gen(2))
    assert noise.shape == (5, 37) and noise.dtype == torch.float32
    assert ((noise[~mask] >= 0) & (noise[~mask] < 1)).all() and ((noise[mask] >= 1) & (noise[mask] < 2)).all()
    assert torch.equal(kept_by_model(noise, 11), mask)
    ids_keep = random_masking_ids(noise, 11)[0]
    assert torch.equal(ids_keep.sort(1).values, (~mask).nonzero()[:, 1].view(5, 11))
    assert torch.equal(mask_to_noise(mask, gen(2)), noise)  # the generator decides
    assert not torch.equal(mask_to_noise(mask, gen(3)), noise)
    one = mask_to_noise(mask[0], gen(2))  # one sample: noise of the mask's shape
    assert one.shape == (37,) and torch.equal(kept_by_model(one[None], 11)[0], mask[0])


def test_mask_to_noise_stays_below_two(monkeypatch):
    # 1 + u rounds to 2.0 in float32 for the largest u torch.rand draws; masked noise must stay < 2
    top = 1 - 2.0 ** -24
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape[0], top))
    noise = mask_to_noise(torch.tensor([[True, False, True]]), gen())
    assert noise[0, 0] < 2 and noise[0, 0] >= 1 and noise[0, 1] == top


def test_mask_to_noise_errors():
    good = torch.tensor([True, False, True, False])
    for bad, msg in [(good.float(), "must be a non-empty bool tensor"),
                     (good.view(1, 2, 2), "must be a non-empty bool tensor"),
                     (torch.zeros(0, dtype=torch.bool), "must be a non-empty bool tensor"),
                     ([True, False], "must be a non-empty bool tensor"),
                     (torch.tensor([[True, False], [True, True]]), r"same number of patches .* counts \[1, 2\]"),
                     (torch.ones(2, 3, dtype=torch.bool), "keeps no patch of 3"),
                     (torch.zeros(2, 3, dtype=torch.bool), "masks no patch of 3")]:
        with pytest.raises(ValueError, match=msg):
            mask_to_noise(bad, gen())


def test_exact_mask_ratio_hits_every_count():
    assert int(5 * (1 - 4 / 5)) == 0  # the plain quotient can keep one patch fewer
    for L in range(2, 160):
        for M in range(1, L):
            r = exact_mask_ratio(L, M)
            assert num_kept(L, r) == L - M, (L, M, r)
            assert abs(r - M / L) < 1e-12
    for args, msg in [((4, 4), "keeps no patch of 4"), ((4, 0), "num_masked must be a positive integer"),
                      ((0, 1), "num_patches must be a positive integer"), ((4.0, 1), "num_patches must be")]:
        with pytest.raises(ValueError, match=msg):
            exact_mask_ratio(*args)


def test_fix_mask_count_tops_up_and_trims():
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :3] = True  # too few
    mask[1, :15] = True  # too many
    mask[2, :8] = True  # already right
    fixed = fix_mask_count(mask, 8, gen(0))
    assert (fixed.sum(1) == 8).all()
    assert (fixed[0] >= mask[0]).all()  # only adds
    assert (fixed[1] <= mask[1]).all()  # only removes
    assert torch.equal(fixed[2], mask[2]) and torch.equal(fix_mask_count(mask, 8, gen(0)), fixed)
    assert not torch.equal(fix_mask_count(mask, 8, gen(1)), fixed)
    assert mask[0].sum() == 3  # a copy: the input is untouched
    assert fix_mask_count(mask[0], 5, gen(0)).shape == (20,)
    for n, msg in [(21, "exceeds the 20 patches"), (-1, "num_masked must be an integer >= 0"),
                   (2.0, "num_masked must be")]:
        with pytest.raises(ValueError, match=msg):
            fix_mask_count(mask, n, gen())


# ============================================================================ 1. random
def test_random_noise_is_the_official_torch_rand():
    noise = random_noise(3, 49, 0.75, gen(4))
    assert torch.equal(noise, torch.rand(3, 49, generator=gen(4)))
    assert noise.dtype == torch.float32 and not torch.equal(random_noise(3, 49, 0.75, gen(5)), noise)
    assert kept_by_model(noise, 12).sum(1).eq(37).all()
    for args, msg in [((2, 4, 0.9), "leaves no visible patch of 4"), ((2, 4, 0.0), "masks no patch of 4"),
                      ((2, 4, 1.0), r"must lie in \[0, 1\)"), ((0, 4, 0.5), "N must be a positive integer"),
                      ((2, 0, 0.5), "L must be a positive integer")]:
        with pytest.raises(ValueError, match=msg):
            random_noise(*args, generator=gen())


# ============================================================================ 2. UM-MAE
def test_uniform_mask_keeps_one_patch_per_2x2_window():
    mask, secondary = uniform_mask(6, 14, 10, generator=gen(0))
    assert mask.shape == secondary.shape == (6, 140) and mask.dtype == torch.bool
    windows = (~mask).view(6, 7, 2, 5, 2).sum((2, 4))  # kept patches per window
    assert (windows == 1).all()
    assert (mask.sum(1) == 105).all() and not secondary.any()
    again, _ = uniform_mask(6, 14, 10, generator=gen(0))
    assert torch.equal(again, mask) and not torch.equal(uniform_mask(6, 14, 10, generator=gen(1))[0], mask)
    assert not torch.equal(mask[0], mask[1])  # a new draw per sample


def test_uniform_mask_draws_from_the_official_balanced_pool():
    # two windows: the official pool holds each of the 4 positions once, so they always differ
    seen = set()
    for seed in range(60):
        mask, _ = uniform_mask(1, 2, 4, generator=gen(seed))
        kept = (~mask).view(2, 2, 2).permute(1, 0, 2).reshape(2, 4).float().argmax(1).tolist()
        assert kept[0] != kept[1], seed
        seen.update(kept)
    assert seen == {0, 1, 2, 3}


def test_uniform_secondary_masks_only_kept_patches_with_the_official_count():
    mask, secondary = uniform_mask(4, 14, 14, vis_mask_ratio=0.25, generator=gen(3))
    assert not (secondary & mask).any()  # only kept patches
    # official: K - int(K * (1 - r)) = 49 - 36 = 13 (not int(49 * 0.25) = 12)
    assert (secondary.sum(1) == 13).all()
    assert not torch.equal(secondary[0], secondary[1])
    ids_keep = random_masking_ids(mask_to_noise(mask, gen(0)), 49)[0]
    assert secondary.gather(1, ids_keep).sum(1).eq(13).all()  # the [N, K] form for the model
    again = uniform_mask(4, 14, 14, vis_mask_ratio=0.25, generator=gen(3))
    assert torch.equal(again[0], mask) and torch.equal(again[1], secondary)


def test_uniform_noise_through_the_reference_mae():
    torch.manual_seed(0)
    model = reference.MaskedAutoencoderViT(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                           decoder_num_heads=2, mlp_ratio=2.0)
    mask, _ = uniform_mask(3, 4, 4, generator=gen(7))
    noise = mask_to_noise(mask, gen(8))
    with torch.no_grad():
        _, _, got = model(torch.randn(3, 3, 32, 32), mask_ratio=0.75, noise=noise)
    assert torch.equal(got, mask.float())


def test_uniform_mask_errors():
    for args, kw, msg in [((2, 3, 4), {}, "needs an even grid"), ((2, 4, 5), {}, "needs an even grid"),
                          ((2, 0, 4), {}, "grid_h must be a positive integer"), ((0, 4, 4), {}, "N must be"),
                          ((2, 4, 4), dict(vis_mask_ratio=1.0), r"vis_mask_ratio must be a number in \[0, 1\)"),
                          ((2, 2, 2), dict(vis_mask_ratio=0.5), "leaves none of the 1 kept patches visible")]:
        with pytest.raises(ValueError, match=msg):
            uniform_mask(*args, **kw, generator=gen())


# ============================================================================ 3. BEiT
def _box(mask2d):
    rows, cols = mask2d.nonzero().unbind(1)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("area,aspect,shape", [(4, 1.0, (2, 2)), (9, 1.0, (3, 3)), (4, 4.0, (4, 1)),
                                               (4, 0.25, (1, 4)), (6, 1.5, (3, 2))])
def test_block_mask_places_one_rectangle_of_the_aspect(area, aspect, shape):
    # target = min = max patches and a fixed aspect: exactly one h x w block, h = round(sqrt(A a))
    for seed in range(10):
        mask = block_mask(1, 8, 8, area, min_num_patches=area, min_aspect=aspect, max_aspect=aspect,
                          generator=gen(seed))[0].view(8, 8)
        assert int(mask.sum()) == area and _box(mask) == shape, seed


def test_block_mask_counts_and_reproducibility():
    approx = block_mask(16, 14, 14, 75, generator=gen(0))
    assert approx.shape == (16, 196) and (approx.sum(1) <= 75).all()
    assert torch.equal(block_mask(16, 14, 14, 75, generator=gen(0)), approx)
    assert not torch.equal(block_mask(16, 14, 14, 75, generator=gen(1)), approx)
    exact = block_mask(16, 14, 14, 75, exact=True, generator=gen(0))
    assert (exact.sum(1) == 75).all()
    assert (exact >= approx).all()  # the same blocks, topped up
    noise = mask_to_noise(exact, gen(2))
    K = num_kept(196, exact_mask_ratio(196, 75))
    assert K == 121 and torch.equal(kept_by_model(noise, K), exact)


def test_block_mask_blocks_are_smaller_than_the_grid():
    # BEiT places a block only if h < height and w < width: a 1-row grid gets none
    assert not block_mask(3, 1, 8, 3, min_num_patches=1, generator=gen(0)).any()
    assert not block_mask(3, 8, 4, 4, min_aspect=0.25, max_aspect=0.25, generator=gen(0)).any()  # 1x4 is too wide
    topped = block_mask(3, 1, 8, 3, min_num_patches=1, exact=True, generator=gen(0))
    assert (topped.sum(1) == 3).all()


def test_block_mask_uses_only_the_torch_generator():
    import random
    import numpy as np
    random.seed(0)
    np.random.seed(0)
    a = block_mask(2, 14, 14, 75, generator=gen(5))
    random.seed(1)
    np.random.seed(1)
    assert torch.equal(block_mask(2, 14, 14, 75, generator=gen(5)), a)


def test_block_mask_errors():
    for args, kw, msg in [((2, 4, 4, 16), {}, "num_masking_patches=16 keeps no patch of the 4x4 grid"),
                          ((2, 4, 4, 0), {}, "num_masking_patches must be a positive integer"),
                          ((2, 4, 4, 8), dict(min_num_patches=17), "min_num_patches=17 is larger than the 4x4 grid"),
                          ((2, 4, 4, 8), dict(min_num_patches=0), "min_num_patches must be a positive integer"),
                          ((2, 4, 4, 8), dict(max_num_patches=3), "max_num_patches=3 is smaller than min_num_"),
                          ((2, 4, 4, 8), dict(min_aspect=0), "min_aspect must be a positive number"),
                          ((2, 4, 4, 8), dict(max_aspect=-1.0), "max_aspect must be a positive number"),
                          ((2, 4, 4, 8), dict(min_aspect=2.0, max_aspect=1.0), "min_aspect=2.0 exceeds max_aspect"),
                          ((2, 0, 4, 8), {}, "grid_h must be a positive integer"),
                          ((0, 4, 4, 8), {}, "N must be a positive integer")]:
        with pytest.raises(ValueError, match=msg):
            block_mask(*args, **kw, generator=gen())


# ============================================================================ 4. MaskAlign
def _official_attention_masking(importance, mask_ratio):
    """MaskAlign's ``attention_masking`` index computation, on torch's default generator."""
    N, L = importance.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.multinomial(importance, L, replacement=False)
    return ids_shuffle[:, :len_keep]


def test_cls_attention_is_the_head_mean_of_the_cls_row():
    attn = torch.rand(2, 3, 5, 5, generator=gen(0)).softmax(-1)
    got = cls_attention(attn)
    assert got.shape == (2, 4)
    assert torch.allclose(got[1, 2], attn[1, :, 0, 3].mean())
    for bad in (attn[0], torch.rand(2, 3, 5, 4), torch.rand(2, 3, 1, 1)):
        with pytest.raises(ValueError, match=r"attn must have shape \[N, heads, 1\+L, 1\+L\]"):
            cls_attention(bad)


def test_attentive_keep_is_the_official_multinomial_draw():
    attn = cls_attention(torch.rand(4, 3, 50, 50, generator=gen(0)).softmax(-1))
    ids = attentive_keep(attn, 12, gen(1))
    assert torch.equal(ids, torch.multinomial(attn, 49, replacement=False, generator=gen(1))[:, :12])
    assert not torch.equal(attentive_keep(attn, 12, gen(2)), ids)
    torch.manual_seed(3)  # no generator: torch's default one, as the official code
    want = _official_attention_masking(attn, 0.75)
    torch.manual_seed(3)
    assert torch.equal(attentive_keep(attn, 12), want)


def test_attentive_masking_keeps_high_attention_patches():
    attn = torch.full((3, 40), 1e-9)
    attn[:, 5:15] = 1.0  # ten patches hold all the attention
    for seed in range(5):
        ids = attentive_keep(attn, 10, gen(seed))
        assert torch.equal(ids.sort(1).values, torch.arange(5, 15).expand(3, 10))
    zero = torch.zeros(2, 10)
    zero[:, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # zero attention is never kept before the rest
    assert (attentive_keep(zero, 4, gen(0)) < 4).all()


def test_attentive_noise_reproduces_the_official_ids_keep_in_order():
    attn = cls_attention(torch.rand(3, 2, 65, 65, generator=gen(4)).softmax(-1))
    noise = attentive_noise(attn, 0.75, gen(5))
    order = torch.multinomial(attn, 64, replacement=False, generator=gen(5))
    assert torch.equal(noise.argsort(1), order)
    ids_keep, _, _, mask = random_masking_ids(noise, 16)
    assert torch.equal(ids_keep, order[:, :16])  # same patches, same order as the official x_masked
    assert torch.equal(mask.bool(), noise >= 1) and (mask.sum(1) == 48).all()
    assert ((noise >= 0) & (noise < 2)).all()


def test_attentive_errors():
    attn = torch.rand(2, 8)
    for call, msg in [(lambda: attentive_keep(attn, 8), "len_keep=8 masks no patch of 8"),
                      (lambda: attentive_keep(attn, 0), "len_keep must be a positive integer"),
                      (lambda: attentive_keep(attn[0], 2), r"cls_attn must be a floating tensor \[N, L\]"),
                      (lambda: attentive_keep(attn.long(), 2), "cls_attn must be a floating tensor"),
                      (lambda: attentive_keep(-attn, 2), "finite and non-negative"),
                      (lambda: attentive_keep(attn.masked_fill(attn > 0.5, math.nan), 2), "finite and non-negative"),
                      (lambda: attentive_keep(torch.zeros(2, 8), 2), "all zero"),
                      (lambda: attentive_noise(attn, 0.95), "leaves no visible patch of 8"),
                      (lambda: attentive_noise(attn, 0.0), "masks no patch of 8")]:
        with pytest.raises(ValueError, match=msg):
            call()


# ============================================================================ 5. VideoMAE
def test_tube_mask():
    g = gen(0)
    masks = torch.stack([tube_mask(8, 14, 14, 0.9, g) for _ in range(4)])
    assert masks.shape == (4, 8 * 196) and masks.dtype == torch.bool
    assert (masks.sum(1) == 8 * int(0.9 * 196)).all()
    slices = masks.view(4, 8, 196)
    assert (slices == slices[:, :1]).all() and not (slices[0, 0] == slices[1, 0]).all()
    assert torch.equal(tube_mask(8, 14, 14, 0.9, gen(0)), masks[0])
    want = torch.zeros(196, dtype=torch.bool)
    want[torch.randperm(196, generator=gen(0))[:176]] = True  # the draw: one randperm per clip
    assert torch.equal(masks[0, :196], want)


def test_random_mask():
    g = gen(0)
    masks = torch.stack([random_mask(8, 7, 7, 0.75, g) for _ in range(4)])
    assert (masks.sum(1) == int(0.75 * 8 * 49)).all()
    assert not (masks.view(4, 8, 49) == masks.view(4, 8, 49)[:, :1]).all()  # not tubes
    assert torch.equal(random_mask(8, 7, 7, 0.75, gen(0)), masks[0])


@pytest.mark.parametrize("kind", [tube_mask, random_mask])
def test_video_mask_errors(kind):
    for args, msg in [((2, 2, 2, 1.0), r"mask_ratio must be a number in \[0, 1\)"),
                      ((2, 2, 2, "0.5"), "mask_ratio must be a number"),
                      ((1, 2, 2, 0.1), "masks no tubelet"),
                      ((0, 2, 2, 0.5), "num_frames_tokens must be a positive integer"),
                      ((2, 2.0, 2, 0.5), "grid_h must be a positive integer")]:
        with pytest.raises(ValueError, match=msg):
            kind(*args)


def test_masking_does_not_import_the_video_module():
    tree = ast.parse(inspect.getsource(masking))
    names = [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any("video" in x for x in names + modules), (names, modules)


# ============================================================================ 6. VideoMAE V2
def test_running_cell_hand_checked_patterns():
    # ratio 0.5: queue [1, 1, 0, 0]; slice t reads slots (offset + t + 1 + k) % 4, k = 2*row + col in the cell
    got = running_cell_mask(3, 2, 4, 0.5, offset=0).view(3, 2, 4).int()
    want = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]],   # slots 1 2 3 0 -> 1 0 / 0 1
                         [[0, 0, 0, 0], [1, 1, 1, 1]],   # slots 2 3 0 1 -> 0 0 / 1 1
                         [[0, 1, 0, 1], [1, 0, 1, 0]]])  # slots 3 0 1 2 -> 0 1 / 1 0
    assert torch.equal(got, want)
    # ratio 0.25: queue [1, 0, 0, 0]; ratio 0.75: queue [1, 1, 1, 0]; offset 2, one slice: slots 3 0 1 2
    assert torch.equal(running_cell_mask(1, 2, 2, 0.25, offset=2).int(), torch.tensor([0, 1, 0, 0]))
    assert torch.equal(running_cell_mask(1, 2, 2, 0.75, offset=2).int(), torch.tensor([0, 1, 1, 1]))
    # the cell tiles the frame; 4x4 grid, offset 3, slice 0: slots 0 1 2 3 -> 1 1 / 0 0
    tiled = running_cell_mask(1, 4, 4, 0.5, offset=3).view(4, 4).int()
    assert torch.equal(tiled, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]).repeat(2, 1))


def test_running_cell_runs_and_draws_its_offset():
    mask = running_cell_mask(8, 14, 14, 0.5, offset=1).view(8, 14, 14)
    assert (mask.sum((1, 2)) == 98).all()
    shifted = running_cell_mask(8, 14, 14, 0.5, offset=2).view(8, 14, 14)
    assert torch.equal(mask[1:], shifted[:-1])  # one slot per time slice
    draws = {running_cell_mask(2, 2, 2, generator=gen(s)).tolist().__repr__() for s in range(40)}
    assert len(draws) == 4  # the four official maps
    assert torch.equal(running_cell_mask(4, 4, 4, generator=gen(9)), running_cell_mask(4, 4, 4, generator=gen(9)))
    offset = int(torch.randint(0, 4, (), generator=gen(9)))
    assert torch.equal(running_cell_mask(4, 4, 4, generator=gen(9)), running_cell_mask(4, 4, 4, offset=offset))


def test_running_cell_errors():
    for args, kw, msg in [((2, 3, 4), {}, "needs an even grid"), ((2, 4, 4, 0.2), {}, "drops 0 of the 4 tokens"),
                          ((2, 4, 4, 1.0), {}, r"mask_ratio must be a number in \[0, 1\)"),
                          ((0, 4, 4), {}, "num_frames_tokens must be a positive integer"),
                          ((2, 4, 4), dict(offset=4), r"offset must be an integer in \[0, 4\)")]:
        with pytest.raises(ValueError, match=msg):
            running_cell_mask(*args, **kw)


# ============================================================================ 7. schedule
def test_schedule_endpoints_and_midpoint():
    lin = MaskRatioSchedule.parse("0.6:0.9")
    assert lin == MaskRatioSchedule(0.6, 0.9, "linear")
    assert lin.ratio_at(0) == 0.6 and lin.ratio_at(1) == pytest.approx(0.9) and lin.ratio_at(0.5) == pytest.approx(0.75)
    cos = MaskRatioSchedule.parse("0.9:0.6:Cosine")
    assert cos.mode == "cosine" and cos.ratio_at(0) == 0.9 and cos.ratio_at(1) == pytest.approx(0.6)
    assert cos.ratio_at(0.5) == pytest.approx(0.75)
    assert cos.ratio_at(0.25) == pytest.approx(0.6 + 0.3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lin.ratio_at(0.25) == pytest.approx(0.675)
    # epoch form: progress (epoch + step / steps_per_epoch) / epochs
    assert lin.ratio_at(5, 50, 100, 10) == pytest.approx(lin.ratio_at(0.55))
    assert lin.ratio_at(10, 0, 100, 10) == pytest.approx(0.9)


def test_schedule_errors():
    for spec, msg in [("0.6", "is 'START:END' or 'START:END:MODE'"), ("a:b", "is 'START:END'"),
                      ("0.1:0.2:0.3:0.4", "is 'START:END'"), (0.5, "is 'START:END'"),
                      ("1.0:0.5", r"start ratio must be a number in \[0, 1\)"),
                      ("0.5:-0.1", r"end ratio must be a number in \[0, 1\)"),
                      ("0.5:0.7:step", "mode must be 'linear' or 'cosine'")]:
        with pytest.raises(ValueError, match=msg):
            MaskRatioSchedule.parse(spec)
    s = MaskRatioSchedule(0.5, 0.9)
    for args, msg in [((1.5,), r"progress must be a number in \[0, 1\]"), ((True,), "progress must be"),
                      ((1, 100, 100, 10), "step=100 is not below steps_per_epoch=100"),
                      ((10, 1, 100, 10), "beyond the 10 epochs"), ((1, 2), "give either progress alone"),
                      ((-1, 0, 100, 10), "epoch must be an integer >= 0"),
                      ((1, 0, 0, 10), "steps_per_epoch must be a positive integer")]:
        with pytest.raises(ValueError, match=msg):
            s.ratio_at(*args)
    s.check(196)
    with pytest.raises(ValueError, match="the schedule's end ratio: mask_ratio=0.9 leaves no visible patch of 4"):
        s.check(4)
    with pytest.raises(ValueError, match="the schedule's start ratio: .*masks no patch"):
        MaskRatioSchedule(0.0, 0.5).check(16)


# ============================================================================ fastmae pretrain --mask_type
@pytest.mark.parametrize("kind", ["uniform", "block"])
def test_image_masking_noise_keeps_the_strategys_patches(kind):
    """ImageMasking's noise, through the model's own masking (keep the K smallest), removes exactly
    the strategy's patches: one kept per 2x2 window (uniform), exactly L - K removed (block)."""
    from fastmae.ops import random_masking_ids

    draw = masking.ImageMasking(kind, (8, 8), 0.75)
    gen = torch.Generator().manual_seed(0)
    noise = torch.stack([draw(gen) for _ in range(4)])
    _, _, _, mask = random_masking_ids(noise, int(64 * 0.25))
    assert (mask.sum(1) == 48).all()
    if kind == "uniform":
        windows = mask.view(4, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(4, 16, 4)
        assert ((1 - windows).sum(-1) == 1).all()
    else:  # block masks are made of rectangles: more masked neighbours than random masks have
        assert (mask == (noise >= 1).float()).all()
    again = draw(torch.Generator().manual_seed(0))
    assert torch.equal(again, noise[0])


@pytest.mark.parametrize("args, message", [
    (dict(mask_type="uniform", grid=(8, 8), mask_ratio=0.6), "uniform masking keeps one patch of every 2x2 window"),
    (dict(mask_type="uniform", grid=(7, 8), mask_ratio=0.75), "even"),
    (dict(mask_type="block", grid=(2, 2), mask_ratio=0.5), "block masking places blocks of at least 4 patches"),
    (dict(mask_type="tube", grid=(4, 4)), "unknown image mask type 'tube'"),
])
def test_image_masking_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        masking.ImageMasking(**args)


def test_pretrain_mask_types_and_schedule(tmp_path):
    """fastmae pretrain --mask_type block / uniform trains (the checkpoint records it, visualize draws
    those masks); --mask_ratio_schedule moves the step's ratio with training progress; bad
    combinations are refused."""
    from trainkit import pretrain_args

    from fastmae import data, train
    from fastmae.visualize import visualize

    for kind in ("block", "uniform"):
        out = tmp_path / kind
        train.pretrain(pretrain_args(out, "--mask_type", kind, "--max-steps", 2), dataset=data.EmbeddedDigits("train"))
        ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
        assert ckpt["args"]["mask_type"] == kind
        assert visualize(str(out / "checkpoint-last.pth"), out=str(out / "pic.png")) == str(out / "pic.png")
    recipe = train.Pretraining(pretrain_args(tmp_path / "s", "--mask_ratio_schedule", "0.5:0.9"))
    recipe.args.lr = 1e-3  # the engine completes it from --blr before training
    ratios = []
    for epoch in (0.0, 1.0, 2.0):  # --epochs 2
        recipe.learning_rate(epoch)
        ratios.append(recipe.mask_ratio())
    assert ratios == pytest.approx([0.5, 0.7, 0.9])
    for extra, message in ((["--mask_type", "attention"], "attention needs a teacher"),
                           (["--mask_type", "block", "--mask_ratio_schedule", "0.5:0.9"], "fixes it"),
                           (["--mask_type", "uniform", "--mask_ratio", "0.6"], "must be 0.75"),
                           (["--mask_ratio_schedule", "0.5:1.0"], "end")):
        with pytest.raises(ValueError, match=message):
            train.pretrain(pretrain_args(tmp_path / "bad", *extra), dataset=data.EmbeddedDigits("train"))
