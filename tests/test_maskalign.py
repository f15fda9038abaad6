"""MaskAlign (fastmae.maskalign): the student against the official code's golden outputs, the
teachers, and the bad-input errors.

- the reference twin and the fast model (attention backends, gradient checkpointing) fed the
  golden state_dict, images, teacher outputs and masks of the three official cases: loss and every
  gradient; fast against reference directly; perturbations the comparison must notice;
- the options the golden file does not cover (``bn`` targets, ``norm_linear``/``mlp2`` heads,
  ``out``/``linear_decay`` weights, mask ratio 0), fast against reference; the weights and the
  per-level loss against their formulas; both maskings;
- the Teacher on tiny local models (Hugging Face CLIP and ViT folders, a fastmae checkpoint, timm):
  its outputs, frozen parameters, and a full student step with each;
- the errors: misaligned patch grids, a path that is no model, more weighted levels than the
  teacher has, a mask ratio that keeps nothing, unknown options, bad masks and teacher outputs.
"""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import load_golden, rel_err

from fastmae import checkpoint as ckpt_io
from fastmae import reference
from fastmae.maskalign import (CLIP_MEAN, CLIP_STD, MaskAlignViT, Teacher, TeacherOutput, align_loss_ref,
                               attention_importance, create_maskalign, level_weights,
                               student_state_dict)

GOLDEN = "official_maskalign_small.pt"
OPTIONS = ("mask_type", "target_norm", "loss_type", "loss_weights", "fusion_type", "head_type")
IMPLS = ["reference", "fast-sdpa", "fast-math", "fast-checkpointed"]
# a tiny student for a 3-layer, 24-wide teacher on 32-px images in 8-px patches
TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, teacher_dim=24,
            teacher_depth=3, norm_layer=partial(nn.LayerNorm, eps=1e-6))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


def _impl_kwargs(impl):
    if impl == "reference":
        return dict(reference_impl=True)
    if impl == "fast-checkpointed":
        return dict(grad_checkpointing=True)
    return dict(attn_backend=impl.removeprefix("fast-"))


def _golden_model(case, **kw):
    cfg = dict(case["student_config"])
    eps = cfg.pop("layer_norm_eps")
    model = MaskAlignViT(**cfg, norm_layer=partial(nn.LayerNorm, eps=eps),
                         **{k: case["settings"][k] for k in OPTIONS}, **kw)
    model.load_state_dict(case["state_dict"], strict=True)
    return model.train()


def _golden_mask(case):
    return dict(noise=case["noise"]) if case["noise"] is not None else dict(ids_keep=case["ids_keep"])


def _step(model, imgs, teacher_out, **kw):
    """(output, gradients by name) of one training step."""
    model.zero_grad(set_to_none=True)
    out = model(imgs, teacher_out, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _golden_step(model, case):
    teacher = TeacherOutput(case["teacher_hidden_states"], case["teacher_last_attention"])
    return _step(model, case["imgs"], teacher, mask_ratio=case["settings"]["mask_ratio"], **_golden_mask(case))


def _max_grad_err(got, want, label=""):
    assert got.keys() == want.keys(), f"{label}: parameters with a gradient differ: {got.keys() ^ want.keys()}"
    return max(rel_err(got[n], want[n]) for n in want)


# ============================================================================ golden
@pytest.mark.parametrize("impl", IMPLS)
def test_golden_official_outputs(golden, impl):
    """Loss (relative 1e-5) and every gradient (relative by norm 1e-4) as the official code computed
    them, for the README recipe, the argparse defaults and the third case."""
    assert len(golden["cases"]) == 3
    for name, case in golden["cases"].items():
        model = _golden_model(case, **_impl_kwargs(impl))
        out, grads = _golden_step(model, case)
        assert torch.equal(out.ids_keep, case["ids_keep"]), name  # random masking: argsort of the noise
        assert rel_err(out.loss.detach(), case["loss"]) <= 1e-5, (name, out.loss.item(), case["loss"].item())
        err = _max_grad_err(grads, case["grads"], name)
        assert err <= 1e-4, (name, err)
        # the unused final norm and the heads of unweighted levels get no gradient, as officially
        assert "norm.weight" not in grads


def test_golden_fast_matches_reference(golden):
    for name, case in golden["cases"].items():
        ref_out, ref_grads = _golden_step(_golden_model(case, reference_impl=True), case)
        out, grads = _golden_step(_golden_model(case), case)
        assert rel_err(out.loss.detach(), ref_out.loss.detach()) <= 1e-5, name
        assert _max_grad_err(grads, ref_grads, name) <= 1e-4, name
        assert torch.equal(out.mask, ref_out.mask) and out.mask.sum(1).tolist() == [16 - out.ids_keep.shape[1]] * 2


@pytest.mark.parametrize("impl", ["reference", "fast-sdpa"])
def test_golden_comparison_can_fail(golden, impl):
    """What the comparison must notice: a weight nudged, a weighted teacher layer changed, another
    set of kept patches, a gradient 0.1% off."""
    name, case = next(iter(golden["cases"].items()))  # the README recipe: top5, linear fusion
    base = _golden_model(case, **_impl_kwargs(impl))
    teacher = TeacherOutput(case["teacher_hidden_states"], case["teacher_last_attention"])
    ratio = case["settings"]["mask_ratio"]
    with torch.no_grad():
        loss = base(case["imgs"], teacher, mask_ratio=ratio, ids_keep=case["ids_keep"]).loss
        assert rel_err(loss, case["loss"]) <= 1e-5

        for name in ("patch_embed.proj.weight", "distill_heads.11.weight"):  # 1%: 10x the loss tolerance
            nudged = copy.deepcopy(base)
            nudged.get_parameter(name).mul_(1.01)
            assert rel_err(nudged(case["imgs"], teacher, mask_ratio=ratio, ids_keep=case["ids_keep"]).loss,
                           case["loss"]) > 1e-4, name
        hidden = list(case["teacher_hidden_states"])
        hidden[-1] = hidden[-1] + 0.1 * torch.randn(hidden[-1].shape, generator=torch.Generator().manual_seed(0))
        assert rel_err(base(case["imgs"], TeacherOutput(hidden, None), mask_ratio=ratio,
                            ids_keep=case["ids_keep"]).loss, case["loss"]) > 1e-4
        # a layer without weight (top5 of 12: layers 1..7) changes nothing
        hidden = list(case["teacher_hidden_states"])
        hidden[1] = hidden[1] * 2
        assert rel_err(base(case["imgs"], TeacherOutput(hidden, None), mask_ratio=ratio,
                            ids_keep=case["ids_keep"]).loss, case["loss"]) <= 1e-6
        # the kept tokens are a set: the student and the targets follow ids_keep's order together, and the
        # blocks are permutation-equivariant, so another order gives the same loss; another set does not
        ids_sorted = case["ids_keep"].sort(dim=1).values
        assert not torch.equal(ids_sorted, case["ids_keep"])
        assert rel_err(base(case["imgs"], teacher, mask_ratio=ratio, ids_keep=ids_sorted).loss, case["loss"]) <= 1e-5
        other = case["ids_keep"].clone()
        other[0, 0] = next(i for i in range(16) if i not in other[0].tolist())
        assert rel_err(base(case["imgs"], teacher, mask_ratio=ratio, ids_keep=other).loss, case["loss"]) > 1e-4
    # a gradient error the tolerance must catch
    _, grads = _golden_step(base, case)
    grads["distill_weights"] = grads["distill_weights"] * 1.001
    assert _max_grad_err(grads, case["grads"]) > 1e-4


def test_golden_state_dict_layout(golden):
    """The official keys load strictly; the teacher is not in the state_dict."""
    for case in golden["cases"].values():
        model = _golden_model(case)
        assert set(model.state_dict()) == set(case["state_dict"])
        assert not any(k.startswith(("clip_model", "dino_model")) for k in model.state_dict())
        assert len(model.distill_heads) == 12 and model.teacher_dim == 768
        # an official checkpoint holds its teacher too (and DDP's prefix): dropped for the student
        full = {f"module.{k}": v for k, v in case["state_dict"].items()}
        full["module.clip_model.vision_model.embeddings.class_embedding"] = torch.zeros(768)
        model.load_state_dict(student_state_dict(full), strict=True)


# ============================================================================ options beyond the golden file
def _random_teacher(N=2, L=16, depth=3, dim=24, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(N, 1 + L, dim, generator=g) * (1 + i) for i in range(depth + 1)]
    attn = torch.randn(N, heads, 1 + L, 1 + L, generator=g).softmax(-1)
    return TeacherOutput(hidden, attn)


@pytest.mark.parametrize("opts", [
    dict(target_norm="bn", loss_type="smoothl1", loss_weights="out", fusion_type="simple", head_type="norm_linear"),
    dict(target_norm="whiten", loss_type="l2", loss_weights="linear_decay", fusion_type="linear", head_type="mlp2"),
    dict(target_norm="l2", loss_type="l1", loss_weights="top2", fusion_type="sum", head_type="mlp", depth=5),
    dict(target_norm="bn", loss_type="l2", loss_weights="mid0", fusion_type="sum", head_type="linear", depth=2,
         mask_type="attention"),
])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.0])
def test_fast_matches_reference_on_other_options(opts, mask_ratio):
    cfg = dict(TINY, **opts)
    torch.manual_seed(0)
    ref = MaskAlignViT(**cfg, reference_impl=True)
    fast = MaskAlignViT(**cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    teacher = _random_teacher()
    ids = torch.randperm(16)[:int(16 * (1 - mask_ratio))].expand(2, -1).contiguous()
    ref_out, ref_grads = _step(ref, imgs, teacher, mask_ratio=mask_ratio, ids_keep=ids)
    out, grads = _step(fast, imgs, teacher, mask_ratio=mask_ratio, ids_keep=ids)
    assert torch.isfinite(ref_out.loss) and ref_out.loss > 0
    assert rel_err(out.loss.detach(), ref_out.loss.detach()) <= 1e-5
    assert _max_grad_err(grads, ref_grads) <= 1e-4
    weighted = {i for i, w in enumerate(fast.weights) if w > 0}
    assert {int(n.split(".")[1]) for n in grads if n.startswith("distill_heads.")} == weighted


def test_level_weights_follow_the_official_formulas():
    assert level_weights("mean", 4) == [0.25] * 4
    assert level_weights("out", 3) == [0.0, 0.0, 1.0]
    assert level_weights("linear_decay", 4) == [0.0, 1 / 6, 2 / 6, 3 / 6]  # grows with depth
    assert level_weights("top2", 4) == [0.0, 0.0, 0.5, 0.5]
    assert level_weights("mid1", 4) == [0.0, 1.0, 0.0, 0.0]  # 0-based
    assert level_weights("top5", 12) == [0.0] * 7 + [0.2] * 5


def test_align_loss_ref_formulas():
    g = torch.Generator().manual_seed(1)
    level = torch.randn(2, 5, 6, generator=g) * 3
    ids = torch.tensor([[0, 3, 1], [0, 2, 4]])
    pred = torch.randn(2, 3, 6, generator=g)
    picked = torch.stack([level[n, ids[n]] for n in range(2)])
    targets = {
        "none": picked,
        "l2": picked / picked.norm(dim=-1, keepdim=True),
        "whiten": (picked - picked.mean(-1, keepdim=True))
        / (picked.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt(),
        "bn": (picked - level.mean()) / (level.var(unbiased=True) + 1e-6).sqrt(),  # stats of every token
    }
    for norm, t in targets.items():
        d = pred - t
        want = {"l2": (d ** 2).mean(), "l1": d.abs().mean(),
                "smoothl1": torch.where(d.abs() < 1, d ** 2, 2 * d.abs() - 1).mean()}
        for loss_type, w in want.items():
            got = align_loss_ref(pred, level, ids, norm, loss_type)
            assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), (norm, loss_type, got, w)
    # no gradient into the teacher, fp32 for a low-precision prediction
    lvl = level.clone().requires_grad_()
    out = align_loss_ref(pred.bfloat16().requires_grad_(), lvl, ids, "whiten", "l2")
    out.backward()
    assert out.dtype == torch.float32 and lvl.grad is None


# ============================================================================ masking
def test_random_masking_keeps_the_smallest_noise_in_order():
    model = MaskAlignViT(**TINY)
    imgs, teacher = torch.randn(2, 3, 32, 32), _random_teacher()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    out = model(imgs, teacher, mask_ratio=0.75, noise=noise)
    assert torch.equal(out.ids_keep, torch.argsort(noise, dim=1)[:, :4])
    a = model(imgs, teacher, generator=torch.Generator().manual_seed(5))
    b = model(imgs, teacher, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(a.ids_keep, b.ids_keep)


def test_attentive_masking_draws_from_the_cls_attention():
    model = MaskAlignViT(**TINY, mask_type="attention")
    imgs, teacher = torch.randn(2, 3, 32, 32), _random_teacher()
    out = model(imgs, teacher, mask_ratio=0.5, generator=torch.Generator().manual_seed(7))
    importance = teacher.attention[:, :, 0, 1:].mean(1)
    want = torch.multinomial(importance, 16, replacement=False, generator=torch.Generator().manual_seed(7))[:, :8]
    assert torch.equal(out.ids_keep, want) and torch.equal(attention_importance(teacher.attention), importance)
    # all attention on patches 2, 5, 9 and 11 of the first sample: those are the ones kept
    attn = torch.full_like(teacher.attention, 1e-9)
    attn[0, :, 0, 1 + torch.tensor([2, 5, 9, 11])] = 1.0
    attn[1, :, 0, 1:5] = 1.0
    out = model(imgs, TeacherOutput(teacher.hidden_states, attn), mask_ratio=0.75)
    assert sorted(out.ids_keep[0].tolist()) == [2, 5, 9, 11] and sorted(out.ids_keep[1].tolist()) == [0, 1, 2, 3]


# ============================================================================ teachers
def _transformers():
    return pytest.importorskip("transformers")


def _hf_dir(tmp_path, kind, patch_size=8, image_size=32):
    transformers = _transformers()
    common = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    elif kind == "clip_full":  # a whole CLIPModel folder, as openai/clip-vit-base-patch16 is
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=common, text_config=text))
        path = tmp_path / kind
        full.save_pretrained(path)
        return str(path), transformers.CLIPVisionModel.from_pretrained(path).eval()
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**common), add_pooling_layer=False)
    path = tmp_path / f"{kind}_{patch_size}"
    model.save_pretrained(path)
    return str(path), model.eval()


def _fastmae_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = reference.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2,
                                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
    path = str(tmp_path / "mae.pth")
    torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": mae.state_dict(),
                "model_config": ckpt_io.model_config(mae), "args": {}, "step": 10}, path)
    return path, mae


def _check_teacher_and_step(teacher, attention=True):
    """Frozen, depth + 1 hidden states of the right shape, and a full student step with it inside."""
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    imgs = torch.randn(2, 3, 32, 32)
    out = teacher(imgs)
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 17, 24) for h in out.hidden_states)
    assert not any(h.requires_grad for h in out.hidden_states)
    if attention:
        assert out.attention.shape == (2, 2, 17, 17)
        assert torch.allclose(out.attention.sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    student = MaskAlignViT(**TINY, mask_type="attention" if attention else "random", target_norm="whiten",
                           loss_type="smoothl1", fusion_type="linear", loss_weights="top2").train()
    for impl in (student, MaskAlignViT(**TINY, reference_impl=True, fusion_type="sum", loss_weights="mean")):
        res = impl(imgs, teacher, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
        res.loss.backward()
        assert torch.isfinite(res.loss) and res.loss > 0
        assert impl.blocks[0].attn.qkv.weight.grad is not None and impl.cls_token.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    return out


@pytest.mark.parametrize("kind", ["clip", "clip_full", "vit"])
def test_hugging_face_teachers(tmp_path, kind):
    path, hf = _hf_dir(tmp_path, kind)
    teacher = Teacher.from_pretrained(path)
    out = _check_teacher_and_step(teacher)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # the model's own outputs; CLIP sees the images re-normalised with CLIP's statistics
    x = imgs
    if kind.startswith("clip"):
        m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        cm, cs = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        x = (s * imgs + m - cm) / cs
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        want = hf(pixel_values=x, output_hidden_states=True, output_attentions=True)
    out = teacher(imgs)
    for got, w in zip(out.hidden_states, want.hidden_states):
        assert torch.allclose(got, w, atol=1e-5)
    assert torch.allclose(out.attention, want.attentions[-1], atol=1e-6)
    # random masking needs no attention: the default (faster) attention then
    lean = Teacher.from_pretrained(path, attention=False)
    assert lean.model.config._attn_implementation != "eager" and lean(imgs).attention is None
    _check_teacher_and_step(lean, attention=False)


def test_hugging_face_teacher_of_another_grid(tmp_path):
    """A 4-px-patch teacher at 32 px has an 8x8 grid, the student 4x4: an error naming the fix,
    which then works (the input resized to 16 px, the position table interpolated)."""
    path, _ = _hf_dir(tmp_path, "clip", patch_size=4)
    student = MaskAlignViT(**TINY)
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"grid 8x8 .* does not align .* 4x4.*image_size=\(16, 16\)"):
        student(imgs, Teacher.from_pretrained(path))
    with pytest.raises(ValueError, match="gives 64 patch tokens .* student has 16"):
        student(imgs, Teacher.from_pretrained(path)(imgs))  # raw outputs: the token counts
    teacher = Teacher.from_pretrained(path, image_size=16)
    assert [h.shape for h in teacher(imgs).hidden_states] == [(2, 17, 24)] * 4
    student(imgs, teacher).loss.backward()


def test_fastmae_checkpoint_teacher(tmp_path):
    path, mae = _fastmae_checkpoint(tmp_path)
    teacher = Teacher.from_pretrained(path)
    assert teacher.kind == "fastmae" and (teacher.dim, teacher.depth, teacher.patch_size) == (24, 3, 8)
    out = _check_teacher_and_step(teacher)
    # the encoder's own blocks on every patch (no masking); the attention is the last block's
    imgs = torch.randn(2, 3, 32, 32)
    out = teacher(imgs)
    with torch.no_grad():
        x = mae.patch_embed(imgs) + mae.pos_embed[:, 1:]
        x = torch.cat(((mae.cls_token + mae.pos_embed[:, :1]).expand(2, -1, -1), x), dim=1)
        want = [x]
        for blk in mae.blocks:
            want.append(blk(want[-1]))
        last = mae.blocks[-1].attn
        h = mae.blocks[-1].norm1(want[-2])
        v = last.qkv(h).reshape(2, 17, 3, 2, 12).permute(2, 0, 3, 1, 4)[2]
        attn_out = last.proj((out.attention @ v).transpose(1, 2).reshape(2, 17, 24))
    for got, w in zip(out.hidden_states, want):
        assert torch.allclose(got, w, atol=1e-5)
    assert torch.allclose(attn_out, last(h), atol=1e-5)  # A @ v is the block's attention output


def test_fastmae_classifier_teacher(tmp_path):
    from fastmae.vit import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, mlp_ratio=2, num_classes=0)
    _check_teacher_and_step(Teacher(vit))


def test_timm_teacher(tmp_path):
    timm = pytest.importorskip("timm")
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2, mlp_ratio=2, num_classes=0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    teacher = Teacher(model)
    out = _check_teacher_and_step(teacher)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = model.forward_intermediates(imgs, norm=False, output_fmt="NLC", intermediates_only=True)
    out = teacher(imgs)
    assert torch.allclose(out.hidden_states[-1][:, 1:], inter[-1], atol=1e-5)
    assert model.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()  # restored
    folder = tmp_path / "timm"
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    loaded = Teacher.from_pretrained(str(folder))
    assert torch.allclose(loaded(imgs).hidden_states[-1], out.hidden_states[-1], atol=1e-6)
    registers = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=2, **args)
    with pytest.raises(ValueError, match="exactly one prefix token"):
        Teacher(registers)


# ============================================================================ errors
def test_bad_teacher_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Teacher.from_pretrained(str(tmp_path / "missing"))
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="is not a teacher model"):
        Teacher.from_pretrained(str(text))
    with pytest.raises(ValueError, match="is not a teacher model"):
        Teacher.from_pretrained(str(tmp_path))  # a folder without weights
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' model; a teacher must be a CLIP or ViT"):
        Teacher.from_pretrained(str(bert))
    with pytest.raises(ValueError, match="not a supported teacher"):
        Teacher(nn.Linear(2, 2))


def test_teacher_that_does_not_fit(tmp_path):
    path, _ = _fastmae_checkpoint(tmp_path)
    teacher = Teacher.from_pretrained(path)
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="teacher_dim=24, teacher_depth=3"):
        MaskAlignViT(**dict(TINY, teacher_dim=32))(imgs, teacher)
    with pytest.raises(ValueError, match="built for 32x32 images but the student sees 64x64"):
        MaskAlignViT(**dict(TINY, img_size=64))(torch.randn(2, 3, 64, 64), teacher)
    with pytest.raises(ValueError, match="image_size .* Hugging Face teachers only"):
        Teacher(teacher.model, image_size=16)
    hf_path, _ = _hf_dir(tmp_path, "clip")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        Teacher(_transformers().CLIPVisionModel.from_pretrained(hf_path, attn_implementation="sdpa"))
    with pytest.raises(ValueError, match="needs the teacher's last-layer attention"):
        MaskAlignViT(**TINY, mask_type="attention")(imgs, Teacher.from_pretrained(path, attention=False))


def test_more_weighted_levels_than_the_teacher_has():
    with pytest.raises(ValueError, match="'top9' weighs the last 9 levels but the teacher has 5 layers"):
        MaskAlignViT(**dict(TINY, teacher_depth=5, depth=5), loss_weights="top9")
    with pytest.raises(ValueError, match="'top9' weighs the last 9 levels but the teacher has 5 layers"):
        MaskAlignViT(**dict(TINY, teacher_depth=5), loss_weights="top9", fusion_type="sum")
    with pytest.raises(ValueError, match="mid5.*choose mid0 ... mid4"):
        MaskAlignViT(**dict(TINY, teacher_depth=5, depth=5), loss_weights="mid5")
    with pytest.raises(ValueError, match="top1 ... top3"):
        MaskAlignViT(**TINY, loss_weights="top0")


def test_unknown_options():
    for name, bad in (("mask_type", "block"), ("fusion_type", "concat"), ("target_norm", "ln"),
                      ("loss_type", "mse"), ("head_type", "conv")):
        with pytest.raises(ValueError, match=f"unknown {name} '{bad}'; choose one of"):
            MaskAlignViT(**TINY, **{name: bad})
    for bad in ("stop5", "top", "median"):
        with pytest.raises(ValueError, match="unknown loss_weights"):
            MaskAlignViT(**TINY, loss_weights=bad)
    with pytest.raises(ValueError, match="fusion_type='simple' pairs .* 4 blocks and the teacher 3 layers"):
        MaskAlignViT(**dict(TINY, depth=4))
    with pytest.raises(ValueError, match="unknown model"):
        create_maskalign("maskalign_vit_tiny")
    with pytest.raises(ValueError, match="unknown target_norm"):
        align_loss_ref(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.zeros(1, 2, dtype=torch.long), "pca")


def test_bad_masks_and_teacher_outputs():
    model = MaskAlignViT(**TINY)
    imgs, teacher = torch.randn(2, 3, 32, 32), _random_teacher()
    with pytest.raises(ValueError, match="mask_ratio=0.99 keeps no patch of 16"):
        model(imgs, teacher, mask_ratio=0.99)
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="mask_ratio must be a number in"):
            model(imgs, teacher, mask_ratio=bad)
    with pytest.raises(ValueError, match=r"ids_keep must have shape \[2, 4\]"):
        model(imgs, teacher, mask_ratio=0.75, ids_keep=torch.arange(8).expand(2, -1))
    with pytest.raises(ValueError, match="repeats index"):
        model(imgs, teacher, mask_ratio=0.75, ids_keep=torch.tensor([[0, 1, 2, 2], [0, 1, 2, 3]]))
    with pytest.raises(IndexError, match="outside"):
        model(imgs, teacher, mask_ratio=0.75, ids_keep=torch.tensor([[0, 1, 2, 16], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"noise must have shape \[N, L\]"):
        model(imgs, teacher, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="not both"):
        model(imgs, teacher, noise=torch.rand(2, 16), ids_keep=torch.arange(4).expand(2, -1))
    with pytest.raises(ValueError, match="noise drives random masking"):
        MaskAlignViT(**TINY, mask_type="attention")(imgs, teacher, noise=torch.rand(2, 16))
    with pytest.raises(ValueError, match="must be 4 tensors .* got 3 tensors"):
        model(imgs, TeacherOutput(teacher.hidden_states[:3], None))
    with pytest.raises(ValueError, match=r"hidden_states\[2\] must be \[N, 1 \+ L, D\] = \[2, 17, 24\]"):
        model(imgs, TeacherOutput([h if i != 2 else h[..., :20] for i, h in enumerate(teacher.hidden_states)], None))
    with pytest.raises(ValueError, match="teacher_out must be"):
        model(imgs, teacher.hidden_states)
    with pytest.raises(ValueError, match="last attention must be"):
        model(imgs, TeacherOutput(teacher.hidden_states, teacher.attention[:, :, :5]))
    with pytest.raises(ValueError, match="images are 16x16"):
        model(torch.randn(2, 3, 16, 16), teacher)


# ============================================================================ configuration, precision
def test_config_round_trip_and_factories():
    model = MaskAlignViT(**TINY, fusion_type="sum", head_type="mlp2", loss_weights="top2", target_norm="bn")
    again = MaskAlignViT.from_config(model.config())
    assert again.config() == model.config() and again.config()["kind"] == "maskalign"
    again.load_state_dict(model.state_dict(), strict=True)
    assert model.no_weight_decay() == {"distill_weights"}  # the official skip_list
    with torch.device("meta"):
        base = create_maskalign("maskalign_vit_base_patch16", fusion_type="linear")
        large = create_maskalign("maskalign_vit_large_patch16", fusion_type="sum")  # a ViT-L under CLIP-B/16
    assert (base.teacher_dim, base.teacher_depth, tuple(base.distill_weights.shape)) == (768, 12, (12, 12))
    assert tuple(base.distill_heads[0].weight.shape) == (768, 768) and base.norm.eps == 1e-6
    assert tuple(large.distill_weights.shape) == (12, 24) and len(large.distill_heads) == 12
    with torch.device("meta"):  # the official rule for the teacher's width and depth, from its name
        assert create_maskalign("maskalign_vit_large_patch16",
                                teacher_model="openai/clip-vit-large-patch14").teacher_dim == 1024


def test_bf16_autocast_fast_matches_reference():
    torch.manual_seed(0)
    opts = dict(target_norm="whiten", loss_type="smoothl1", fusion_type="linear", loss_weights="top2")
    ref = MaskAlignViT(**TINY, reference_impl=True, **opts)
    fast = MaskAlignViT(**TINY, **opts)
    fast.load_state_dict(ref.state_dict())
    imgs, teacher = torch.randn(2, 3, 32, 32), _random_teacher()
    low = TeacherOutput([h.bfloat16() for h in teacher.hidden_states], teacher.attention.bfloat16())
    ids = torch.randperm(16)[:4].expand(2, -1).contiguous()
    with torch.no_grad():
        want = ref(imgs, teacher, ids_keep=ids).loss
    for model in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _step(model, imgs, low, ids_keep=ids)
        assert out.loss.dtype == torch.float32 and rel_err(out.loss.detach(), want) < 2e-2
        assert all(torch.isfinite(g).all() for g in grads.values())
