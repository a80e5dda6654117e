"""Files a run leaves behind, written atomically (write to a temporary file, then rename)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def strict_json_values(value: Any) -> Any:
    """NaN and infinities become null: metrics files stay strict JSON (jq, JavaScript, other languages)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars, 0-d tensors
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_values(v) for v in value]
    return value


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line; a failed write (disk full) is cut back off, so the file never ends in half a row."""
    data = (json.dumps(strict_json_values(row), default=float, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # unbuffered: nothing is left in a buffer to fail again later
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the reader skips a torn last line, and a resume rewrites the file
            raise
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file; a torn last line (a kill mid-write) is skipped."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep rows with step <= max_step: a resumed run re-logs the steps after its checkpoint exactly once."""
    if not Path(path).exists():
        return
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("rlp-cli", "torch", "transformers", "tokenizers", "reasoning-gym", "numpy", "pandas"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(**extra) -> dict:
    return {"git_commit": git_commit(), "versions": package_versions(), "host": platform.node(),
            "platform": platform.platform(), "date": now(), **extra}


LEASE_TTL_S = 120.0  # a lease not refreshed for this long is stale: its holder died without a word (kill -9, node lost)


class LeaseTaken(Exception):
    """Another live process holds the lease: `holder` is its {host, pid, updated}."""

    def __init__(self, holder: dict):
        super().__init__(f"held by process {holder.get('pid')} on {holder.get('host')}")
        self.holder = holder


class Lease:
    """lease.json while a run trains: which host and process hold it, refreshed every LEASE_TTL_S / 4 seconds.

    A driver on another node, or a second `rlp ablate` on the same folder, sees a fresh lease and does
    not start the run twice; a stale one (the holder was killed) may be taken over. Entering raises
    LeaseTaken when another live process holds it.
    """

    def __init__(self, path: Path, ttl: float = LEASE_TTL_S):
        self.path, self.ttl = Path(path), ttl
        self.me = {"host": platform.node(), "pid": os.getpid()}
        self._stop = None
        self._thread = None

    def _mine(self, lease: dict | None) -> bool:
        return isinstance(lease, dict) and all(lease.get(k) == v for k, v in self.me.items())

    def _write(self) -> None:
        try:
            write_json(self.path, {**self.me, "updated": time.time(), "ttl_s": self.ttl})
        except OSError:
            pass  # a full disk: the run itself reports it; a missing refresh only makes the lease look stale sooner

    def __enter__(self) -> "Lease":
        import threading

        holder = lease_holder(self.path)
        if holder and not self._mine(holder):
            raise LeaseTaken(holder)
        self._write()
        if not self._mine(read_json(self.path)):  # another process took it in the same instant
            raise LeaseTaken(read_json(self.path) or {})
        self._stop = threading.Event()

        def refresh():
            while not self._stop.wait(self.ttl / 4):
                self._write()

        self._thread = threading.Thread(target=refresh, name="rlp-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._mine(read_json(self.path)):  # never remove a lease another process has taken since
            self.path.unlink(missing_ok=True)


def lease_holder(path: Path) -> dict | None:
    """The holder of a fresh lease ({host, pid, updated}), or None when there is none or it is stale.

    Fresh: refreshed within its ttl, and, on this host, its process still alive (a kill -9 frees it at once).
    """
    lease = read_json(path)
    if not isinstance(lease, dict) or not isinstance(lease.get("updated"), (int, float)):
        return None
    if time.time() - lease["updated"] >= float(lease.get("ttl_s", LEASE_TTL_S)):
        return None
    if lease.get("host") == platform.node() and not _process_alive(lease.get("pid")):
        return None
    return lease


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has finished
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
