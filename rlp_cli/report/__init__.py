"""`rlp report`: every run under a results folder, gathered into paper-style tables and plots.

What it reads (written by `rlp train`, `rlp eval` and `rlp ablate`):

    RESULTS_DIR/<ablation>/manifest.json          optional: arms, seeds, axes, baseline, report layout
    RESULTS_DIR/<ablation>/<run>/config.yaml      a run folder = config.yaml + status.json,
                                 status.json      plus metrics.jsonl (training curves), probe.jsonl
                                 probe.jsonl      (fixed held-out items scored every few steps), samples.jsonl
                                 samples.jsonl    (logged thoughts and their rewards), eval.json and
                                 eval.json        eval_samples.jsonl (one record per problem and sample)
    RESULTS_DIR/<ablation>/base/eval.json         the untrained model, evaluated once per ablation

Ablations may nest; the runs of one folder form one table. Without a manifest the axes are the config
keys that differ between the runs, and an arm is the set of runs that differ only by seed.

Each table: rows are the arms (the base model first), columns the tasks (accuracy ± lm-eval stderr),
the group averages and Overall (macro averages over tasks, accuracy in %; with several seeds mean ±
sample std over seeds), and the change of Overall against the baseline, absolute (points) and
relative (% of the baseline's Overall). The change is tested by pairing where the data allow it, so
one seed suffices: problem by problem (eval_samples.jsonl: a paired bootstrap over problems, McNemar
per task; the table "Problem by problem"), else with Welch's t-test over seeds (a one-sample t-test
when one side has a single run). `~` marks p > 0.05, a difference that noise explains; `?` marks a
change that cannot be tested. Runs with probe.jsonl get a probe table: the change of information gain
on the same items since step 0 and against the baseline arm, paired over items; it is the headline
while no run is evaluated. The statistics are in rlp_cli/stats.py.
Partial results are normal: running, failed and missing runs appear as such; a file that cannot be
read is skipped with a warning.

The package, in the order the data flows:

    records.py      the typed records: Ablation, Run, EvalResult, Sample, Manifest
    collect.py      a results folder -> records (and the pandas frame of report.csv)
    tables.py       records -> the main table and the compute table (cells.py: Table, cells, noise marks)
    paired.py       the paired sub-tables: eval problem by problem, the probe item by item
    paper.py        the paper's published rows for the same axis
    rewarded.py     the highest- and lowest-rewarded thoughts of each run, early and late
    render_text.py  report.md, report.tex, the terminal
    render_data.py  report.csv, report.json
    render_html.py  report.html, self-contained
    plots.py        plots/*.png
    command.py      make_report() and the `rlp report` command
"""

# The public names of the former single module rlp_cli/report.py stay importable from here. betainc and
# t_two_sided_p are not used by the report: they stay importable from rlp_cli.report, where they used to live.
from rlp_cli.report.cells import (MARKS_LEGEND, NOISE_P, SubTable, Table, noise_marker,  # noqa: F401
                                  relative_change)
from rlp_cli.report.collect import (IGNORED_AXIS_KEYS, PROBE_METRICS, PROBE_VERSION, SKIP_DIRS,  # noqa: F401
                                    add_manifest_rows, assign_arms, axis_value, collect, eval_columns, infer_axes,
                                    is_training_row, last_value, read_eval_items, read_model_eval, read_probe,
                                    read_run, read_samples, scan, short_keys, training_columns)
from rlp_cli.report.command import FORMATS, make_report, parse_formats, register  # noqa: F401
from rlp_cli.report.paired import (BOOTSTRAP_SAMPLES, PROBE_TABLE_METRICS, build_paired_eval,  # noqa: F401
                                   build_probe_table, compare_problems, eval_items_of, paired_summary,
                                   pick_probe_baseline, probe_change, probe_final)
from rlp_cli.report.paper import (PAPER_AXES, PAPER_SOURCE, add_paper_rows, load_paper_results,  # noqa: F401
                                  paper_axis_for)
from rlp_cli.report.plots import PROBE_CURVES, plot_metrics, plot_training, training_curve_names  # noqa: F401
from rlp_cli.report.records import Ablation, EvalResult, Manifest, Run, Sample, Thought  # noqa: F401
from rlp_cli.report.render_data import render_json  # noqa: F401
from rlp_cli.report.render_html import render_html  # noqa: F401
from rlp_cli.report.render_text import render_latex, render_markdown, render_rich  # noqa: F401
from rlp_cli.report.tables import (build_table, headline_metric, headline_tasks, minimum_detectable_note,  # noqa: F401
                                   ordered_arms, pick_baseline)
from rlp_cli.stats import (betainc, combine_seeds, mcnemar, mean_std, minimum_detectable_difference,  # noqa: F401
                           paired_bootstrap, paired_differences, paired_t, stderr_binary, t_two_sided_p, welch_test)
