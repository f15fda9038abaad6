"""OptimizerInBackward: the same updates as one optimizer over all parameters, gradients freed in
backward, learning-rate changes and state round trips."""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae.optim import OptimizerInBackward
from fastmae.train import param_groups

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, norm_pix_loss=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
OPTS = dict(lr=1e-2, betas=(0.9, 0.95))


def _model(**kw):
    torch.manual_seed(0)
    return fastmae.MaskedAutoencoderViT(**TINY, **kw)


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    imgs, noise = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 16, generator=g)
    opt.zero_grad(set_to_none=True)
    loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-off", "fused"])
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_same_updates_as_one_adamw(fused, grad_checkpointing):
    """Three steps with weight-decay groups: every parameter equals a plain AdamW run's."""
    plain = _model(grad_checkpointing=grad_checkpointing)
    fused_model = copy.deepcopy(plain)
    opt_a = torch.optim.AdamW(param_groups(plain, 0.05), foreach=False if not fused else None, fused=fused or None,
                              **OPTS)
    opt_b = OptimizerInBackward(param_groups(fused_model, 0.05), torch.optim.AdamW,
                                foreach=False if not fused else None, fused=fused or None, **OPTS)
    for step in range(3):
        la, lb = _step(plain, opt_a, step), _step(fused_model, opt_b, step)
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        for (name, a), b in zip(plain.named_parameters(), fused_model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
            assert b.grad is None, f"{name}: gradient kept after backward"
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), _model().parameters())), "nothing trained"


def test_set_lr_and_state_round_trip():
    model = _model()
    opt = OptimizerInBackward(model.parameters(), torch.optim.AdamW, **OPTS)
    _step(model, opt, 0)
    opt.set_lr(1e-3)
    assert all(g["lr"] == 1e-3 for o in opt.optimizers.values() for g in o.param_groups)
    clone = _model()  # not a deepcopy: that would copy the hooks (and the optimizer they step) too
    clone.load_state_dict(model.state_dict())
    opt_clone = OptimizerInBackward(clone.parameters(), torch.optim.AdamW, **OPTS)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared tensors
    assert all(g["lr"] == 1e-3 for o in opt_clone.optimizers.values() for g in o.param_groups)
    _step(model, opt, 1)
    _step(clone, opt_clone, 1)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="state for 1 parameters"):
        opt_clone.load_state_dict(opt.state_dict()[:1])


def test_remove_stops_stepping_and_bad_arguments():
    model = _model()
    opt = OptimizerInBackward(model.parameters(), torch.optim.AdamW, **OPTS)
    opt.remove()
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="empty parameter list"):
        OptimizerInBackward([], torch.optim.AdamW)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        OptimizerInBackward([nn.Parameter(torch.zeros(2), requires_grad=False)], torch.optim.AdamW)
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than one group"):
        OptimizerInBackward([{"params": [p]}, {"params": [p]}], torch.optim.AdamW)
