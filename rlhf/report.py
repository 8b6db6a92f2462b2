"""A run's report: one static HTML page, readable offline (``rlhf report RUN_DIR``, and written
as RUN_DIR/report.html at the end of every run).

The page holds the run's settings, its curves as inline SVG drawn here (no script, no network,
nothing outside the file), and sample completions from the start, middle and end of the run
(``completions.jsonl``), every text escaped. LM curves: reward (total and per function), KL to
the reference, completion length, entropy, clip fraction, then the other training signals;
gym: return, episode length, then every other logged number.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import yaml

from rlhf.errors import UserError
from rlhf.storage import read_jsonl, replace_file

REPORT = "report.html"
# (title, metric keys): the first charts of an LM run, in this order; "rewards/" stands for every
# reward function's own curve (drawn with the total)
LM_CHARTS = [("reward", ["reward", "rewards/"]), ("KL to the reference", ["kl"]),
             ("completion length (tokens)", ["completion_len"]), ("entropy", ["entropy"]),
             ("clip fraction", ["clip_frac"]), ("loss", ["loss", "pg_loss", "vf_loss"]),
             ("approx KL(old || new)", ["approx_kl"]), ("explained variance", ["explained_variance"]),
             ("truncated fraction", ["truncated"]), ("groups with equal rewards", ["frac_groups_all_equal"]),
             ("gradient norm", ["grad_norm"])]
GYM_CHARTS = [("return (mean of the last 100 episodes)", ["return"]), ("episode length", ["ep_length"])]
NOT_CHARTED = ("step", "time_s", "episodes", "lr", "skipped")  # gym / reward-model leftovers not worth a chart
SAMPLES_PER_STEP = 4
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def write_report(run_dir) -> Path:
    """Write RUN_DIR/report.html from the run's files; returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no recipe.yaml); pass the run_dir "
                        "printed by `rlhf train`")
    path = run_dir / REPORT
    replace_file(path, render(run_dir).encode("utf-8"))  # (a rename: a link in its place is not written through)
    return path


def render(run_dir: Path) -> str:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    history = read_jsonl(run_dir / "metrics.jsonl")
    samples = read_jsonl(run_dir / "completions.jsonl")
    charts = "".join(svg_chart(title, series) for title, series in chart_series(history, "env" in recipe))
    body = [f"<h1>{_e(run_dir.name)}</h1>", _settings(recipe, history),
            "<h2>Curves</h2>", f'<div class="charts">{charts}</div>' if charts else "<p>No metrics logged yet.</p>"]
    if samples:
        body += ["<h2>Sample completions</h2>", sample_tables(samples)]
    body.append(f"<details><summary>Full recipe</summary><pre>{_e(yaml.safe_dump(recipe, sort_keys=False))}"
                "</pre></details>")
    return PAGE.format(title=_e(f"rlhf report: {run_dir.name}"), body="\n".join(body))


def chart_series(history: list[dict], gym: bool) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """(title, {label: [(step, value)]}) for each chart, in the page's order; a metric is drawn once."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    numeric = [k for k in keys if any(_finite(row.get(k)) for row in history)]
    out, used = [], set()
    for title, wanted in GYM_CHARTS if gym else LM_CHARTS:
        chosen = [k for w in wanted for k in numeric if (k.startswith(w) if w.endswith("/") else k == w)
                  and not k.endswith(("/timeouts", "/all_none"))]
        if chosen:
            out.append((title, {k: _points(history, k) for k in chosen}))
            used |= set(chosen)
    if gym or not out:  # gym and reward-model runs: every other number too
        out += [(k, {k: _points(history, k)}) for k in numeric if k not in used and k not in NOT_CHARTED]
    return out


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 440, height: int = 230) -> str:
    """A line chart as inline SVG: axes with round ticks, one polyline per series (broken where a
    value is missing), a legend for several series."""
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return ""
    legend = 14 * len(series) if len(series) > 1 else 0  # one line per series, under the axis
    left, right, top, bottom = 58, 12, 30, 34 + legend
    height += legend
    x0, x1 = _span(min(p[0] for p in pts), max(p[0] for p in pts))
    y0, y1 = _span(min(p[1] for p in pts), max(p[1] for p in pts))
    yticks = nice_ticks(y0, y1)
    y0, y1 = min(y0, yticks[0]), max(y1, yticks[-1])
    xticks = nice_ticks(x0, x1, 6, min_step=1)  # steps are whole numbers
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg class="chart" role="img" aria-label="{_e(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{_e(title)}</title>", f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{left}" y="18" class="t">{_e(title)}</text>']
    for t in yticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="g"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{tick_label(t, yticks)}</text>')
    for t in xticks:
        if x0 <= t <= x1:
            parts.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                         f'{tick_label(t, xticks)}</text>')
    parts.append(f'<text x="{width - right}" y="{height - bottom + 28}" text-anchor="end">step</text>'
                 f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
                 'class="frame"/>')
    for i, (label, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        for run in _unbroken(points):
            xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
            parts.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.8"/>')
            if len(run) <= 40:
                parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.4" fill="{color}"/>' for x, y in run]
        if legend:
            ly = height - legend + 14 * i + 8
            parts.append(f'<rect x="{left}" y="{ly - 4}" width="12" height="3" fill="{color}"/>'
                         f'<text x="{left + 18}" y="{ly}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def nice_ticks(lo: float, hi: float, n: int = 5, min_step: float = 0.0) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart, at least ``min_step``)
    covering [lo, hi]."""
    raw = max((hi - lo) / max(n - 1, 1), min_step)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    count = math.ceil((hi - first) / step - 1e-9) + 1
    return [round(first + i * step, 12) for i in range(count)]


def tick_label(v: float, ticks: list[float]) -> str:
    """A tick value with just the decimals its spacing needs (0.0001 apart: 4 decimals)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if max(abs(t) for t in ticks) >= 1e6 or step < 1e-6:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def sample_tables(samples: list[dict]) -> str:
    """Samples of the first, middle and last logged steps, ``SAMPLES_PER_STEP`` each (from
    different prompts where the step has several)."""
    steps = sorted({r["step"] for r in samples})
    picked = list(dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]]))
    labels = dict(zip(picked, ("start", "middle", "end") if len(picked) == 3 else ("start", "end")))
    out = []
    for step in picked:
        rows = spread([r for r in samples if r["step"] == step])[:SAMPLES_PER_STEP]
        names = list(rows[0].get("rewards", {}))
        head = "".join(f"<th>{_e(h)}</th>" for h in ["prompt", "completion", "reward", *names, "advantage",
                                                      "length", "truncated"])
        body = "".join(
            "<tr>" + f'<td class="text">{_e(r["prompt"])}</td><td class="text">{_e(r["completion"])}</td>'
            + "".join(f"<td>{_num(v)}</td>" for v in [r["reward"], *(r["rewards"].get(k) for k in names),
                                                      r["advantage"]])
            + f"<td>{_e(r['length'])}</td><td>{'yes' if r['truncated'] else 'no'}</td></tr>" for r in rows)
        out.append(f"<h3>{labels[step]}: step {_e(step)}</h3><table><tr>{head}</tr>{body}</table>")
    return "\n".join(out)


def spread(rows: list[dict]) -> list[dict]:
    """``rows`` reordered round-robin over their prompts (each prompt's first sample, then each
    one's second, ...), so that the first few shown come from different prompts."""
    rank: dict[str, int] = {}
    order = []
    for i, r in enumerate(rows):
        rank[r["prompt"]] = rank.get(r["prompt"], -1) + 1
        order.append((rank[r["prompt"]], i))
    return [rows[i] for _, i in sorted(order)]


def _settings(recipe: dict, history: list[dict]) -> str:
    """The run's key settings and its first and last logged values of the headline metric."""
    keys = ["algo", "env", "model", "task", "rewards", "steps", "total_steps", "lr", "kl_coef", "seed"]
    items = [(k, recipe[k]) for k in keys if k in recipe and recipe[k] is not None]
    metric = "return" if "env" in recipe else "reward"
    values = [r[metric] for r in history if _finite(r.get(metric))]
    if values:
        items.append((f"{metric}: first, last", f"{_num(values[0])}, {_num(values[-1])}"))
    if history:
        items.append(("last logged step", history[-1].get("step")))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _points(history: list[dict], key: str) -> list[tuple[float, float | None]]:
    return [(r["step"], r[key] if _finite(r.get(key)) else None) for r in history if key in r and "step" in r]


def _unbroken(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    runs: list[list] = [[]]
    for x, y in points:
        if y is None:
            runs.append([])
        else:
            runs[-1].append((x, y))
    return [r for r in runs if r]


def _span(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> str:
    """A value for the page, escaped (the files it comes from may hold anything)."""
    if v is None:
        return "-"
    return _e(f"{v:.4g}" if isinstance(v, float) else v)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222;
       max-width: 1400px; }}
h1 {{ font-size: 22px; margin: 0 0 12px; }} h2 {{ font-size: 18px; margin: 26px 0 8px; }} h3 {{ font-size: 15px; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 0; }}
dt {{ color: #666; }} dd {{ margin: 0; font-family: ui-monospace, monospace; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.chart {{ border: 1px solid #ddd; border-radius: 4px; }}
.chart text {{ font: 11px system-ui, sans-serif; fill: #444; }} .chart text.t {{ font-size: 13px; fill: #111; }}
.chart .g {{ stroke: #eee; }} .chart .frame {{ fill: none; stroke: #bbb; }}
table {{ border-collapse: collapse; margin-bottom: 14px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: right; }}
th {{ background: #f5f5f5; text-align: left; }}
td.text {{ text-align: left; white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 480px; }}
pre {{ background: #f7f7f7; padding: 8px; }}
</style></head>
<body>
{body}
</body></html>
"""
