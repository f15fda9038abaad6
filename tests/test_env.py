"""fastmae.config (every FASTMAE_* setting, read once), `fastmae env`, and the README's table."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastmae
from fastmae import config, envinfo
from fastmae.ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_from_environ_parses_and_refuses():
    s = config.from_environ({"FASTMAE_BACKEND": " Torch ", "FASTMAE_CPU_ISA": "avx2", "FASTMAE_CPU_STREAM": "never",
                             "FASTMAE_REQUIRE_EXTENSION": "1"})
    assert s == config.Settings(backend="torch", cpu_isa="avx2", cpu_stream="never", require_extension=True)
    assert s.cpp_args == (1, 0)
    assert config.from_environ({}) == config.Settings() and config.Settings().cpp_args == (2, 2)
    assert config.from_environ({"FASTMAE_BACKEND": ""}).backend == "auto"  # empty: the default
    for name, value in (("FASTMAE_BACKEND", "c pp"), ("FASTMAE_CPU_ISA", "avx9"), ("FASTMAE_CPU_STREAM", "sometimes"),
                        ("FASTMAE_REQUIRE_EXTENSION", "yes")):
        with pytest.raises(ValueError, match=f"{name}='{value}' is not one of"):
            config.from_environ({name: value})


def test_override_restores_and_checks():
    before = config.settings()
    with config.override(backend="torch", cpu_stream="always") as s:
        assert config.settings() is s and s.backend == "torch" and s.cpu_stream == "always"
        assert s.cpu_isa == before.cpu_isa
        with config.override(backend="cpp"):
            assert config.settings().backend == "cpp"
        assert config.settings().backend == "torch"
    assert config.settings() == before
    with pytest.raises(ValueError, match="FASTMAE_BACKEND='bogus' is not one of"):
        with config.override(backend="bogus"):
            pass
    with pytest.raises(TypeError, match="unknown setting 'backnd'"):
        with config.override(backnd="torch"):
            pass
    assert config.settings() == before


def test_settings_read_once_at_import():
    """Changing the environment after the import changes nothing; a bad value is reported by the
    first op (and by fastmae env), not by the import."""
    code = ("import os, torch, fastmae; from fastmae import config, ops; "
            "os.environ['FASTMAE_BACKEND'] = 'torch'; print(config.settings().backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTMAE_BACKEND": "auto"})
    assert out.returncode == 0 and out.stdout.strip() == "auto", out.stderr
    code = ("import torch, fastmae; from fastmae import ops\n"
            "try:\n    ops.gather_mask(torch.randn(1, 1, 4, 4), torch.tensor([[0]]), 2)\n"
            "except ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTMAE_BACKEND": "bogus"})
    assert out.returncode == 0, out.stderr
    assert "bad fastmae setting: FASTMAE_BACKEND='bogus' is not one of auto, torch, cpp, triton" in out.stdout


def test_require_extension_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "_ext_state", {"error": "ImportError: no fastmae._C"})
    with config.override(backend="auto", require_extension=True):
        with pytest.raises(RuntimeError, match="FASTMAE_REQUIRE_EXTENSION=1 but fastmae's C\\+\\+ extension is "
                                               "unavailable \\(ImportError: no fastmae._C\\)"):
            _backend.select_backend("cpu")
    with config.override(backend="auto", require_extension=False):
        with pytest.warns(RuntimeWarning, match="CPU tensors use the slower torch math"):
            assert _backend.select_backend("cpu") == "torch"


def test_env_report_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "fastmae", "env"], capture_output=True, text=True,
                         env={**os.environ, "FASTMAE_CPU_STREAM": "never", "FASTMAE_TYPO": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"fastmae  " in text and fastmae.__version__ in text and torch.__version__ in text
    for var in config.VARIABLES:
        assert (var.name in text) != var.bench  # benchmark knobs only when set
    assert re.search(r"FASTMAE_CPU_STREAM\s+'never' \(from the environment\)", text), text
    assert "FASTMAE_TYPO" in text and "not a fastmae setting" in text
    ext = _backend.extension_error()
    assert bool(re.search(r"C\+\+ extension\s+loaded", text)) == (ext is None), text
    if ext is None:
        assert "CPU kernels' ISA" in text
    assert re.search(r"fused ops on CPU\s+(cpp|torch|triton)", text)


def test_env_report_says_why_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_backend, "_ext_state", {"error": "ImportError: undefined symbol _ZN3c10", "warned": True})
    text = envinfo.report()
    assert "NOT loaded: ImportError: undefined symbol _ZN3c10" in text
    assert "pip install --no-build-isolation ." in text


def test_readme_settings_table_is_current():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = re.search(r"<!-- settings-table[^\n]*-->\n(.*?)\n<!-- /settings-table -->", readme, re.S)
    assert table, "README.md lost its settings table markers"
    assert table.group(1) == envinfo.settings_table(), "regenerate it with fastmae.envinfo.settings_table()"


def test_no_fastmae_variable_read_outside_config():
    """FASTMAE_* variables are read in fastmae/config.py only (setup.py reads FASTMAE_NO_EXTENSION at
    build time); the C++ kernels get their settings as arguments."""
    offenders = []
    for folder in ("fastmae", "kernels", "csrc", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith((".py", ".cpp", ".h")) or name == "config.py":
                    continue
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    text = f.read()
                if re.search(r"(environ(\.get|\.setdefault)?\s*[\[(]\s*[\"']FASTMAE_|getenv\(\s*\"FASTMAE_)", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders
