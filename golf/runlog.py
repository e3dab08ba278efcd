"""Run logs that reproduce a run on their own (SPEC.md section 4), and the JSON summary beside them.

The log starts with the trainer's source and that of every project module it imported, the git
commit and whether the tree was dirty, library versions and nvidia-smi, then every resolved setting.
Only rank 0 writes; other ranks get a RunLog that prints nothing.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quant.pack import packed_script

_PACKED = packed_script()  # a packed trainer (quant/pack.py) carries the project's modules inside itself
REPO_ROOT = Path(_PACKED).parent if _PACKED else Path(__file__).resolve().parents[1]
_LIBRARIES = ("torch", "triton", "numpy", "sentencepiece", "brotli", "huggingface-hub")


def project_sources(main_file: str | Path) -> list[Path]:
    """The trainer file, then every imported module that lives inside the repository; for a packed
    trainer, the packed file alone (its own bytes are the code that runs, and what the artifact counts)."""
    if _PACKED:
        return [Path(_PACKED)]
    main_file = Path(main_file).resolve()
    found = {main_file}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not os.path.isabs(path):  # some extension modules report bare names
            continue
        p = Path(path).resolve()
        if p.suffix == ".py" and p.is_file() and REPO_ROOT in p.parents and ".venv" not in p.parts:
            found.add(p)
    return [main_file] + sorted(found - {main_file})


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return out


class RunLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, line: str = "", console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def provenance(self, main_file: str | Path, settings: list[str]) -> dict[str, Any]:
        """Writes sources (file only), versions, hardware and settings; returns them for the summary."""
        for src in project_sources(main_file):
            self(f"==== source: {src.relative_to(REPO_ROOT) if REPO_ROOT in src.parents else src}", console=False)
            self(src.read_text(encoding="utf-8"), console=False)
        git, libs = git_state(), versions()
        self(f"git_commit:{git['commit']} dirty:{git['dirty']}")
        self("versions: " + " ".join(f"{k}={v}" for k, v in libs.items()))
        smi = _run(["nvidia-smi"])
        self(smi if smi else "nvidia-smi: not available", console=False)
        self("==== settings")
        for line in settings:
            self(line, console=False)
        return {"git": git, "versions": libs, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# Dynamo's per-phase compile timers worth a log line: tracing, the autograd split, Inductor's codegen
# and the wait for Triton kernels compiling in the background
COMPILE_PHASES = {"bytecode_tracing": "trace", "create_aot_dispatcher_function": "aot",
                  "compile_fx_inner": "inductor", "async_compile.wait": "triton_wait"}


def compile_breakdown() -> dict[str, float]:
    """Seconds spent in each of COMPILE_PHASES so far in this process, plus the number of graphs
    compiled; empty when Dynamo's private timers are unavailable (they are diagnostics, not results)."""
    try:
        from torch._dynamo.utils import compile_times, counters
        table = compile_times(repr="str", aggregate=True)
    except (ImportError, TypeError):
        return {}
    out: dict[str, float] = {}
    for line in table.splitlines():
        name, _, value = line.rpartition(", ")
        if name in COMPILE_PHASES:
            out[COMPILE_PHASES[name]] = round(float(value), 2)
    out["graphs"] = counters["stats"]["unique_graphs"]
    return out
