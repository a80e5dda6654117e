"""report.html: one self-contained page (inline CSS, plots as base64 PNG data URIs, no script, nothing fetched)
with the tables, their noise marks, the paper's rows, the plots, and what RLP rewarded in each run.

Every piece of text (thoughts are arbitrary model output) goes through html.escape."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Iterable, Optional

from rlp_cli import runio
from rlp_cli.report.cells import MARKS_LEGEND, SubTable, Table
from rlp_cli.report.plots import slug
from rlp_cli.report.records import Ablation, Run
from rlp_cli.report.render_text import first_error_line, not_in_table
from rlp_cli.report.rewarded import Pick, rewarded_thoughts, runs_with_samples

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1em 2em 4em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; } h2 { margin-top: 2.5em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h3 { margin-top: 1.8em; } h4 { margin: 1.4em 0 .4em; }
.meta, .caption, .notes { color: #555; font-size: 12.5px; } .notes li { margin: .2em 0; }
.scroll { overflow-x: auto; margin: .6em 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .3em .65em; text-align: right; white-space: nowrap; }
th { background: #f5f5f7; position: sticky; top: 0; } th:first-child, td:first-child { text-align: left; }
tr:hover td { background: #fafafa; }
td.noise { color: #8a8a8a; } td.untested { color: #a05a00; } td.ref { color: #555; font-style: italic; }
td.beyond { font-weight: 600; }
.legend { display: inline-block; border: 1px solid #ddd; border-radius: 6px; padding: .4em .9em; background: #fbfbfd; }
.legend dl { display: inline; margin: 0; }
.legend dt { display: inline; font-weight: 600; font-family: ui-monospace, monospace; }
.legend dd { display: inline; margin: 0 1.2em 0 .3em; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.phases { display: flex; gap: 1.2em; flex-wrap: wrap; }
.phase { flex: 1 1 480px; min-width: 0; }
.pick { border: 1px solid #ddd; border-left: 5px solid #999; border-radius: 5px; padding: .5em .8em; margin: .6em 0; }
.pick.high { border-left-color: #2a9d4b; } .pick.low { border-left-color: #c8453b; }
.pick pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f8; padding: .4em .6em; margin: .3em 0;
            border-radius: 4px; }
.pick .target { background: #ffe9a8; outline: 1px solid #e0b84a; }
.pick .label { font-weight: 600; } .pick dl { margin: .3em 0; font-size: 12.5px; }
.pick dt { display: inline; color: #555; } .pick dd { display: inline; margin: 0 1em 0 .3em; }
.warn { color: #8a5a00; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _prose(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def _cell_class(text: str, is_delta: bool) -> str:
    if text == "ref":
        return "ref"
    if text.endswith("~"):
        return "noise"
    if text.endswith("?"):
        return "untested"
    if is_delta and re.match(r"[+-]\d", text):
        return "beyond"
    return ""


def _table(columns: list[str], rows: list[list[str]], delta_from: Optional[int] = None, tested: bool = True) -> str:
    """A table; in a tested table, Δ columns (and every column from delta_from on) get the marks' classes."""
    delta = {i for i, c in enumerate(columns)
             if tested and (c.startswith("Δ") or (delta_from is not None and i >= delta_from))}
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, text in enumerate(row):
            cls = _cell_class(str(text), i in delta)
            cells.append(f'<td class="{cls}">{esc(text)}</td>' if cls else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _notes(lines: Iterable[str]) -> str:
    items = "".join(f"<li>{_prose(line)}</li>" for line in lines)
    return f'<ul class="notes">{items}</ul>' if items else ""


PAIRED_EVAL_LEAD = ["Arm", "problems", "Δ Overall (pts)", "95% CI (pts)", "p", "MDD (pts)"]  # then a Δ per task


def _sub_table(sub: SubTable, heading: str) -> list[str]:
    lead = len(PAIRED_EVAL_LEAD)
    delta_from = lead if sub.columns[:lead] == PAIRED_EVAL_LEAD else None
    return [f"<h3>{esc(heading)}</h3>", _table(sub.columns, sub.rows, delta_from), _notes(sub.footer)]


def legend() -> str:
    items = "".join(f"<dt>{esc(mark)}</dt><dd>{esc(meaning)}</dd>" for mark, meaning in MARKS_LEGEND)
    return f'<div class="legend"><strong>Marks after a change:</strong> <dl>{items}</dl></div>'


def _plot(results_dir: Path, relative: str) -> str:
    path = results_dir / relative
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f'<p class="warn">plot {esc(relative)} could not be read</p>'
    return f'<figure><img class="plot" alt="{esc(Path(relative).stem)}" src="data:image/png;base64,{data}"></figure>'


def _fmt(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:+.3f}"


def _reward_name(run: Run) -> str:
    from rlp_cli.config import ObjectiveConfig

    name = run.config.get("objective.name", "rlp")
    try:
        return ObjectiveConfig.model_construct(name=name, reward=run.config.get("objective.reward")).reward_name()
    except (KeyError, TypeError):
        return str(run.config.get("objective.reward") or "?")


def _pick(pick: Pick) -> str:
    s, t = pick.sample, pick.thought
    cls = {"highest reward": "high", "lowest reward": "low"}.get(pick.label, "")
    facts = [("step", s.step), ("reward", _fmt(t.reward)), ("target", json.dumps(s.target, ensure_ascii=False))]
    for key, value in (("s_pred", t.s_pred), ("s_ema", s.s_ema), ("s_empty", s.s_empty)):
        if value is not None:
            facts.append((key, f"{value:.3f}"))
    if t.prediction is not None:
        facts.append(("prediction", json.dumps(t.prediction, ensure_ascii=False)))
    if t.tokens is not None:
        closed = "" if t.closed is None else ", closed" if t.closed else ", not closed"
        facts.append(("tokens", f"{t.tokens}{closed}"))
    others = ", ".join(_fmt(o.reward) for o in s.thoughts)
    facts.append((f"the {len(s.thoughts)} thoughts of this context", others))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return (f'<div class="pick {cls}"><div class="label">{esc(pick.label)}: {esc(_fmt(t.reward))}</div>'
            f'<div class="meta">context (its tail), then the true next token highlighted:</div>'
            f'<pre>{esc(s.context_tail)}<span class="target">{esc(s.target)}</span></pre>'
            f'<div class="meta">thought:</div><pre>{esc(t.text)}</pre><dl>{dl}</dl></div>')


def rewards_section(ab: Ablation, arms: list[str]) -> list[str]:
    runs = runs_with_samples(ab.runs, arms)
    if not runs:
        return []
    out = ["<h3>What RLP rewards</h3>",
           '<p class="meta">From each run\'s samples.jsonl (one logged context every few steps, with its G thoughts): '
           "the highest- and the lowest-rewarded thought in the first third of the logged steps (early) and in the "
           "last third (late). reward: the thought's reward (info_gain: s_pred − s_ema; prefix_match and the other "
           "sparse rewards: whether the written prediction matches the true continuation); s_pred: log p(true next "
           "token | context, thought); s_ema: log p(true next token | context) under the EMA teacher, no thought; "
           "s_empty: the same with an empty thought.</p>"]
    for run in runs:
        out.append(f"<h4>{esc(run.arm)} <span class=\"meta\">({esc(run.folder)}, seed {esc(run.seed)}, reward "
                   f"{esc(_reward_name(run))}, {len(run.samples)} logged steps)</span></h4>")
        phases = []
        for phase in rewarded_thoughts(run.samples):
            steps = ", ".join(map(str, phase.steps))
            body = "".join(_pick(p) for p in phase.picks) or '<p class="meta">no rewarded thought logged</p>'
            phases.append(f'<div class="phase"><strong>{esc(phase.name.capitalize())}</strong> '
                          f'<span class="meta">(steps {esc(steps)}; {phase.n_thoughts} thoughts)</span>{body}</div>')
        out.append(f'<div class="phases">{"".join(phases)}</div>')
    return out


def render_html(tables: list[Table], ablations: dict[str, Ablation], warnings: list[str], results_dir: Path) -> str:
    results_dir = Path(results_dir)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>rlp report: {esc(results_dir)}</title><style>{CSS}</style></head><body>",
           f"<h1>rlp report: {esc(results_dir)}</h1>",
           f'<p class="meta">Generated {esc(runio.now())} by <code>rlp report</code> (rlp-cli, git '
           f"{esc(runio.git_commit())}). The same tables as report.md; report.json has the numbers behind them.</p>",
           legend()]
    if len(tables) > 1:
        out.append("<ul>" + "".join(f'<li><a href="#{esc(slug(t.ablation))}">{esc(t.title)}</a> '
                                    f'<span class="meta">({esc(t.ablation)})</span></li>' for t in tables) + "</ul>")
    for t in tables:
        out += [f'<h2 id="{esc(slug(t.ablation))}">{esc(t.title)}</h2>',
                f'<p class="meta">Folder: <code>{esc(t.ablation)}</code></p>']
        if t.probe is not None and t.headline == "probe":
            out += _sub_table(t.probe, f"{t.probe.title} (the headline: no run is evaluated yet)")
            out.append("<h3>Evaluation</h3>")
        out += [_table(t.columns, t.rows), _notes(t.footer)]
        if t.paired_eval is not None:
            out += _sub_table(t.paired_eval, t.paired_eval.title)
        if t.probe is not None and t.headline != "probe":
            out += _sub_table(t.probe, t.probe.title)
        if t.compute_rows:
            out += ["<h3>Training and compute</h3>", '<p class="meta">Mean over seeds; final = mean over the last 10% '
                    "of logged steps.</p>", _table(t.compute_columns, t.compute_rows)]
        if t.paper_rows:
            out += ["<h3>Paper</h3>", _table(t.paper_columns, t.paper_rows, tested=False),
                    f'<p class="caption">{_prose(t.paper_caption)}</p>']
        elif t.paper_caption:
            out.append(f'<p class="caption">{_prose(t.paper_caption)}</p>')
        problems = not_in_table(t)
        if problems:
            items = [f"<li><code>{esc(r['folder'])}</code> ({esc(r['arm'])}, seed {esc(r['seed'])}): {esc(r['status'])}"
                     + (f": {esc(first_error_line(r['error']))}" if r.get("error") else "") + "</li>" for r in problems]
            out += ["<h3>Runs not (yet) in the table</h3>", "<ul>" + "".join(items) + "</ul>"]
        if t.plots:
            out += ["<h3>Plots</h3>"] + [_plot(results_dir, p) for p in t.plots]
        if t.ablation in ablations:
            out += rewards_section(ablations[t.ablation], [row[0] for row in t.rows])
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
        out += ["<h2>Skipped files</h2>", f'<ul class="warn">{items}</ul>']
    out.append("</body></html>")
    return "\n".join(out) + "\n"
