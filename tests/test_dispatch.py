"""How a fused op reaches its kernel: the backend chosen per device (``fastmae.ops._backend``), the
forced backend's kernel actually running, the loader of the C++ extension (missing, stale, warned
once, refused under FASTMAE_REQUIRE_EXTENSION=1), the settings of ``fastmae.config`` (read once at
import, checked, overridden in-process and restored), the settings the C++ kernels take as
arguments, and the three ops in one graph under ``torch.compile(fullgraph=True)``."""
import os
import re
import sys
import types

import pytest
import torch
from helpers import available_backends, random_masking, require_cpp, skip_triton_tracing

from fastmae import config, ops
from fastmae.ops import _backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def fresh_loader(monkeypatch):
    """The extension loader's state, restored after the test (it is cached per process)."""
    monkeypatch.setattr(_backend, "_ext_state", {})
    return _backend


# ============================================================================ backend choice
def test_backend_choice_by_device(monkeypatch):
    """With backend auto: CPU tensors to C++ (when the extension is built), CUDA tensors to Triton
    (torch math without triton), any other device to torch math."""
    with config.override(backend="auto"):
        assert _backend.select_backend(CPU) == ("cpp" if _backend.has_extension() else "torch")
        assert _backend.select_backend("meta") == "torch"
        monkeypatch.setattr(_backend, "has_triton", lambda: True)
        assert _backend.select_backend(CUDA) == "triton"
        monkeypatch.setattr(_backend, "has_triton", lambda: False)
        assert _backend.select_backend(CUDA) == "torch"


def test_forced_backend_is_used_for_every_device():
    with config.override(backend="torch"):
        assert {_backend.select_backend(d) for d in (CPU, CUDA, "meta")} == {"torch"}
    if _backend.has_extension():
        with config.override(backend="cpp"):
            assert _backend.select_backend(CPU) == "cpp"


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch, fresh_loader):
    """cpp on a CUDA tensor or without the extension, triton without triton or on a CPU tensor
    without the interpreter: a RuntimeError saying why and what to do."""
    with config.override(backend="cpp"):
        with pytest.raises(RuntimeError, match="FASTMAE_BACKEND=cpp runs on CPU tensors only, got cuda"):
            _backend.select_backend(CUDA)
        monkeypatch.setattr(_backend, "REQUIRED_CPP_OPS", _backend.REQUIRED_CPP_OPS + ("no_such_op",))
        with pytest.raises(RuntimeError, match="FASTMAE_BACKEND=cpp but the extension is unavailable .*"
                                               "pip install --no-build-isolation"):
            _backend.select_backend(CPU)
    with config.override(backend="triton"):
        monkeypatch.setattr(_backend, "has_triton", lambda: False)
        with pytest.raises(RuntimeError, match="FASTMAE_BACKEND=triton but triton is not installed"):
            _backend.select_backend(CUDA)
        monkeypatch.setattr(_backend, "has_triton", lambda: True)
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton's own switch, not a fastmae setting
        with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(got cpu\).*TRITON_INTERPRET=1"):
            _backend.select_backend(CPU)
        assert _backend.select_backend(CUDA) == "triton"


def _spy(monkeypatch, calls: list):
    """Record every call of a C++ kernel (torch.ops.fastmae_C) and of a Triton launcher
    (fastmae.kernels) as (backend, name)."""
    import importlib

    for op in ("gather_mask", "unshuffle_scatter", "norm_mse_loss"):
        if _backend.has_extension():
            for name in (f"{op}_fwd", f"{op}_bwd"):
                real = getattr(torch.ops.fastmae_C, name)
                monkeypatch.setattr(torch.ops.fastmae_C, name,
                                    lambda *a, _real=real, _name=name: calls.append(("cpp", _name)) or _real(*a))
        if _backend.has_triton():
            module = importlib.import_module(f"fastmae.kernels.{op}")
            for name in (f"{op}_forward", f"{op}_backward"):
                real = getattr(module, name)
                monkeypatch.setattr(module, name,
                                    lambda *a, _real=real, _name=name: calls.append(("triton", _name)) or _real(*a))


def test_forced_backend_runs_its_kernels(backend, monkeypatch):
    """Each op's forward and backward run the forced backend's kernels, and no other backend's
    (the torch backend: neither C++ kernels nor Triton launchers)."""
    calls = []
    _spy(monkeypatch, calls)
    gen = torch.Generator().manual_seed(0)
    N, C, H, W, p, K, D = 2, 3, 16, 16, 8, 1, 8
    _, keep, restore, mask = random_masking(gen, N, 4, K)
    imgs = torch.randn(N, C, H, W, requires_grad=True)
    ops.gather_mask(imgs, keep, p).sum().backward()
    x = torch.randn(N, 1 + K, D, requires_grad=True)
    ops.unshuffle_scatter(x, torch.zeros(D), restore).sum().backward()
    pred = torch.randn(N, 4, C * p * p, requires_grad=True)
    ops.norm_mse_loss(pred, imgs.detach(), mask, p).backward()
    if backend == "torch":
        assert calls == []
    else:
        assert {b for b, _ in calls} == {backend} and len({name for _, name in calls}) == 6, calls


# ============================================================================ the extension loader
def test_missing_extension_falls_back_with_one_warning(monkeypatch, fresh_loader):
    """An extension that does not import: the reason recorded, CPU tensors on torch math with one
    warning naming it and the fix; refused under FASTMAE_REQUIRE_EXTENSION=1."""
    def no_extension(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_backend, "importlib", types.SimpleNamespace(import_module=no_extension))
    assert _backend.extension_error() == "ImportError: No module named 'fastmae._C'"
    assert not _backend.has_extension()
    with config.override(backend="auto", require_extension=False):
        with pytest.warns(RuntimeWarning) as warned:
            assert _backend.select_backend(CPU) == "torch" and _backend.select_backend(CPU) == "torch"
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "No module named 'fastmae._C'" in message and "torch math instead" in message
    assert "pip install --no-build-isolation" in message
    with config.override(backend="auto", require_extension=True):
        with pytest.raises(RuntimeError, match=re.escape("FASTMAE_REQUIRE_EXTENSION=1 but fastmae's C++ extension is "
                                                         "unavailable (ImportError: No module named 'fastmae._C')")):
            _backend.select_backend(CPU)


def test_stale_extension_lacking_an_op(monkeypatch, fresh_loader):
    """An extension built from older sources, missing an op the CPU path needs, is stale: the
    reason names the op; CPU tensors fall back to torch math (one warning), or are refused under
    FASTMAE_REQUIRE_EXTENSION=1."""
    require_cpp()
    monkeypatch.setattr(_backend, "_ext_state", {})  # require_cpp loaded it
    monkeypatch.setattr(_backend, "REQUIRED_CPP_OPS", _backend.REQUIRED_CPP_OPS + ("no_such_op",))
    assert _backend.extension_error() == "the built extension lacks no_such_op (built from older sources)"
    with config.override(backend="auto", require_extension=False):
        with pytest.warns(RuntimeWarning, match="lacks no_such_op"):
            assert _backend.select_backend(CPU) == "torch"
    with config.override(backend="auto", require_extension=True):
        with pytest.raises(RuntimeError, match="FASTMAE_REQUIRE_EXTENSION=1 but .*lacks no_such_op"):
            _backend.select_backend(CPU)


def test_stale_extension_with_old_signatures(monkeypatch, fresh_loader):
    """An extension whose ops have the names but the old arguments (no CPU settings, or a loss
    without the clip arguments) is stale."""
    def op(*names):
        schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=n) for n in names])
        return types.SimpleNamespace(default=types.SimpleNamespace(_schema=schema))

    def extension(*names):
        return types.SimpleNamespace(**{name: op(*names) for name in _backend.REQUIRED_CPP_OPS})

    monkeypatch.setattr(_backend, "importlib", types.SimpleNamespace(import_module=lambda name: None))
    current = ("a", "b", "c", "tubelet_size", "isa_cap")
    for old in (extension("a", "b", "c"), extension("a", "b", "c", "isa_cap", "stream_mode")):
        monkeypatch.setattr(_backend, "_ext_state", {})
        monkeypatch.setattr(_backend, "torch", types.SimpleNamespace(ops=types.SimpleNamespace(fastmae_C=old)))
        assert _backend.extension_error() == ("the built extension's ops take the old arguments (built from older "
                                              "sources)")
    monkeypatch.setattr(_backend, "_ext_state", {})
    monkeypatch.setattr(_backend, "torch", types.SimpleNamespace(ops=types.SimpleNamespace(
        fastmae_C=extension(*current))))
    assert _backend.extension_error() is None


def test_backend_fixture_covers_the_built_backends():
    """The op tests run on every backend this machine has: torch always, cpp when built (CI sets
    FASTMAE_REQUIRE_EXTENSION=1, so that a broken build fails instead of skipping), triton under
    the interpreter when installed."""
    names = available_backends()
    assert names[0] == "torch"
    assert ("cpp" in names) == _backend.has_extension()
    if config.settings().require_extension:
        assert "cpp" in names, _backend.extension_error()


# ============================================================================ settings
def test_settings_defaults_and_parsing():
    assert config.from_environ({}) == config.Settings("auto", "auto", "auto", False)
    s = config.from_environ({"FASTMAE_BACKEND": " Torch ", "FASTMAE_CPU_ISA": "AVX2", "FASTMAE_CPU_STREAM": "never",
                             "FASTMAE_REQUIRE_EXTENSION": "1", "FASTMAE_UNRELATED": "x"})
    assert s == config.Settings("torch", "avx2", "never", True)
    assert s.cpp_args == (config.ISA_CAPS["avx2"], config.STREAM_MODES["never"]) == (1, 0)
    assert config.from_environ({"FASTMAE_CPU_ISA": "", "FASTMAE_REQUIRE_EXTENSION": "0"}) == config.Settings()
    assert config.Settings().cpp_args == (2, 2)
    assert config.Settings(cpu_isa="base", cpu_stream="always").cpp_args == (0, 1)


@pytest.mark.parametrize("name, value, allowed", [
    ("FASTMAE_CPU_ISA", "avx9", "auto, avx512, avx2, base"),
    ("FASTMAE_CPU_STREAM", "sometimes", "auto, always, never"),
    ("FASTMAE_BACKEND", "c pp", "auto, torch, cpp, triton"),
    ("FASTMAE_REQUIRE_EXTENSION", "yes", "0, 1"),
])
def test_bad_setting_is_refused(name, value, allowed):
    """A bad value names the variable, the value and what is allowed."""
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is not one of {allowed}")):
        config.from_environ({name: value})


def test_bad_isa_message_exactly():
    with pytest.raises(ValueError) as info:
        config.from_environ({"FASTMAE_CPU_ISA": "avx9"})
    assert str(info.value) == "FASTMAE_CPU_ISA='avx9' is not one of auto, avx512, avx2, base"


def test_override_checks_and_restores():
    """override() puts checked settings in force inside the block and restores the previous ones
    on exit, also when the block raises; an unknown field or a bad value is refused up front."""
    before = config.settings()
    with config.override(backend=" CPP ", cpu_isa="base", cpu_stream="always") as s:
        assert s == config.settings() == config.Settings("cpp", "base", "always", before.require_extension)
        with config.override(require_extension=True):
            assert config.settings().require_extension and config.settings().backend == "cpp"
        assert config.settings() == s
    assert config.settings() == before
    with pytest.raises(KeyError), config.override(backend="torch"):
        assert config.settings().backend == "torch"
        raise KeyError("inside")
    assert config.settings() == before
    with pytest.raises(ValueError, match=re.escape("FASTMAE_BACKEND='bogus' is not one of auto, torch, cpp, triton")):
        with config.override(backend="bogus"):
            pass
    with pytest.raises(ValueError, match="FASTMAE_CPU_STREAM='sometimes'"):
        with config.override(cpu_stream="sometimes"):
            pass
    with pytest.raises(TypeError, match="unknown setting 'isa'"):
        with config.override(isa="avx2"):
            pass
    assert config.settings() == before


def test_bad_environment_fails_at_first_use(monkeypatch):
    """A bad FASTMAE_* value in the environment does not break the import; the first op refuses
    to run, naming it (and `fastmae env` reports it); override() still works on top of defaults."""
    err = "FASTMAE_CPU_ISA='avx9' is not one of auto, avx512, avx2, base"
    monkeypatch.setattr(config, "_current", None)
    monkeypatch.setattr(config, "_error", err)
    assert config.error() == err
    imgs, keep = torch.randn(1, 3, 16, 16), torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match=re.escape(f"bad fastmae setting: {err}")):
        ops.gather_mask(imgs, keep, 8)
    with config.override(backend="torch"):
        assert config.settings() == config.Settings(backend="torch")
        ops.gather_mask(imgs, keep, 8)
    assert config.error() == err


def _fresh_config(monkeypatch, environ: dict):
    """A private copy of fastmae/config.py imported under ``environ`` (what a fresh process that
    imports fastmae with these variables set would hold)."""
    import importlib.util

    for name in list(os.environ):
        if name.startswith("FASTMAE_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("fastmae_config_copy", config.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_environment_is_read_once_at_import(monkeypatch):
    """The FASTMAE_* variables set when fastmae/config.py is imported are the settings in force;
    changing os.environ afterwards changes nothing (tests use config.override instead); a bad value
    does not break the import and is reported at the first use."""
    copy = _fresh_config(monkeypatch, {"FASTMAE_BACKEND": "cpp", "FASTMAE_CPU_ISA": "avx2",
                                       "FASTMAE_CPU_STREAM": "never", "FASTMAE_REQUIRE_EXTENSION": "1"})
    assert copy.settings() == copy.Settings("cpp", "avx2", "never", True) and copy.error() is None
    monkeypatch.setenv("FASTMAE_BACKEND", "torch")
    assert copy.settings().backend == "cpp"
    before = config.settings()
    monkeypatch.setenv("FASTMAE_CPU_ISA", "base")  # nor does it change the real settings
    assert config.settings() == before
    copy = _fresh_config(monkeypatch, {"FASTMAE_CPU_STREAM": "sometimes"})
    assert copy.error() == "FASTMAE_CPU_STREAM='sometimes' is not one of auto, always, never"
    with pytest.raises(ValueError, match=re.escape("bad fastmae setting: FASTMAE_CPU_STREAM='sometimes' is not one "
                                                   "of auto, always, never")):
        copy.settings()


# ============================================================================ the C++ kernels' settings
def test_cpp_isa_cap_selects_the_variant():
    """cpu_isa(cap) is the variant a cap selects: the best this CPU runs, at most the cap."""
    require_cpp()
    best = torch.ops.fastmae_C.cpu_isa(2)
    assert best in (0, 1, 2)
    assert [torch.ops.fastmae_C.cpu_isa(cap) for cap in (0, 1, 2)] == [0, min(1, best), best]
    assert config.ISA_CAPS["auto"] == config.ISA_CAPS["avx512"] == 2


def test_cpp_kernels_check_their_settings():
    """The kernels refuse a cap or a streaming mode outside the enums (config passes valid ones)."""
    require_cpp()
    f = torch.ops.fastmae_C
    x, tok, ids = torch.randn(1, 2, 8), torch.randn(8), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=re.escape("isa cap must be 0 (base), 1 (avx2) or 2 (avx512), got 3")):
        f.unshuffle_scatter_fwd(x, tok, ids, None, 3, 2)
    with pytest.raises(ValueError, match=re.escape("isa cap must be 0 (base), 1 (avx2) or 2 (avx512), got -1")):
        f.cpu_isa(-1)
    with pytest.raises(ValueError, match=re.escape("stream mode must be 0 (never), 1 (always) or 2 (auto), got 5")):
        f.unshuffle_scatter_fwd(x, tok, ids, None, 2, 5)


def test_cpp_kernels_follow_the_settings(monkeypatch):
    """The custom op passes the settings in force to the C++ kernel as its trailing arguments."""
    require_cpp()
    seen = []
    real = torch.ops.fastmae_C.gather_mask_fwd
    monkeypatch.setattr(torch.ops.fastmae_C, "gather_mask_fwd", lambda *a: seen.append(a[-2:]) or real(*a))
    imgs, keep = torch.randn(1, 3, 16, 16), torch.tensor([[0, 2]])
    for isa, stream in (("base", "always"), ("avx2", "never"), ("auto", "auto")):
        with config.override(backend="cpp", cpu_isa=isa, cpu_stream=stream):
            ops.gather_mask(imgs, keep, 8)
    assert seen == [(0, 1), (1, 0), (2, 2)]


# ============================================================================ compiled
def test_compile_fullgraph(backend):
    """One compiled function using every op forward and backward (one graph, no break) matches eager."""
    skip_triton_tracing(backend)
    N, C, H, W, p, K, D = 2, 3, 16, 24, 8, 2, 8
    L = (H // p) * (W // p)
    _, keep, restore, mask = random_masking(torch.Generator().manual_seed(0), N, L, K)
    imgs = torch.randn(N, C, H, W)
    proj = torch.randn(C * p * p, D) * 0.1
    head = torch.randn(D, p * p * C) * 0.1

    def step(imgs, tok, pos):
        x = ops.gather_mask(imgs, keep, p) @ proj  # [N, K, D]
        x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
        dec = ops.unshuffle_scatter(x, tok, restore, pos)
        pred = dec[:, 1:] @ head
        return ops.norm_mse_loss(pred, imgs.detach(), mask, p)  # the target is data

    def run(fn):
        leaves = [imgs.clone().requires_grad_(), torch.randn(D, generator=torch.Generator().manual_seed(1)),
                  torch.randn(1 + L, D, generator=torch.Generator().manual_seed(2))]
        for t in leaves[1:]:
            t.requires_grad_()
        loss = fn(*leaves)
        loss.backward()
        return [loss] + [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for name, a, b in zip(["loss", "dimgs", "dmask_token", "dpos"], compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()
