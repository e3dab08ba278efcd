"""Record folders that check themselves (SPEC.md section 7): `python -m golf records COMMAND`.

  new LOG_DIR --name NAME           records/<track>/<date>_<name>/ from finished seed runs in LOG_DIR
  check [FOLDER ...]                recompute submission.json from the folder's logs (default: every folder)
  leaderboard                       rank every records/*/*/submission.json, marking folders that fail check
  compare A B                       B's seed logs against A's by the record bar (golf/reproduce.py)
  reproduce FOLDER [--dry-run]      rerun a folder's settings for its seeds, compare with its logs
  ablation STUDY_DIR --name NAME    a track_non_record_16mb folder from a study's report

A record folder holds README.md, submission.json, `train_seed<N>.log` per seed (our trainer's JSON
summary beside each as `train_seed<N>.json`), the packed trainer train_gpt.py and requirements.txt.
The logs are the evidence: check re-derives every number of submission.json from them (per-seed
scores, mean and std, steps, ms/step, bytes), holds each seed's artifact to the 16,000,000-byte cap
and the trainer's size to the logged code size, and decodes the packed trainer without running it.
"""
from __future__ import annotations

import argparse
import ast
import base64
import json
import lzma
import math
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from golf.logparse import LogError, ParsedLog, embedded_sources, parse_log
from golf.stats import mean_std
from quant.artifact import ARTIFACT_CAP, ArtifactTooLarge, check_artifact
from quant.pack import find_modules, pack
# A packed file is D="<blob>" then exactly this bootstrap; a bundle carries the stand-in in place of
# quant/pack.py. Both are the packer's own text, so a record's trainer is decoded by its definition.
from quant.pack import _BOOTSTRAP, _STANDIN

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = REPO_ROOT / "records"
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
TRAINER = "train_gpt.py"
PER_RUN = ("SEED", "RUN_ID", "LOG_DIR")  # settings that differ between the seed runs of one record
_FOLDER = re.compile(r"^(\d{4}-\d{2}-\d{2})_([A-Za-z0-9][A-Za-z0-9_.-]*)$")
_SEED_LOG = re.compile(r"^train_seed(\d+)\.log$")


class RecordError(ValueError):
    """A record folder that cannot be made from the given runs; the message says why."""


# ----------------------------------------------------------------------------- submission.json schema
def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


COMMON = {"author": (_text, "a non-empty string"), "github_id": (_text, "a non-empty string"),
          "name": (_text, "a non-empty string"), "blurb": (_text, "a non-empty string"),
          "date": (lambda v: isinstance(v, str) and bool(re.match(r"\d{4}-\d{2}-\d{2}", v)), "a YYYY-MM-DD date"),
          "track": (lambda v: v in TRACKS, f"one of {', '.join(TRACKS)}")}
RECORD = {**COMMON,
          "val_loss": (_num, "a number"), "val_bpb": (_num, "a number"),
          "val_loss_std": (lambda v: v is None or _num(v), "a number (null with one seed)"),
          "val_bpb_std": (lambda v: v is None or _num(v), "a number (null with one seed)"),
          "seeds": (lambda v: isinstance(v, list) and bool(v) and all(_int(s) for s in v) and len(set(v)) == len(v),
                    "a non-empty list of distinct non-negative ints"),
          "seed_results": (lambda v: isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()),
                           "an object {seed: {val_loss, val_bpb, ...}}"),
          "bytes_total": (_int, "an int"), "bytes_code": (_int, "an int"), "artifact_bytes_max": (_int, "an int"),
          "hardware": (_text, "a non-empty string"), "pytorch_version": (_text, "a non-empty string"),
          "cuda_version": (_text, "a non-empty string"), "technique_summary": (_text, "a non-empty string")}
OPTIONAL = {"score_stage": (_text, "a stage name"), "p_value": (_num, "a number"), "baseline": (_text, "a folder"),
            "delta_vs_baseline_val_loss": (_num, "a number"), "delta_vs_baseline_val_bpb": (_num, "a number"),
            "env": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                    "an object of environment variable strings")}
ABLATION = {**COMMON, "kind": (lambda v: v == "ablation", '"ablation"'), "runs": (_int, "an int"),
            "report": (_text, "a file name"), "results": (_text, "a file name")}
# field -> how far it may sit from the value recomputed from the logs (they print 8, 2 and 1 decimals)
SEED_FIELDS = {"val_loss": 1e-8, "val_bpb": 1e-8, "artifact_bytes": 0, "steps": 0, "step_avg_ms": 0.005,
               "eval_time_s": 0.05}
AGGREGATES = {"val_loss": 1e-8, "val_bpb": 1e-8, "val_loss_std": 1e-8, "val_bpb_std": 1e-8, "bytes_total": 0,
              "bytes_code": 0, "artifact_bytes_max": 0, "score_stage": 0}


def schema_problems(sub: dict, schema: dict) -> list[str]:
    out = []
    for key, (ok, want) in schema.items():
        if key not in sub:
            out.append(f"submission.json lacks {key!r} ({want})")
        elif not ok(sub[key]):
            out.append(f"submission.json {key} is {sub[key]!r}; expected {want}")
        elif isinstance(sub[key], str) and sub[key].startswith("TODO"):
            out.append(f"submission.json {key} is still the TODO placeholder")
    for key, (ok, want) in OPTIONAL.items():
        if key in sub and not ok(sub[key]):
            out.append(f"submission.json {key} is {sub[key]!r}; expected {want}")
    return out


# ----------------------------------------------------------------------------- numbers from logs
def seed_result(log: ParsedLog) -> dict:
    return {"val_loss": log.val_loss, "val_bpb": log.val_bpb, "artifact_bytes": log.artifact_bytes,
            "steps": log.steps, "step_avg_ms": log.step_avg_ms, "eval_time_s": log.score.eval_time_s}


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 8)


def numbers_from_logs(logs: list[ParsedLog]) -> dict:
    """Every submission.json number the logs determine. Raises RecordError when they disagree on
    what must be shared (scored stage, code size) or repeat a seed."""
    for log in logs:
        log.need("seed", "code_bytes", "model_bytes", "artifact_bytes")
    seeds = [log.seed for log in logs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"seed logs repeat a seed: {', '.join(f'{l.path.name}={l.seed}' for l in logs)}")
    for field in ("score_stage", "code_bytes"):
        values = {getattr(log, field) for log in logs}
        if len(values) > 1:
            raise RecordError(f"seed logs disagree on {field}: " +
                              ", ".join(f"{l.path.name}={getattr(l, field)}" for l in logs))
    loss_mean, loss_std = mean_std([log.val_loss for log in logs])
    bpb_mean, bpb_std = mean_std([log.val_bpb for log in logs])
    biggest = max(log.artifact_bytes for log in logs)
    return {"val_loss": round(loss_mean, 8), "val_bpb": round(bpb_mean, 8),
            "val_loss_std": _rounded(loss_std), "val_bpb_std": _rounded(bpb_std), "seeds": seeds,
            "seed_results": {str(log.seed): seed_result(log) for log in logs},
            "bytes_total": biggest, "bytes_code": logs[0].code_bytes, "artifact_bytes_max": biggest,
            "score_stage": logs[0].score_stage}


def _differs(claimed, actual, tol: float) -> bool:
    if _num(actual):
        return not _num(claimed) or abs(claimed - actual) > tol
    return claimed != actual


# ----------------------------------------------------------------------------- the trainer
def read_packed(data: bytes) -> tuple[str, dict[str, str]]:
    """(entry key, {path: source}) of a packed trainer, decoded without running it. Raises ValueError
    when the file is not exactly the packer's blob + bootstrap or a bundled file is not Python."""
    head, _, tail = data.partition(b'"\n')
    if not head.startswith(b'D="') or tail != _BOOTSTRAP.encode():
        raise ValueError('not a packed trainer: expected D="<blob>" followed by quant/pack.py\'s bootstrap')
    try:
        payload = lzma.decompress(base64.b85decode(head[3:]), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        parts = payload.decode("utf-8").split("\0")
    except (ValueError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise ValueError(f"the packed blob does not decode: {e}") from None
    files = dict(zip(parts[1::2], parts[2::2]))
    if len(parts) % 2 == 0 or parts[0] not in files:
        raise ValueError(f"the packed blob has no entry file {parts[0]!r}")
    for name, source in files.items():
        try:
            ast.parse(source, name)
        except SyntaxError as e:
            raise ValueError(f"bundled {name} is not valid Python: {e.msg} (line {e.lineno})") from None
    return parts[0], files


def trainer_problems(folder: Path, bytes_code) -> list[str]:
    """The trainer must be there, decode (packed) or pack (plain, self-contained), and be the code size claimed."""
    path = folder / TRAINER
    if not path.is_file():
        return [f"{TRAINER} is missing: a record ships the trainer that produced its logs"]
    data = path.read_bytes()
    try:
        if data.startswith(b'D="'):
            read_packed(data)
        else:
            imported = find_modules(path, roots=(folder, REPO_ROOT))
            if imported:
                return [f"{TRAINER} imports project modules ({', '.join(imported)}) but is not packed, so its "
                        "size undercounts the code; ship the output of `python -m quant pack`"]
            pack(path, roots=(folder,))
    except (ValueError, SyntaxError) as e:
        return [f"{TRAINER} does not decode or pack: {e}"]
    if bytes_code is not None and len(data) != bytes_code:
        return [f"{TRAINER} is {len(data)} bytes but bytes_code says {bytes_code}"]
    return []


def pack_from_sources(sources: dict[str, str]) -> bytes:
    """The packed trainer exactly as the run measured it: the sources its log embeds, written to a
    scratch tree and packed from there. quant/pack.py is written as the stand-in a bundle carries for it
    (the packer recognises only its own file). A run of a packed trainer embeds that file alone."""
    first = next(iter(sources))
    if len(sources) == 1 and sources[first].startswith('D="'):
        return sources[first].encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, text in sources.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise RecordError(f"embedded source {rel} lies outside the repository; pass --trainer FILE")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(_STANDIN if rel == "quant/pack.py" else text, encoding="utf-8")
        return pack(root / first, roots=(root,))


def _trainer_bytes(logs: list[ParsedLog], trainer: Path | None) -> bytes:
    if trainer is not None:
        data = trainer.read_bytes()
        return data if data.startswith(b'D="') else pack(trainer)
    saved = [log.path.with_name(log.path.stem + "_trainer.py") for log in logs]
    if all(p.is_file() for p in saved):  # the bytes each run counted (packing depends on the Python version)
        kept = {p.read_bytes() for p in saved}
        if len(kept) > 1:
            raise RecordError(f"the seed runs saved different packed trainers ({', '.join(map(str, saved))}); "
                              "a record's seeds share one trainer")
        return kept.pop()
    sources = [embedded_sources(log.path) for log in logs]
    for log, other in zip(logs[1:], sources[1:]):
        changed = sorted(k for k in set(other) | set(sources[0]) if other.get(k) != sources[0].get(k))
        if changed:
            raise RecordError(f"{log.path} was produced by other code than {logs[0].path} "
                              f"(differs in {', '.join(changed)}); a record's seeds share one trainer")
    return pack_from_sources(sources[0])


# ----------------------------------------------------------------------------- new
def find_runs(log_dir: Path, run_ids: list[str] | None) -> list[Path]:
    """The named runs' logs, or every `<id>.txt` whose `<id>.json` summary exists (a finished run)."""
    if run_ids:
        paths = [log_dir / f"{r}.txt" for r in run_ids]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RecordError(f"no such run log: {', '.join(missing)}")
        return paths
    paths = sorted(p for p in log_dir.glob("*.txt") if p.with_suffix(".json").is_file())
    if not paths:
        raise RecordError(f"{log_dir}: no finished runs (a <RUN_ID>.txt log with its <RUN_ID>.json summary)")
    return paths


def _env_value(value: str) -> str:
    """A logged setting (the `repr` of its value) as the environment variable that sets it."""
    try:
        v = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # e.g. inf, which repr writes bare
        return value
    return ("1" if v else "0") if isinstance(v, bool) else str(v)


def recorded_env(logs: list[ParsedLog]) -> dict[str, str]:
    """Settings the runs took from the environment (not defaults), minus the per-run ones; the seed
    runs must agree on every setting but those."""
    shared = [{k: v for k, (v, _) in log.settings.items() if k not in PER_RUN} for log in logs]
    for log, settings in zip(logs[1:], shared[1:]):
        changed = sorted(k for k in set(settings) | set(shared[0]) if settings.get(k) != shared[0].get(k))
        if changed:
            raise RecordError(f"{log.path} and {logs[0].path} differ in settings {', '.join(changed)}; "
                              "a record's seeds differ only in SEED")
    return {k: _env_value(v) for k, (v, source) in logs[0].settings.items()
            if k not in PER_RUN and source != "default" and v != "None"}


def command_line(env: dict[str, str], nproc: int) -> str:
    """The README's command for one seed ($SEED), one setting per line."""
    lines = ["SEED=$SEED"] + [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return " \\\n".join(lines + [f"torchrun --standalone --nproc_per_node={nproc} {TRAINER}"])


def readme_text(sub: dict, logs: list[ParsedLog], command: str) -> str:
    rows = [f"| {s} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | {r['steps']} | "
            f"{r['step_avg_ms']:.2f} | {_fmt(r['eval_time_s'], 1)} |" for s, r in sub["seed_results"].items()]
    return f"""# {sub['name']}

{sub['blurb']}

## Results

Scored stage `final_{sub['score_stage']}_exact`; {sub['hardware']}, PyTorch {sub['pytorch_version']}, CUDA {sub['cuda_version']}.

| seed | val_loss | val_bpb | artifact bytes | steps | ms/step | eval s |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
| mean ± std | {sub['val_loss']:.8f} ± {_fmt(sub['val_loss_std'])} | {sub['val_bpb']:.8f} ± {_fmt(sub['val_bpb_std'])} | max {sub['artifact_bytes_max']:,} | | | |

Code {sub['bytes_code']:,} bytes (the packed `{TRAINER}`); the largest artifact is {sub['artifact_bytes_max']:,} of {ARTIFACT_CAP:,} bytes.

## Technique

{sub['technique_summary']}

## Command

Run from this folder, once per seed ({', '.join(map(str, sub['seeds']))}):

```bash
{command}
```

## Files

- `{TRAINER}`: the trainer that produced the logs, packed (`python -m quant pack`) from the sources they embed
- {', '.join(f'`{log.path.name}`' for log in logs)} (per seed, with its JSON summary): the logs
- `submission.json`, `requirements.txt`

`python -m golf records check` recomputes every number above from the logs.
"""


def new_record(log_dir: Path, name: str, track: str = TRACKS[0], run_ids: list[str] | None = None,
               date: str | None = None, meta: dict | None = None, stage: str | None = None,
               trainer: Path | None = None, baseline: Path | None = None, records_dir: Path = RECORDS) -> Path:
    """Creates records_dir/<track>/<date>_<name>/ from the runs; returns the folder. `meta` gives the
    prose keys (author, github_id, blurb, technique_summary, display name); left out, they are TODO."""
    date = date or time.strftime("%Y-%m-%d")
    folder = records_dir / track / f"{date}_{name}"
    if track not in TRACKS:
        raise RecordError(f"track {track!r}: expected one of {', '.join(TRACKS)}")
    if not _FOLDER.match(folder.name):
        raise RecordError(f"folder name {folder.name!r}: expected YYYY-MM-DD_Name (letters, digits, _ . -)")
    if folder.exists():
        raise RecordError(f"{folder} already exists")
    logs = sorted((parse_log(p, stage) for p in find_runs(log_dir, run_ids)), key=lambda log: log.seed or 0)
    numbers = numbers_from_logs(logs)
    env = recorded_env(logs)
    code = _trainer_bytes(logs, trainer)
    if len(code) != numbers["bytes_code"]:
        raise RecordError(f"the trainer packs to {len(code)} bytes but the logs say `Code size: "
                          f"{numbers['bytes_code']} bytes`: it is not the code that ran (packed by another Python version, or "
                          "quant/pack.py changed?); pass the run's <RUN_ID>_trainer.py as --trainer")
    for log in logs:
        check_artifact(log.code_bytes, log.model_bytes)
    meta = {"author": "TODO: author", "github_id": "TODO: github id", "name": name.replace("_", " "),
            "blurb": "TODO: one paragraph: what changed and why", "technique_summary": "TODO: the techniques, briefly",
            **(meta or {})}
    first = logs[0]
    sub = {**{k: meta[k] for k in ("author", "github_id", "name", "blurb")}, "date": date, "track": track,
           **numbers, "hardware": first.hardware, "pytorch_version": first.torch_version or "unknown",
           "cuda_version": first.cuda_version or "unknown", "technique_summary": meta["technique_summary"], "env": env}
    if baseline is not None:
        from golf.reproduce import baseline_delta  # reproduce builds on this module

        sub.update(baseline_delta(baseline, logs, records_dir))
    folder.mkdir(parents=True)
    copied = []
    for log in logs:
        dest = folder / f"train_seed{log.seed}.log"
        shutil.copyfile(log.path, dest)
        if log.path.with_suffix(".json").is_file():
            shutil.copyfile(log.path.with_suffix(".json"), dest.with_suffix(".json"))
        copied.append(parse_log(dest, stage))
    (folder / TRAINER).write_bytes(code)
    shutil.copyfile(REPO_ROOT / "requirements.txt", folder / "requirements.txt")
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    (folder / "README.md").write_text(readme_text(sub, copied, command_line(env, first.world_size or 8)))
    return folder


# ----------------------------------------------------------------------------- check
def load_submission(folder: Path) -> dict:
    path = folder / "submission.json"
    try:
        sub = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError("submission.json is missing") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"submission.json is not valid JSON: {e}") from None
    if not isinstance(sub, dict):
        raise RecordError("submission.json is not a JSON object")
    return sub


def check_folder(folder: Path) -> list[str]:
    """Every way the folder fails to prove its submission.json; [] when it holds."""
    folder = Path(folder)
    try:
        sub = load_submission(folder)
    except RecordError as e:
        return [str(e)]
    problems = []
    m = _FOLDER.match(folder.name)
    if folder.parent.name not in TRACKS:
        problems.append(f"the folder is not inside a track folder ({', '.join(TRACKS)})")
    elif sub.get("track") != folder.parent.name:
        problems.append(f"submission.json track is {sub.get('track')!r} but the folder is in {folder.parent.name}")
    if not m:
        problems.append(f"folder name {folder.name!r}: expected YYYY-MM-DD_Name")
    elif isinstance(sub.get("date"), str) and not sub["date"].startswith(m.group(1)):
        problems.append(f"submission.json date {sub['date']!r} is not the folder's date {m.group(1)}")
    if sub.get("kind") == "ablation":
        return problems + ablation_problems(folder, sub)
    problems += schema_problems(sub, RECORD)
    if problems:
        return problems  # the numbers below assume the schema
    return _log_problems(folder, sub) + trainer_problems(folder, sub["bytes_code"])


def _seed_logs(folder: Path, sub: dict) -> tuple[list[ParsedLog], list[str]]:
    """The logs of the listed seeds, and what is wrong with the set (missing, extra, unreadable)."""
    problems, logs = [], []
    on_disk = {int(m.group(1)) for p in folder.iterdir() if (m := _SEED_LOG.match(p.name))}
    for extra in sorted(on_disk - set(sub["seeds"])):
        problems.append(f"train_seed{extra}.log is not one of the seeds {sub['seeds']}")
    for seed in sub["seeds"]:
        path = folder / f"train_seed{seed}.log"
        if not path.is_file():
            problems.append(f"train_seed{seed}.log is missing (seed {seed} is listed in seeds)")
            continue
        try:
            log = parse_log(path, sub.get("score_stage"))
        except LogError as e:
            problems.append(str(e).replace(str(folder) + "/", ""))
            continue
        if log.seed is not None and log.seed != seed:
            problems.append(f"{path.name} is a run of seed {log.seed}")
        logs.append(log)
    if set(sub["seed_results"]) != {str(s) for s in sub["seeds"]}:
        problems.append(f"seed_results has seeds {sorted(sub['seed_results'])} but seeds lists {sub['seeds']}")
    return logs, problems


def _log_problems(folder: Path, sub: dict) -> list[str]:
    logs, problems = _seed_logs(folder, sub)
    if problems:
        return problems
    try:
        numbers = numbers_from_logs(logs)
        env = recorded_env(logs)
    except (LogError, RecordError) as e:
        return [str(e)]
    for log in logs:
        try:
            check_artifact(log.code_bytes, log.model_bytes)
        except ArtifactTooLarge as e:
            problems.append(f"{log.path.name}: {e}")
        claimed, actual = sub["seed_results"][str(log.seed)], numbers["seed_results"][str(log.seed)]
        problems += [f"seed_results[{log.seed}].{key} is {claimed.get(key)!r} but {log.path.name} gives {actual[key]!r}"
                     for key, tol in SEED_FIELDS.items() if _differs(claimed.get(key), actual[key], tol)]
    problems += [f"submission.json {key} is {sub[key]!r} but the logs give {numbers[key]!r} "
                 f"(seeds {', '.join(map(str, numbers['seeds']))})"
                 for key, tol in AGGREGATES.items() if key in sub and _differs(sub[key], numbers[key], tol)]
    if "env" in sub and sub["env"] != env:
        changed = sorted(k for k in set(env) | set(sub["env"]) if env.get(k) != sub["env"].get(k))
        problems.append("submission.json env differs from the settings the logs took from the environment: " +
                        ", ".join(f"{k} ({sub['env'].get(k)!r} vs {env.get(k)!r})" for k in changed))
    if sub["bytes_total"] > ARTIFACT_CAP:
        over = sub["bytes_total"] - ARTIFACT_CAP
        problems.append(f"bytes_total {sub['bytes_total']} is over the {ARTIFACT_CAP}-byte cap by {over}")
    return problems + baseline_problems(folder, sub, logs)


def baseline_problems(folder: Path, sub: dict, logs: list[ParsedLog]) -> list[str]:
    """A claimed comparison (p_value, delta_vs_baseline_*) is recomputed from both folders' logs."""
    if "baseline" not in sub:
        claims = [k for k in ("p_value", "delta_vs_baseline_val_loss", "delta_vs_baseline_val_bpb") if k in sub]
        return [f"submission.json has {', '.join(claims)} but no baseline folder to check them against"
                ] if claims else []
    from golf.reproduce import baseline_delta  # reproduce builds on this module; imported here, not at the top

    records_dir = folder.parent.parent
    if not (records_dir / sub["baseline"]).is_dir():
        return [f"baseline {sub['baseline']} is not a folder under {records_dir}: p_value and deltas cannot be checked"]
    try:
        actual = baseline_delta(records_dir / sub["baseline"], logs, records_dir)
    except (LogError, RecordError) as e:
        return [f"baseline {sub['baseline']}: {e}"]
    return [f"submission.json {key} is {sub.get(key)!r} but the logs give {value!r} against {sub['baseline']}"
            for key, value in actual.items() if _differs(sub.get(key), value, 1e-9)]


def ablation_problems(folder: Path, sub: dict) -> list[str]:
    problems = schema_problems(sub, ABLATION)
    if problems:
        return problems
    for key in ("report", "results"):
        if not (folder / sub[key]).is_file():
            problems.append(f"{sub[key]} (submission.json {key}) is missing")
    if problems:
        return problems
    try:
        rows = read_jsonl(folder / sub["results"])
    except RecordError as e:
        return [str(e)]
    if len(rows) != sub["runs"]:
        problems.append(f"submission.json runs is {sub['runs']} but {sub['results']} has {len(rows)} rows")
    return problems


def record_folders(records_dir: Path = RECORDS) -> list[Path]:
    return sorted(p for p in records_dir.glob("*/*") if p.is_dir())


def check_all(folders: list[Path]) -> dict[Path, list[str]]:
    return {folder: check_folder(folder) for folder in folders}


# ----------------------------------------------------------------------------- leaderboard
def leaderboard(records_dir: Path = RECORDS) -> str:
    """Ranked tables per track, lowest val_bpb first; folders that fail check are marked."""
    rows, ablations = {}, []
    for folder in record_folders(records_dir):
        problems = check_folder(folder)
        status = "ok" if not problems else f"FAILS CHECK ({len(problems)})"
        try:
            sub = load_submission(folder)
        except RecordError:
            sub = {}
        if sub.get("kind") == "ablation":
            ablations.append(f"  {folder.name}: {sub.get('runs', '?')} runs, {status}")
            continue
        score = sub.get("val_bpb") if _num(sub.get("val_bpb")) else math.inf
        rows.setdefault(folder.parent.name, []).append((score, folder, sub, status))
    if not rows and not ablations:
        return f"no record folders under {records_dir}"
    out = []
    for track in sorted(rows):
        out += [f"{track}", "| rank | val_bpb | std | seeds | artifact bytes | date | name | check |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rank, (score, folder, sub, status) in enumerate(sorted(rows[track], key=lambda r: (r[0], r[1].name)), 1):
            std, size = sub.get("val_bpb_std"), sub.get("artifact_bytes_max", sub.get("bytes_total"))
            out.append(f"| {rank} | {_fmt(score)} | {_fmt(std)} | {len(sub.get('seeds') or []) or '?'} | "
                       f"{f'{size:,}' if _int(size) else '?'} | {sub.get('date', '?')} | {folder.name} | {status} |")
        out.append("")
    if ablations:
        out += ["ablation folders (not ranked):"] + ablations
    return "\n".join(out).rstrip()


def _fmt(x, digits: int = 8) -> str:
    return f"{x:.{digits}f}" if _num(x) else "-"


# ----------------------------------------------------------------------------- ablation export
def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path.name} line {i} is not JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path.name} line {i} is not a JSON object")
        rows.append(row)
    return rows


def new_ablation(study_dir: Path, name: str, date: str | None = None, meta: dict | None = None,
                 records_dir: Path = RECORDS) -> Path:
    """records_dir/track_non_record_16mb/<date>_<name>/ holding a study's report.md, PNGs and results.jsonl."""
    date = date or time.strftime("%Y-%m-%d")
    folder = records_dir / TRACKS[1] / f"{date}_{name}"
    for needed in ("report.md", "results.jsonl"):
        if not (study_dir / needed).is_file():
            raise RecordError(f"{study_dir}: no {needed} "
                              "(a study output directory holds report.md, results.jsonl and PNGs)")
    if not _FOLDER.match(folder.name):
        raise RecordError(f"folder name {folder.name!r}: expected YYYY-MM-DD_Name (letters, digits, _ . -)")
    if folder.exists():
        raise RecordError(f"{folder} already exists")
    rows = read_jsonl(study_dir / "results.jsonl")
    statuses = {}
    for row in rows:
        statuses[str(row.get("status", "unknown"))] = statuses.get(str(row.get("status", "unknown")), 0) + 1
    meta = {"author": "TODO: author", "github_id": "TODO: github id", "name": name.replace("_", " "),
            "blurb": "TODO: what the study asked and found", **(meta or {})}
    sub = {**{k: meta[k] for k in ("author", "github_id", "name", "blurb")}, "date": date, "track": TRACKS[1],
           "kind": "ablation", "runs": len(rows), "report": "report.md", "results": "results.jsonl"}
    folder.mkdir(parents=True)
    pngs = sorted(study_dir.glob("*.png"))
    for path in [study_dir / "report.md", study_dir / "results.jsonl", *pngs]:
        shutil.copyfile(path, folder / path.name)
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    counts = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    (folder / "README.md").write_text(
        f"# {sub['name']}\n\n{sub['blurb']}\n\nAn ablation study (not a record): {len(rows)} runs ({counts}). "
        f"The findings are in [report.md](report.md), made from `results.jsonl` (one row per run)"
        f"{', with ' + ', '.join(f'`{p.name}`' for p in pngs) if pngs else ''}.\n")
    return folder


# ----------------------------------------------------------------------------- command line
def _meta(args) -> dict:
    return {k: v for k, v in {"author": args.author, "github_id": args.github_id, "name": args.title,
                              "blurb": args.blurb, "technique_summary": getattr(args, "summary", None)}.items() if v}


def _cmd_new(args) -> int:
    folder = new_record(Path(args.log_dir), args.name, args.track, args.runs, args.date, _meta(args), args.stage,
                        Path(args.trainer) if args.trainer else None, Path(args.baseline) if args.baseline else None,
                        Path(args.records_dir))
    print(f"wrote {folder}")
    return _report({folder: check_folder(folder)})


def _cmd_check(args) -> int:
    folders = [Path(f) for f in args.folders] or record_folders(Path(args.records_dir))
    if not folders:
        print(f"no record folders under {args.records_dir}")
    return _report(check_all(folders))


def _report(results: dict[Path, list[str]]) -> int:
    for folder, problems in results.items():
        print(f"{'ok  ' if not problems else 'FAIL'} {folder}")
        for p in problems:
            print(f"     {p}")
    return 1 if any(results.values()) else 0


def _cmd_leaderboard(args) -> int:
    print(leaderboard(Path(args.records_dir)))
    return 0


def _cmd_ablation(args) -> int:
    folder = new_ablation(Path(args.study_dir), args.name, args.date, _meta(args), Path(args.records_dir))
    print(f"wrote {folder}")
    return _report({folder: check_folder(folder)})


def _add_prose(p) -> None:
    p.add_argument("--date", help="YYYY-MM-DD (default: today)")
    p.add_argument("--author")
    p.add_argument("--github-id")
    p.add_argument("--title", help="display name (default: NAME with spaces)")
    p.add_argument("--blurb", help="one paragraph for submission.json and the README")


def build_parser() -> argparse.ArgumentParser:
    from golf import reproduce  # declares compare and reproduce; it builds on this module

    parser = argparse.ArgumentParser(prog="python -m golf records", description=__doc__.splitlines()[0])
    parser.add_argument("--records-dir", default=str(RECORDS), help="the records folder (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("new", help="a record folder from finished seed runs")
    p.add_argument("log_dir", help="LOG_DIR of the runs (<RUN_ID>.txt logs and .json summaries)")
    p.add_argument("--name", required=True, help="Short_Name of the folder <date>_<name>")
    p.add_argument("--track", default=TRACKS[0], choices=TRACKS)
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="which runs (default: every finished run in LOG_DIR)")
    p.add_argument("--stage", help="the scored stage (default: each log's last _exact stage after export)")
    p.add_argument("--trainer", help="ship this trainer (default: packed from the sources the logs embed)")
    p.add_argument("--baseline", help="record folder of the current best: adds p_value and delta_vs_baseline_*")
    p.add_argument("--summary", help="technique_summary")
    _add_prose(p)
    p.set_defaults(func=_cmd_new)
    p = sub.add_parser("check", help="recompute submission.json from each folder's logs")
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="default: every records/*/*/ folder")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("leaderboard", help="ranked table of every record folder")
    p.set_defaults(func=_cmd_leaderboard)
    p = sub.add_parser("ablation", help="a non-record folder from a study output directory")
    p.add_argument("study_dir", help="holds report.md, results.jsonl and PNGs")
    p.add_argument("--name", required=True, help="Short_Name of the folder <date>_<name>")
    _add_prose(p)
    p.set_defaults(func=_cmd_ablation)
    reproduce.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecordError, LogError, ArtifactTooLarge) as e:
        print(f"python -m golf records {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
