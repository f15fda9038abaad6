"""The masking strategies of the MAE family, as plain functions drawing from a ``torch.Generator``.

Every random draw comes from the ``generator`` argument (``None``: torch's default generator), so
the same generator state gives the same mask: runs are reproducible and resumable. Masks are
built on the CPU (the attentive ones on the attention's device).

Representation. A boolean mask is ``[L]`` or ``[N, L]`` with True = masked (removed), patches in
row-major order, as the official code's ``mask``. The MAE model (``fastmae.reference``,
``fastmae.model``, ``fastmae.ops.random_masking_ids``) takes a *noise* ``[N, L]`` instead and keeps
the ``K = int(L * (1 - mask_ratio))`` patches of smallest noise, in ascending-noise order. Every
image strategy therefore also comes as noise, float32, whose K smallest entries are exactly the
kept patches: ``mask_to_noise(mask, generator)`` gives kept patches values in [0, 1) and masked
ones values in [1, 2), in random order within each. The encoder drops tokens, so every sample of a
batch must keep the same K; ``exact_mask_ratio(L, num_masked)`` gives the ``mask_ratio`` to pass
with the noise so that the model's ``int(L * (1 - mask_ratio))`` is exactly that K.

Strategies:

- ``random_noise``: the official MAE masking (``torch.rand`` noise);
- ``uniform_mask``: UM-MAE's uniform masking (``--mask_regular``, one kept patch per 2x2 window)
  and its secondary masking (``--vis_mask_ratio``);
- ``block_mask``: BEiT's block-wise ``MaskingGenerator``, optionally made exact (``fix_mask_count``);
- ``cls_attention``, ``attentive_keep``, ``attentive_noise``: MaskAlign's attentive masking;
- ``tube_mask``, ``random_mask``: VideoMAE's tube and plain spatio-temporal masking (one clip);
- ``running_cell_mask``: VideoMAE V2's running-cell decoder masking (one clip);
- ``MaskRatioSchedule``: a linear or cosine mask-ratio schedule over training;
- ``ImageMasking`` / ``sample_noise``: one image's noise for ``fastmae pretrain --mask_type``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import num_kept

__all__ = [
    "IMAGE_MASK_TYPES", "ImageMasking", "MaskRatioSchedule", "sample_noise", "attentive_keep", "attentive_noise", "block_mask", "cls_attention", "exact_mask_ratio",
    "fix_mask_count", "mask_to_noise", "random_mask", "random_noise", "running_cell_mask", "tube_mask",
    "uniform_mask",
]

_BELOW_TWO = 2.0 - 2.0 ** -23  # the largest float32 below 2: masked noise stays in [1, 2)


# ============================================================================ argument checks
def _int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _even_grid(grid_h, grid_w, what: str) -> None:
    _int("grid_h", grid_h)
    _int("grid_w", grid_w)
    if grid_h % 2 or grid_w % 2:
        raise ValueError(f"{what} needs an even grid (2x2 windows), got {grid_h}x{grid_w}")


def _rows(mask, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (1, 2) or not mask.numel():
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a non-empty bool tensor [L] or [N, L] (True = masked), got {got}")
    return mask if mask.dim() == 2 else mask[None]


# ============================================================================ the representation
def mask_to_noise(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise (float32, of the mask's shape) whose smallest entries are exactly the mask's kept
    patches: kept in [0, 1), masked in [1, 2), random order within each. Every sample must mask the
    same number of patches, at least one and not all."""
    rows = _rows(mask)
    counts = rows.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every sample must mask the same number of patches (the encoder drops tokens), got "
                         f"counts {sorted(set(counts.tolist()))}; make them equal with fix_mask_count")
    masked, L = int(counts[0]), rows.shape[1]
    if masked == L:
        raise ValueError(f"the mask keeps no patch of {L}: the encoder needs at least one")
    if masked == 0:
        raise ValueError(f"the mask masks no patch of {L}: the loss (mean over masked patches) would be undefined")
    u = torch.rand(rows.shape, generator=generator, device=mask.device)
    return torch.where(rows, (u + 1).clamp_max_(_BELOW_TWO), u).view(mask.shape)


def exact_mask_ratio(num_patches: int, num_masked: int) -> float:
    """The mask ratio r, as close to num_masked / num_patches as floats allow, for which the
    official ``int(L * (1 - r))`` keeps exactly ``num_patches - num_masked`` patches (the plain
    quotient often keeps one fewer: 1 - 4/5 = 0.19999999999999996)."""
    L, M = _int("num_patches", num_patches), _int("num_masked", num_masked)
    if M >= L:
        raise ValueError(f"num_masked={M} keeps no patch of {L}")
    ratio, keep = M / L, L - M
    while int(L * (1 - ratio)) < keep:
        ratio = math.nextafter(ratio, 0.0)
    while int(L * (1 - ratio)) > keep:
        ratio = math.nextafter(ratio, 1.0)
    return ratio


def fix_mask_count(mask: torch.Tensor, num_masked: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``mask`` with exactly ``num_masked`` masked patches per sample: masks random
    unmasked patches where there are too few, unmasks random masked ones where there are too many."""
    rows = _rows(mask).clone()
    target = _int("num_masked", num_masked, low=0)
    if target > rows.shape[1]:
        raise ValueError(f"num_masked={target} exceeds the {rows.shape[1]} patches")
    for row in rows:
        count = int(row.sum())
        if count != target:
            pool = (~row if count < target else row).nonzero().flatten()
            pick = pool[torch.randperm(len(pool), generator=generator)[:abs(target - count)].to(pool.device)]
            row[pick] = count < target
    return rows.view(mask.shape)


# ============================================================================ 1. MAE's random masking
def random_noise(N: int, L: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official MAE masking: uniform noise ``[N, L]``; the model keeps the
    ``int(L * (1 - mask_ratio))`` patches of smallest noise (the ratio is checked to keep and mask
    at least one)."""
    num_kept(_int("L", L), mask_ratio)
    return torch.rand(_int("N", N), L, generator=generator)


# ============================================================================ 2. UM-MAE
def uniform_mask(N: int, grid_h: int, grid_w: int, vis_mask_ratio: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """UM-MAE's uniform masking and secondary masking: ``(mask, secondary)``, both ``[N, L]`` bool.

    ``mask`` keeps exactly one patch of every 2x2 window (K = L/4; the mask ratio is 0.75, pass
    ``mask_ratio=0.75`` with its noise). As the official ``RandomMaskingGenerator(regular=True)``,
    the window's kept position comes from a shuffled pool holding each of the 4 positions equally
    often (``4 * ceil(windows / 2)`` entries), so positions are balanced across the windows.

    ``secondary`` (over the L patches, True only at kept patches) marks the kept patches the encoder
    replaces by its visible-mask token: ``K - int(K * (1 - vis_mask_ratio))`` random ones per
    sample, the official count. A model that gathers the kept patches with ``ids_keep`` (any order)
    gets them as ``secondary.gather(1, ids_keep)``.
    """
    _int("N", N)
    _even_grid(grid_h, grid_w, "uniform masking")
    ratio = _ratio("vis_mask_ratio", vis_mask_ratio)
    wh, ww = grid_h // 2, grid_w // 2
    windows, L = wh * ww, grid_h * grid_w
    visible = int(windows * (1.0 - ratio))
    if visible < 1:
        raise ValueError(f"vis_mask_ratio={vis_mask_ratio} leaves none of the {windows} kept patches visible")
    pool = 4 * math.ceil(windows / 2)
    picks = torch.stack([torch.randperm(pool, generator=generator)[:windows] % 4 for _ in range(N)])
    kept = F.one_hot(picks, 4).bool().view(N, wh, ww, 2, 2).permute(0, 1, 3, 2, 4).reshape(N, L)
    mask = ~kept
    secondary = torch.zeros_like(mask)
    if visible < windows:  # the official draw: the `visible` kept patches of smallest noise stay
        order = torch.argsort(mask.float() + torch.rand(N, L, generator=generator), dim=1)
        secondary.scatter_(1, order[:, visible:windows], True)
    return mask, secondary


# ============================================================================ 3. BEiT
def _uniform(low: float, high: float, generator) -> float:
    return low + (high - low) * torch.rand((), dtype=torch.float64, generator=generator).item()


def _randint(low: int, high: int, generator) -> int:  # inclusive, as random.randint
    return int(torch.randint(low, high + 1, (), generator=generator))


def _add_block(mask, max_mask_patches, min_num_patches, log_aspect, generator) -> int:
    """BEiT's ``_mask``: up to 10 attempts to place one rectangle adding 1..max_mask_patches
    new patches; returns how many it added (0: every attempt failed)."""
    height, width = mask.shape
    for _ in range(10):
        area = _uniform(min_num_patches, max_mask_patches, generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top, left = _randint(0, height - h, generator), _randint(0, width - w, generator)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_mask_patches:
                block.fill_(True)
                return new
    return 0


def block_mask(N: int, grid_h: int, grid_w: int, num_masking_patches: int, min_num_patches: int = 4,
               max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None, *,
               exact: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT's block-wise ``MaskingGenerator``: ``[N, L]`` bool. Rectangles of ``min_num_patches``
    to ``max_num_patches`` (default: the target) patches, aspect h/w log-uniform in
    [min_aspect, max_aspect] (default max: 1 / min_aspect), strictly smaller than the grid, are added
    until ``num_masking_patches`` are masked or 10 attempts in a row fail, so a sample may mask
    fewer. ``exact=True`` then masks random further patches so that every sample masks exactly
    ``num_masking_patches`` (what an MAE encoder needs)."""
    _int("N", N)
    L = _int("grid_h", grid_h) * _int("grid_w", grid_w)
    target, low = _int("num_masking_patches", num_masking_patches), _int("min_num_patches", min_num_patches)
    if target >= L:
        raise ValueError(f"num_masking_patches={target} keeps no patch of the {grid_h}x{grid_w} grid")
    if low > L:
        raise ValueError(f"min_num_patches={low} is larger than the {grid_h}x{grid_w} grid ({L} patches)")
    high = target if max_num_patches is None else _int("max_num_patches", max_num_patches)
    if high < low:
        raise ValueError(f"max_num_patches={high} is smaller than min_num_patches={low}")
    for name, v in (("min_aspect", min_aspect), ("max_aspect", 1 if max_aspect is None else max_aspect)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    max_aspect = 1 / min_aspect if max_aspect is None else max_aspect
    if min_aspect > max_aspect:
        raise ValueError(f"min_aspect={min_aspect} exceeds max_aspect={max_aspect}")
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    masks = torch.zeros(N, grid_h, grid_w, dtype=torch.bool)
    for mask in masks:
        count = 0
        while count < target:
            delta = _add_block(mask, min(target - count, high), low, log_aspect, generator)
            if delta == 0:
                break
            count += delta
    masks = masks.view(N, L)
    return fix_mask_count(masks, target, generator) if exact else masks


# ============================================================================ 4. MaskAlign
def cls_attention(attn: torch.Tensor) -> torch.Tensor:
    """MaskAlign's importance: a layer's attention ``[N, heads, 1+L, 1+L]`` (the teacher's last
    layer) -> the cls token's attention to the L patches, averaged over heads ``[N, L]``."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[2] < 2 or attn.shape[2] != attn.shape[3]:
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must have shape [N, heads, 1+L, 1+L], got {got}")
    return attn[:, :, 0, 1:].mean(1)


def _check_attention(cls_attn) -> int:
    if not isinstance(cls_attn, torch.Tensor) or cls_attn.dim() != 2 or not cls_attn.is_floating_point():
        got = f"{cls_attn.dtype} of shape {tuple(cls_attn.shape)}" if isinstance(cls_attn, torch.Tensor) else \
            type(cls_attn).__name__
        raise ValueError(f"cls_attn must be a floating tensor [N, L], got {got}")
    if not torch.isfinite(cls_attn).all() or (cls_attn < 0).any():
        raise ValueError("cls_attn must be finite and non-negative (attention weights)")
    if (cls_attn.sum(1) <= 0).any():
        raise ValueError("cls_attn has a sample whose weights are all zero")
    return cls_attn.shape[1]


def _attentive_order(cls_attn, generator) -> torch.Tensor:
    # the official draw: every patch, without replacement, high attention first
    return torch.multinomial(cls_attn, cls_attn.shape[1], replacement=False, generator=generator)


def attentive_keep(cls_attn: torch.Tensor, len_keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskAlign's attentive masking: ``ids_keep [N, len_keep]``, the first ``len_keep`` patches of
    ``torch.multinomial(cls_attn, L, replacement=False)``: patches are kept with probability growing
    with the teacher's attention to them, in the order drawn."""
    L, keep = _check_attention(cls_attn), _int("len_keep", len_keep)
    if keep >= L:
        raise ValueError(f"len_keep={keep} masks no patch of {L}")
    return _attentive_order(cls_attn, generator)[:, :keep]


def attentive_noise(cls_attn: torch.Tensor, mask_ratio: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskAlign's attentive masking as noise ``[N, L]``: its ascending order is the official
    multinomial draw, so the model keeps the official ``ids_keep`` (K = ``int(L * (1 - mask_ratio))``)
    in the official order; kept patches in [0, 1), masked in [1, 2). Mask: ``noise >= 1``."""
    L = _check_attention(cls_attn)
    K = num_kept(L, mask_ratio)
    order = _attentive_order(cls_attn, generator)
    rank = torch.arange(L, device=order.device, dtype=torch.float32)
    value = torch.where(rank < K, rank / K, 1 + (rank - K) / (L - K)).expand(order.shape[0], L)
    return torch.empty(order.shape, device=order.device).scatter_(1, order, value)


# ============================================================================ 5. VideoMAE
def _num_masks(name: str, total: int, mask_ratio) -> int:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    n = int(mask_ratio * total)  # the official rounding
    if n < 1:
        raise ValueError(f"mask_ratio={mask_ratio} masks no tubelet of {total} {name}: the loss would be undefined")
    return n


def _grid(num_frames_tokens, grid_h, grid_w) -> None:
    for name, v in (("num_frames_tokens", num_frames_tokens), ("grid_h", grid_h), ("grid_w", grid_w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def tube_mask(num_frames_tokens: int, grid_h: int, grid_w: int, mask_ratio: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The official ``TubeMaskingGenerator``: one random spatial mask of ``int(mask_ratio * h*w)``
    positions, the same in every time slice. Returns one sample's ``[T' * h * w]`` bool (True = masked)."""
    _grid(num_frames_tokens, grid_h, grid_w)
    hw = grid_h * grid_w
    n = _num_masks("positions per frame", hw, mask_ratio)
    frame = torch.zeros(hw, dtype=torch.bool)
    frame[torch.randperm(hw, generator=generator)[:n]] = True
    return frame.repeat(num_frames_tokens)


def random_mask(num_frames_tokens: int, grid_h: int, grid_w: int, mask_ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain random masking of ``int(mask_ratio * T'*h*w)`` tubelets anywhere in the clip (the
    official ``RandomMaskingGenerator``). Returns one sample's ``[T' * h * w]`` bool (True = masked)."""
    _grid(num_frames_tokens, grid_h, grid_w)
    total = num_frames_tokens * grid_h * grid_w
    n = _num_masks("tubelets", total, mask_ratio)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:n]] = True
    return mask


# ============================================================================ 6. VideoMAE V2
def running_cell_mask(num_frames_tokens: int, grid_h: int, grid_w: int, mask_ratio: float = 0.5,
                      generator: torch.Generator | None = None, *, offset: int | None = None) -> torch.Tensor:
    """VideoMAE V2's ``RunningCellMaskingGenerator``: one clip's decoder mask ``[T' * h * w]`` bool,
    tokens in (t, h, w) order. True (the official 1) = the decoder drops the token; False = the
    decoder reconstructs it (the official model puts mask tokens at ``~decode_mask``).

    Each 2x2 cell reads a 4-slot queue of ``int(4 * mask_ratio)`` ones then zeros, starting at slot
    ``offset + t + 1`` for time slice t (slots in row-major cell order), so the pattern runs one slot
    per slice; the same cell tiles the frame. ``offset`` (0..3) is drawn from the generator unless given.
    """
    _grid(num_frames_tokens, grid_h, grid_w)
    _even_grid(grid_h, grid_w, "running-cell masking")
    ratio = _ratio("mask_ratio", mask_ratio)
    drops = int(4 * ratio)
    if not 0 < drops < 4:
        raise ValueError(f"mask_ratio={mask_ratio} drops {drops} of the 4 tokens of a 2x2 cell; it must drop 1 to 3")
    if offset is None:
        offset = _randint(0, 3, generator)
    elif isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 4:
        raise ValueError(f"offset must be an integer in [0, 4), got {offset!r}")
    t = torch.arange(num_frames_tokens).view(-1, 1, 1)
    slot = 2 * (torch.arange(grid_h) % 2).view(1, -1, 1) + (torch.arange(grid_w) % 2).view(1, 1, -1)
    return ((slot + offset + t + 1) % 4 < drops).flatten()


# ============================================================================ 7. schedule
@dataclass(frozen=True)
class MaskRatioSchedule:
    """A mask ratio going from ``start`` to ``end`` over training, ``linear`` or ``cosine``
    (half a cosine: flat at both ends). ``parse("0.6:0.9")`` / ``parse("0.6:0.9:cosine")``."""

    start: float
    end: float
    mode: str = "linear"

    def __post_init__(self):
        _ratio("start ratio", self.start)
        _ratio("end ratio", self.end)
        if self.mode not in ("linear", "cosine"):
            raise ValueError(f"mode must be 'linear' or 'cosine', got {self.mode!r}")

    @classmethod
    def parse(cls, spec: str) -> "MaskRatioSchedule":
        parts = spec.split(":") if isinstance(spec, str) else []
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            start, end = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"a mask-ratio schedule is 'START:END' or 'START:END:MODE' (MODE linear or cosine), "
                             f"got {spec!r}") from None
        return cls(start, end, parts[2].strip().lower() if len(parts) == 3 else "linear")

    def ratio_at(self, progress, step=None, steps_per_epoch=None, epochs=None) -> float:
        """The ratio at ``progress`` in [0, 1], or at ``(epoch, step, steps_per_epoch, epochs)``:
        progress ``(epoch + step / steps_per_epoch) / epochs``, as MAE's per-step lr schedule."""
        if (step, steps_per_epoch, epochs) != (None, None, None):
            if None in (step, steps_per_epoch, epochs):
                raise ValueError("give either progress alone or epoch, step, steps_per_epoch and epochs")
            epoch, spe = _int("epoch", progress, 0), _int("steps_per_epoch", steps_per_epoch)
            total = _int("epochs", epochs)
            if _int("step", step, 0) >= spe:
                raise ValueError(f"step={step} is not below steps_per_epoch={spe}")
            progress = (epoch + step / spe) / total
            if progress > 1:
                raise ValueError(f"epoch {epoch} step {step} lies beyond the {total} epochs")
        elif isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0 <= progress <= 1:
            raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
        if self.mode == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    def check(self, num_patches: int) -> None:
        """Every ratio of the schedule keeps and masks at least one of ``num_patches`` patches
        (the ratios lie between the endpoints, and K is monotone in the ratio)."""
        for name, ratio in (("start", self.start), ("end", self.end)):
            try:
                num_kept(num_patches, ratio)
            except ValueError as e:
                raise ValueError(f"the schedule's {name} ratio: {e}") from None


# ============================================================================ 8. per-sample noise for training
IMAGE_MASK_TYPES = ("random", "uniform", "block")


@dataclass(frozen=True)
class ImageMasking:
    """One image's masking noise ``[L]`` for the MAE's ``forward(noise=...)``, by ``--mask_type``:
    ``random`` (``torch.rand``: the official masking), ``uniform`` (UM-MAE: one kept patch per 2x2
    window; the mask ratio is 0.75) or ``block`` (BEiT's blocks, topped up to exactly the
    ``L - int(L * (1 - mask_ratio))`` patches the model removes). Drawn from ``generator`` (None:
    torch's default generator, which the data pipeline seeds per sample)."""

    mask_type: str
    grid: tuple[int, int]
    mask_ratio: float = 0.75

    def __post_init__(self):
        if self.mask_type not in IMAGE_MASK_TYPES:
            raise ValueError(f"unknown image mask type {self.mask_type!r}; choose one of {', '.join(IMAGE_MASK_TYPES)}")
        h, w = (_int("grid_h", self.grid[0]), _int("grid_w", self.grid[1]))
        keep = num_kept(h * w, self.mask_ratio)
        if self.mask_type == "uniform":
            _even_grid(h, w, "uniform masking")
            if keep != h * w // 4:
                raise ValueError(f"uniform masking keeps one patch of every 2x2 window (a quarter): --mask_ratio must "
                                 f"be 0.75, got {self.mask_ratio}")
        if self.mask_type == "block" and h * w - keep < 4:
            raise ValueError(f"block masking places blocks of at least 4 patches, but mask_ratio={self.mask_ratio} "
                             f"removes {h * w - keep} of the {h}x{w} grid")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = self.grid
        if self.mask_type == "random":
            return torch.rand(h * w, generator=generator)
        if self.mask_type == "uniform":
            mask, _ = uniform_mask(1, h, w, 0.0, generator)
        else:
            masked = h * w - num_kept(h * w, self.mask_ratio)
            mask = block_mask(1, h, w, masked, exact=True, generator=generator)
        return mask_to_noise(mask, generator)[0]


def sample_noise(masking) -> torch.Tensor:
    """One sample's masking noise ``[L]`` from torch's default generator: ``masking`` is the patch
    count (random masking: ``torch.rand(L)``, as the official ``random_masking``) or an
    :class:`ImageMasking`."""
    return masking() if isinstance(masking, ImageMasking) else torch.rand(masking)
