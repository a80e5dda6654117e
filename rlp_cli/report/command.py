"""`rlp report`: collect (collect.py) -> tables (tables.py, paired.py, paper.py) -> files (render_*.py, plots.py)."""

from __future__ import annotations

import os
from pathlib import Path

from rlp_cli import runio
from rlp_cli.errors import UserError
from rlp_cli.report.collect import collect
from rlp_cli.report.paper import load_paper_results
from rlp_cli.report.plots import plot_metrics, plot_training, slug
from rlp_cli.report.render_data import render_csv, render_json
from rlp_cli.report.render_html import render_html
from rlp_cli.report.render_text import render_latex, render_markdown, render_rich
from rlp_cli.report.tables import build_table

FORMATS = ("md", "csv", "tex", "json", "html")
DEFAULT_FORMATS = ",".join(FORMATS)


def parse_formats(spec: str) -> list[str]:
    formats = [f.strip().lower() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {spec}: unknown format(s) {', '.join(unknown) or '(none)'}. Fix: a comma-separated "
                        f"list of {', '.join(FORMATS)}.")
    return formats


def make_report(results_dir: str | Path = "results", formats: str | list[str] = DEFAULT_FORMATS, plots: bool = True,
                paper: bool = False, console=None) -> dict:
    """Gather, tabulate, write. Returns {"tables", "frame", "warnings", "written": [paths]}."""
    root = Path(results_dir)
    formats = parse_formats(formats) if isinstance(formats, str) else list(formats)
    frame, ablations, warnings = collect(root)
    paper_frame = load_paper_results() if paper else None
    tables = []
    written: list[Path] = []
    for ab in ablations.values():
        table = build_table(ab, paper, paper_frame)
        if plots:
            name = slug(ab.key)
            for kind, fn in (("metrics", plot_metrics), ("training", plot_training)):
                path = root / "plots" / f"{name}-{kind}.png"
                try:
                    if fn(ab, table, path):
                        table.plots.append(os.path.relpath(path, root))
                        written.append(path)
                except Exception as e:  # a plot must never cost the tables
                    warnings.append(f"{path}: plot not written ({type(e).__name__}: {e})")
        tables.append(table)
    if not tables:
        warnings.append(f"{root}: no run folder (config.yaml + status.json) or eval.json found")
    public = frame.drop(columns=[c for c in frame.columns if c.startswith("_")], errors="ignore")
    if "md" in formats:
        runio.atomic_write_text(root / "report.md", render_markdown(tables, warnings, root))
        written.append(root / "report.md")
    if "csv" in formats:
        runio.atomic_write_text(root / "report.csv", render_csv(public))
        written.append(root / "report.csv")
    if "tex" in formats:
        runio.atomic_write_text(root / "report.tex", render_latex(tables))
        written.append(root / "report.tex")
    if "json" in formats:
        runio.write_json(root / "report.json", render_json(tables, public, warnings, root))
        written.append(root / "report.json")
    if "html" in formats:
        runio.atomic_write_text(root / "report.html", render_html(tables, ablations, warnings, root))
        written.append(root / "report.html")
    if console is not None:
        for w in warnings:
            console.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
        render_rich(tables, console)
        if written:
            console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
        if "html" in formats:
            from rich.text import Text

            uri = (root / "report.html").resolve().as_uri()
            console.print(Text.assemble("open ", (uri, f"link {uri}")), highlight=False, soft_wrap=True)
    return {"tables": tables, "frame": public, "warnings": warnings, "written": written}


def strict_problems(result: dict) -> list[str]:
    """What `rlp report --strict` (CI, `make smoke`) fails on: no table, an empty table, a run not completed."""
    problems = [] if result["tables"] else ["no table: no run was found"]
    for table in result["tables"]:
        if not table.rows:
            problems.append(f"{table.ablation}: the table is empty")
        problems += [f"{table.ablation}: run {r.get('folder')} is {r.get('status')}" + (f" ({r['error']})" if r.get("error")
                     else "") for r in table.runs if r.get("status") not in ("done", "not evaluated")]
    return problems


def register(app) -> None:
    import typer

    @app.command("report")
    def report_command(
        results_dir: Path = typer.Argument(Path("results"), help="A results folder (searched recursively)."),
        format_: str = typer.Option(DEFAULT_FORMATS, "--format", help="Comma-separated: md, csv, tex, json, html."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots under RESULTS_DIR/plots/."),
        paper: bool = typer.Option(False, "--paper", help="Show the paper's published numbers for the same axis."),
        strict: bool = typer.Option(False, "--strict", help="Exit 1 on a run that did not complete or an empty table "
                                    "(for CI)."),
    ):
        """Tables (per-task accuracy, group averages, Overall, change vs the baseline tested problem by problem or
        over seeds; the training probe, paired over items), plots, and report.html (one self-contained page)."""
        from rich.console import Console

        result = make_report(results_dir, format_, plots, paper, console=Console())
        problems = strict_problems(result) if strict else []
        if problems:
            Console(stderr=True).print("[bold red]--strict:[/bold red] " + "; ".join(problems), highlight=False,
                                       soft_wrap=True)
            raise SystemExit(1)
