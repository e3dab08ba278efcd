"""Markdown report of a study's JSONL rows (golf/study.py), with PNG plots.

Per variant, over seeds: mean ± std of every scored stage's val_bpb, the quantization gap, artifact
bytes against the 16,000,000-byte cap, steps, ms/step (training only: train_time_ms / steps, which
leaves out validation and compile), peak memory, the final train loss and the val - train gap. Against
the baseline: the difference of the compared score with its 95% t interval, a t test (paired by seed
when both sides ran the same seeds, Welch otherwise), Holm's correction across all variants, Cohen's
d and a verdict: 'better' / 'worse' only when |delta| >= the minimum effect at adjusted p < alpha,
otherwise 'inside noise'. The score compared is val_loss (nats) when the variant shares the
baseline's tokenizer and val_bpb when it does not: losses of different tokenizers are not comparable.
Every row of every table says whether its numbers come from the one-GPU proxy or the full run.
"""
from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from golf import stats

CAP = 16_000_000
QUANT_STAGES = ("quant_roundtrip", "int8_zlib_roundtrip")
FINAL_ORDER = ("ttt", "sliding_window", *QUANT_STAGES, "prequant")  # the last scored stage comes first
OK = ("ok", "over_cap")


@dataclass
class Group:
    """One variant's rows: the latest per seed, split into scored and crashed."""
    name: str
    rows: list[dict] = field(default_factory=list)
    crashed: list[dict] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.rows]

    @property
    def scale(self) -> str:
        scales = {r.get("scale", "proxy") for r in self.rows}
        return scales.pop() if len(scales) == 1 else ("mixed" if scales else "-")

    @property
    def meta(self) -> dict:
        return (self.rows or self.crashed)[0]

    def values(self, fn: Callable[[dict], float | None]) -> list[float]:
        return [v for v in (fn(r) for r in self.rows) if v is not None and not math.isnan(v)]


# ----------------------------------------------------------------------------- what a row measured
def _m(key: str) -> Callable[[dict], float | None]:
    return lambda r: r["metrics"].get(key)


def stage_of(row: dict, stage: str) -> str | None:
    """The concrete stage name for `stage` ('final': the last one this run scored; 'quant_roundtrip'
    also means the baseline's int8_zlib_roundtrip)."""
    names = FINAL_ORDER if stage == "final" else (QUANT_STAGES if stage in QUANT_STAGES else (stage,))
    return next((s for s in names if f"stages.{s}.val_bpb" in row["metrics"]), None)


def score(row: dict, stage: str, metric: str) -> float | None:
    s = stage_of(row, stage)
    return row["metrics"].get(f"stages.{s}.{metric}") if s else None


def _quant_gap(r: dict) -> float | None:
    q, p = score(r, "quant_roundtrip", "val_bpb"), score(r, "prequant", "val_bpb")
    return None if q is None or p is None else q - p


def _memory(r: dict) -> float | None:
    m = r["metrics"]
    return m.get("peak_memory.allocated_mib", m.get("peak_memory.cpu_max_rss_mib"))


def _train_val_gap(r: dict) -> float | None:
    val, train = r["metrics"].get("stages.in_training.val_loss"), r["metrics"].get("train_loss")
    return None if val is None or train is None else val - train


def _token_accuracy(r: dict) -> float | None:
    keys = sorted(k for k in r["metrics"] if k.rsplit(".", 1)[-1] in ("token_accuracy", "token_acc"))
    return r["metrics"][keys[-1]] if keys else None


# (header, value of a row, format); a column no row has is left out
SCORE_COLUMNS = [
    ("pre-quant bpb", lambda r: score(r, "prequant", "val_bpb"), ".4f"),
    ("post-quant bpb", lambda r: score(r, "quant_roundtrip", "val_bpb"), ".4f"),
    ("sliding bpb", lambda r: score(r, "sliding_window", "val_bpb"), ".4f"),
    ("post-TTT bpb", lambda r: score(r, "ttt", "val_bpb"), ".4f"),
    ("quant gap", _quant_gap, "+.4f"),
]
COST_COLUMNS = [
    ("steps", _m("steps"), ".0f"),
    ("ms/step", _m("step_avg_ms"), ".1f"),
    ("peak MiB", _memory, ".0f"),
    ("train loss", _m("train_loss"), ".4f"),
    ("val - train loss", _train_val_gap, "+.4f"),
    ("token acc", _token_accuracy, ".4f"),
]


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean, std = stats.mean_std(values)
    return f"{mean:{fmt}}" if math.isnan(std) else f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # a bare | would split the cell
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


# ----------------------------------------------------------------------------- grouping
def group_rows(rows: list[dict], study=None) -> tuple[list[Group], list[str]]:
    """Groups in study (or first-seen) order, baseline first, from the latest row of each (variant, seed).
    With a study, rows whose settings differ from the file's (an edited study not yet re-run) are left out."""
    notes, latest = [], {}
    expected = None
    if study is not None:
        expected = {v.name: {**study.baseline, **v.env} for v in study.variants}
    stale = 0
    for r in rows:
        if expected is not None:
            env = {k: v for k, v in r["env"].items() if k not in ("SEED", "RUN_ID", "LOG_DIR")}
            if expected.get(r["variant"]) != env or r["seed"] not in study.seeds:
                stale += 1
                continue
        latest[(r["variant"], r["seed"])] = r  # rows are appended in time order: the last one wins
    if stale:
        notes.append(f"{stale} row(s) of variants or settings no longer in the study file were left out.")
    order = [v.name for v in study.variants] if study is not None else []
    for variant, _ in latest:
        if variant not in order:
            order.append(variant)
    order.sort(key=lambda name: name != "baseline")  # stable: the baseline first, the rest as they came
    groups = {name: Group(name) for name in order}
    for (variant, _), r in sorted(latest.items(), key=lambda kv: kv[0][1]):  # seed order: pairs line up
        (groups[variant].rows if r["status"] in OK else groups[variant].crashed).append(r)
    return [g for g in groups.values() if g.rows or g.crashed], notes


def _tokenizer(row: dict) -> tuple:
    t = row.get("tokenizer") or {}
    return (t.get("sha256") or t.get("path"), t.get("vocab"))


def common_stage(rows: list[dict], stage: str) -> str | None:
    """The latest stage (or `stage`) that every one of `rows` scored, so they share one axis."""
    return next((s for s in (FINAL_ORDER if stage == "final" else (stage,)) if all(stage_of(r, s) for r in rows)), None)


# ----------------------------------------------------------------------------- comparisons
def comparisons(base: Group, others: list[Group], settings: dict) -> dict[str, dict]:
    """stats.compare of each variant against the baseline, then Holm across them all."""
    out = {}
    for g in others:
        if not g.rows or not base.rows:
            continue
        stage = common_stage(base.rows + g.rows, settings["stage"])
        if stage is None:
            continue
        same_tok = len({_tokenizer(r) for r in base.rows + g.rows}) == 1
        metric = "val_loss" if same_tok else "val_bpb"
        min_effect = settings["min_effect"] if same_tok else settings["min_effect_bpb"]
        paired = base.seeds == g.seeds and len(g.seeds) > 1  # rows are in seed order, so pairs line up
        result = stats.compare([score(r, stage, metric) for r in base.rows], [score(r, stage, metric) for r in g.rows],
                               paired, min_effect, settings["alpha"])
        bpb = [stats.mean_std([score(r, stage, "val_bpb") for r in x.rows])[0] for x in (g, base)]
        result.update(stage=stage_of(g.rows[0], stage), metric=metric, same_tokenizer=same_tok,
                      delta_bpb=bpb[0] - bpb[1])
        out[g.name] = result
    names = list(out)
    for name, p_adj in zip(names, stats.holm([out[n]["p"] for n in names])):
        out[name]["p_holm"] = p_adj
        out[name]["verdict"], out[name]["reason"] = stats.verdict(out[name]["delta"], p_adj, out[name]["min_effect"],
                                                                  out[name]["alpha"])
    return out


def _num(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


# ----------------------------------------------------------------------------- plots
def _plots(groups: list[Group], out: Path, stage: str | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((title, name))

    colors = {g.name: f"C{i % 10}" for i, g in enumerate(groups)}
    trained = [g for g in groups if g.rows and not g.meta.get("post")]
    if any(r.get("val_history") for g in trained for r in g.rows):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for g in trained:
            for i, r in enumerate(g.rows):
                hist = r.get("val_history") or []
                ax.plot([h["train_time_ms"] / 1000 for h in hist], [h["val_bpb"] for h in hist], "o-", ms=3, lw=1,
                        color=colors[g.name], alpha=0.8, label=f"{g.name} ({g.scale})" if i == 0 else None)
        ax.set(xlabel="training time (s, evaluation excluded)", ylabel="val_bpb",
               title="val_bpb during training, every seed")
        ax.legend(fontsize=8)
        save(fig, "val_bpb_vs_time.png", "val_bpb against training time")

    if stage is not None:
        scored = [g for g in groups if g.rows]
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(scored) + 2), 4.2))
        for i, g in enumerate(scored):
            mean, lo, hi = stats.mean_ci(g.values(lambda r: score(r, stage, "val_bpb")))
            err = [[mean - lo], [hi - mean]] if not math.isnan(lo) else None
            ax.bar(i, mean, yerr=err, capsize=4, color=colors[g.name])
        base = scored[0].values(lambda r: score(r, stage, "val_bpb"))
        ax.axhline(stats.mean_std(base)[0], color="gray", lw=0.8, ls="--")
        vals = [v for g in scored for v in g.values(lambda r: score(r, stage, "val_bpb"))]
        pad = (max(vals) - min(vals)) * 0.6 + 1e-4
        ax.set_ylim(min(vals) - pad, max(vals) + pad)  # the differences, not the distance from zero
        ax.set_xticks(range(len(scored)), [f"{g.name}\n({g.scale})" for g in scored], rotation=30, ha="right",
                      fontsize=8)
        ax.set(ylabel=f"val_bpb ({stage})", title="mean over seeds, 95% t interval; dashed: baseline")
        save(fig, "final_bpb.png", f"{stage} val_bpb per variant")
        _sweep_plots(groups, stage, save, plt)
        _memory_plot(groups, save, plt)
    return made


def _sweep_plots(groups: list[Group], stage: str, save, plt) -> None:
    """Per knob of each [grid.*] / [random.*] group: box plots of val_bpb per value, with Spearman's rho
    for numeric knobs; a heat map when a grid has two knobs."""
    sweeps: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        if g.rows and g.meta.get("sweep"):
            sweeps[g.meta["sweep"]].append(g)
    for name, members in sweeps.items():
        knobs = list(members[0].meta.get("knobs") or {})
        by_value: dict[str, dict] = {k: defaultdict(list) for k in knobs}
        for g in members:
            for k in knobs:
                by_value[k][g.meta["knobs"][k]] += g.values(lambda r: score(r, stage, "val_bpb"))
        for k in knobs:
            values = sorted(by_value[k], key=_order)
            fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(values) + 2), 4))
            ax.boxplot([by_value[k][v] for v in values], tick_labels=[str(v) for v in values])
            title = f"{name}: val_bpb against {k}"
            if all(isinstance(v, (int, float)) for v in values):  # a rank correlation needs ordered values
                xs = [v for v in values for _ in by_value[k][v]]
                rho, p = stats.spearman(xs, [y for v in values for y in by_value[k][v]])
                title += f" (Spearman rho {rho:+.2f}, p {p:.2g})"
            ax.set(xlabel=k, ylabel=f"val_bpb ({stage})")
            ax.set_title(title.replace(" (", "\n("), fontsize=9)
            save(fig, f"sweep_{_file(name)}_{k}.png", title)
        if len(knobs) == 2:
            _heatmap(name, members, knobs, stage, save, plt)


def _heatmap(name: str, members: list[Group], knobs: list[str], stage: str, save, plt) -> None:
    cells = {tuple(g.meta["knobs"][k] for k in knobs): stats.mean_std(g.values(lambda r: score(r, stage, "val_bpb")))[0]
             for g in members if g.rows}
    xs = sorted({c[0] for c in cells}, key=_order)
    ys = sorted({c[1] for c in cells}, key=_order)
    if len(cells) != len(xs) * len(ys):  # random draws rarely fill a grid
        return
    import numpy as np

    grid = np.array([[cells[(x, y)] for x in xs] for y in ys])
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    middle = (grid.min() + grid.max()) / 2
    for (i, j), v in np.ndenumerate(grid):  # dark text on the light (low) end of viridis_r
        ax.text(j, i, f"{v:.4f}", ha="center", va="center", fontsize=8, color="black" if v < middle else "white")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set(xlabel=knobs[0], ylabel=knobs[1], title=f"{name}: mean val_bpb ({stage})")
    fig.colorbar(im, ax=ax)
    save(fig, f"heatmap_{_file(name)}.png", f"{name}: mean val_bpb over {knobs[0]} x {knobs[1]}")


def _memory_plot(groups: list[Group], save, plt) -> None:
    points = [(r["config"].get("TRAIN_SEQ_LEN"), _memory(r)) for g in groups for r in g.rows if not g.meta.get("post")]
    points = [(s, m) for s, m in points if s is not None and m is not None]
    lengths = sorted({s for s, _ in points})
    if len(lengths) < 2:  # only when the sequence length was swept
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*points), "o", alpha=0.5)
    ax.plot(lengths, [stats.mean_std([m for s, m in points if s == n])[0] for n in lengths], "-", color="C1")
    ax.set(xlabel="TRAIN_SEQ_LEN", ylabel="peak memory (MiB)", title="peak memory against sequence length")
    save(fig, "memory_vs_seq_len.png", "peak memory against sequence length")


def _order(value) -> tuple:
    """Numbers in numeric order, then strings."""
    return (isinstance(value, str), value if not isinstance(value, str) else 0, str(value))


def _file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# ----------------------------------------------------------------------------- the report
def write_report(rows: list[dict], out: str | Path, study=None) -> Path:
    """Writes <out>/report.md and its PNGs; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups, notes = group_rows(rows, study)
    if not groups:
        raise ValueError(f"no rows to report on (rows: {len(rows)})")
    settings = {"alpha": 0.01, "min_effect": 0.005, "min_effect_bpb": 0.005, "stage": "final",
                **(study.stats if study is not None else groups[0].meta.get("stats") or {})}
    base = next((g for g in groups if g.name == "baseline"), None)
    others = [g for g in groups if g is not base]
    stage = common_stage([r for g in groups for r in g.rows], settings["stage"])

    lines = _header(study.name if study is not None else groups[0].meta.get("study", "study"),
                    study.description if study is not None else "", groups)
    lines += _scores(groups, stage) + _costs(groups)
    if base is None:
        notes.append("No baseline rows: nothing is compared.")
    else:
        lines += _against_baseline(base, others, comparisons(base, others, settings), settings, notes)
    notes += _budget_notes(groups)
    lines += _crashed(groups)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    plots = _plots(groups, out, stage)
    if plots:
        lines += ["## Plots", ""] + [line for title, f in plots for line in (f"![{title}]({f})", "")]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _header(name: str, description: str, groups: list[Group]) -> list[str]:
    rows = [r for g in groups for r in g.rows + g.crashed]
    commits = sorted({(r.get("git") or {}).get("commit") or "?" for r in rows})
    dirty = any((r.get("git") or {}).get("dirty") for r in rows)
    hardware = sorted({f"{r['hardware'].get('gpu') or r['hardware'].get('device') or '?'} "
                       f"x{r['hardware'].get('world_size') or '?'}" for r in rows if r.get("hardware")})
    return [f"# Study {name}", ""] + ([description, ""] if description else []) + [
        f"{len(rows)} runs ({sum(len(g.crashed) for g in groups)} crashed) of {len(groups)} variants; trainer "
        f"{groups[0].meta.get('trainer')}; commit {', '.join(commits)}{' (uncommitted changes)' if dirty else ''}; "
        f"hardware {', '.join(hardware)}; generated {time.strftime('%Y-%m-%d %H:%M')}.",
        "'proxy': one-GPU proxy (or CPU) numbers; 'full': the 8-GPU run (SPEC.md section 9). Every value is "
        "mean ± std over seeds; ms/step is training time over steps, evaluation and compile excluded.", ""]


def _scores(groups: list[Group], stage: str | None) -> list[str]:
    cols = [c for c in SCORE_COLUMNS if any(g.values(c[1]) for g in groups)]
    body = []
    for g in (g for g in groups if g.rows):  # crashed-only variants are listed under Crashed runs
        final = g.values(lambda r: score(r, stage, "val_bpb")) if stage else []
        _, lo, hi = stats.mean_ci(final) if final else (0, math.nan, math.nan)
        size = g.values(_m("bytes.total"))
        over = any(r["metrics"].get("bytes.over_cap") for r in g.rows) or (size and max(size) > CAP)
        body.append([g.name + (" (post)" if g.meta.get("post") else ""), g.scale, str(len(g.rows))]
                    + [_cell(g.values(fn), fmt) for _, fn, fmt in cols]
                    + [f"[{lo:.4f}, {hi:.4f}]" if not math.isnan(lo) else "-",
                       f"{_cell(size, ',.0f')} ({'FAIL' if over else 'pass'}, max {max(size):,.0f})" if size else "-"])
    header = ["variant", "proxy/full", "seeds"] + [c[0] for c in cols]
    return ["## Scores", ""] + _table(header + [f"{stage or 'final'} bpb 95% CI", f"artifact bytes vs {CAP:,}"],
                                      body) + [""]


def _costs(groups: list[Group]) -> list[str]:
    cols = [c for c in COST_COLUMNS if any(g.values(c[1]) for g in groups)]
    scored = [g for g in groups if g.rows]
    lines = ["## Cost and training", ""] + _table(
        ["variant", "proxy/full"] + [c[0] for c in cols],
        [[g.name, g.scale] + [_cell(g.values(fn), fmt) for _, fn, fmt in cols] for g in scored])
    cuda = any("peak_memory.allocated_mib" in r["metrics"] for g in scored for r in g.rows)
    post = [g.name for g in scored if g.meta.get("post")]
    return lines + ["", f"Peak memory: {'CUDA max allocated' if cuda else 'CPU max RSS'}."
                    + (f" Post-training variants ({', '.join(post)}) re-scored the baseline's checkpoints: their "
                       "training columns are the baseline's." if post else ""), ""]


def _against_baseline(base: Group, others: list[Group], results: dict, settings: dict, notes: list[str]) -> list[str]:
    if not results:
        return []
    lines = ["## Against the baseline", "",
             f"Verdict: 'better' or 'worse' only when |delta| >= the minimum effect ({settings['min_effect']:g} nats "
             f"of val_loss with the baseline's tokenizer, {settings['min_effect_bpb']:g} bpb otherwise) at "
             f"Holm-adjusted p < {settings['alpha']:g}; anything else is 'inside noise'. delta = variant - baseline: "
             "negative is better.", ""]
    compared = [g for g in others if g.name in results]
    body = []
    for g in compared:
        c = results[g.name]
        body.append([g.name, f"{g.scale} vs {base.scale}", c["stage"],
                     f"{c['metric']} ({'nats' if c['metric'] == 'val_loss' else 'bpb'})", f"{c['delta']:+.4f}",
                     _interval(c), f"{c['delta_bpb']:+.4f}", "paired" if c["paired"] else "Welch", _num(c["p"], ".3g"),
                     _num(c["p_holm"], ".3g"), _num(c["d"], "+.2f"), f"**{c['verdict']}**",
                     _num(g.meta.get("expected"), "+.4f")])
        if not c["same_tokenizer"]:
            notes.append(f"{g.name} uses another tokenizer than the baseline: compared on val_bpb, never val_loss "
                         "(its train loss columns are nats of its own tokenizer).")
        if g.scale != base.scale:
            notes.append(f"{g.name} ({g.scale}) is compared with a {base.scale} baseline.")
        if len(g.rows) == 1:
            notes.append(f"{g.name} has one seed: no spread, no p-value.")
    lines += _table(["variant", "proxy/full", "stage", "compared", "delta", "95% CI", "delta bpb", "test", "p",
                     "p (Holm)", "Cohen's d", "verdict", "expected"], body) + ["", "## Negative results", ""]
    negative = [g for g in compared if results[g.name]["verdict"] != "better"]
    if not negative:
        return lines + ["Every variant beat the baseline.", ""]
    return lines + ["What did not help (against the baseline; 'inside noise' is no evidence either way):", ""] + _table(
        ["variant", "note", "expected", "measured delta (95% CI)", "verdict", "why"],
        [[g.name, g.meta.get("note") or "", _num(g.meta.get("expected"), "+.4f"),
          f"{results[g.name]['delta']:+.4f} {_interval(results[g.name])} ({g.scale})", results[g.name]["verdict"],
          results[g.name]["reason"]] for g in negative]) + [""]


def _interval(c: dict) -> str:
    return f"[{_num(c['delta_ci'][0], '+.4f')}, {_num(c['delta_ci'][1], '+.4f')}]"


def _budget_notes(groups: list[Group]) -> list[str]:
    notes = []
    for key in ("MAX_WALLCLOCK_SECONDS", "ITERATIONS"):
        budgets = {g.name: {r["config"].get(key) for r in g.rows} for g in groups if g.rows and not g.meta.get("post")}
        if len({v for s in budgets.values() for v in s}) > 1:
            notes.append(f"Unequal budgets: {key} differs between variants "
                         f"({'; '.join(f'{n}: {sorted(map(str, s))}' for n, s in budgets.items())}).")
    return notes


def _crashed(groups: list[Group]) -> list[str]:
    crashed = [r for g in groups for r in g.crashed]
    if not crashed:
        return []
    return ["## Crashed runs", ""] + _table(
        ["variant", "seed", "last line of the error", "output"],
        [[r["variant"], str(r["seed"]), _last_line(r.get("error")), f"`{r.get('output', '')}`"]
         for r in crashed]) + [""]


def _last_line(error: str | None) -> str:
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "?")[:200]
