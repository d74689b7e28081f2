"""patches/apply_patches.py on a copy of the installed megatron-core's patched files: apply,
check, revert (byte-identical), refusal of another release and of changed text with nothing
written, and the patched compile_helpers no longer running `make` where the built extension
imports."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("apply_patches",
                                                  ROOT / "patches" / "apply_patches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["apply_patches"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def site(tmp_path):
    """A copy of the installed files the patches touch, plus package_info.py."""
    tool = _tool()
    installed = tool.default_site()
    paths = {"megatron/core/package_info.py"}
    paths |= {f.path for p in tool.all_patches() for f in p.files}
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(installed / rel, tmp_path / rel)
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.py")}


def _run(tool, command, site):
    out = io.StringIO()
    return tool.run(command, site, out=out), out.getvalue()


def test_every_patch_applies_checks_and_reverts_on_a_copy(site):
    tool = _tool()
    patches = tool.all_patches()
    assert patches, "patches/ has no patch to test"
    original = _snapshot(site)
    assert _run(tool, "check", site)[0] == 1  # a pristine install: not applied
    assert _run(tool, "apply", site) == (0, "".join(
        f"{p.source.name}: applied ({p.upstream}, megatron-core {p.version})\n" for p in patches))
    applied = _snapshot(site)
    assert applied != original
    assert _run(tool, "check", site)[0] == 0
    assert _run(tool, "apply", site)[0] == 0 and _snapshot(site) == applied  # idempotent
    assert _run(tool, "revert", site)[0] == 0
    assert _snapshot(site) == original  # byte for byte


def test_gnu_patch_reads_the_same_files(site):
    if shutil.which("patch") is None:
        pytest.skip("no `patch` program on this machine")
    for patch in _tool().all_patches():
        done = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(patch.source)], cwd=site,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_another_release_is_refused_and_nothing_is_written(site):
    tool = _tool()
    info = site / "megatron/core/package_info.py"
    info.write_text(info.read_text().replace("MINOR = 19", "MINOR = 20"))
    before = _snapshot(site)
    with pytest.raises(tool.Refused, match=r"megatron-core 0\.20\.2 is installed.*made for "
                                           r"0\.19\.2.*megatron-core==0\.19\.2"):
        _run(tool, "apply", site)
    assert _snapshot(site) == before
    code, text = _run(tool, "check", site)  # check reports instead of refusing
    assert code == 1 and "made for 0.19.2" in text
    assert tool.main(["apply", "--site", str(site)]) == 2


def test_changed_upstream_text_is_refused_naming_file_and_hunk(site):
    tool = _tool()
    target = site / "megatron/core/datasets/utils.py"
    target.write_text(target.read_text().replace('command = ["make"', 'command = ["gmake"'))
    before = _snapshot(site)
    with pytest.raises(tool.Refused, match=r"utils\.py, hunk 1: .*matches neither"):
        _run(tool, "apply", site)
    assert _snapshot(site) == before


def test_a_patch_without_its_why_is_refused(tmp_path):
    tool = _tool()
    folder = tmp_path / "megatron-core-0.19.2"
    folder.mkdir()
    source = next(iter(tool.all_patches())).source.read_text()
    diff = source.index("\n--- ") + 1
    preamble = "".join(line for line in source[:diff].splitlines(keepends=True)
                       if line.startswith("Upstream:"))
    text = preamble + source[diff:]
    (folder / "bad.patch").write_text(text)
    with pytest.raises(tool.Refused, match=r"bad\.patch: the preamble lacks 'Why: \.\.\.'"):
        tool.all_patches(tmp_path)


def test_the_patched_compile_helpers_uses_the_built_extension(site, monkeypatch):
    """Loaded from the patched copy: no `make` (the installed one runs it and exits)."""
    _run(_tool(), "apply", site)
    spec = importlib.util.spec_from_file_location(
        "megatron.core.datasets.patched_utils", site / "megatron/core/datasets/utils.py")
    patched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patched)
    made = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: made.append(cmd) or SimpleNamespace(returncode=2))
    patched.compile_helpers()
    assert made == []
    from megatron.core.datasets import utils

    with pytest.raises(SystemExit):
        utils.compile_helpers()
    assert made and made[0][0] == "make"
