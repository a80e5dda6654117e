"""report.csv (a row per run) and report.json (the tables, the numbers behind them, the runs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from rlp_cli import runio
from rlp_cli.report.cells import SubTable, Table


def render_csv(frame) -> str:
    return frame.to_csv(index=False)


def render_json(tables: list[Table], frame, warnings: list[str], results_dir: Path) -> dict:
    import numpy as np

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, np.generic):
            return clean(v.item())
        if isinstance(v, dict):
            return {(k if isinstance(k, str) else "/".join(map(str, k)) if isinstance(k, tuple) else str(k)): clean(x)
                    for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    def sub(table: Optional[SubTable]) -> Optional[dict]:
        return None if table is None else {"title": table.title, "columns": table.columns, "rows": table.rows,
                                           "data": clean(table.data), "footer": table.footer}

    runs = [{k: clean(v) for k, v in rec.items()} for rec in frame.to_dict(orient="records")] if len(frame) else []
    return {"results_dir": str(results_dir), "generated": runio.now(), "git_commit": runio.git_commit(),
            "tables": [{"ablation": t.ablation, "title": t.title, "columns": t.columns, "rows": t.rows,
                        "data": clean(t.data),
                        "footer": t.footer, "headline": t.headline, "paired_eval": sub(t.paired_eval),
                        "probe": sub(t.probe), "compute": {"columns": t.compute_columns, "rows": t.compute_rows},
                        "paper": {"columns": t.paper_columns, "rows": t.paper_rows, "caption": t.paper_caption},
                        "runs": t.runs, "plots": t.plots} for t in tables],
            "runs": runs, "warnings": warnings}
