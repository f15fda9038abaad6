"""The VideoMAE pre-training step the video benchmarks time and measure, shared by
``bench/test_bench_video.py`` (speed) and ``bench/memory.py --model video`` (peak memory, fresh
process): fastmae's ``PretrainVisionTransformer`` (``fastmae.video``) against its plain-PyTorch
twin (``reference_impl=True``: the official ``modeling_pretrain.py`` computation, i.e. the model as
VideoMAE's users run it).

A step is the official ``engine_for_pretraining`` step without its data transforms:
``zero_grad(set_to_none=True)``; under the chosen precision (fp32, or bf16 autocast; as officially,
the loss inside the autocast region) the model's forward on the clips and their tube masks
(``num_masked`` passed, so the fast model traces as one graph) and ``videomae_loss(videos, mask,
outputs, 16, 2, normalize_target=True)``; ``backward``; one ``AdamW(fused=True)`` step over every
parameter (one group, lr 1.5e-4, betas (0.9, 0.95), weight decay 0.05: the official recipe's
optimizer without its no-weight-decay group, which costs the optimizer the same on both sides).
No stochastic depth (``drop_path_rate=0``, the official pre-training default): the step is
deterministic and the same work on both sides.

The fast providers compute the loss with ``videomae_loss`` (fastmae's fused loss: the targets of
the masked tubelets are never stored); the reference providers with ``official_loss``, the official
script's computation as written (the whole clip un-normalised, rearranged into tubelets and
normalised, the masked ones selected by boolean indexing, ``MSELoss``), so the reference is the step
VideoMAE's users run.

Providers (every one gets the same step, weights, clips and masks):

- ``fast-compiled``: ``torch.compile(fastmae model, fullgraph=True)``;
- ``ref-compiled``: ``torch.compile(reference model)`` with the defaults, as a user would (its
  boolean indexing breaks the graph);
- ``ref-eager`` / ``fast-eager``: the models without compilation.

Both models hold the weights the reference draws from the seed (the fast one loads its
state_dict with ``strict=True``). Clips are standard normal (seeded); masks are the official tube
masks (``tube_mask``, ratio 0.9, one seeded generator drawing each sample's mask in turn).

Configurations (tubelets 2 x 16 x 16, decoder depth 4 as the official run scripts set it):

- ``vits``: ``pretrain_videomae_small_patch16_224`` at 16x224x224 (encoder 384-d x 12, 6 heads;
  decoder 192-d x 4, 3 heads; 1568 tubelets, 160 visible), batch 2 (``FASTMAE_BENCH_BATCH``);
- ``vitb``: ``pretrain_videomae_base_patch16_224`` at 16x224x224 (encoder 768-d x 12, 12 heads;
  decoder 384-d x 4, 6 heads), batch 1 (``FASTMAE_BENCH_BATCH``);
- ``small``: the ViT-S widths at 8x64x64 (64 tubelets, 8 visible), batch 4
  (``FASTMAE_BENCH_SMALL_BATCH``): a step of about a tenth of a second on 2 cores, for the quick
  tier and smoke runs; small GEMMs, so per-kernel overheads weigh more than at 224.

``FASTMAE_BENCH_SMOKE=1``: batch 1 in every configuration unless the batch knob is set.

FLOPs per clip are counted (``FlopCounterMode`` on the reference model's forward, loss and
backward: every GEMM, the Conv3d patch embedding and the attention matmuls), not assumed.
"""
from __future__ import annotations

import torch

from fastmae.bench.model_step import precision_context
from fastmae.config import bench_setting

PATCH, TUBELET = 16, 2
MASK_RATIO = 0.9
CONFIGS = {
    "vits": dict(title="ViT-S/16 VideoMAE at 16x224x224 (encoder 384-d x 12, decoder 192-d x 4; 1568 tubelets, "
                       "90% tube masking)",
                 name="pretrain_videomae_small_patch16_224", kwargs=dict(decoder_depth=4), frames=16, img=224,
                 batch_env="FASTMAE_BENCH_BATCH", default_batch=2),
    "vitb": dict(title="ViT-B/16 VideoMAE at 16x224x224 (encoder 768-d x 12, decoder 384-d x 4; 1568 tubelets, "
                       "90% tube masking)",
                 name="pretrain_videomae_base_patch16_224", kwargs=dict(decoder_depth=4), frames=16, img=224,
                 batch_env="FASTMAE_BENCH_BATCH", default_batch=1),
    "small": dict(title="ViT-S-width VideoMAE at 8x64x64 (encoder 384-d x 12, decoder 192-d x 4; 64 tubelets, "
                        "90% tube masking)",
                  name="pretrain_videomae_small_patch16_224", kwargs=dict(decoder_depth=4, img_size=64, num_frames=8),
                  frames=8, img=64, batch_env="FASTMAE_BENCH_SMALL_BATCH", default_batch=4),
}
PROVIDERS = ("fast-compiled", "ref-compiled", "ref-eager", "fast-eager")
IMPLS = ("fast", "ref")
PRECISIONS = ("fp32", "bf16")

SMOKE = bench_setting("FASTMAE_BENCH_SMOKE", "0") == "1"


def batch_size(config: str) -> int:
    cfg = CONFIGS[config]
    return int(bench_setting(cfg["batch_env"], "1" if SMOKE else str(cfg["default_batch"])))


def build_model(config: str, impl: str, seed: int = 0) -> torch.nn.Module:
    """The fast model (``impl='fast'``) or its reference twin (``'ref'``) in training mode; both
    hold the weights the reference draws from ``seed``."""
    from fastmae.video import create_videomae

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    ref = create_videomae(cfg["name"], reference_impl=True, **cfg["kwargs"])
    if impl == "ref":
        return ref.train()
    fast = create_videomae(cfg["name"], **cfg["kwargs"])
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast.train()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def make_batch(config: str, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random clips ``[B, 3, T, H, W]``, their tube masks ``[B, N]`` (True = masked) and the masked
    count of every sample."""
    from fastmae.video import tube_mask

    cfg = CONFIGS[config]
    frames, img = cfg["frames"], cfg["img"]
    gen = torch.Generator().manual_seed(seed)
    videos = torch.randn(batch, 3, frames, img, img, generator=gen)
    mask = torch.stack([tube_mask(frames // TUBELET, img // PATCH, img // PATCH, MASK_RATIO, generator=gen)
                        for _ in range(batch)])
    return videos, mask, int(mask[0].sum())


def official_loss(videos: torch.Tensor, mask: torch.Tensor, outputs: torch.Tensor, patch: int = PATCH,
                  tubelet: int = TUBELET, normalize_target: bool = True) -> torch.Tensor:
    """``engine_for_pretraining.train_one_epoch``'s loss as written: targets of the whole clip (fp32,
    no gradient), the masked ones selected, then ``MSELoss`` (fp32 under autocast, as its policy)."""
    import torch.nn.functional as F

    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD

    with torch.no_grad():
        mean = torch.as_tensor(IMAGENET_MEAN, device=videos.device)[None, :, None, None, None]
        std = torch.as_tensor(IMAGENET_STD, device=videos.device)[None, :, None, None, None]
        unnorm = videos * std + mean
        B, C, T, H, W = unnorm.shape
        t, p = tubelet, patch
        # 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'
        x = unnorm.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        x = x.reshape(B, -1, t * p * p, C)
        if normalize_target:
            x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        x = x.reshape(B, x.shape[1], -1)  # 'b n p c -> b n (p c)'
        labels = x[mask].reshape(B, -1, x.shape[-1])
    return F.mse_loss(outputs.float(), labels)


def _is_reference(model) -> bool:
    return bool(getattr(getattr(model, "_orig_mod", model), "reference_impl", False))


def step_loss(model, videos, mask, num_masked: int) -> torch.Tensor:
    """The forward and the loss (call under the precision context): the fused ``videomae_loss`` for
    the fast model, ``official_loss`` for the reference."""
    from fastmae.video import videomae_loss

    outputs = model(videos, mask, num_masked)
    if _is_reference(model):
        return official_loss(videos, mask, outputs)
    return videomae_loss(videos, mask, outputs, PATCH, TUBELET, normalize_target=True)


def train_step(model, opt, videos, mask, num_masked: int, precision: str) -> None:
    """One pre-training step: forward and loss under the precision context, backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = step_loss(model, videos, mask, num_masked)
    loss.backward()
    opt.step()


def compile_model(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """fullgraph for the fast model; the reference with torch.compile's defaults, as a user would."""
    return torch.compile(model, fullgraph=(impl == "fast"))


def counted_flops(config: str, precision: str = "fp32") -> float:
    """FLOPs of one step's forward + loss + backward per clip, counted on the reference model
    (explicit attention, so its matmuls are counted; the optimizer's elementwise work is not)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config, "ref")
    videos, mask, num_masked = make_batch(config, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        with precision_context(precision):
            loss = step_loss(model, videos, mask, num_masked)
        loss.backward()
    return float(counter.get_total_flops())


def compare(a: torch.nn.Module, b: torch.nn.Module, videos, mask, num_masked: int) -> tuple[float, float, float]:
    """The fp32 losses of the two models on the same clips and masks, and the largest absolute
    difference of their outputs (no_grad)."""
    from fastmae.video import videomae_loss

    with torch.no_grad():
        out_a, out_b = a(videos, mask, num_masked), b(videos, mask, num_masked)
        loss_a, loss_b = (float(official_loss(videos, mask, out) if _is_reference(m) else
                                videomae_loss(videos, mask, out, PATCH, TUBELET, normalize_target=True))
                          for m, out in ((a, out_a), (b, out_b)))
        return loss_a, loss_b, float((out_a - out_b).abs().max())
