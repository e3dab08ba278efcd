"""Ablation studies: a declarative TOML file -> one run per (variant, seed) -> one JSONL row per run.

    python -m golf study run studies/demo_cpu.toml [--dry-run] [--out DIR] [--jobs N]
    python -m golf study report studies/demo_cpu.toml            # golf/report.py

The file (studies/demo_cpu.toml is a worked example; paths are relative to the repository root,
where every run starts):

    name = "lr"                     # results go to runs/<name>/ unless --out
    trainer = "train_gpt.py"        # default
    gpus = 1                        # per run; 0 runs `python <trainer>` on the CPU
    seeds = [1337, 42, 2024]        # default
    budget = 180                    # MAX_WALLCLOCK_SECONDS of every run: equal budgets
    jobs = 1                        # CPU runs at once; GPU runs: as many as the visible GPUs allow

    [baseline]                      # knob overrides that every run starts from
    TRAIN_BATCH_TOKENS = 98304

    [variants.high_lr]              # UPPER-CASE keys are knobs; lower-case keys describe the variant
    MATRIX_LR = 0.04
    expected = -0.003               # expected effect on the compared score (negative: better)
    note = "why we try it"

    [variants.both]
    stack = ["high_lr", "no_smear"] # those variants' overrides in order, then this one's own

    [variants.clip]
    post = true                     # quantization/eval knobs only: re-scores each baseline checkpoint
    MLP_CLIP_SIGMAS = 12.5          # with `python -m quant requantize` instead of training again

    [grid.lr_wd]                    # one variant per combination of values
    MATRIX_LR = [0.02, 0.04]
    MUON_WD = [0.0, 0.095]

    [random.lr]                     # `samples` draws: a list is a choice, or {uniform|log_uniform = [lo, hi]}
    samples = 6
    MATRIX_LR = {log_uniform = [0.01, 0.1]}

    [stats]                         # verdicts (golf/report.py): defaults shown
    alpha = 0.01
    min_effect = 0.005              # nats of val_loss when a variant shares the baseline's tokenizer
    min_effect_bpb = 0.005          # val_bpb when it does not (losses are never compared across tokenizers)
    stage = "final"                 # the score compared: final (last scored stage), prequant, quant_roundtrip, ...

Knob names are checked against the trainer's KNOBS table (misspellings name the closest knob) and
their values against the knobs' types before anything runs. Knob variables in the calling shell are
not passed on: the study file is the whole configuration. A run whose row (same variant, seed and
settings) already says ok is skipped, so an interrupted study resumes; a crash is a row too.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import queue
import random
import re
import shlex
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golf.config import KnobError, parse_knobs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = (1337, 42, 2024)
DEFAULT_STATS = {"alpha": 0.01, "min_effect": 0.005, "min_effect_bpb": 0.005, "stage": "final"}
STAGES = ("final", "prequant", "quant_roundtrip", "int8_zlib_roundtrip", "sliding_window", "ttt")
OK = ("ok", "over_cap")  # over_cap: trained and scored, but the artifact failed the size cap
_RUNNER_KNOBS = ("SEED", "RUN_ID", "LOG_DIR")  # one per run, set by the runner
# What `python -m quant requantize` takes from the environment: quantization, packing and evaluation.
_POST_KNOBS = {"QUANT_METHOD", "MATRIX_BITS", "EMBED_BITS", "ATTN_CLIP_SIGMAS", "MLP_CLIP_SIGMAS",
               "EMBED_CLIP_SIGMAS", "MATRIX_CLIP_SIGMAS", "LQER_ENABLED", "LQER_RANK", "LQER_TOP_K", "COMPRESSOR",
               "FIT_BUDGET", "VAL_BATCH_TOKENS", "EVAL_SEQ_LEN", "EVAL_STRIDE"}
_POST_PREFIXES = ("TTT_", "PHASED_TTT_", "GLOBAL_TTT_")
_TOP = {"name", "description", "trainer", "gpus", "seeds", "budget", "jobs", "baseline", "variants", "grid",
        "random", "stats"}
_VARIANT_KEYS = {"stack", "post", "expected", "note"}
_RANDOM_KEYS = _VARIANT_KEYS | {"samples", "seed"}


class StudyError(ValueError):
    """A study file that cannot be run as written; the message names the file and the entry."""


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str]                  # overrides on the baseline, stacks resolved
    post: bool = False
    expected: float | None = None
    note: str = ""
    sweep: str | None = None             # the [grid.X] / [random.X] group it came from
    knobs: dict[str, Any] = field(default_factory=dict)  # that group's knob values, as written


@dataclass(frozen=True)
class Study:
    name: str
    path: Path | None
    trainer: str
    gpus: int
    seeds: tuple[int, ...]
    budget: float | None
    jobs: int
    baseline: dict[str, str]
    variants: tuple[Variant, ...]        # the baseline first
    stats: dict[str, Any]
    description: str = ""

    def default_out(self) -> Path:
        return REPO / "runs" / self.name


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    run_id: str
    env: dict[str, str]                  # everything the study sets for this run
    cmd: tuple[str, ...]
    log_dir: Path
    checkpoint: Path | None = None       # a post run: the baseline checkpoint it re-scores

    @property
    def summary_path(self) -> Path:
        return self.log_dir / (f"{self.run_id}_model.json" if self.checkpoint else f"{self.run_id}.json")


# ----------------------------------------------------------------------------- the file
def _closest(name: str, names) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


@functools.lru_cache(maxsize=None)
def trainer_knobs(trainer: Path) -> tuple:
    """The trainer's KNOBS table, read by importing the file (it runs nothing on import)."""
    if not trainer.is_file():
        raise StudyError(f"trainer {trainer} not found")
    name = f"_study_trainer_{trainer.stem}"  # its own name: the file may shadow nothing already imported
    spec = importlib.util.spec_from_file_location(name, trainer)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    if not hasattr(module, "KNOBS"):
        raise StudyError(f"{trainer} has no KNOBS table, so the study cannot check its knob names")
    return module.KNOBS


def _knob_names(knobs) -> set[str]:
    return {k.name for k in knobs} | {a.name for k in knobs for a in k.aliases}


class _Known(set):
    """A trainer's knob names (aliases included), and the trainer's file for messages."""

    def __init__(self, trainer: str, knobs):
        super().__init__(_knob_names(knobs))
        self.trainer = trainer


def _env_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise StudyError(f"{where}: expected a number, string or boolean, got {type(value).__name__} {value!r}")


def _split(table: Any, allowed: set[str], known: _Known, where: str) -> tuple[dict, dict]:
    """(knobs, settings) of a section: UPPER-CASE keys are knobs, lower-case ones its settings."""
    if not isinstance(table, dict):
        raise StudyError(f"{where}: expected a table, got {table!r}")
    knobs, settings = {}, {}
    for key, value in table.items():
        if key.isupper():
            if key in _RUNNER_KNOBS:
                raise StudyError(f"{where}: {key} is set by the runner for each run (seeds = [...] picks seeds)")
            if key not in known:
                raise StudyError(f"{where}: {key} is not a knob of {known.trainer}{_closest(key, known)} "
                                 f"(python {known.trainer} --help lists them)")
            knobs[key] = value
        elif key in allowed:
            settings[key] = value
        else:
            hint = _closest(key.upper(), known) or _closest(key, allowed)
            raise StudyError(f"{where}: unknown setting {key!r}{hint} (knobs are UPPER CASE; settings here: "
                             f"{', '.join(sorted(allowed)) or 'none'})")
    return knobs, settings


def _typed(settings: dict, key: str, kind, where: str, default=None):
    value = settings.get(key, default)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if value is not None and not ok:
        raise StudyError(f"{where}: {key} = {value!r}: expected {getattr(kind, '__name__', 'a number')}")
    return value


def _check_env(env: dict[str, str], knobs, where: str) -> Any:
    """Type-checks the values with the trainer's own parser; returns the resolved config."""
    try:
        return parse_knobs(knobs, env)
    except KnobError as e:
        raise StudyError(f"{where}: {e}") from None


def _is_post_knob(name: str) -> bool:
    return name in _POST_KNOBS or name.startswith(_POST_PREFIXES)


def _fmt(value: Any) -> str:
    return _env_value(value, "value")


def _grid(group: str, table: dict, known: _Known, where: str) -> list[tuple[str, dict, dict]]:
    knobs, settings = _split(table, _VARIANT_KEYS, known, where)
    for k, values in knobs.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{where}: {k} = {values!r}: a grid knob takes a non-empty list of values")
    out = []
    for combo in itertools.product(*knobs.values()):
        values = dict(zip(knobs, combo))
        out.append((f"{group}[{','.join(f'{k}={_fmt(v)}' for k, v in values.items())}]", values, settings))
    return out


def _draw(rng: random.Random, spec: Any, where: str) -> Any:
    if isinstance(spec, list) and spec:
        return rng.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if kind in ("uniform", "log_uniform") and isinstance(bounds, list) and len(bounds) == 2:
            lo, hi = bounds
            if all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) and kind == "uniform":
                return rng.randint(lo, hi)
            if kind == "log_uniform":
                if lo <= 0 or hi <= 0:
                    raise StudyError(f"{where}: log_uniform bounds must be positive, got {bounds}")
                x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            else:
                x = rng.uniform(lo, hi)
            return float(f"{x:.4g}")  # readable settings: 4 significant digits are plenty for a sweep
    raise StudyError(f"{where}: {spec!r}: expected a list of choices, {{uniform = [lo, hi]}} or "
                     "{log_uniform = [lo, hi]}")


def _random(group: str, table: dict, known: _Known, where: str) -> list[tuple[str, dict, dict]]:
    knobs, settings = _split(table, _RANDOM_KEYS, known, where)
    samples = _typed(settings, "samples", int, where)
    if not samples or samples < 1:
        raise StudyError(f"{where}: samples = N (at least 1) is required")
    rng = random.Random(_typed(settings, "seed", int, where, 0))
    out, seen = [], set()
    for _ in range(samples):
        values = {k: _draw(rng, spec, f"{where}: {k}") for k, spec in knobs.items()}
        name = f"{group}[{','.join(f'{k}={_fmt(v)}' for k, v in values.items())}]"
        if name not in seen:  # a repeated draw would only duplicate runs
            seen.add(name)
            out.append((name, values, {k: v for k, v in settings.items() if k in _VARIANT_KEYS}))
    return out


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"study file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from None
    for key in data:
        if key not in _TOP:
            raise StudyError(f"{path}: unknown top-level setting {key!r}{_closest(key, _TOP)}")
    where = str(path)
    name = _typed(data, "name", str, where, path.stem)
    trainer = _typed(data, "trainer", str, where, "train_gpt.py")
    gpus = _typed(data, "gpus", int, where, 1)
    jobs = _typed(data, "jobs", int, where, 1)
    budget = _typed(data, "budget", (int, float), where)
    seeds = data.get("seeds", list(DEFAULT_SEEDS))
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{where}: seeds = {seeds!r}: expected a list of distinct integers")
    if gpus < 0 or jobs < 1 or (budget is not None and budget < 0):
        raise StudyError(f"{where}: gpus >= 0, jobs >= 1 and budget >= 0 expected (got {gpus}, {jobs}, {budget})")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise StudyError(f"{where}: name = {name!r}: letters, digits, '.', '_' and '-' only (it names a folder)")
    stats = {**DEFAULT_STATS, **_typed(data, "stats", dict, where, {})}
    for key in stats:
        if key not in DEFAULT_STATS:
            raise StudyError(f"{where}: [stats] {key!r} is not a setting{_closest(key, DEFAULT_STATS)}")
    if stats["stage"] not in STAGES:
        raise StudyError(f"{where}: [stats] stage = {stats['stage']!r}: expected one of {', '.join(STAGES)}")
    for key in ("alpha", "min_effect", "min_effect_bpb"):
        if not (_typed(stats, key, (int, float), f"{where}: [stats]") >= 0):
            raise StudyError(f"{where}: [stats] {key} = {stats[key]!r}: expected a number >= 0")

    knobs = trainer_knobs((REPO / trainer).resolve())
    known = _Known(trainer, knobs)
    base_knobs, _ = _split(data.get("baseline", {}), set(), known, f"{where}: [baseline]")
    baseline = {k: _env_value(v, f"{where}: [baseline] {k}") for k, v in base_knobs.items()}
    if budget is not None:
        if "MAX_WALLCLOCK_SECONDS" in baseline:
            raise StudyError(f"{where}: [baseline] sets MAX_WALLCLOCK_SECONDS and the study sets budget; keep one")
        baseline["MAX_WALLCLOCK_SECONDS"] = _fmt(budget)
    _check_env(baseline, knobs, f"{where}: [baseline]")

    # every entry: (name, own knob values, settings, sweep group, where it is written)
    entries: list[tuple[str, dict, dict, str | None, str]] = []
    for vname, table in _typed(data, "variants", dict, where, {}).items():
        at = f"{where}: [variants.{vname}]"
        entries.append((vname, *_split(table, _VARIANT_KEYS, known, at), None, at))
    for kind, expand in (("grid", _grid), ("random", _random)):
        for group, table in _typed(data, kind, dict, where, {}).items():
            at = f"{where}: [{kind}.{group}]"
            entries += [(n, v, s, group, at) for n, v, s in expand(group, table, known, at)]

    named = {n: (own, s) for n, own, s, group, _ in entries if group is None}
    variants = [Variant("baseline", {})]
    slugs = {"baseline"}
    for vname, own, settings, group, at in entries:
        if vname == "baseline" or slug(vname) in slugs:
            raise StudyError(f"{at}: variant name {vname!r} is taken (by the baseline or another variant)")
        slugs.add(slug(vname))
        post = _typed(settings, "post", bool, at, False)
        env = _stacked(vname, named, post, at)
        env.update({k: _env_value(v, f"{at} {k}") for k, v in own.items()})
        if post:
            bad = [k for k in env if not _is_post_knob(k)]
            if bad:
                raise StudyError(f"{at}: post = true takes quantization and evaluation knobs only; {', '.join(bad)} "
                                 "change training (make it a training variant)")
        _check_env({**baseline, **env}, knobs, at)
        if "TOKENIZER_PATH" in env and "DATA_PATH" not in env:
            raise StudyError(f"{at}: sets TOKENIZER_PATH but not DATA_PATH; shards are made with one tokenizer")
        expected = _typed(settings, "expected", (int, float), at)
        variants.append(Variant(vname, env, post, None if expected is None else float(expected),
                                _typed(settings, "note", str, at, ""), group, dict(own) if group else {}))
    if any(v.post for v in variants):
        _check_post_baseline(baseline, trainer, f"{where}: [baseline]")
    return Study(name, path, trainer, gpus, tuple(seeds), budget, jobs, baseline, tuple(variants), stats,
                 _typed(data, "description", str, where, ""))


def _stacked(name: str, named: dict, post: bool, where: str, chain: tuple[str, ...] = ()) -> dict[str, str]:
    """The knobs of the variants `name` stacks on, in order, recursively (a cycle is an error)."""
    own, settings = named.get(name, ({}, {}))
    stack = settings.get("stack", [])
    if not isinstance(stack, list) or not all(isinstance(s, str) for s in stack):
        raise StudyError(f"{where}: stack = {stack!r}: expected a list of variant names")
    env: dict[str, str] = {}
    for other in stack:
        if other not in named:
            raise StudyError(f"{where}: stack names {other!r}, which is not a [variants.*] entry"
                             f"{_closest(other, named)}")
        if other in chain + (name,):
            raise StudyError(f"{where}: stack cycle {' -> '.join(chain + (name, other))}")
        if post and not named[other][1].get("post", False):
            raise StudyError(f"{where}: a post variant can stack only post variants; {other!r} trains")
        env.update(_stacked(other, named, post, where, chain + (name,)))
        env.update({k: _env_value(v, f"{where} {k}") for k, v in named[other][0].items()})
    return env


def _check_post_baseline(baseline: dict[str, str], trainer: str, where: str) -> None:
    # requantize rebuilds train_gpt.py's model from the checkpoint: a knob only another trainer has
    # would be silently dropped there
    base = _knob_names(trainer_knobs((REPO / "train_gpt.py").resolve()))
    foreign = [k for k in baseline if k not in base]
    if foreign:
        raise StudyError(f"{where}: post variants re-score with train_gpt.py's model, which has no "
                         f"{', '.join(foreign)} ({trainer}'s own knobs); drop them or the post variants")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# ----------------------------------------------------------------------------- the plan
def plan(study: Study, out: Path) -> list[Run]:
    """Every run, training runs first (post runs need the baseline's checkpoints)."""
    log_dir = out.resolve() / "logs"
    knobs = trainer_knobs((REPO / study.trainer).resolve())
    train, post = [], []
    for v in study.variants:
        for seed in study.seeds:
            run_id = f"{slug(v.name)}_s{seed}"
            env = {**study.baseline, **v.env, "SEED": str(seed), "RUN_ID": run_id, "LOG_DIR": str(log_dir)}
            if not v.post:
                launcher = (sys.executable, study.trainer) if study.gpus == 0 else (
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={study.gpus}",
                    study.trainer)
                train.append(Run(v, seed, run_id, env, launcher, log_dir))
                continue
            ckpt = log_dir / f"baseline_s{seed}_model.pre.bin"
            cfg = parse_knobs(knobs, env)
            # sliding windows and TTT are stages of their own: score them only when they are on
            stages = cfg.ttt_enabled or 0 < cfg.eval_stride < (cfg.eval_seq_len or cfg.train_seq_len)
            cmd = (sys.executable, "-m", "quant", "requantize", str(ckpt), "-o", str(log_dir / f"{run_id}_model.bin"),
                   "--stages" if stages else "--score")
            post.append(Run(v, seed, run_id, env, cmd, log_dir, ckpt))
    return train + post


def format_run(run: Run) -> str:
    """The exact command, as a shell line with the study's settings in front."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items())
    return f"cd {shlex.quote(str(REPO))} && {env} {shlex.join(run.cmd)}"


def visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def lanes_for(study: Study, jobs: int | None = None, gpus: list[str] | None = None) -> list[dict[str, str]]:
    """The environment of each concurrent lane: a CUDA_VISIBLE_DEVICES slice of `study.gpus` GPUs each,
    or for CPU studies `jobs` lanes sharing the cores."""
    if study.gpus == 0:
        n = jobs or study.jobs
        threads = str(max(1, (os.cpu_count() or 1) // n))
        return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads} for _ in range(n)]
    gpus = visible_gpus() if gpus is None else gpus
    if len(gpus) < study.gpus:
        raise StudyError(f"study {study.name} runs on {study.gpus} GPU(s) per run but {len(gpus)} are visible "
                         "(gpus = 0 runs on the CPU)")
    g = study.gpus
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * g:(i + 1) * g])} for i in range(len(gpus) // g)]


# ----------------------------------------------------------------------------- results
def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StudyError(f"{path}:{n}: not a JSON row ({e})") from None
    return rows


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


def flatten(summary: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a run summary as dotted keys (stages.ttt.val_bpb, bytes.total, ...); the
    config, the val curve and the per-step export log are kept elsewhere or left out."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if name in ("config", "val_history", "versions", "git", "export.fit_steps", "quant_knobs"):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)):
            out[name] = value
    return out


def last_train_loss(log: Path) -> float | None:
    if not log.is_file():
        return None
    found = re.findall(r"^step:\d+/\d+ train_loss:([0-9.eE+-]+|nan|inf)", log.read_text(errors="replace"), re.M)
    return float(found[-1]) if found else None


@functools.lru_cache(maxsize=None)
def _tokenizer_sha(path: str) -> str | None:
    p = REPO / path
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


def _gpu_name(devices: str | None) -> str | None:
    if not devices:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", devices.split(",")[0]],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def scale(summary: dict) -> str:
    """'full' for the real 8-GPU configuration, else 'proxy' (SPEC.md section 9: report which)."""
    return "full" if str(summary.get("device", "")).startswith("cuda") and summary.get("world_size") == 8 else "proxy"


def _row(study: Study, run: Run, status: str, summary: dict | None, lane: dict, wall: float, error: str | None,
         base: dict | None) -> dict:
    """The JSONL row of a run. A post run trained nothing itself: its training numbers, config, curve and
    scale are the baseline run's (`baseline_run`), overlaid with what re-scoring measured."""
    from golf.runlog import git_state

    summary = summary or {}
    if run.checkpoint:
        base = base or {}
        hardware = base.get("hardware", {})
        trained = {"config": dict(base.get("config", {})), "metrics": dict(base.get("metrics", {})),
                   "val_history": base.get("val_history", []), "scale": base.get("scale", "proxy"),
                   "device": hardware.get("device"), "world_size": hardware.get("world_size")}
        trained["config"].update(summary.get("quant_knobs", {}))
    else:
        trained = {"config": summary.get("config", {}), "metrics": {}, "val_history": summary.get("val_history", []),
                   "scale": scale(summary), "device": summary.get("device"), "world_size": summary.get("world_size")}
    metrics = {**trained["metrics"], **flatten(summary)}
    loss = last_train_loss(run.log_dir / f"{run.run_id}.txt")
    if loss is not None:
        metrics["train_loss"] = loss
    cfg = trained["config"]
    tokenizer = cfg.get("TOKENIZER_PATH") or run.env.get("TOKENIZER_PATH")
    devices = lane.get("CUDA_VISIBLE_DEVICES")
    return {
        "study": study.name, "variant": run.variant.name, "seed": run.seed, "run_id": run.run_id,
        "kind": "post" if run.checkpoint else "train", "status": status, "env": run.env,
        "trainer": study.trainer, "gpus": study.gpus, "git": summary.get("git") or git_state(),
        "hardware": {"device": trained["device"], "world_size": trained["world_size"], "gpu": _gpu_name(devices),
                     "visible_devices": devices, "cpus": os.cpu_count()},
        "scale": trained["scale"],
        "tokenizer": {"path": tokenizer, "vocab": cfg.get("VOCAB_SIZE"),
                      "sha256": _tokenizer_sha(tokenizer) if tokenizer else None},
        "metrics": metrics, "config": cfg, "val_history": trained["val_history"],
        "expected": run.variant.expected, "note": run.variant.note, "post": run.variant.post,
        "sweep": run.variant.sweep, "knobs": run.variant.knobs, "stats": study.stats,
        "baseline_run": base.get("run_id") if run.checkpoint else None,
        "wall_s": wall, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "error": error,
        "output": str(run.log_dir / f"{run.run_id}.out"),
    }


def execute(study: Study, run: Run, lane: dict[str, str], base: dict | None = None) -> dict:
    """Runs one (variant, seed) and returns its row; never raises for a failed run."""
    run.log_dir.mkdir(parents=True, exist_ok=True)
    out = run.log_dir / f"{run.run_id}.out"
    run.summary_path.unlink(missing_ok=True)  # a stale summary must never pass for this run's
    if run.checkpoint and (base is None or not run.checkpoint.is_file()):
        return _row(study, run, "crashed", None, lane, 0.0, f"no baseline checkpoint {run.checkpoint}: the "
                    f"baseline run for seed {run.seed} has no ok row with the study's settings", base)
    known = _knob_names(trainer_knobs((REPO / study.trainer).resolve()))
    env = {k: v for k, v in os.environ.items() if k not in known}
    env.update(lane)
    env.update(run.env)
    t0 = time.perf_counter()
    try:
        with open(out, "w", encoding="utf-8") as f:
            rc = subprocess.run(run.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        error = None
    except OSError as e:
        rc, error = None, f"could not start {run.cmd[0]}: {e}"
    wall = time.perf_counter() - t0
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.is_file() else None
    if summary is not None and rc == 0:
        status = "ok"
    elif summary is not None and summary.get("bytes", {}).get("over_cap"):
        status = "over_cap"
    else:
        status = "crashed"
    if status != "ok" and error is None:
        tail = out.read_text(errors="replace")[-3000:] if out.is_file() else ""
        error = f"exit code {rc}:\n{tail}"
    return _row(study, run, status, summary, lane, wall, error, base)


def log_to_wandb(row: dict) -> None:
    """Mirrors a row to Weights & Biases when WANDB_PROJECT is set and wandb is importable (WANDB_MODE=offline
    works); the JSONL stays the record, so any wandb failure only warns."""
    project = os.environ.get("WANDB_PROJECT")
    if not project:
        return
    try:
        import wandb
    except ImportError:
        print("wandb: WANDB_PROJECT is set but wandb is not installed; rows are in the JSONL only")
        return
    try:
        run = wandb.init(project=project, name=row["run_id"], group=row["study"], job_type=row["kind"],
                         config={"variant": row["variant"], "seed": row["seed"], "scale": row["scale"], **row["env"]})
        run.log({k: v for k, v in row["metrics"].items()})
        run.summary["status"] = row["status"]
        run.finish()
    except Exception as e:  # noqa: BLE001 - an optional mirror must never stop a study
        print(f"wandb: could not log {row['run_id']}: {e}")


def _key(variant: str, seed: int, env: dict) -> tuple:
    return variant, seed, json.dumps(env, sort_keys=True)


def run_study(study: Study, out: Path | None = None, dry_run: bool = False, jobs: int | None = None,
              gpus: list[str] | None = None, only: set[str] | None = None, seeds: set[int] | None = None) -> list[dict]:
    """Runs what has no ok row yet in `<out>/results.jsonl`, appending a row per run; returns the new rows.
    `only` and `seeds` restrict this call to some variants and seeds (a study spread over several
    sessions or machines; a post variant needs its baseline's checkpoint on this machine)."""
    out = (out or study.default_out()).resolve()
    results = out / "results.jsonl"
    names = [v.name for v in study.variants]
    unknown = sorted((only or set()) - set(names))
    if unknown:
        raise StudyError(f"--only {unknown[0]}: no such variant{_closest(unknown[0], names)}")
    stray = sorted((seeds or set()) - set(study.seeds))
    if stray:
        raise StudyError(f"--seeds {stray[0]}: not one of the study's seeds {list(study.seeds)}")
    runs = [r for r in plan(study, out) if (not only or r.variant.name in only) and (not seeds or r.seed in seeds)]
    rows = read_rows(results)
    done = {_key(r["variant"], r["seed"], r["env"]) for r in rows if r.get("status") in OK}
    todo = [r for r in runs if _key(r.variant.name, r.seed, r.env) not in done]
    lanes = lanes_for(study, jobs, gpus) if not dry_run or study.gpus == 0 else None
    if dry_run:
        lane_text = f"{len(lanes)} at a time" if lanes else f"{study.gpus} GPU(s) each, as many at once as are visible"
        print(f"# study {study.name}: {len(runs)} runs, {len(runs) - len(todo)} already in {results}; {lane_text}")
        for run in runs:
            skip = run not in todo
            print(f"# {run.variant.name} seed {run.seed}{' (done: skipped)' if skip else ''}")
            print(format_run(run))
        return []
    print(f"study {study.name}: {len(todo)} of {len(runs)} runs to do, {len(lanes)} at a time; rows -> {results}")
    new: list[dict] = []
    # post runs re-score the checkpoint of the baseline run with the study's current settings
    current = {_key(r.variant.name, r.seed, r.env) for r in runs if r.variant.name == "baseline"}
    baselines = {r["seed"]: r for r in rows
                 if r.get("status") in OK and _key(r["variant"], r["seed"], r["env"]) in current}
    free: queue.Queue = queue.Queue()
    for lane in lanes:
        free.put(lane)

    def work(run: Run) -> dict:
        lane = free.get()
        try:
            return execute(study, run, lane, baselines.get(run.seed))
        finally:
            free.put(lane)

    for batch in ([r for r in todo if not r.checkpoint], [r for r in todo if r.checkpoint]):
        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            for future in as_completed([pool.submit(work, r) for r in batch]):
                row = future.result()
                append_row(results, row)
                new.append(row)
                if row["variant"] == "baseline" and row["status"] in OK:
                    baselines[row["seed"]] = row
                log_to_wandb(row)
                score = next((row["metrics"][k] for k in ("stages.ttt.val_bpb", "stages.quant_roundtrip.val_bpb",
                                                           "stages.prequant.val_bpb") if k in row["metrics"]), None)
                print(f"[{len(new)}/{len(todo)}] {row['variant']} seed {row['seed']}: {row['status']}"
                      + (f" val_bpb {score:.4f}" if score is not None else "") + f" ({row['wall_s']:.1f}s)"
                      + ("" if row["status"] in OK else f"; see {row['output']}"))
    return new


# ----------------------------------------------------------------------------- command line
def _user_errors(func):
    """A StudyError is the user's to fix: the CLI prints it without a traceback."""
    @functools.wraps(func)
    def wrapper(args) -> int:
        try:
            return func(args)
        except StudyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper


@_user_errors
def _cmd_run(args) -> int:
    study = load_study(args.file)
    out = Path(args.out) if args.out else study.default_out()
    only = set(args.only.split(",")) if args.only else None
    try:
        seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
    except ValueError:
        raise StudyError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    rows = run_study(study, out, args.dry_run, args.jobs, only=only, seeds=seeds)
    if not args.dry_run:
        crashed = sum(r["status"] == "crashed" for r in rows)
        print(f"{len(rows)} runs, {crashed} crashed; report: python -m golf study report {args.file}"
              + (f" --results {out / 'results.jsonl'}" if args.out else ""))
    return 0


@_user_errors
def _cmd_report(args) -> int:
    from golf.report import write_report

    source = Path(args.source)
    study = load_study(source) if source.suffix == ".toml" else None
    results = Path(args.results) if args.results else (study.default_out() / "results.jsonl" if study else source)
    if not results.is_file():
        raise StudyError(f"no results at {results} (run the study first, or pass --results)")
    out = Path(args.out) if args.out else results.parent / "report"
    print(f"wrote {write_report(read_rows(results), out, study)}")
    return 0


def main(argv: list[str]) -> int:
    """`python -m golf study run|report ...` (registered in golf/__main__.py)."""
    p = argparse.ArgumentParser(prog="python -m golf study", description="Ablation studies from a TOML file "
                                "(the format is in golf/study.py's docstring).")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    r = verbs.add_parser("run", help="one run per (variant, seed), appended to <out>/results.jsonl")
    r.add_argument("file", help="the study's TOML file")
    r.add_argument("--dry-run", action="store_true", help="print every command with its settings; run nothing")
    r.add_argument("--out", help="results folder (default: runs/<name>/)")
    r.add_argument("--jobs", type=int, help="CPU studies: runs at once (default: the file's jobs)")
    r.add_argument("--only", help="comma-separated variants to run now (baseline included by name); the rest wait")
    r.add_argument("--seeds", help="comma-separated seeds to run now (of the study's seeds)")
    r.set_defaults(func=_cmd_run)
    q = verbs.add_parser("report", help="markdown report with statistics and plots from the results")
    q.add_argument("source", help="the study's TOML file, or a results JSONL")
    q.add_argument("--out", help="report folder (default: report/ beside the results)")
    q.add_argument("--results", help="the results JSONL (default: runs/<name>/results.jsonl of the study)")
    q.set_defaults(func=_cmd_report)
    args = p.parse_args(argv)
    return args.func(args)
