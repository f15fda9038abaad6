"""Checkpoints in and out (fastmae.convert): Hugging Face and timm layouts, both ways, read safely.

- Hugging Face's ``ViTMAEForPreTraining`` (transformers, built locally; nothing downloaded) with
  converted weights gives the official code's loss, logits and mask (the golden file), in both key
  layouts: the 5.x one by a strict ``load_state_dict``, the 4.x one through ``from_pretrained``
  (transformers 5 renames 4.x keys as it loads them: a key it does not know is reported
  missing) and, where ``FASTMAE_TRANSFORMERS4`` names a transformers 4.x install (.ci/run makes
  one), by transformers 4 itself;
- timm's ``VisionTransformer`` loaded from ``to_timm`` gives the official fine-tuned logits and
  fastmae's features, both poolings, the linear probe's head folded;
- ViT-B in both libraries (slow tier); round trips exact;
- ``load_pretrained`` from every format into a classifier and an MAE, with the same weights;
- files that are damaged, empty, of another kind or that would run code are refused with a clear
  error; ``fastmae convert`` end to end.
"""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import transformers
from helpers import load_golden, rel_err
from safetensors.torch import save_file

import fastmae
from fastmae import checkpoint, cli, convert, pretrained
from fastmae.checkpoint import CheckpointError

MAE_CASES = ["p8_64px_normpix1_mask0.75", "p4_32px_normpix0_mask0.5"]
LAYOUTS = convert.HF_LAYOUTS


@pytest.fixture(scope="module")
def golden_mae():
    return load_golden("official_mae_small.pt")


@pytest.fixture(scope="module")
def golden_ft():
    return load_golden("official_finetune_small.pt")


def _fastmae_ckpt(state, config):
    return {"format": checkpoint.FORMAT, "model": state, "model_config": config}


def _hf_model(folder):
    """``ViTMAEForPreTraining.from_pretrained(folder)``, refusing any key it had to leave or invent."""
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    return model.eval()


def _equal_state(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _perturbed(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ============================================================================ Hugging Face
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MAE_CASES)
def test_hf_gives_the_official_numbers(golden_mae, case, layout, tmp_path):
    c = golden_mae["cases"][case]
    out = convert.export(_fastmae_ckpt(c["state_dict"], c["config"]), str(tmp_path / "hf"), "hf", layout)
    assert "ViTMAEForPreTraining" in out[-1]
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["layer_norm_eps"] == 1e-6 and hf_cfg["norm_pix_loss"] == c["config"]["norm_pix_loss"]
    hf = _hf_model(str(tmp_path / "hf"))
    hf.config.mask_ratio = c["mask_ratio"]
    with torch.no_grad():
        o = hf(c["imgs"], noise=c["noise"])
    assert rel_err(o.loss, c["loss"]) < 1e-5
    assert torch.equal(o.mask, c["mask"])
    assert rel_err(o.logits, c["pred"]) < 1e-5
    # the converted 5.x-layout state_dict also loads into transformers 5's model strictly
    if layout == "5":
        fresh = transformers.ViTMAEForPreTraining(hf.config)
        fresh.load_state_dict(convert.to_hf(c["state_dict"], "5"), strict=True)
    _equal_state(convert.from_hf(hf.state_dict()), c["state_dict"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_round_trips_are_exact(golden_mae, layout):
    sd = golden_mae["cases"][MAE_CASES[0]]["state_dict"]
    _equal_state(convert.from_hf(convert.to_hf(sd, layout)), sd)
    encoder = {k: v for k, v in sd.items() if not k.startswith(convert.DECODER_PREFIXES)}
    hf_encoder = convert.to_hf(encoder, layout)
    assert not any(k.startswith("vit.") for k in hf_encoder)  # ViTMAEModel's keys
    _equal_state(convert.from_hf(hf_encoder), encoder)
    assert convert.detect_layout(convert.to_hf(sd, layout)) == "hf" + layout
    # and from transformers' own model: HF -> fastmae -> HF in the layout it came in
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=16,
        patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64))
    native = hf.state_dict()
    assert convert.detect_layout(native) == "hf5"
    _equal_state(convert.to_hf(convert.from_hf(native), "5"), native)
    _equal_state(convert.from_hf(convert.to_hf(convert.from_hf(native), "4")), convert.from_hf(native))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_vit_base_matches_fastmae(layout, tmp_path):
    torch.manual_seed(0)
    mae = _perturbed(fastmae.create_model("mae_vit_base_patch16", norm_pix_loss=True)).eval()
    convert.export(_fastmae_ckpt(mae.state_dict(), checkpoint.model_config(mae)), str(tmp_path / "hf"), "hf", layout)
    hf = _hf_model(str(tmp_path / "hf"))
    x, noise = torch.randn(2, 3, 224, 224), torch.rand(2, 196)
    with torch.no_grad():
        o = hf(x, noise=noise)
        loss, pred, mask = mae(x, mask_ratio=0.75, noise=noise)
    assert rel_err(o.loss, loss) < 1e-5 and torch.equal(o.mask, mask) and rel_err(o.logits, pred) < 1e-5
    _equal_state(convert.from_hf(hf.state_dict()), mae.state_dict())


_TRANSFORMERS4_SCRIPT = r"""
import sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
folder, data = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
model, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True,
                                                                attn_implementation="eager")
assert not any(info.values()), info
with torch.no_grad():
    o = model.eval()(data["imgs"], noise=data["noise"])
torch.save({"loss": o.loss, "logits": o.logits, "mask": o.mask, "version": transformers.__version__,
            "state": model.state_dict()}, sys.argv[3])
"""


def test_transformers4_loads_the_4x_layout(golden_mae, tmp_path):
    """transformers 4.x itself (in a side install: it cannot share an environment with 5.x) loads the
    4.x-layout folder and gives the official numbers."""
    site = os.environ.get("FASTMAE_TRANSFORMERS4")
    if not site:
        pytest.skip("set FASTMAE_TRANSFORMERS4 to a `pip install --target DIR transformers==4.57.6` folder "
                    "(.ci/run does)")
    c = golden_mae["cases"][MAE_CASES[0]]
    convert.export(_fastmae_ckpt(c["state_dict"], c["config"]), str(tmp_path / "hf"), "hf", "4")
    torch.save({"imgs": c["imgs"], "noise": c["noise"]}, tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH=site)
    subprocess.run([sys.executable, "-c", _TRANSFORMERS4_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["version"].startswith("4.")
    assert rel_err(got["loss"], c["loss"]) < 1e-5 and torch.equal(got["mask"], c["mask"])
    assert rel_err(got["logits"], c["pred"]) < 1e-5
    _equal_state(convert.from_hf(got["state"]), c["state_dict"])


# ============================================================================ timm
@pytest.mark.parametrize("case", ["global_pool1", "global_pool0"])
def test_timm_gives_the_official_finetuned_logits(golden_ft, case, tmp_path):
    c = golden_ft["cases"][case]
    cfg = dict(c["config"], kind="vit", head="linear", in_chans=3)
    state = convert.to_timm(c["state_dict"])
    arch, args = convert.timm_config(cfg, state)
    assert args["global_pool"] == ("avg" if cfg["global_pool"] else "token") and args["fc_norm"] == cfg["global_pool"]
    model = timm.create_model(arch, pretrained=False, **args).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert rel_err(model(c["imgs"]), c["logits"]) < 1e-5
    # the same through a model folder that timm reads itself
    convert.export(_fastmae_ckpt(c["state_dict"], cfg), str(tmp_path / "timm"), "timm")
    folder_model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert rel_err(folder_model(c["imgs"]), c["logits"]) < 1e-5
    _equal_state(convert.from_timm(folder_model.state_dict()), c["state_dict"])


@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
def test_timm_features_and_a_folded_probe_head(global_pool, tmp_path):
    torch.manual_seed(0)
    vit = _perturbed(fastmae.create_vit("vit_micro_patch8", img_size=32, num_classes=5, global_pool=global_pool))
    vit.use_probe_head()
    with torch.no_grad():
        vit.head[0].running_mean.normal_()
        vit.head[0].running_var.uniform_(0.5, 2.0)
    vit.eval()
    lines = convert.export(_fastmae_ckpt(vit.state_dict(), vit.config()), str(tmp_path / "t"), "timm")
    assert any("folded" in line for line in lines)
    model = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), vit.forward_features(x),
                              atol=1e-6)
        assert torch.allclose(model(x), vit(x), atol=1e-5)


def test_an_mae_encoder_exports_to_timm_and_loads_back(tmp_path):
    """A pre-trained MAE's encoder: timm's cls-token pooling with the final norm, no head; loaded
    back into a fastmae classifier it gives the same features."""
    torch.manual_seed(0)
    mae = _perturbed(fastmae.create_model("mae_vit_micro_patch8", img_size=32))
    convert.export(_fastmae_ckpt(mae.state_dict(), checkpoint.model_config(mae)), str(tmp_path / "t"), "timm")
    model = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    assert model.num_classes == 0 and model.global_pool == "token"
    vit = fastmae.create_vit("vit_micro_patch8", img_size=32, num_classes=0, global_pool=False).eval()
    report = convert.load_pretrained(vit, str(tmp_path / "t"))
    assert report.format == "timm VisionTransformer" and not report.dropped
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), vit.forward_features(x),
                              atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("global_pool", [True, False], ids=["gap", "cls"])
def test_timm_vit_base_matches_fastmae(global_pool):
    torch.manual_seed(0)
    vit = _perturbed(fastmae.vit_base_patch16(num_classes=10, global_pool=global_pool)).eval()
    arch, args = convert.timm_config(vit.config(), vit.state_dict())
    assert arch == "vit_base_patch16_224"
    model = timm.create_model(arch, pretrained=False, num_classes=10, global_pool=args["global_pool"],
                              fc_norm=args["fc_norm"]).eval()
    model.load_state_dict(convert.to_timm(vit.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), vit.forward_features(x),
                              atol=1e-5)
        assert torch.allclose(model(x), vit(x), atol=1e-5)
    _equal_state(convert.from_timm(model.state_dict()), vit.state_dict())


def test_timm_features_fastmae_lacks_are_refused():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=3, reg_tokens=2, init_values=1e-5, num_classes=0)
    with pytest.raises(convert.ConversionError, match="features fastmae's ViT does not have: .*reg_token"):
        convert.from_timm(model.state_dict())


# ============================================================================ load_pretrained
def _sources(mae, tmp_path):
    """The same pre-trained MAE in every format fastmae reads, with the format it must be detected as."""
    sd, cfg = mae.state_dict(), checkpoint.model_config(mae)
    encoder = {k: v for k, v in sd.items() if not k.startswith(convert.DECODER_PREFIXES)}
    torch.save(_fastmae_ckpt(sd, cfg), tmp_path / "fastmae.pth")
    torch.save({"model": sd}, tmp_path / "official.pth")
    torch.save({"model": encoder}, tmp_path / "official_encoder.pth", _use_new_zipfile_serialization=False)
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    for layout in LAYOUTS:
        convert.export(str(tmp_path / "fastmae.pth"), str(tmp_path / f"hf{layout}"), "hf", layout)
    convert.export({"model": encoder, "model_config": cfg, "format": checkpoint.FORMAT}, str(tmp_path / "hf_enc"),
                   "hf")
    convert.export(str(tmp_path / "fastmae.pth"), str(tmp_path / "timm"), "timm")
    return {
        "fastmae.pth": "fastmae pre-training checkpoint",
        "official.pth": "official pre-training checkpoint",
        "official_encoder.pth": "official encoder-only pre-training checkpoint",  # torch's legacy format
        "encoder.safetensors": "state_dict",
        "hf4": "Hugging Face ViTMAEForPreTraining (transformers 4.x keys)",
        "hf5": "Hugging Face ViTMAEForPreTraining (transformers 5.x keys)",
        "hf_enc": "Hugging Face ViTMAEModel (transformers 4.x keys)",
        "timm": "timm VisionTransformer",
    }


def test_load_pretrained_detects_every_format(tmp_path):
    torch.manual_seed(0)
    mae = _perturbed(fastmae.create_model("mae_vit_micro_patch8", img_size=32))
    sd = mae.state_dict()
    sources = _sources(mae, tmp_path)
    hf_state = convert.to_hf(sd, "5")  # an in-memory Hugging Face state_dict too
    for name, fmt in list(sources.items()) + [(hf_state, "Hugging Face ViTMAEForPreTraining (transformers 5.x keys)")]:
        source = str(tmp_path / name) if isinstance(name, str) else name
        vit = fastmae.create_vit("vit_micro_patch8", img_size=32, num_classes=4, global_pool=False)
        report = convert.load_pretrained(vit, source)
        assert report.format == fmt, (name, report.format)
        for k, v in vit.state_dict().items():
            if not k.startswith("head."):
                assert torch.equal(v, sd[k]), (name, k)
        assert set(report.initialised) == {"head.weight", "head.bias"}
        torch.manual_seed(5)
        other = fastmae.create_model("mae_vit_micro_patch8", img_size=32)
        init_decoder = {k: v.clone() for k, v in other.state_dict().items() if k.startswith(convert.DECODER_PREFIXES)}
        report = convert.load_pretrained(other, source)
        has_decoder = "decoder_embed.weight" in pretrained.read_source(source).state
        for k, v in other.state_dict().items():
            want = sd[k] if has_decoder or not k.startswith(convert.DECODER_PREFIXES) else init_decoder[k]
            assert torch.equal(v, want), (name, k)
        assert bool(report.initialised) == (not has_decoder), name


def test_load_pretrained_reads_what_transformers_saves_sharded(tmp_path):
    """A folder written by transformers' own save_pretrained, split into shards with an index
    (transformers 5 saves the 4.x keys, its decoder blocks as ``decoder.decoder_encoder.layer.N``)."""
    torch.manual_seed(0)
    mae = _perturbed(fastmae.create_model("mae_vit_micro_patch8", img_size=32))
    convert.export(_fastmae_ckpt(mae.state_dict(), checkpoint.model_config(mae)), str(tmp_path / "hf"), "hf")
    _hf_model(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, info = pretrained.load_model(str(tmp_path / "sharded"))
    assert info["format"] == ("Hugging Face ViTMAEForPreTraining (transformers 4.x keys, as transformers 5 saves "
                              "them)")
    _equal_state(model.state_dict(), mae.state_dict())


def test_load_pretrained_into_an_mae_of_another_size_and_the_eps_note(tmp_path):
    """A sin-cos table of another grid is regenerated; a Hugging Face config with its default
    layer_norm_eps (1e-12) is loaded with a note, and export replaces it by the official 1e-6."""
    torch.manual_seed(0)
    mae = fastmae.create_model("mae_vit_micro_patch8", img_size=32)
    convert.export(_fastmae_ckpt(mae.state_dict(), checkpoint.model_config(mae)), str(tmp_path / "hf"), "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), layer_norm_eps=1e-12)))
    bigger = fastmae.create_model("mae_vit_micro_patch8", img_size=48)
    report = convert.load_pretrained(bigger, str(tmp_path / "hf"))
    assert {"pos_embed", "decoder_pos_embed"} == set(report.resized)
    assert any("layer_norm_eps=1e-12" in n for n in report.notes) and "note:" in str(report)
    lines = convert.export(str(tmp_path / "hf"), str(tmp_path / "fm.pth"), "fastmae")
    assert any("layer_norm_eps 1e-12" in line and "replaced by the official recipe's 1e-6" in line for line in lines)
    model, info = pretrained.load_model(str(tmp_path / "fm.pth"))
    assert info["model_config"]["layer_norm_eps"] == 1e-6 and model.norm.eps == 1e-6


# ============================================================================ safety and errors
class _Payload:
    """An object a weights-only load refuses to rebuild (unpickling it could run code)."""


def test_files_that_are_not_checkpoints_give_clear_errors(tmp_path):
    torch.manual_seed(0)
    sd = fastmae.create_model("mae_vit_micro_patch8", img_size=32).state_dict()
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    data = good.read_bytes()
    cases = {}
    for name, content in [("truncated.safetensors", data[: len(data) // 2]), ("garbage.safetensors", os.urandom(999)),
                          ("header_only.safetensors", data[:8])]:
        (tmp_path / name).write_bytes(content)
        cases[name] = "not a readable .safetensors file"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty.safetensors"] = "is empty"
    (tmp_path / "no_weights").mkdir()
    cases["no_weights"] = "holds no weights"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file(sd, str(bert / "model.safetensors"))
    cases["bert"] = "Hugging Face 'bert' model"
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    (resnet / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    save_file(sd, str(resnet / "model.safetensors"))
    cases["resnet"] = "timm 'resnet50' model"
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    save_file(sd, str(bad_json / "model.safetensors"))
    cases["bad_json"] = "cannot be read as JSON"
    code = tmp_path / "code"
    code.mkdir()
    torch.save({"model": sd, "extra": _Payload()}, code / "pytorch_model.bin")
    cases["code"] = r"safe \(weights-only\) load refuses.*if you trust the file"
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cases["other.safetensors"] = "does not hold a ViT encoder: the weights are in no layout fastmae reads"
    vit = fastmae.create_vit("vit_micro_patch8", img_size=32)
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg):
            convert.load_pretrained(vit, str(tmp_path / name))
        assert cli.main(["convert", "--to", "hf", str(tmp_path / name), str(tmp_path / ("out_" + name))]) == 1, name


def test_conversions_refuse_what_the_target_cannot_hold(golden_ft):
    sd = golden_ft["cases"]["global_pool1"]["state_dict"]
    with pytest.raises(convert.ConversionError, match="classifier .* no Hugging Face ViTMAE counterpart"):
        convert.to_hf(sd)
    with pytest.raises(convert.ConversionError, match="layout must be one of"):
        convert.to_hf({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}, "6")
    with pytest.raises(convert.ConversionError, match="official layout already"):
        convert.from_hf(sd)
    hf = convert.to_hf({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))})
    del hf["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(convert.ConversionError, match="only some of query, key and value"):
        convert.from_hf(hf)
    with pytest.raises(convert.ConversionError, match="no layout fastmae reads"):
        convert.detect_layout({"conv1.weight": torch.zeros(1)})


# ============================================================================ fastmae convert
def test_convert_command_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    mae = _perturbed(fastmae.create_model("mae_vit_micro_patch8", img_size=32))
    torch.save({"model": mae.state_dict(), "args": {"model": "mae_vit_micro_patch8"}}, tmp_path / "official.pth")

    def run(*argv):
        return cli.main(["convert", *map(str, argv)])

    assert run("--to", "hf", tmp_path / "official.pth", tmp_path / "hf") == 0
    assert "ViTMAEForPreTraining.from_pretrained" in capsys.readouterr().out
    assert run("--to", "fastmae", tmp_path / "hf", tmp_path / "fm.safetensors") == 0
    assert run("--to", "fastmae", tmp_path / "fm.safetensors", tmp_path / "fm.pth") == 0
    assert run("--to", "official", tmp_path / "fm.pth", tmp_path / "back.pth") == 0
    _equal_state(torch.load(tmp_path / "back.pth", weights_only=True)["model"], mae.state_dict())
    model, info = pretrained.load_model(str(tmp_path / "fm.safetensors"))
    assert info["format"] == "fastmae pre-training checkpoint" and info["step"] is None
    _equal_state(model.state_dict(), mae.state_dict())
    # fastmae visualize reads any pre-training format
    assert cli.main(["visualize", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
    # a weights-only file cannot resume a run, and says why
    with pytest.raises(CheckpointError, match="holds weights only"):
        checkpoint.load(str(tmp_path / "fm.pth"))
    # refusals: an existing OUT, OUT = IN, a classifier to Hugging Face, a folder for a one-file format
    capsys.readouterr()
    assert run("--to", "hf", tmp_path / "official.pth", tmp_path / "hf") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run("--to", "hf", "--overwrite", tmp_path / "official.pth", tmp_path / "hf") == 0
    assert run("--to", "official", "--overwrite", tmp_path / "back.pth", tmp_path / "back.pth") == 1
    vit = fastmae.create_vit("vit_micro_patch8", img_size=32, num_classes=3, global_pool=True)
    torch.save({"model": vit.state_dict()}, tmp_path / "cls.pth")
    capsys.readouterr()
    assert run("--to", "hf", tmp_path / "cls.pth", tmp_path / "cls_hf") == 1
    assert "no Hugging Face ViTMAE counterpart" in capsys.readouterr().err
    assert run("--to", "official", tmp_path / "cls.pth", tmp_path / "cls_dir") == 1
    assert run("--to", "timm", tmp_path / "cls.pth", tmp_path / "cls.safetensors") == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out
    model, info = pretrained.load_model(str(tmp_path / "cls.safetensors"))
    assert info["model_config"]["num_classes"] == 3 and model.global_pool
    _equal_state(model.state_dict(), vit.state_dict())
