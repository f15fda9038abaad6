"""Mixed precision and activation checkpointing of the fast model (eager; compiled runs are in
test_compile.py).

Precision policy under autocast (the same as the reference's, where autocast decides alone):
Linear layers and attention run in the low-precision dtype; the residual streams of encoder and
decoder stay fp32 (the patch embedding meets the fp32 position table, the decoder input meets the
fp32 mask token), so every LayerNorm normalises fp32 inputs with fp32 statistics; the loss is
accumulated in fp32 from the low-precision ``pred``; gradients of fp32 parameters are fp32.
"""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import assert_close_to_truth, rel_err

import fastmae
from fastmae import reference

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, norm_pix_loss=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _pair(seed=0, **kw):
    """A reference and a fast model with the same perturbed weights."""
    torch.manual_seed(seed)
    ref = reference.MaskedAutoencoderViT(**TINY)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    fast = fastmae.MaskedAutoencoderViT(**TINY, **kw)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _run(model, imgs, noise, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, pred, mask = model(imgs, noise=noise)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), pred.detach(), grads


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_dtype_policy_and_accuracy(precision, backend):
    """LayerNorms see fp32, Linear outputs are low precision, the loss is fp32; the fast model's
    error against fp32 is at most twice the reference's under the same autocast."""
    low = LOW[precision]
    ref, fast = _pair()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    seen = {}

    def record(name):
        return lambda mod, args, out: seen.setdefault(name, set()).add((args[0].dtype, out.dtype))

    hooks = [m.register_forward_hook(record(type(m).__name__ + ("" if isinstance(m, nn.LayerNorm) else "." + n)))
             for n, m in fast.named_modules() if isinstance(m, (nn.LayerNorm, nn.Linear))]
    got = _run(fast, imgs, noise, low)
    for h in hooks:
        h.remove()
    assert seen["LayerNorm"] == {(torch.float32, torch.float32)}, "a LayerNorm saw low-precision input"
    assert all(out == low for k, v in seen.items() if k.startswith("Linear") for _, out in v)
    loss, pred, grads = got
    assert loss.dtype == torch.float32 and pred.dtype == low
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())

    truth = _run(ref, imgs, noise)  # fp32
    ref_low = _run(ref, imgs, noise, low)
    # STYLE.md's rule in the l2 norm: relative error at most twice the reference's + atol
    assert_close_to_truth(loss, truth[0], ref_low[0], atol=1e-3, norm="l2", name="loss")
    assert_close_to_truth(pred, truth[1], ref_low[1], atol=1e-3, norm="l2", name="pred")
    for n, g in truth[2].items():
        assert_close_to_truth(grads[n], g, ref_low[2][n], atol=1e-2, norm="l2", name=n)


def _train(model, precision, steps=8):
    """AdamW steps on one fixed batch (it should be fitted); fp16 goes through a GradScaler."""
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=LOW.get(precision, torch.bfloat16), enabled=precision in LOW):
            loss, _, _ = model(imgs, noise=noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses, scaler


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_without_nan(precision, backend):
    if backend == "triton":
        pytest.skip("eight interpreted Triton steps cost ~15 s; the Triton ops' low-precision forward and "
                    "backward are checked by test_autocast_dtype_policy_and_accuracy")
    _, model = _pair(seed=1)
    before = copy.deepcopy(model.state_dict())
    losses, scaler = _train(model, precision)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], f"{precision} did not fit one batch: {losses}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "mask_token" in changed
    if precision == "fp16":
        assert 1.0 <= scaler.get_scale() < float("inf")


# ----------------------------------------------------------------------- activation checkpointing
def _count_block_calls(model):
    calls = []
    for blk in list(model.blocks) + list(model.decoder_blocks):
        # a pre-hook: recomputation may stop early, before a block's forward returns
        blk.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_grad_checkpointing_same_gradients(precision):
    """Checkpointed blocks are recomputed in backward (each runs twice) and give the same loss and
    gradients; eval and no_grad forwards do not checkpoint."""
    _, plain = _pair(seed=2)
    ckpt = fastmae.MaskedAutoencoderViT(**TINY, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    calls = _count_block_calls(ckpt)
    n_blocks = len(ckpt.blocks) + len(ckpt.decoder_blocks)
    dtype = LOW.get(precision)
    lc, pc, gc = _run(ckpt, imgs, noise, dtype)
    assert len(calls) == 2 * n_blocks, "blocks were not recomputed in backward"
    lp, pp, gp = _run(plain, imgs, noise, dtype)
    assert rel_err(lc, lp) <= 1e-6 and rel_err(pc, pp) <= 1e-6
    for n in gp:
        assert rel_err(gc[n], gp[n]) <= 1e-5, n
    calls.clear()
    with torch.no_grad():
        ckpt(imgs, noise=noise)
    ckpt.eval()
    ckpt(imgs, noise=noise)
    assert len(calls) == 2 * n_blocks


# ----------------------------------------------------------------------- the tolerance rule itself
def test_tolerance_rule_fails_on_a_wrong_answer_and_names_the_worst_element():
    """helpers.assert_close_to_truth (every low-precision comparison of the suite) passes a result
    as good as plain PyTorch's, fails one element off by more, NaN, or a baseline far from the
    truth, and names the worst element, in both norms."""
    truth = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    plain = truth.to(torch.bfloat16)
    assert_close_to_truth(plain, truth, plain)
    assert_close_to_truth(plain, truth, plain, norm="l2")
    bad = plain.clone()
    bad[2, 1] += 0.05
    with pytest.raises(AssertionError, match=r"worst element \(2, 1\): got 0\.6875, want 0\.6363"):
        assert_close_to_truth(bad, truth, plain, atol=1e-3, name="bad")
    with pytest.raises(AssertionError, match=r"l2 norm.*worst element \(2, 1\)"):
        assert_close_to_truth(bad, truth, plain, atol=1e-3, norm="l2")
    assert_close_to_truth(bad, truth, plain, atol=0.05)  # within the atol
    nan = plain.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"NaN.*worst element \(0, 3\): got nan"):
        assert_close_to_truth(nan, truth, plain, atol=1.0)
    with pytest.raises(AssertionError, match="plain PyTorch is .* off the truth"):
        assert_close_to_truth(bad, truth, bad, baseline_tol=1e-2)
    with pytest.raises(AssertionError, match="not one precision"):
        assert_close_to_truth(plain.float(), truth, plain)
