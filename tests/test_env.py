"""`fastmae env`, the README's settings table, and that FASTMAE_* variables are read in fastmae.config
only (the settings themselves: tests/test_dispatch.py)."""
import os
import re
import subprocess
import sys

import torch

import fastmae
from fastmae import config, envinfo
from fastmae.ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_env_report_runs_as_a_command(tmp_path):
    # cwd: away from the checkout, whose fastmae/ (no built extension in a non-editable install)
    # `python -m` would import instead of the installed package
    out = subprocess.run([sys.executable, "-m", "fastmae", "env"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "FASTMAE_CPU_STREAM": "never", "FASTMAE_TYPO": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "fastmae  " in text and fastmae.__version__ in text and torch.__version__ in text
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
    assert "pip install --no-build-isolation" in text


def test_build_hint_names_a_source_checkout_imported_as_it_is():
    """Run from a checkout's folder after a non-editable install, `python -m fastmae` imports the
    checkout's sources, which have no built extension: the hint says so instead of "install"."""
    package = os.path.dirname(os.path.abspath(fastmae.__file__))
    checkout = os.path.isfile(os.path.join(package, os.pardir, "setup.py"))
    hint = _backend.build_hint()
    assert ("source checkout" in hint and "run from another folder" in hint) == checkout, hint
    assert "pip install --no-build-isolation" in hint


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
