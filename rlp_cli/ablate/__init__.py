"""`rlp ablate`: a YAML ablation grid expanded into training runs, scheduled on local GPUs or CPU cores.

The files follow the data:

    preset.py     an ablation file -> Preset (the schema; finding a preset by name; reading it and its base config)
    plan.py       Preset -> Plan: every run resolved, its id and folder name, FLOP-matched keys (pure: no I/O)
    store.py      the results folder: manifest.json and the changed-grid check, the .lock, each run's state
    scheduler.py  jobs -> child processes (`rlp train`, then `rlp eval`) through a Backend (local: GPU slots or
                  CPU shares), a live table, Ctrl-C that leaves every run resumable
    command.py    `rlp ablate` (plan -> store -> scheduler -> summary), and what `rlp validate` / `rlp ls` use

The files of a run folder are named in rlp_cli/runfolder.py. Nothing here imports torch at module level, so
`rlp --help` stays fast; nothing here imports rlp_cli.cli.
"""

from rlp_cli.ablate.command import preset_descriptions, register, validate_ablation
from rlp_cli.ablate.plan import expand, run_id
from rlp_cli.ablate.preset import Preset, is_ablation_source, load_preset
from rlp_cli.ablate.scheduler import make_slots
from rlp_cli.ablate.store import write_manifest

__all__ = ["Preset", "expand", "is_ablation_source", "load_preset", "make_slots", "preset_descriptions", "register",
           "run_id", "validate_ablation", "write_manifest"]
