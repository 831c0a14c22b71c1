"""Helpers shared by the benchmark scripts: ``--set key=value`` parsing and report writing."""
import platform
import re
from pathlib import Path

import yaml

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_sets(pairs):
    """``["key=value", ...]`` -> dict, values parsed as yaml (as RecBole parses --key=value)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def parse_scoped_sets(rest, scopes):
    """``["--set-<scope>", "key=value", ...]`` (the arguments argparse left over) -> ``{scope: [pairs]}``
    for every scope in ``scopes``; anything else is refused with its name."""
    scoped = {scope: [] for scope in scopes}
    flags = iter(rest)
    for flag in flags:
        scope = flag[len("--set-"):] if flag.startswith("--set-") else None
        value = next(flags, None)
        if scope not in scoped or value is None:
            raise SystemExit(f"unknown argument {flag!r}; per-scope overrides are --set-<one of {list(scopes)}> key=value")
        scoped[scope].append(value)
    return scoped


def write_report(out, lines):
    """Write ``lines`` to the markdown file ``out``, followed by the hand-written analysis kept in
    ``<out stem>_notes.md`` (so re-running a benchmark never loses it), and print them."""
    out = Path(out)
    notes = out.with_name(out.stem + "_notes.md")
    if notes.is_file():
        lines = [*lines, "", notes.read_text()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def cpu_description():
    """``(CPU model name, the matmul-relevant flags it has)`` from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split()) if "flags" in text else set()
    return (model.group(1).strip() if model else platform.processor()), [f for f in FLAGS if f in flags]
