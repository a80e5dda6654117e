"""User-facing errors, printed as one paragraph without a traceback.

UserError: bad input (config, file, model), naming the file, the key and the fix; exit code 2.
RunFailed: the input was fine but the run could not go on (diverged, disk full, I/O error); exit code 1.
Both leave the run folder resumable: the last checkpoint and every finished line of output are intact.
"""

import errno

# Failures of the machine rather than of the input: the fix is outside rlp, then the same command resumes.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EIO: "an input/output error",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only"}


class UserError(Exception):
    """Bad input from the user (config, file, model). Printed without a traceback; exit code 2."""

    exit_code = 2


class RunFailed(RuntimeError):
    """The run stopped for a reason that is not bad input. Printed without a traceback; exit code 1."""

    exit_code = 1
    step: int | None = None


def storage_failure(error: OSError, doing: str) -> RunFailed | None:
    """A RunFailed naming the file and the fix for a full or broken disk; None for other OS errors."""
    reason = STORAGE_ERRNOS.get(error.errno)
    if reason is None:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return RunFailed(f"{reason} while {doing}{where}. Nothing already written was lost: no temporary file is left "
                     "and the last checkpoint is intact. Fix: free space (or pass another --out), then run the same "
                     "command again to resume.")
