#!/usr/bin/env python3
"""Apply, revert or check this folder's patches against an installed megatron-core.

  python patches/apply_patches.py check    # what is applied, what is not, what cannot be
  python patches/apply_patches.py apply    # apply every patch not yet applied
  python patches/apply_patches.py revert   # undo every applied patch
  ... --site DIR    the folder that holds `megatron/` (default: where `import megatron` finds
                    it, without importing it)

Each patch is a unified diff under `megatron-core-<version>/` (paths relative to the folder
holding `megatron/`, as `patch -p1` reads them) with a preamble before its first `---` line:

  Upstream: megatron/core/datasets/utils.py
  Why: ...

A patch is applied only to the megatron-core release its folder names (read from
`megatron/core/package_info.py`); another release is refused, naming both, because its
context lines may match code that means something else. Hunks match their context exactly
(no fuzz, line numbers ignored); a file whose text matches neither the patch's before nor its
after is refused with the file and the hunk, and no file is written unless every hunk of
every patch matches. Exit status: 0 done (or nothing to do), 1 `check` found patches not
applied, 2 refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
_VERSION_FIELD = re.compile(r"^(MAJOR|MINOR|PATCH)\s*=\s*(\d+)\s*$", re.M)
_HUNK_HEADER = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@")


class Refused(Exception):
    """A patch that cannot be applied or reverted here; the message says why and what to do."""


@dataclass
class Hunk:
    before: str
    after: str


@dataclass
class FilePatch:
    path: str             # relative to the folder holding megatron/
    hunks: list[Hunk]


@dataclass
class Patch:
    source: Path          # the .patch file
    version: str          # the megatron-core release it was made for
    upstream: str
    why: str
    files: list[FilePatch]


def parse_patch(source: Path) -> Patch:
    """A unified diff with its preamble (module docstring)."""
    lines = source.read_text().splitlines(keepends=True)
    fields: dict[str, str] = {}
    files: list[FilePatch] = []
    i = 0
    while i < len(lines) and not lines[i].startswith("--- "):
        key, _, value = lines[i].partition(":")
        if value and key.strip() in ("Upstream", "Why"):
            fields[key.strip()] = value.strip()
        elif lines[i].startswith("  ") and fields:  # a continued field (indented)
            last = list(fields)[-1]
            fields[last] += " " + lines[i].strip()
        i += 1
    while i < len(lines):
        if not lines[i].startswith("--- ") or not lines[i + 1].startswith("+++ "):
            raise Refused(f"{source}: line {i + 1}: expected '--- a/PATH' then '+++ b/PATH'")
        path = lines[i + 1][4:].strip().split("\t")[0]
        path = path[2:] if path.startswith("b/") else path
        file = FilePatch(path, [])
        i += 2
        while i < len(lines) and _HUNK_HEADER.match(lines[i]):
            before, after = [], []
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\n") \
                    and not lines[i].startswith(("--- ", "+++ ")):
                tag, text = lines[i][:1], lines[i][1:]
                if tag == "\n":  # an empty context line whose leading space was stripped
                    tag, text = " ", "\n"
                if tag in (" ", "-"):
                    before.append(text)
                if tag in (" ", "+"):
                    after.append(text)
                i += 1
            file.hunks.append(Hunk("".join(before), "".join(after)))
        if not file.hunks:
            raise Refused(f"{source}: {path} has no hunk")
        files.append(file)
    for key in ("Upstream", "Why"):
        if key not in fields:
            raise Refused(f"{source}: the preamble lacks '{key}: ...' (README.md)")
    version = source.parent.name.removeprefix("megatron-core-")
    return Patch(source, version, fields["Upstream"], fields["Why"], files)


def all_patches(folder: Path = HERE) -> list[Patch]:
    return [parse_patch(p) for p in sorted(folder.glob("megatron-core-*/*.patch"))]


def default_site() -> Path:
    """The folder holding the installed `megatron/` package (found without importing it)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise Refused("megatron-core is not installed in this Python: install it "
                      "(pip install megatron-core) or pass --site DIR")
    return Path(list(spec.submodule_search_locations)[0]).parent


def installed_version(site: Path) -> str:
    info = site / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        raise Refused(f"{info} does not exist: --site must be the folder that holds megatron/")
    fields = dict(_VERSION_FIELD.findall(info.read_text()))
    if set(fields) != {"MAJOR", "MINOR", "PATCH"}:
        raise Refused(f"{info}: no MAJOR, MINOR and PATCH found; not a megatron-core install")
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}"


def state(patch: Patch, site: Path) -> str:
    """'applied', 'not applied'; Refused when the installed files match neither."""
    states = set()
    for file in patch.files:
        target = site / file.path
        if not target.is_file():
            raise Refused(f"{patch.source.name}: {target} does not exist")
        text = target.read_text()
        for n, hunk in enumerate(file.hunks, 1):
            has_before, has_after = text.count(hunk.before), text.count(hunk.after)
            # (a hunk that only adds or only removes lines at an end of its context has one
            # side inside the other)
            if has_after == 1 and (has_before == 0 or hunk.before in hunk.after):
                states.add("applied")
            elif has_before == 1 and (has_after == 0 or hunk.after in hunk.before):
                states.add("not applied")
            else:
                raise Refused(f"{patch.source.name}: {target}, hunk {n}: the installed text "
                              "matches neither the patch's before nor its after exactly once "
                              "(changed by hand or by another patch?); reinstall megatron-core "
                              f"{patch.version} and apply again")
    if len(states) > 1:
        raise Refused(f"{patch.source.name}: partly applied in {site}; reinstall megatron-core "
                      f"{patch.version} and apply again")
    return states.pop()


def _rewrite(patch: Patch, site: Path, *, forward: bool) -> None:
    new_texts = {}
    for file in patch.files:
        target = site / file.path
        text = new_texts.get(target, target.read_text())
        for hunk in file.hunks:
            old, new = (hunk.before, hunk.after) if forward else (hunk.after, hunk.before)
            text = text.replace(old, new, 1)
        new_texts[target] = text
    for target, text in new_texts.items():
        target.write_text(text)


def run(command: str, site: Path, folder: Path = HERE, out=sys.stdout) -> int:
    """The CLI's work (module docstring); raises Refused before writing anything."""
    version = installed_version(site)
    patches = all_patches(folder)
    wrong = [p for p in patches if p.version != version]
    if wrong and command != "check":
        made_for = sorted({p.version for p in wrong})
        raise Refused(f"megatron-core {version} is installed in {site}; the patches "
                      f"{', '.join(p.source.name for p in wrong)} were made for "
                      f"{', '.join(made_for)}. Install that release (pip install "
                      f"megatron-core=={made_for[0]}) or port the patches to {version} in a "
                      f"new folder patches/megatron-core-{version}/")
    states = {p.source.name: ("made for " + p.version if p.version != version
                              else state(p, site)) for p in patches}  # refuses before writing
    for patch in patches:
        name = patch.source.name
        if command == "apply" and states[name] == "not applied":
            _rewrite(patch, site, forward=True)
            states[name] = "applied"
        elif command == "revert" and states[name] == "applied":
            _rewrite(patch, site, forward=False)
            states[name] = "not applied"
        print(f"{name}: {states[name]} ({patch.upstream}, megatron-core {patch.version})",
              file=out)
    if not patches:
        print(f"no patches in {folder}", file=out)
    return 1 if command == "check" and any(s != "applied" for s in states.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "apply", "revert"))
    parser.add_argument("--site", type=Path, default=None,
                        help="the folder that holds megatron/ (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        return run(args.command, args.site or default_site())
    except Refused as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
