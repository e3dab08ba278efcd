"""Reads a training log in the community grammar (SPEC.md section 4) back into numbers.

The same grammar serves our trainer's `<RUN_ID>.txt` and the public leaderboard's `train*.log`:
  step:N/M train_loss:X train_time:Tms step_avg:Ams
  step:N/M val_loss:X val_bpb:Y train_time:Tms step_avg:Ams
  stopping_early: wallclock_cap ...      peak memory allocated: N MiB reserved: N MiB
  Serialized model[ label]: N bytes      Code size: N bytes      Total submission size[ label]: N bytes
  final_<stage> val_loss:X val_bpb:Y ... eval_time:Ts      final_<stage>_exact val_loss:X val_bpb:Y
Logs begin with the trainer's source, which holds these patterns too (in f-strings, docstrings), so
the source is skipped first: ours up to the `git_commit:` line, a public one up to the first line of
'=' that follows code. A run is scored by its last `_exact` stage other than `prequant` (the stage after
export that the leaderboard reads), unless a stage is named. Nothing in a log is executed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_STEP = re.compile(rf"^step:(\d+)/(\d+) (?:train_loss:{_NUM}|val_loss:{_NUM} val_bpb:{_NUM}) "
                   rf"train_time:{_NUM}ms step_avg:{_NUM}ms", re.M)
_EXACT = re.compile(rf"^(?:final_)?(\w+?)_exact val_loss:{_NUM} val_bpb:{_NUM}", re.M)
_STAGE_TIME = re.compile(rf"^(?:final_)?(\w+) (?:\S+ )*?val_loss:{_NUM} val_bpb:{_NUM} (?:\S+ )*?"
                         rf"eval_time:{_NUM}(ms|s)\b", re.M)
_SIZE = {"model": re.compile(r"^Serialized model[^:\n]*: (\d+) bytes", re.M),
         "code": re.compile(r"^Code size: (\d+) bytes", re.M),
         "total": re.compile(r"^Total submission size[^:\n]*: (\d+) bytes", re.M)}
_SEED = re.compile(r"^(?:SEED=|seed:)(\d+)\b", re.M)
_SEED_IN_NAME = re.compile(r"seed_?(\d+)")
_STOP = re.compile(r"^stopping_early: (\w+)", re.M)
_PEAK = re.compile(r"^peak memory allocated: (\d+) MiB", re.M)
_WORLD = re.compile(r"^(?:run_id:(\S+) )?world_size:(\d+)", re.M)
_GIT = re.compile(r"^git_commit:(\S*) dirty:\S*$", re.M)
_VERSIONS = re.compile(r"^versions: (.*)$", re.M)
_PUBLIC_TORCH = re.compile(r"^Running PyTorch (\S+)", re.M)
_GPU = re.compile(r"^\|\s+(\d+)\s+(NVIDIA [^|]*?)\s+(?:On|Off)\s+\|", re.M)  # an nvidia-smi table row
_SETTING = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*) \((env|default|replace|alias [A-Z0-9_]+)\)$", re.M)
_SOURCE = re.compile(r"^==== source: (.+)\n", re.M)
_RULE = re.compile(r"^={50,}$", re.M)
_CODE = re.compile(r"^(?:import |from \S+ import |def |class )", re.M)


class LogError(ValueError):
    """A log that lacks what a caller needs; the message names the file."""


@dataclass(frozen=True)
class Score:
    val_loss: float
    val_bpb: float
    eval_time_s: float | None = None


@dataclass(frozen=True)
class ParsedLog:
    path: Path
    seed: int | None
    stages: dict[str, Score]  # every `_exact` stage, in log order
    score_stage: str
    steps: int
    total_steps: int
    train_time_ms: float
    step_avg_ms: float
    stopped_early: bool
    code_bytes: int | None
    model_bytes: int | None
    artifact_bytes: int | None
    peak_memory_mib: int | None
    run_id: str | None
    world_size: int | None
    gpus: tuple[str, ...]
    torch_version: str | None
    cuda_version: str | None
    git_commit: str | None
    settings: dict[str, tuple[str, str]] = field(default_factory=dict)  # ours: NAME -> (value repr, source)

    @property
    def score(self) -> Score:
        return self.stages[self.score_stage]

    @property
    def val_loss(self) -> float:
        return self.score.val_loss

    @property
    def val_bpb(self) -> float:
        return self.score.val_bpb

    @property
    def hardware(self) -> str:
        """`8xNVIDIA H100 80GB HBM3`, from world size and nvidia-smi; `1xcpu` without a GPU table."""
        n = self.world_size or 1
        return f"{n}x{self.gpus[0]}" if self.gpus else f"{n}x{'cpu' if self.world_size else 'unknown'}"

    def need(self, *names: str) -> None:
        """Raises LogError naming the file and every listed field the log did not give."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise LogError(f"{self.path}: the log lacks {'; '.join(_WHERE.get(n, n) for n in missing)}")


_WHERE = {"seed": "a seed (a SEED=N setting, a seed:N line or seedN in the file name)",
          "code_bytes": "a `Code size: N bytes` line", "model_bytes": "a `Serialized model ...: N bytes` line",
          "artifact_bytes": "a `Total submission size ...: N bytes` line"}


def log_body(text: str) -> str:
    """The log after the trainer's source (see the module doc); the whole text when none is embedded."""
    if text.startswith("==== source:"):
        end = _GIT.search(text)
        return text[end.start():] if end else ""
    rule = _RULE.search(text)
    if rule and _CODE.search(text, 0, rule.start()):
        return text[rule.end():]
    return text


def embedded_sources(path: str | Path) -> dict[str, str]:
    """{path in the repository: text} of the files our trainer wrote at the top of its log: the trainer
    first, then every project module it imported (golf/runlog.py writes each file followed by a newline)."""
    path = Path(path)
    text = _read(path)
    end = _GIT.search(text)
    if not text.startswith("==== source:") or not end:
        raise LogError(f"{path}: no embedded sources (expected `==== source: FILE` sections up to a git_commit: line)")
    parts = _SOURCE.split(text[:end.start()])
    return {name: body[:-1] if body.endswith("\n") else body for name, body in zip(parts[1::2], parts[2::2])}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogError(f"{path}: cannot read the log: {e.strerror}") from None


def _last_int(pattern: re.Pattern, text: str) -> int | None:
    hits = pattern.findall(text)
    return int(hits[-1]) if hits else None


def parse_log(path: str | Path, stage: str | None = None) -> ParsedLog:
    """Reads one log; `stage` picks the scored stage (default: the last `_exact` one after export).
    Raises LogError naming the file when it has no step lines or no scored stage."""
    path = Path(path)
    body = log_body(_read(path))
    steps = _STEP.findall(body)
    if not steps:
        raise LogError(f"{path}: no `step:N/M ... train_time:Tms step_avg:Ams` lines; not a training log")
    vals = [s for s in steps if s[3]]
    last = (vals or steps)[-1]  # the final validation line carries the total training time
    times = {m[0]: float(m[3]) / (1000 if m[4] == "ms" else 1) for m in _STAGE_TIME.findall(body)}
    stages = {name: Score(float(loss), float(bpb), times.get(name)) for name, loss, bpb in _EXACT.findall(body)}
    if stage is None:
        scored = [s for s in stages if s != "prequant"]
        if not scored:
            raise LogError(f"{path}: no `final_<stage>_exact val_loss:X val_bpb:Y` line after export; "
                           "the run did not finish scoring")
        stage = scored[-1]
    elif stage not in stages:
        raise LogError(f"{path}: no stage {stage!r}; the log scores {', '.join(stages) or 'nothing'}")
    seed = _SEED.search(body) or _SEED_IN_NAME.search(path.stem)
    world = _WORLD.findall(body)
    versions = dict(kv.split("=", 1) for m in _VERSIONS.findall(body)[-1:] for kv in m.split() if "=" in kv)
    code, model, total = (_last_int(_SIZE[k], body) for k in ("code", "model", "total"))
    if total is None and code is not None and model is not None:
        total = code + model
    git = _GIT.search(body)
    return ParsedLog(
        path=path, seed=int(seed.group(1)) if seed else None, stages=stages, score_stage=stage,
        steps=int(last[0]), total_steps=int(last[1]), train_time_ms=float(last[5]), step_avg_ms=float(last[6]),
        stopped_early=bool(_STOP.search(body)), code_bytes=code, model_bytes=model, artifact_bytes=total,
        peak_memory_mib=_last_int(_PEAK, body), run_id=(world[-1][0] or None) if world else None,
        world_size=int(world[-1][1]) if world else None,
        gpus=tuple(name for _, name in dict(_GPU.findall(body)).items()),
        torch_version=versions.get("torch") or next(iter(_PUBLIC_TORCH.findall(body)), None),
        cuda_version=versions.get("cuda"), git_commit=git.group(1) if git else None,
        settings={name: (value, source) for name, value, source in _SETTING.findall(body)})
