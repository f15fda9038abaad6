"""The MaskAlign pre-training step the MaskAlign benchmarks time and measure, shared by
``bench/test_bench_maskalign.py`` (speed) and ``bench/memory.py --model maskalign`` (peak memory,
fresh process): fastmae's MaskAlign student (``fastmae.maskalign.MaskAlignViT``) against its
plain-PyTorch twin (``reference_impl=True``: the official ``models_pretrain.py`` computation, i.e.
the model as MaskAlign's users run it), both aligned with the same frozen teacher.

The recipe is the one ``fastmae pretrain --objective maskalign`` runs by default (the official
README's: ``fastmae/maskalign_train.py``): attentive masking at ratio 0.7, ``target_norm='whiten'``,
``loss_type='smoothl1'``, ``loss_weights='top5'``, ``fusion_type='linear'``, ``head_type='linear'``;
without stochastic depth (``drop_path_rate=0``), so the step is deterministic and the same work on
every side.

A step is ``zero_grad(set_to_none=True)``; under the chosen precision (fp32, or bf16 autocast) the
frozen teacher's forward on the images (``Teacher(...)(imgs)``: eval, ``no_grad``; with its
last-layer attention, which attentive masking draws from), then the student's forward on the same
images, the teacher's outputs and the fixed masks (below), returning the loss; ``backward``; one
``AdamW(fused=True)`` step over every parameter of the student (one group, lr 1.5e-4, betas (0.9,
0.95), weight decay 0.05: the recipe's optimizer without its no-weight-decay group, which costs the
optimizer the same on both sides). Parameters without a gradient (the final ``norm``, which the
loss never reads, and the heads of the levels weighing 0) are skipped by AdamW on both sides.

The teacher: a fastmae ViT-B/16 encoder (``fastmae.vit.create_vit("vit_base_patch16",
num_classes=0)``; for ``small`` the student's shape) with random weights drawn from a seed (nothing is
downloaded), wrapped in ``Teacher`` (it runs the embedding and the blocks one by one and computes
the last block's attention probabilities from that block's ``qkv``). ONE teacher module serves every
provider, in eager mode: ``fastmae pretrain --compile`` compiles the student only (the engine wraps
the trained model), so an eager teacher is what a compiled run pays, and it is the same cost on both
sides of every comparison. Its share of the step is measured, not assumed: the provider
``teacher-only`` times the teacher's forward alone, under the same precision, in the same cycles.

The masks: the recipe's attentive draw (``draw_ids_keep('attention', ...)``: ``torch.multinomial``
over the teacher's cls attention, seeded), made ONCE per batch, so every provider does the same work
on the same tokens. They reach the models as ``noise`` whose ascending order begins with the drawn
``ids_keep`` (the student is built with ``mask_type='random'``, which keeps the ``K`` patches of
smallest noise in that order: exactly the drawn ``ids_keep``; this is how ``maskalign_train`` passes
its uniform and block masks). Passing ``ids_keep=`` itself would keep the fast model from compiling
as one graph on the CPU: ``forward`` validates a given ``ids_keep`` on the host (``check_distinct``:
``aminmax`` and a sort read back with ``int()``/``bool()``), a data-dependent branch that
``torch.compile(fullgraph=True)`` refuses; with ``noise`` the ``argsort`` is in the graph and the
fast model compiles with ``fullgraph=True``. The draw itself (a multinomial over ``[N, L]``) is
negligible beside the step; the teacher still computes its last attention, as in training.

Providers (every one gets the same teacher, weights, images and masks):

- ``fast-compiled``: ``torch.compile(fastmae student, fullgraph=True)``;
- ``ref-compiled``: ``torch.compile(reference student)`` with the defaults, as a user would;
- ``ref-eager`` / ``fast-eager``: the students without compilation;
- ``teacher-only``: the teacher's forward alone (no student, no backward, no optimizer).

Both students hold the weights the reference draws from the seed (the fast one loads its state_dict
with ``strict=True``). Images are standard normal (seeded).

Configurations:

- ``vitb``: ``maskalign_vit_base_patch16`` at 224x224 (768-d x 12, 12 heads, patch 16; 196 patches,
  58 kept) with a ViT-B/16 teacher (768-d x 12: ``teacher_dim=768, teacher_depth=12``), batch 8
  (``FASTMAE_BENCH_BATCH``);
- ``small``: a ViT-Tiny-width student at 64x64 with patch 8 (192-d x 6, 3 heads; 64 patches, 19 kept)
  and a teacher of the same shape (6 layers, so ``top5`` and ``linear`` fusion apply), batch 32
  (``FASTMAE_BENCH_SMALL_BATCH``): small GEMMs, so per-kernel overheads weigh more than at 224.

``FASTMAE_BENCH_SMOKE=1``: batch 1 in every configuration unless the batch knob is set.

FLOPs per image are counted (``FlopCounterMode``), not assumed, on the reference twins: the
reference student's forward, loss and backward and a reference-block twin of the teacher (the fast
attention is not an op the counter sees). The reference is the official computation: it embeds
every patch and runs every level's head and the whole fusion matrix, work the fast model skips, so
the same count stands for both sides. The teacher's forward is counted separately too.

MAE's own step is not part of this suite: ``bench/test_bench_model.py`` times it
(``FASTMAE_BENCH_CONFIGS=vitb FASTMAE_BENCH_BATCH=8`` for the batch of ``vitb`` here), and the
report shows both when both JSON files are rendered together.
"""
from __future__ import annotations

import torch

from fastmae.bench.model_step import precision_context
from fastmae.config import bench_setting

MASK_RATIO = 0.7
RECIPE = dict(target_norm="whiten", loss_type="smoothl1", loss_weights="top5", fusion_type="linear",
              head_type="linear", drop_path_rate=0.0)
CONFIGS = {
    "vitb": dict(title="ViT-B/16 MaskAlign student at 224x224 (768-d x 12; 58 of 196 patches kept) with a ViT-B/16 "
                       "teacher (768-d x 12)",
                 student="maskalign_vit_base_patch16", student_kwargs=dict(img_size=224),
                 teacher_kwargs=dict(img_size=224), teacher_dim=768, teacher_depth=12, img=224,
                 batch_env="FASTMAE_BENCH_BATCH", default_batch=8),
    "small": dict(title="ViT-Tiny-width MaskAlign student at 64x64, patch 8 (192-d x 6; 19 of 64 patches kept) with "
                        "a teacher of the same shape",
                  student="maskalign_vit_base_patch16",
                  student_kwargs=dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
                  teacher_kwargs=dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
                  teacher_dim=192, teacher_depth=6, img=64, batch_env="FASTMAE_BENCH_SMALL_BATCH", default_batch=32),
}
STUDENT_PROVIDERS = ("fast-compiled", "ref-compiled", "ref-eager", "fast-eager")
PROVIDERS = STUDENT_PROVIDERS + ("teacher-only",)
IMPLS = ("fast", "ref")
PRECISIONS = ("fp32", "bf16")

SMOKE = bench_setting("FASTMAE_BENCH_SMOKE", "0") == "1"


def batch_size(config: str) -> int:
    cfg = CONFIGS[config]
    return int(bench_setting(cfg["batch_env"], "1" if SMOKE else str(cfg["default_batch"])))


def build_teacher(config: str, seed: int = 2, reference_impl: bool = False):
    """The frozen teacher (``fastmae.maskalign.Teacher`` around a fastmae ViT encoder with random
    weights drawn from ``seed``); ``reference_impl``: the same weights on the plain reference blocks
    (for counting FLOPs)."""
    from fastmae.maskalign import Teacher
    from fastmae.vit import create_vit

    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    model = create_vit("vit_base_patch16", num_classes=0, **cfg["teacher_kwargs"])
    if reference_impl:
        twin = create_vit("vit_base_patch16", num_classes=0, reference_impl=True, **cfg["teacher_kwargs"])
        twin.load_state_dict(model.state_dict(), strict=True)
        model = twin
    return Teacher(model, attention=True)


def build_model(config: str, impl: str, seed: int = 0) -> torch.nn.Module:
    """The fast student (``impl='fast'``) or its reference twin (``'ref'``) in training mode; both
    hold the weights the reference draws from ``seed``."""
    from fastmae.maskalign import create_maskalign

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cfg = CONFIGS[config]
    kwargs = dict(cfg["student_kwargs"], teacher_dim=cfg["teacher_dim"], teacher_depth=cfg["teacher_depth"],
                  mask_type="random", **RECIPE)  # the attentive masks come as noise (module doc)
    torch.manual_seed(seed)
    ref = create_maskalign(cfg["student"], reference_impl=True, **kwargs)
    if impl == "ref":
        return ref.train()
    fast = create_maskalign(cfg["student"], **kwargs)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast.train()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def noise_for(ids_keep: torch.Tensor, num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``noise [N, L]`` whose ascending order begins with ``ids_keep [N, K]`` in its order: the kept
    patches get ``0 .. K-1``, the others distinct values in ``[K, K + 1)``, so random masking
    (``argsort(noise)[:, :K]``) returns ``ids_keep`` exactly."""
    N, K = ids_keep.shape
    noise = K + torch.rand(N, num_patches, generator=generator)
    ranks = torch.arange(K, dtype=noise.dtype).expand(N, K).contiguous()
    return noise.scatter_(1, ids_keep, ranks)


def make_batch(config: str, batch: int, teacher, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images ``[B, 3, H, W]``, the recipe's attentive draw ``ids_keep [B, K]`` (from the
    teacher's fp32 last-layer attention on those images, seeded) and the ``noise [B, L]`` that makes
    every model keep exactly those patches."""
    from fastmae.maskalign import draw_ids_keep

    img = CONFIGS[config]["img"]
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, img, img, generator=gen)
    attention = teacher(imgs).attention
    num_patches = attention.shape[-1] - 1
    ids_keep = draw_ids_keep("attention", num_patches, MASK_RATIO, batch, imgs.device, attention=attention,
                             generator=gen)
    return imgs, ids_keep, noise_for(ids_keep, num_patches, gen)


def step_loss(model, teacher, imgs, noise) -> torch.Tensor:
    """The teacher's forward and the student's loss (call under the precision context)."""
    teacher_out = teacher(imgs)  # frozen: eval, no_grad
    return model(imgs, teacher_out, MASK_RATIO, noise=noise).loss


def train_step(model, opt, teacher, imgs, noise, precision: str) -> None:
    """One pre-training step: the teacher and the student's loss under the precision context,
    backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = step_loss(model, teacher, imgs, noise)
    loss.backward()
    opt.step()


def teacher_step(teacher, imgs, precision: str) -> None:
    """The teacher's forward alone, as the step runs it (the ``teacher-only`` provider)."""
    with precision_context(precision):
        teacher(imgs)


def compile_model(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """fullgraph for the fast student; the reference with torch.compile's defaults, as a user would."""
    return torch.compile(model, fullgraph=(impl == "fast"))


def counted_flops(config: str, precision: str = "fp32") -> tuple[float, float]:
    """FLOPs per image of one step's teacher forward + student forward, loss and backward, and of
    the teacher's forward alone, counted on the reference twins (the optimizer's elementwise work is
    not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    teacher = build_teacher(config, reference_impl=True)
    model = build_model(config, "ref")
    imgs, _, noise = make_batch(config, 1, teacher)
    counter = FlopCounterMode(display=False)
    with counter, precision_context(precision):
        teacher(imgs)
    teacher_flops = float(counter.get_total_flops())
    counter = FlopCounterMode(display=False)
    with counter:
        with precision_context(precision):
            loss = step_loss(model, teacher, imgs, noise)
        loss.backward()
    return float(counter.get_total_flops()), teacher_flops


def compare(a: torch.nn.Module, b: torch.nn.Module, teacher, imgs, noise, ids_keep) -> tuple[float, float]:
    """The fp32 losses of the two students on the same teacher outputs, images and masks (no_grad);
    an error unless both kept exactly the drawn ``ids_keep``."""
    with torch.no_grad():
        out = teacher(imgs)
        losses = []
        for m in (a, b):
            res = m(imgs, out, MASK_RATIO, noise=noise)
            if not torch.equal(res.ids_keep, ids_keep):
                raise AssertionError("the noise did not reproduce the drawn ids_keep: the providers would not see "
                                     "the same tokens")
            losses.append(float(res.loss))
        return losses[0], losses[1]
