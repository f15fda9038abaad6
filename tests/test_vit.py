"""The fine-tuning ViT (fastmae.vit) and loading pre-trained encoders into it (fastmae.pretrained).

- against the official fine-tuning code's golden outputs (logits, gradients, layer-wise lr decay,
  position-table interpolation, state_dict keys);
- the fast model against its reference twin (same weights) over odd shapes, fp32 and bf16
  autocast, both poolings, checkpointing and each attention backend that runs on CPU;
- stochastic depth, partial fine-tuning / linear probing (``set_trainable_blocks``), the probe
  head, the configuration round trip, torch.compile;
- ``load_encoder`` from every checkpoint form it accepts, and the errors for those it refuses.
"""
import argparse
import copy
from functools import partial

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from helpers import assert_close_to_truth, load_golden, rel_err

import fastmae
from fastmae import checkpoint, reference
from fastmae.checkpoint import CheckpointError
from fastmae.pretrained import encoder_config, load_encoder, read_source
from fastmae.vit import (VisionTransformer, create_vit, interpolate_pos_embed, param_groups_lrd,
                         sincos_pos_embed_like, vit_base_patch16, vit_huge_patch14, vit_large_patch16)

GOLDEN = "official_finetune_small.pt"
# odd shapes: a non-square 3x5 grid, 1 channel, 3 heads of 16
ODD = dict(img_size=(24, 40), patch_size=8, in_chans=1, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
           num_classes=5, norm_layer=partial(nn.LayerNorm, eps=1e-6))
SMALL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0,
             num_classes=5, norm_layer=partial(nn.LayerNorm, eps=1e-6))
CPU_ATTN_BACKENDS = ["auto", "sdpa", "math"]  # xformers runs on CUDA only


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


def _perturb(model, seed=1, scale=0.05):
    """Move every trainable parameter off its initialisation (unit LayerNorms, zero biases) so each
    matters (an MAE's fixed sin-cos tables stay as they are)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _twin(seed=0, **cfg):
    """(fast, reference) classifiers holding the same perturbed weights."""
    torch.manual_seed(seed)
    fast = _perturb(VisionTransformer(**cfg), seed)
    ref = VisionTransformer(**cfg, reference_impl=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fwd_bwd(model, imgs, dtype=None):
    """(logits, gradients by name, gradient of the images) of ``logits.pow(2).mean()``."""
    model.zero_grad(set_to_none=True)
    x = imgs.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    logits.float().pow(2).mean().backward()
    return logits.detach(), _grads(model), x.grad


def _assert_grads_close(got, want, tol, label=""):
    assert got.keys() == want.keys(), f"{label}: parameters with a gradient differ: {got.keys() ^ want.keys()}"
    worst = max(want, key=lambda n: rel_err(got[n], want[n]))
    assert rel_err(got[worst], want[worst]) <= tol, (label, worst, rel_err(got[worst], want[worst]))


# ============================================================================ golden
def _golden_model(case, impl):
    cfg = dict(case["config"])
    eps = cfg.pop("layer_norm_eps")
    model = VisionTransformer(**cfg, norm_layer=partial(nn.LayerNorm, eps=eps), reference_impl=impl == "reference")
    model.load_state_dict(case["state_dict"], strict=True)
    return model


@pytest.mark.parametrize("backend", ["torch", "cpp"], indirect=True)
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case_name", ["global_pool1", "global_pool0"])
def test_golden_logits_and_gradients(golden, case_name, impl, backend):
    """Eval-mode logits and the gradient of ``logits.pow(2).mean()`` as the official code computed."""
    if impl == "reference" and backend != "torch":
        pytest.skip("the reference model does not use the fused ops")
    case = golden["cases"][case_name]
    model = _golden_model(case, impl).eval()
    assert model.global_pool == case["config"]["global_pool"]
    assert hasattr(model, "fc_norm") != hasattr(model, "norm")
    logits, grads, _ = _fwd_bwd(model, case["imgs"])
    want = case["logits"]
    assert logits.shape == want.shape == (4, 7)
    assert rel_err(logits, want) <= 1e-5, rel_err(logits, want)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    _assert_grads_close(grads, case["grads_of_mean_square_logits"], 1e-4, case_name)


@pytest.mark.parametrize("case_name", ["global_pool1", "global_pool0"])
def test_golden_layer_decay_groups(golden, case_name):
    """Every parameter gets the official ``(lr_scale, weight_decay)``; frozen ones are left out."""
    case = golden["cases"][case_name]
    model = _golden_model(case, "fast")
    names = {id(p): n for n, p in model.named_parameters()}

    def assigned(groups):
        out = {}
        for g in groups:
            for p in g["params"]:
                assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
                out[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
        return out

    got = assigned(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75))
    want = {n: tuple(float(x) for x in v) for n, v in case["lr_decay_0.75_wd_0.05"].items()}
    assert got.keys() == want.keys()
    wrong = {n: (got[n], want[n]) for n in want if got[n] != pytest.approx(want[n], rel=1e-12, abs=0)}
    assert not wrong, wrong
    model.set_trainable_blocks(1)
    partial_groups = assigned(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75))
    assert partial_groups == {n: v for n, v in got.items() if n.startswith(("blocks.2.", "head.", "norm.", "fc_norm."))}


def test_golden_interpolate_pos_embed(golden):
    data = golden["interpolate_pos_embed_32_to_48"]
    cfg = {k: v for k, v in golden["cases"]["global_pool1"]["config"].items() if k != "layer_norm_eps"}
    model = VisionTransformer(**dict(cfg, img_size=48))
    state = {"pos_embed": data["src"].clone()}
    interpolate_pos_embed(model, state)
    assert state["pos_embed"].shape == data["dst"].shape == model.pos_embed.shape == (1, 37, 48)
    torch.testing.assert_close(state["pos_embed"], data["dst"], rtol=1e-6, atol=1e-6)
    assert torch.equal(state["pos_embed"][:, 0], data["src"][:, 0])  # the cls row is kept as it is
    same = {"pos_embed": data["src"].clone()}  # the model's own grid: left as it is
    interpolate_pos_embed(VisionTransformer(**cfg), same)
    assert torch.equal(same["pos_embed"], data["src"])


def test_golden_vit_base_keys_and_official_factories(golden):
    with torch.device("meta"):
        base = vit_base_patch16(global_pool=True)
        large, huge = vit_large_patch16(), vit_huge_patch14()
    assert sorted(base.state_dict()) == sorted(golden["vit_base_patch16_global_pool_keys"])
    for model, (patch, width, depth, heads) in ((base, (16, 768, 12, 12)), (large, (16, 1024, 24, 16)),
                                                (huge, (14, 1280, 32, 16))):
        cfg = model.config()
        assert (cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (patch, width, depth, heads)
        assert (cfg["mlp_ratio"], cfg["qkv_bias"], cfg["img_size"], cfg["num_classes"]) == (4.0, True, [224, 224], 1000)
        assert cfg["layer_norm_eps"] == 1e-6 and cfg["global_pool"] is (model is base)  # official default: False
    assert sum(p.numel() for p in base.parameters()) == 86_567_656  # timm/official ViT-B/16 with a 1000-class head
    with pytest.raises(ValueError, match="unknown model 'vit_small'; choose one of .*vit_micro_patch8"):
        create_vit("vit_small")


def test_non_square_img_size():
    model = _perturb(VisionTransformer(**dict(SMALL, img_size=(32, 48))))
    assert model.patch_embed.grid_size == (4, 6) and model.pos_embed.shape == (1, 25, 48)
    assert model.config()["img_size"] == [32, 48]
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 5)
    with pytest.raises(ValueError, match="built for 32x48"):
        model(torch.randn(2, 3, 48, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 32, 48))
    assert VisionTransformer(**dict(SMALL, num_classes=0))(torch.randn(2, 3, 32, 32)).shape == (2, 48)


def test_constructor_refuses_unsupported_options():
    for kw, msg in [(dict(drop_rate=0.1), "drop_rate"), (dict(attn_drop_rate=0.1), "attn_drop_rate"),
                    (dict(qk_scale=0.5), "qk_scale"), (dict(drop_path_rate=1.0), "drop_path_rate"),
                    (dict(num_classes=-1), "num_classes"), (dict(attn_backend="flash9"), "unknown attention backend")]:
        with pytest.raises(ValueError, match=msg):
            VisionTransformer(**dict(SMALL, **kw))


# ============================================================================ fast vs reference
@pytest.mark.parametrize("attn", CPU_ATTN_BACKENDS)
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_matches_reference(precision, global_pool, ckpt, attn):
    """Train mode (drop_path_rate 0), forward and backward, batch 1 and 3 of 1-channel 24x40 images.
    fp32: the reference's numbers. bf16 autocast: within twice the reference's error against fp32."""
    fast, ref = _twin(**ODD, global_pool=global_pool, attn_backend=attn, grad_checkpointing=ckpt)
    ref.grad_checkpointing = ckpt
    fast.train(), ref.train()
    for batch in (1, 3):
        imgs = torch.randn(batch, 1, 24, 40, generator=torch.Generator().manual_seed(batch))
        truth = _fwd_bwd(ref, imgs)
        if precision == "fp32":
            logits, grads, dx = _fwd_bwd(fast, imgs)
            assert rel_err(logits, truth[0]) <= 1e-5, rel_err(logits, truth[0])
            assert rel_err(dx, truth[2]) <= 1e-4, rel_err(dx, truth[2])
            _assert_grads_close(grads, truth[1], 1e-4, f"batch {batch}")
            continue
        logits, grads, dx = _fwd_bwd(fast, imgs, torch.bfloat16)
        base = _fwd_bwd(ref, imgs, torch.bfloat16)
        assert logits.dtype == base[0].dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in grads.values()) and grads.keys() == truth[1].keys()
        assert_close_to_truth(logits, truth[0].to(logits.dtype), base[0], atol=2e-3, norm="l2",
                              baseline_tol=5e-2, name=f"logits, batch {batch}")
        assert_close_to_truth(dx, truth[2], base[2], atol=1e-2, norm="l2", name=f"image gradient, batch {batch}")
        for n, g in truth[1].items():
            assert_close_to_truth(grads[n], g, base[1][n], atol=1e-2, norm="l2", baseline_tol=0.1,
                                  name=f"{n}, batch {batch}")


def test_fast_matches_reference_per_op_backend(backend):
    """The fast blocks' fused ops (GELU MLP) on each op backend, in fp32."""
    fast, ref = _twin(**ODD, global_pool=True)
    imgs = torch.randn(3, 1, 24, 40)
    logits, grads, _ = _fwd_bwd(fast, imgs)
    want = _fwd_bwd(ref, imgs)
    assert rel_err(logits, want[0]) <= 1e-5
    _assert_grads_close(grads, want[1], 1e-4)


# ============================================================================ drop path
def test_drop_path():
    cfg = dict(ODD, drop_path_rate=0.4, depth=3)
    fast, ref = _twin(**cfg)
    rates = [0.0, 0.2, 0.4]
    for model in (fast, ref):
        got = [getattr(b.drop_path, "p", 0.0) for b in model.blocks]
        assert got == pytest.approx(rates), got
        assert isinstance(model.blocks[0].drop_path, nn.Identity)  # rate 0: no module
        assert all(isinstance(b.drop_path, reference.DropPath) for b in model.blocks[1:])
    plain = VisionTransformer(**dict(cfg, drop_path_rate=0.0))
    plain.load_state_dict(fast.state_dict(), strict=True)
    imgs = torch.randn(8, 1, 24, 40)

    def run(model, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(imgs)

    fast.train()
    a, b, a2 = run(fast, 0), run(fast, 1), run(fast, 0)
    assert not torch.allclose(a, b), "train mode: the output does not vary with the seed"
    assert torch.equal(a, a2), "train mode: the same seed gave another output"
    ref.train()
    assert rel_err(run(ref, 0), a) <= 1e-5  # the twins draw the same masks from the same seed
    fast.eval(), plain.eval()
    e = run(fast, 0)
    assert torch.equal(e, run(fast, 1)) and torch.equal(e, run(plain, 2)), "eval mode must not drop paths"
    assert not torch.allclose(e, a)
    # a frozen block is a fixed function even in train mode: no path is dropped there
    fast.set_trainable_blocks(0)
    fast.train(), plain.train()
    assert torch.equal(run(fast, 0), run(fast, 1))
    assert rel_err(run(fast, 0), run(plain, 3)) <= 1e-6


def test_drop_path_module():
    """Per sample: the branch is zeroed with probability p, else scaled by 1 / (1 - p) (timm's)."""
    torch.manual_seed(0)
    dp = reference.DropPath(0.25).train()
    x = torch.rand(4000, 3, 5) + 0.5
    y = dp(x)
    ratio = y / x
    kept = ratio[:, 0, 0] != 0
    torch.testing.assert_close(ratio, kept[:, None, None].float().expand_as(ratio) / 0.75, rtol=1e-6, atol=0)
    assert abs((~kept).float().mean().item() - 0.25) < 0.03  # binomial std 0.007
    assert torch.equal(dp.eval()(x), x) and torch.equal(reference.DropPath(0.0).train()(x), x)


def test_drop_path_with_checkpointing_keeps_the_mask():
    """Recomputation in backward redraws no mask: checkpointed gradients equal the plain ones."""
    fast, _ = _twin(**dict(ODD, drop_path_rate=0.4, depth=3))
    ckpt = copy.deepcopy(fast)
    ckpt.grad_checkpointing = True
    fast.train(), ckpt.train()
    imgs = torch.randn(8, 1, 24, 40)
    torch.manual_seed(5)
    want = _fwd_bwd(fast, imgs)
    torch.manual_seed(5)
    got = _fwd_bwd(ckpt, imgs)
    assert torch.equal(got[0], want[0])
    _assert_grads_close(got[1], want[1], 1e-6)


# ============================================================================ set_trainable_blocks
def _expected_trainable(model, k, train_norm):
    depth = len(model.blocks)
    norm = "fc_norm." if model.global_pool else "norm."
    names = set()
    for n, _ in model.named_parameters():
        if n.startswith("head."):
            names.add(n)
        elif n.startswith(norm):
            if train_norm:
                names.add(n)
        elif n.startswith("blocks."):
            if int(n.split(".")[1]) >= depth - k:
                names.add(n)
        elif k == depth:  # patch_embed, cls_token, pos_embed
            names.add(n)
    return names


@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
@pytest.mark.parametrize("train_norm", [True, False])
def test_set_trainable_blocks(global_pool, train_norm):
    """Exactly the expected parameters train; they get the full model's gradients, the frozen ones
    none; the frozen modules stay in eval mode after ``train()``."""
    cfg = dict(SMALL, global_pool=global_pool, drop_path_rate=0.0)
    full, _ = _twin(**cfg)
    full.train()
    imgs = torch.randn(3, 3, 32, 32)
    want = _fwd_bwd(full, imgs)
    depth = len(full.blocks)
    for k in range(depth + 1):
        model = copy.deepcopy(full)
        model.zero_grad(set_to_none=True)
        model.set_trainable_blocks(k, train_norm=train_norm)
        expected = _expected_trainable(model, k, train_norm)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected, k
        model.eval()
        model.train()
        frozen = ([model.patch_embed, *model.blocks[:depth - k]] if k < depth else []) + (
            [] if train_norm else [model.final_norm])
        for name, m in model.named_modules():
            in_frozen = any(m is f or any(m is s for s in f.modules()) for f in frozen)
            assert m.training != in_frozen, (k, name, m.training)
        logits, grads, _ = _fwd_bwd(model, imgs)
        assert rel_err(logits, want[0]) <= 1e-6
        assert grads.keys() == expected, (k, set(grads) ^ expected)
        for n in expected:
            assert rel_err(grads[n], want[1][n]) <= 1e-5, (k, n)
        assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    model.set_trainable_blocks(depth)
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in model.modules())


def test_set_trainable_blocks_rejects_out_of_range():
    model = VisionTransformer(**SMALL)
    for k in (-1, 4, True, 1.5, "2", None):
        with pytest.raises(ValueError, match=r"integer in \[0, 3\].*3-block model, got"):
            model.set_trainable_blocks(k)
    assert all(p.requires_grad for p in model.parameters())  # a refused call changes nothing


@pytest.mark.parametrize("order", ["probe_head_first", "freeze_first"])
def test_linear_probe(order):
    """k=0, train_norm=False and the probe head: only the head's Linear trains; the BatchNorm
    (affine=False, eps=1e-6) keeps running statistics in train mode."""
    model = _perturb(VisionTransformer(**SMALL, global_pool=True))
    if order == "probe_head_first":
        model.use_probe_head()
        model.set_trainable_blocks(0, train_norm=False)
    else:
        model.set_trainable_blocks(0, train_norm=False)
        model.use_probe_head()
    bn, linear = model.head[0], model.head[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.affine is False and bn.eps == 1e-6
    assert model.head_linear is linear and isinstance(linear, nn.Linear)
    assert 0.005 < linear.weight.std().item() < 0.015 and not linear.bias.any()  # std 0.01
    keys = set(model.state_dict())
    assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight",
            "head.1.bias"} <= keys and "head.weight" not in keys and "head.0.weight" not in keys
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    model.train()
    assert bn.training and linear.training and not model.blocks[0].training and not model.fc_norm.training
    logits, grads, _ = _fwd_bwd(model, torch.randn(4, 3, 32, 32))
    assert grads.keys() == {"head.1.weight", "head.1.bias"}
    assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    model.use_probe_head()  # a second call changes nothing
    assert model.head[1] is linear
    with pytest.raises(ValueError, match="num_classes > 0"):
        VisionTransformer(**dict(SMALL, num_classes=0)).use_probe_head()


# ============================================================================ config
@pytest.mark.parametrize("probe", [False, True], ids=["linear_head", "probe_head"])
@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
def test_config_round_trip(global_pool, probe):
    model = VisionTransformer(**dict(ODD, norm_layer=partial(nn.LayerNorm, eps=1e-5)), global_pool=global_pool)
    if probe:
        model.use_probe_head()
    _perturb(model)
    cfg = model.config()
    assert cfg["kind"] == "vit" and cfg["layer_norm_eps"] == 1e-5
    assert cfg["head"] == ("bn_linear" if probe else "linear")
    assert all(isinstance(v, (int, float, str, bool, list)) for v in cfg.values()), cfg
    assert checkpoint.model_config(model) == cfg
    imgs = torch.randn(3, 1, 24, 40)
    model.eval()
    want = model(imgs)
    for impl in (False, True):
        for back in (VisionTransformer.from_config(cfg, reference_impl=impl),
                     checkpoint.build_model(cfg, reference_impl=impl)):
            assert type(back) is VisionTransformer and back.config() == cfg
            assert isinstance(back.blocks[0], reference.Block) and (
                type(back.blocks[0]) is reference.Block) == impl
            assert list(back.state_dict()) == list(model.state_dict())
            back.load_state_dict(model.state_dict(), strict=True)
            assert rel_err(back.eval()(imgs), want) <= 1e-5
            assert back.final_norm.eps == 1e-5
    with pytest.raises(ValueError, match="lacks num_heads"):
        VisionTransformer.from_config({k: v for k, v in cfg.items() if k != "num_heads"})
    mae = fastmae.create_model("mae_vit_micro_patch8", img_size=32)
    assert type(checkpoint.build_model(checkpoint.model_config(mae))) is fastmae.MaskedAutoencoderViT


# ============================================================================ torch.compile
@pytest.fixture
def compile_backend(backend):
    if backend == "triton":
        pytest.skip("torch.compile over Triton ops fails under TRITON_INTERPRET (see test_compile.py)")
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


@pytest.mark.parametrize("trainable", [None, 1], ids=["all", "last_block"])
def test_compile_no_graph_breaks(compile_backend, trainable):
    """fullgraph tracing of training (frozen part under no_grad included) finds no graph break."""
    model, _ = _twin(**SMALL, drop_path_rate=0.2)
    if trainable is not None:
        model.set_trainable_blocks(trainable)
    model.train()
    explanation = torch._dynamo.explain(model)(torch.randn(3, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # ~20-35 s of inductor each on two cores (forward and backward)
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # one suffices: test_compile.py covers the ops
@pytest.mark.parametrize("trainable", [None, 1], ids=["all", "last_block"])
def test_compiled_matches_eager(compile_backend, trainable):
    """Compiled training steps (fullgraph, inductor) give eager's logits and gradients, also with
    only the last block trained (the frozen part under no_grad in the graph); no recompile."""
    eager, _ = _twin(**SMALL, global_pool=True)
    if trainable is not None:
        eager.set_trainable_blocks(trainable)
    eager.train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    imgs = torch.randn(3, 3, 32, 32)
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = _fwd_bwd(compiled, imgs)
        want = _fwd_bwd(eager, imgs)
        assert rel_err(got[0], want[0]) <= 1e-5
        grads = _grads(model)
        _assert_grads_close(grads, want[1], 1e-4)
        if trainable is not None:
            assert all(n.startswith(("blocks.2.", "fc_norm.", "head.")) for n in grads)


# ============================================================================ load_encoder
def _mae(seed=0, img_size=32):
    torch.manual_seed(seed)
    return _perturb(fastmae.create_model("mae_vit_micro_patch8", img_size=img_size), seed)


ENCODER_PREFIXES = ("blocks.", "patch_embed.", "cls_token")


@pytest.mark.parametrize("img_size", [32, 48])
@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
def test_load_encoder_from_mae(global_pool, img_size):
    mae = _mae()
    sd = mae.state_dict()
    vit = create_vit("vit_micro_patch8", img_size=img_size, num_classes=5, global_pool=global_pool)
    report = load_encoder(vit, sd)
    own = vit.state_dict()
    for k, v in own.items():
        if k.startswith(ENCODER_PREFIXES):
            assert torch.equal(v, sd[k]), k
    assert not global_pool == ("norm.weight" in own)
    decoder = {k for k in sd if k.startswith(("decoder_", "mask_token"))}
    assert decoder and decoder <= set(report.dropped)
    assert {"head.weight", "head.bias"} <= set(report.initialised)
    assert 1e-5 < own["head.weight"].std().item() < 3e-5 and not own["head.bias"].any()
    if global_pool:
        assert {"norm.weight", "norm.bias"} <= set(report.dropped)
        assert {"fc_norm.weight", "fc_norm.bias"} <= set(report.initialised)
        assert torch.equal(own["fc_norm.weight"], torch.ones(64)) and not own["fc_norm.bias"].any()
        assert set(report.dropped) == decoder | {"norm.weight", "norm.bias"}
    else:
        assert torch.equal(own["norm.weight"], sd["norm.weight"]) and "norm.weight" in report.loaded
        assert set(report.dropped) == decoder
    assert set(report.initialised) | set(report.loaded) == set(own)
    if img_size == 32:
        assert torch.equal(own["pos_embed"], sd["pos_embed"]) and not report.resized
    else:  # the fixed sin-cos table regenerated for the 6x6 grid
        assert own["pos_embed"].shape == (1, 37, 64)
        assert torch.equal(own["pos_embed"], sincos_pos_embed_like(vit))
        assert "pos_embed" in report.resized and "sin-cos" in report.resized["pos_embed"]
    assert str(report).startswith(f"loaded {len(report.loaded)} tensors") and report.format == "state_dict"
    vit.eval()(torch.randn(2, 3, img_size, img_size))  # runs


def test_load_encoder_interpolates_a_learned_pos_embed():
    sd = dict(_mae().state_dict())
    sd["pos_embed"] = sd["pos_embed"] + 0.1 * torch.randn_like(sd["pos_embed"])  # learned: not the sin-cos table
    vit = create_vit("vit_micro_patch8", img_size=48, num_classes=5, global_pool=True)
    report = load_encoder(vit, sd)
    want = {"pos_embed": sd["pos_embed"].clone()}
    interpolate_pos_embed(vit, want)
    assert want["pos_embed"].shape == (1, 37, 64)
    assert torch.equal(vit.pos_embed.detach(), want["pos_embed"])
    assert "bicubic" in report.resized["pos_embed"]
    assert not torch.allclose(vit.pos_embed.detach(), sincos_pos_embed_like(vit), atol=1e-3)


class _Payload:  # a pickle of this needs this module's code: a safe load must refuse it
    def __init__(self):
        self.x = 1


def test_load_encoder_checkpoint_forms(tmp_path):
    mae = _mae()
    sd = mae.state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_micro_patch8", input_size=32)}, path)
    sources = {
        "state_dict": (sd, "state_dict"),
        "model": ({"model": sd}, "official pre-training checkpoint"),
        "model+args": ({"model": sd, "args": argparse.Namespace(model="mae_vit_micro_patch8")},
                       "official pre-training checkpoint"),
        "file": (str(path), "official pre-training checkpoint"),
        "ddp": ({"model": {"module." + k: v for k, v in sd.items()}}, "official pre-training checkpoint"),
        "encoder_only": ({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}},
                         "official encoder-only pre-training checkpoint"),
        "fastmae": ({"format": checkpoint.FORMAT, "model": sd, "model_config": checkpoint.model_config(mae)},
                    "fastmae pre-training checkpoint"),
    }
    want = None
    for name, (source, fmt) in sources.items():
        torch.manual_seed(0)
        vit = create_vit("vit_micro_patch8", img_size=32, num_classes=5, global_pool=True)
        report = load_encoder(vit, source)
        assert report.format == fmt, (name, report.format)
        got = {k: v for k, v in vit.state_dict().items() if k.startswith(ENCODER_PREFIXES + ("pos_embed",))}
        if want is None:
            want = got
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    src = read_source(str(path))
    assert src.meta["args"] == {"model": "mae_vit_micro_patch8", "input_size": 32} and src.label == str(path)
    assert src.state.keys() == sd.keys()


def test_load_encoder_from_a_finetuned_checkpoint(golden):
    """A fine-tuned checkpoint (7 classes, global pooling) into a 5-class model: the head is
    dropped and initialised anew; into a cls-token model, fc_norm is dropped and norm starts fresh."""
    case = golden["cases"]["global_pool1"]
    sd = case["state_dict"]
    for global_pool in (True, False):
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5,
                                global_pool=global_pool)
        report = load_encoder(vit, {"model": sd})
        assert report.format == "official fine-tuned checkpoint"
        assert {"head.weight", "head.bias"} <= set(report.dropped) and "head.weight" in report.initialised
        assert torch.equal(vit.blocks[2].mlp.fc2.weight.detach(), sd["blocks.2.mlp.fc2.weight"])
        assert torch.equal(vit.pos_embed.detach(), sd["pos_embed"])
        if global_pool:
            assert torch.equal(vit.fc_norm.weight.detach(), sd["fc_norm.weight"])
        else:
            assert {"fc_norm.weight", "fc_norm.bias"} <= set(report.dropped)
            assert "norm.weight" in report.initialised
    vit = _golden_model(case, "fast")  # the same head: everything loads
    report = load_encoder(vit, sd)
    assert set(report.loaded) == set(sd) and not report.dropped and not report.initialised


def test_load_encoder_errors(tmp_path):
    sd = _mae().state_dict()

    def vit(**kw):
        return create_vit("vit_micro_patch8", img_size=32, num_classes=5, **kw)

    for kw, msg in [(dict(embed_dim=96), r"width 64 in the checkpoint vs .*96"),
                    (dict(depth=3), "2 blocks in the checkpoint vs 3 in the model"),
                    (dict(patch_size=4), "8-px patches.* vs 4"),
                    (dict(in_chans=1), "3 channels.* vs .*1")]:
        with pytest.raises(CheckpointError, match=f"another architecture: .*{msg}"):
            load_encoder(vit(**kw), sd)
    with pytest.raises(CheckpointError, match=r"shapes of blocks\.0\.mlp\.fc1"):
        load_encoder(vit(mlp_ratio=2.0), sd)
    with pytest.raises(CheckpointError, match="lacks encoder weights: blocks.1"):
        load_encoder(vit(), {k: v for k, v in sd.items() if not k.startswith("blocks.1.attn")} | {
            "blocks.1.attn.qkv.weight": sd["blocks.1.attn.qkv.weight"]})
    with pytest.raises(CheckpointError, match="no place for: extra"):
        load_encoder(vit(), dict(sd, extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match="does not hold a ViT encoder"):
        load_encoder(vit(), {"weight": torch.zeros(3)})

    files = {}
    files["empty"] = tmp_path / "empty.pth"
    files["empty"].write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save({"model": sd}, whole)
    data = whole.read_bytes()
    files["truncated"] = tmp_path / "truncated.pth"
    files["truncated"].write_bytes(data[:len(data) // 2])
    files["list"] = tmp_path / "list.pth"
    torch.save([sd["cls_token"], 1], files["list"])
    files["code"] = tmp_path / "code.pth"
    torch.save({"model": sd, "extra": _Payload()}, files["code"])
    messages = {"empty": "is empty", "truncated": "corrupt or truncated",
                "list": "neither a checkpoint with a 'model' state_dict nor a state_dict",
                "code": r"safe \(weights-only\) load refuses"}
    for name, msg in messages.items():
        with pytest.raises(CheckpointError, match=msg) as info:
            load_encoder(vit(), str(files[name]))
        assert str(files[name]) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(vit(), str(tmp_path / "missing.pth"))
    assert load_encoder(vit(), str(whole)).loaded  # the whole file loads


def test_encoder_config():
    """The classifier configuration of a checkpoint: stored, from the official args, or by the
    weights' shapes; the head count is None when nothing tells it."""
    mae = _mae()
    sd = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    want = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, in_chans=3, img_size=32)
    assert encoder_config(read_source(sd)) == want  # by shape: the only 64-wide 2-block patch-8 configuration
    args = argparse.Namespace(model="mae_vit_micro_patch8", input_size=32)
    assert encoder_config(read_source({"model": sd, "args": args})) == want
    fastmae_ckpt = {"format": checkpoint.FORMAT, "model": mae.state_dict(),
                    "model_config": checkpoint.model_config(mae)}
    assert encoder_config(read_source(fastmae_ckpt)) == dict(want, img_size=(32, 32))  # as stored: (H, W)
    assert encoder_config(read_source(_mae(img_size=48).state_dict()))["img_size"] == 48  # the table's grid
    vit = create_vit("vit_micro_patch8", **{k: v for k, v in want.items() if k != "patch_size"}, num_classes=5)
    load_encoder(vit, sd)
    odd = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3).state_dict()
    for meta in ({}, {"args": {"model": "mae_vit_unknown"}}):
        cfg = encoder_config(read_source({"model": odd, **meta}))
        assert cfg["num_heads"] is None and (cfg["embed_dim"], cfg["depth"]) == (48, 3)
    vit_cfg = VisionTransformer(img_size=(24, 40), patch_size=8, embed_dim=48, depth=3, num_heads=3).config()
    cfg = encoder_config(read_source({"format": checkpoint.FORMAT, "model": odd, "model_config": vit_cfg}))
    assert cfg["num_heads"] == 3 and cfg["img_size"] == (24, 40)


def test_load_encoder_resizes_a_table_of_another_grid_with_the_same_patch_count():
    """A 32x48 pre-training (4x6 grid) loaded at 48x32 (6x4): same number of rows, another grid;
    the stored image size tells them apart and the sin-cos table is regenerated."""
    mae = fastmae.create_model("mae_vit_micro_patch8", img_size=(32, 48))
    src = {"format": checkpoint.FORMAT, "model": mae.state_dict(), "model_config": checkpoint.model_config(mae)}
    model = create_vit("vit_micro_patch8", img_size=(48, 32), num_classes=3)
    report = load_encoder(model, src)
    assert "6x4 grid (was 4x6)" in report.resized["pos_embed"]
    assert torch.equal(model.pos_embed.detach(), fastmae.vit.sincos_pos_embed_like(model))
    with pytest.raises(CheckpointError, match="24 patch rows, not a square grid"):
        load_encoder(create_vit("vit_micro_patch8", img_size=48, num_classes=3), mae.state_dict())
