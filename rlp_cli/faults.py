"""Failpoints for the fault-injection suite (tests/test_faults.py).

`RLP_FAILPOINT=<name>` or `<name>@<step>` makes the process kill itself with SIGKILL at that point, as
`kill -9` would, so a test can stop a run exactly between two writes instead of guessing a moment.
Unset (always, outside tests) a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = {
    "checkpoint-tmp-written": "the new checkpoint is on disk as state.pt.tmp, not yet renamed over state.pt",
    "checkpoint-renamed": "state.pt was replaced; its checksum file still lists the previous checkpoint too",
    "final-tmp-written": "the final model is in final.tmp/, not yet renamed to final/",
    "final-renamed": "final/ is in place; status.json still says running",
}


def failpoint(name: str, step: int | None = None) -> None:
    wanted = os.environ.get("RLP_FAILPOINT")
    if not wanted:
        return
    point, _, at = wanted.partition("@")
    if point == name and (not at or step == int(at)):
        os.kill(os.getpid(), signal.SIGKILL)
