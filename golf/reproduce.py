"""Significance between sets of seed logs, and reruns of a record folder's settings.

`compare A B` reads the scored stage of every seed log in A (the baseline, e.g. the current best) and B
(the candidate) and applies the record bar of SPEC.md section 1 through golf.stats.compare: B is
"better" only if its mean val_loss is at least 0.005 nats lower with p < 0.01 (Welch's t test; paired
by seed with --paired).

`reproduce FOLDER` reruns a folder's settings for its seeds and compares the new scores with the
recorded ones by the same test: a significant difference beyond 0.005 nats means it did not reproduce.
Our folders run their own packed trainer with submission.json's `env`. A public-leaderboard folder
(no `env`) runs its README command's settings on our train_gpt.py: variables that are knobs or
aliases in train_gpt.py's KNOBS table pass, launcher variables (OMP_, NCCL_, TORCH_, CUDA_ ...) pass,
SEED/RUN_ID/LOG_DIR are set per seed, and anything else is reported; a run with unknown knobs is
refused unless --drop-unknown. Knob tables are read from the source without running it.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from golf import stats
from golf.logparse import ParsedLog, parse_log
from golf.records import (PER_RUN, REPO_ROOT, TRAINER, RecordError, load_submission, read_packed)

RECORD_BAR = {"metric": "val_loss", "min_effect": 0.005, "alpha": 0.01}  # SPEC.md section 1
_LAUNCHER = ("OMP_", "NCCL_", "TORCH_", "CUDA_", "PYTORCH_", "NVIDIA_", "TRITON_", "PYTHON")
_SEED_LOG = re.compile(r"^train_seed(\d+)\.log$")


# ----------------------------------------------------------------------------- compare
def logs_in(path: Path, stage: str | None = None) -> list[ParsedLog]:
    """The seed logs at `path`: a file; a record folder's train_seed<N>.log; a LOG_DIR's finished runs
    (<RUN_ID>.txt with its .json); else every *.log and *.txt in the directory."""
    path = Path(path)
    if path.is_file():
        return [parse_log(path, stage)]
    if not path.is_dir():
        raise RecordError(f"{path}: no such log file or directory")
    files = (sorted(p for p in path.glob("train_seed*.log") if _SEED_LOG.match(p.name))
             or sorted(p for p in path.glob("*.txt") if p.with_suffix(".json").is_file())
             or sorted([*path.glob("*.log"), *path.glob("*.txt")]))
    if not files:
        raise RecordError(f"{path}: no logs (train_seed<N>.log, <RUN_ID>.txt or *.log)")
    return [parse_log(p, stage) for p in files]


def _values(logs: list[ParsedLog], metric: str) -> list[float]:
    return [getattr(log, metric) for log in logs]


def compare_logs(baseline: list[ParsedLog], candidate: list[ParsedLog], metric: str = RECORD_BAR["metric"],
                 paired: bool = False, min_effect: float = RECORD_BAR["min_effect"],
                 alpha: float = RECORD_BAR["alpha"]) -> dict:
    """golf.stats.compare on the scored stage's metric; paired pairs the runs by seed."""
    if paired:
        a, b = {log.seed: log for log in baseline}, {log.seed: log for log in candidate}
        if None in a or None in b or set(a) != set(b):
            raise RecordError(f"--paired needs the same seeds on both sides (baseline {sorted(a, key=str)}, "
                              f"candidate {sorted(b, key=str)})")
        baseline, candidate = [a[s] for s in sorted(a)], [b[s] for s in sorted(a)]
    return stats.compare(_values(baseline, metric), _values(candidate, metric), paired, min_effect, alpha)


def format_comparison(result: dict, baseline: list[ParsedLog], candidate: list[ParsedLog], metric: str,
                      names: tuple[str, str] = ("baseline", "candidate")) -> str:
    lines = []
    for name, logs in zip(names, (baseline, candidate)):
        mean, std = stats.mean_std(_values(logs, metric))
        seeds = ", ".join(str(log.seed) for log in logs)
        lines.append(f"{name}: n={len(logs)} {metric} {mean:.8f} ± {std:.8f} "
                     f"(seeds {seeds}; stage {logs[0].score_stage})")
    lo, hi = result["delta_ci"]
    lines.append(f"delta ({names[1]} - {names[0]}): {result['delta']:+.8f}  95% CI [{lo:+.6f}, {hi:+.6f}]  "
                 f"t={result['t']:.3f} df={result['df']:.1f} p={result['p']:.3g} d={result['d']:.2f} "
                 f"({'paired' if result['paired'] else 'Welch'})")
    lines.append(f"verdict: {result['verdict']} ({result['reason']})")
    return "\n".join(lines)


def baseline_delta(baseline: Path, logs: list[ParsedLog], records_dir: Path) -> dict:
    """submission.json's comparison keys against a baseline record folder (Welch on val_loss, as compare)."""
    base = logs_in(baseline)
    loss = compare_logs(base, logs)
    bpb = compare_logs(base, logs, metric="val_bpb")
    try:
        name = str(Path(baseline).resolve().relative_to(Path(records_dir).resolve()))
    except ValueError:
        raise RecordError(f"baseline {baseline} is not a folder under {records_dir}") from None
    out = {"baseline": name, "delta_vs_baseline_val_loss": round(loss["delta"], 8),
           "delta_vs_baseline_val_bpb": round(bpb["delta"], 8)}
    if not math.isnan(loss["p"]):
        out["p_value"] = loss["p"]
    return out


# ----------------------------------------------------------------------------- knob tables
def knob_table(sources: list[str]) -> tuple[set[str], dict[str, str]]:
    """(knob names, alias -> knob) from every `Knob("NAME", ..., (Alias("OTHER"), ...))` call in the
    sources, read with ast (nothing runs)."""
    knobs, aliases = set(), {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if _call_name(node) == "Knob" and node.args and isinstance(node.args[0], ast.Constant):
                knobs.add(node.args[0].value)
                for inner in ast.walk(node):
                    if _call_name(inner) == "Alias" and inner.args and isinstance(inner.args[0], ast.Constant):
                        aliases[inner.args[0].value] = node.args[0].value
    return knobs, aliases


def _call_name(node) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    return getattr(node.func, "id", None) or getattr(node.func, "attr", None)


def trainer_sources(script: Path) -> list[str]:
    data = script.read_bytes()
    if data.startswith(b'D="'):
        return list(read_packed(data)[1].values())
    return [data.decode("utf-8")]


# ----------------------------------------------------------------------------- reproduce
@dataclass
class Plan:
    script: Path
    env: dict[str, str]
    seeds: list[int]
    nproc: int
    recorded: dict[int | None, ParsedLog | float]  # seed -> its log, or the submission's mean val_loss
    notes: list[str] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)


def readme_command(readme: Path) -> tuple[dict[str, str], int | None]:
    """(NAME=VALUE assignments, --nproc_per_node) of the first torchrun/python command in a ``` block."""
    try:
        text = readme.read_text()
    except OSError:
        raise RecordError(f"{readme}: missing; a folder without submission.json env needs its README command") from None
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            tokens = shlex.split(line, comments=True)
            if not any(t == "torchrun" or t.endswith(("python", "python3")) or t.endswith(".py") for t in tokens):
                continue
            env, nproc = {}, None
            for i, tok in enumerate(tokens):
                if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tok) and len(env) == i:  # leading assignments only
                    name, value = tok.split("=", 1)
                    env[name] = value
                elif tok.startswith("--nproc_per_node"):
                    value = tok.split("=", 1)[1] if "=" in tok else tokens[i + 1]
                    nproc = int(value) if value.isdigit() else None
            return env, nproc
    raise RecordError(f"{readme}: no torchrun or python command in a ``` block")


def map_env(env: dict[str, str], knobs: set[str],
            aliases: dict[str, str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(what passes to the trainer, notes on the mapping, unknown variables)."""
    kept, notes, unknown = {}, [], {}
    for name, value in env.items():
        if name in PER_RUN:
            notes.append(f"{name}={value}: set per seed by reproduce")
        elif name in knobs:
            kept[name] = value
        elif name in aliases:
            kept[name] = value
            notes.append(f"{name}={value}: alias of {aliases[name]}, converted by the trainer")
        elif name.startswith(_LAUNCHER):
            kept[name] = value
            notes.append(f"{name}={value}: launcher variable, passed through")
        else:
            unknown[name] = value
    return kept, notes, unknown


def _recorded(folder: Path, sub: dict) -> dict:
    logs = {}
    for path in sorted(folder.glob("*.log")):
        try:
            log = parse_log(path, sub.get("score_stage"))
        except ValueError:
            continue  # a folder may hold other logs; the recorded runs are those that parse
        logs[log.seed] = log
    if not logs and "val_loss" in sub:
        logs[None] = sub["val_loss"]
    return logs


def plan(folder: Path, seeds: list[int] | None = None, nproc: int | None = None,
         overrides: dict[str, str] | None = None) -> Plan:
    folder = Path(folder)
    sub = load_submission(folder) if (folder / "submission.json").is_file() else {}
    recorded = _recorded(folder, sub)
    if "env" in sub:  # ours: the record's own trainer with the settings its runs took from the environment
        script, env, readme_nproc = folder / TRAINER, dict(sub["env"]), None
        if not script.is_file():
            raise RecordError(f"{script} is missing")
    else:
        script = REPO_ROOT / "train_gpt.py"
        env, readme_nproc = readme_command(folder / "README.md")
    knobs, aliases = knob_table(trainer_sources(script))
    env, notes, unknown = map_env({**env, **(overrides or {})}, knobs, aliases)
    if "env" not in sub:
        notes.append(f"public-style folder: its settings run on {script.relative_to(REPO_ROOT)}; "
                     "knobs the command leaves unset take that trainer's defaults, not the original script's")
    seeds = seeds or sub.get("seeds") or sorted(s for s in recorded if isinstance(s, int))
    if not seeds:
        raise RecordError(f"{folder}: no recorded seeds (submission.json seeds, seed logs); pass --seeds")
    logged_world = next((log.world_size for log in recorded.values()
                         if isinstance(log, ParsedLog) and log.world_size), None)
    return Plan(script, env, list(seeds), nproc or logged_world or readme_nproc or 8, recorded, notes, unknown)


def commands(p: Plan, out_dir: Path) -> list[tuple[dict[str, str], list[str]]]:
    launcher = [sys.executable] if p.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p.nproc}"]
    return [({**p.env, "SEED": str(seed), "RUN_ID": f"reproduce_seed{seed}", "LOG_DIR": str(out_dir)},
             launcher + [str(p.script)]) for seed in p.seeds]


def shell_line(env: dict[str, str], cmd: list[str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


def run(p: Plan, out_dir: Path, cwd: Path) -> list[ParsedLog]:
    """Runs every seed; the environment keeps no knob of the trainer that the plan does not set."""
    knobs, aliases = knob_table(trainer_sources(p.script))
    base = {k: v for k, v in os.environ.items() if k not in knobs and k not in aliases}
    logs = []
    for env, cmd in commands(p, out_dir):
        print(f"$ {shell_line(env, cmd)}", flush=True)
        done = subprocess.run(cmd, env={**base, **env}, cwd=cwd)
        log = out_dir / f"{env['RUN_ID']}.txt"
        if done.returncode != 0:
            raise RecordError(f"seed {env['SEED']} failed (exit {done.returncode}); its log: {log}")
        logs.append(parse_log(log))
    return logs


def reproduction_verdict(p: Plan, logs: list[ParsedLog]) -> tuple[str, int]:
    """The comparison's text and exit code: 1 only when the new runs are significantly worse."""
    recorded = [v for v in p.recorded.values() if isinstance(v, ParsedLog)]
    if len(recorded) < 2:
        ref = recorded[0].val_loss if recorded else next(iter(p.recorded.values()), math.nan)
        mean, _ = stats.mean_std(_values(logs, "val_loss"))
        return (f"recorded val_loss {ref:.8f}, reproduced mean {mean:.8f} ({mean - ref:+.8f}); "
                "too few recorded seeds for a test"), 0
    paired = {log.seed for log in recorded} == {log.seed for log in logs}
    result = compare_logs(recorded, logs, paired=paired)
    text = format_comparison(result, recorded, logs, "val_loss", ("recorded", "reproduced"))
    return text, int(result["verdict"] == "worse")


# ----------------------------------------------------------------------------- command line
def _cmd_compare(args) -> int:
    a, b = logs_in(Path(args.a), args.stage), logs_in(Path(args.b), args.stage)
    result = compare_logs(a, b, args.metric, args.paired, args.min_effect, args.alpha)
    print(format_comparison(result, a, b, args.metric, (f"A {args.a}", f"B {args.b}")))
    strict = args.min_effect >= RECORD_BAR["min_effect"] and args.alpha <= RECORD_BAR["alpha"]
    if args.metric == RECORD_BAR["metric"] and strict:  # only then does the verdict speak to the record bar
        print("B meets the record bar" if result["verdict"] == "better" else "B does not meet the record bar")
    return 0


def _assignment(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def _cmd_reproduce(args) -> int:
    p = plan(Path(args.folder), args.seeds, args.nproc, dict(args.set))
    out_dir = Path(args.out or f"logs/reproduce_{Path(args.folder).resolve().name}").resolve()
    for note in p.notes:
        print(f"note: {note}")
    for name, value in p.unknown.items():
        print(f"unknown: {name}={value} is not a knob of {p.script.name}" + (" (dropped)" if args.drop_unknown else ""))
    for env, cmd in commands(p, out_dir):
        print(shell_line(env, cmd))
    if args.dry_run:
        return 0
    if p.unknown and not args.drop_unknown:
        print(f"refusing to run: {len(p.unknown)} unknown setting(s) would be lost (--drop-unknown runs without them)")
        return 1
    text, code = reproduction_verdict(p, run(p, out_dir, Path(args.cwd)))
    print(text)
    return code


def add_commands(sub) -> None:
    """Declares `compare` and `reproduce` under `python -m golf records`."""
    p = sub.add_parser("compare", help="significance of B's seed logs against A's (the record bar by default)")
    p.add_argument("a", help="baseline logs: a log, a record folder or a LOG_DIR")
    p.add_argument("b", help="candidate logs, as A")
    p.add_argument("--metric", default=RECORD_BAR["metric"], choices=("val_loss", "val_bpb"))
    p.add_argument("--stage", help="scored stage (default: each log's last _exact stage after export)")
    p.add_argument("--paired", action="store_true", help="pair runs by seed (both sides need the same seeds)")
    p.add_argument("--min-effect", type=float, default=RECORD_BAR["min_effect"])
    p.add_argument("--alpha", type=float, default=RECORD_BAR["alpha"])
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("reproduce", help="rerun a folder's settings for its seeds and compare")
    p.add_argument("folder")
    p.add_argument("--seeds", type=int, nargs="+", help="default: the recorded seeds")
    p.add_argument("--nproc", type=int, help="GPUs (default: the recorded world size, else the README's, else 8)")
    p.add_argument("--set", action="append", default=[], type=_assignment, metavar="NAME=VALUE",
                   help="override a setting (e.g. DATA_PATH)")
    p.add_argument("--out", help="LOG_DIR of the new runs (default: logs/reproduce_<folder>)")
    p.add_argument("--cwd", default=".", help="where the runs start (relative DATA_PATHs resolve here)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--drop-unknown", action="store_true", help="run even if some settings are not knobs of the trainer")
    p.set_defaults(func=_cmd_reproduce)
