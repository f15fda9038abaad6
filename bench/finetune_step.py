"""The fine-tuning step and the feature extraction the fine-tuning benchmarks time and measure,
shared by ``bench/test_bench_finetune.py`` (speed) and ``bench/memory.py --model finetune`` (peak
memory, fresh process): fastmae's classifier (``fastmae.vit``, the drop-in for the official
``models_vit``) against timm's ``VisionTransformer`` of the same architecture.

A step is ``zero_grad(set_to_none=True)``, the classifier's forward (``global_pool=True``: the
mean of the patch tokens, then ``fc_norm``, then the head) and the cross-entropy against random
labels under the chosen precision (as the official ``engine_finetune`` does, the loss inside
autocast), ``backward`` and one ``AdamW(fused=True)`` step over every parameter (one group,
betas (0.9, 0.999), weight decay 0.05: the official recipe's optimizer without its layer-wise lr
decay groups, which cost the optimizer the same on both sides). No mixup, no label smoothing, no
stochastic depth (``drop_path_rate=0``): the step is deterministic and the same work on both sides.

Providers (every one gets the same step, weights, images and labels):

- ``fast-compiled``: ``torch.compile(fastmae classifier, fullgraph=True)``;
- ``timm-compiled``: ``torch.compile(timm classifier)`` (defaults, as a user would);
- ``timm-eager`` / ``fast-eager``: the models without compilation.

The timm model is ``timm.create_model("vit_base_patch16_224", pretrained=False,
global_pool="avg", fc_norm=True, num_classes=1000)`` for ``vitb``; for ``small``, timm's
``VisionTransformer`` class with the same image size, patch, width, depth and heads. Both models
hold the weights fastmae's reference classifier draws from the seed (the official state_dict keys
load into timm's model with ``strict=True``); timm's attention is its fused path
(``F.scaled_dot_product_attention``), fastmae's the ``auto`` backend.

Feature extraction is what linear probing and k-NN evaluation run: the model in eval mode, under
``torch.no_grad``, the pooled features before the head (fastmae ``forward_features``; timm
``forward_head(forward_features(x), pre_logits=True)``: the same ``fc_norm(mean of the patch
tokens)``), at ``FEATURE_BATCH_FACTOR`` times the step's batch.

Configurations:

- ``vitb``: ``vit_base_patch16`` at 224x224 (768-d x 12 blocks, 12 heads, 197 tokens), batch 8
  (``FASTMAE_BENCH_BATCH``). About 105 GFLOP per image per step (3x a 35 GFLOP forward).
- ``small``: ``vit_tiny_patch8`` (the demo's encoder: 192-d x 6 blocks, 3 heads) at 64x64
  (65 tokens), batch 64 (``FASTMAE_BENCH_SMALL_BATCH``).

FLOPs per image are counted (``FlopCounterMode`` on fastmae's reference classifier: every GEMM,
the patch embedding and the attention matmuls), not assumed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.config import bench_setting

from fastmae.bench.model_step import precision_context

CONFIGS = {
    "vitb": dict(title="ViT-B/16 classifier at 224x224 (768-d x 12 blocks, 12 heads; 197 tokens; global pool)",
                 name="vit_base_patch16", kwargs=dict(), img=224, timm_name="vit_base_patch16_224",
                 timm_kwargs=None, batch_env="FASTMAE_BENCH_BATCH", default_batch=8),
    "small": dict(title="ViT-Tiny/8 classifier at 64x64 (vit_tiny_patch8: 192-d x 6 blocks, 3 heads; 65 tokens; "
                        "global pool)",
                  name="vit_tiny_patch8", kwargs=dict(img_size=64), img=64, timm_name=None,
                  timm_kwargs=dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
                  batch_env="FASTMAE_BENCH_SMALL_BATCH", default_batch=64),
}
NUM_CLASSES = 1000
PROVIDERS = ("fast-compiled", "timm-compiled", "timm-eager", "fast-eager")
IMPLS = ("fast", "timm", "ref")  # ref: fastmae's reference classifier (models_vit on plain blocks)
PRECISIONS = ("fp32", "bf16")
FEATURE_BATCH_FACTOR = 4  # feature extraction runs at this multiple of the step's batch

SMOKE = bench_setting("FASTMAE_BENCH_SMOKE", "0") == "1"


def batch_size(config: str) -> int:
    cfg = CONFIGS[config]
    return int(bench_setting(cfg["batch_env"], "2" if SMOKE else str(cfg["default_batch"])))


def _reference(config: str, seed: int) -> torch.nn.Module:
    from fastmae.vit import create_vit

    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    return create_vit(cfg["name"], global_pool=True, num_classes=NUM_CLASSES, reference_impl=True, **cfg["kwargs"])


def build_classifier(config: str, impl: str, seed: int = 0) -> torch.nn.Module:
    """fastmae's classifier (``impl='fast'``), its reference twin (``'ref'``) or timm's model of
    the same architecture (``'timm'``), in training mode; all hold the weights the reference
    classifier draws from ``seed``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cfg = CONFIGS[config]
    ref = _reference(config, seed)
    if impl == "ref":
        return ref
    if impl == "fast":
        from fastmae.vit import create_vit

        model = create_vit(cfg["name"], global_pool=True, num_classes=NUM_CLASSES, **cfg["kwargs"])
    else:
        import timm

        if cfg["timm_name"]:
            model = timm.create_model(cfg["timm_name"], pretrained=False, global_pool="avg", fc_norm=True,
                                      num_classes=NUM_CLASSES)
        else:
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(global_pool="avg", fc_norm=True, num_classes=NUM_CLASSES, qkv_bias=True,
                                      **cfg["timm_kwargs"])
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.train()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, fused=True)


def make_batch(config: str, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and random labels."""
    img = CONFIGS[config]["img"]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, img, img, generator=gen),
            torch.randint(0, NUM_CLASSES, (batch,), generator=gen))


def train_step(model, opt, imgs, labels, precision: str) -> None:
    """One fine-tuning step: forward, cross-entropy, backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = F.cross_entropy(model(imgs), labels)
    loss.backward()
    opt.step()


def compile_model(model, impl: str):
    """fullgraph for fastmae's classifier; timm's with torch.compile's defaults."""
    return torch.compile(model, fullgraph=(impl == "fast"))


class Features(torch.nn.Module):
    """The pooled features before the head (what linear probing and k-NN read):
    fastmae ``forward_features``; timm ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: torch.nn.Module, impl: str):
        super().__init__()
        self.model, self.impl = model, impl

    def forward(self, x):
        if self.impl == "timm":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.forward_features(x)


def feature_fn(model, impl: str, precision: str, compiled: bool):
    """A function images -> features in eval mode under no_grad (``model`` is put in eval mode)."""
    model.eval()
    runner = Features(model, impl)
    if compiled:
        runner = torch.compile(runner, fullgraph=(impl != "timm"))

    def run(imgs):
        with torch.no_grad(), precision_context(precision):
            return runner(imgs)

    return run


def counted_flops(config: str, precision: str = "fp32") -> float:
    """FLOPs of one fine-tuning step's forward + backward per image, counted on fastmae's reference
    classifier (explicit attention, so its matmuls are counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_classifier(config, "ref")
    imgs, labels = make_batch(config, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        with precision_context(precision):
            loss = F.cross_entropy(model(imgs), labels)
        loss.backward()
    return float(counter.get_total_flops())


def logits_difference(a: torch.nn.Module, b: torch.nn.Module, imgs: torch.Tensor) -> float:
    """Largest absolute difference of the two models' fp32 logits on ``imgs`` (no_grad)."""
    with torch.no_grad():
        return float((a(imgs) - b(imgs)).abs().max())
