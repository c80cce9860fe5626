"""One writer per output directory: an exclusive lock file `OUT/.lock`.

A stage (the unit driver, `select`) and a run (its RUN directory) hold the lock of the directory they
write for as long as they write it; a second writer is refused with a message naming the holder:

    OUT/.lock   {"pid": ..., "host": ..., "started": ISO time, "command": the holder's command line}

What it guarantees:

* **Local disks**: the lock file is created with `O_CREAT | O_EXCL`, which is atomic: of two writers
  started together exactly one gets the lock. A lock left by a process that died (SIGKILL, a crash, a
  lost machine) is *stale* when its host is this host and its pid no longer runs; it is then taken
  over (renamed away and re-created, so two takers cannot both win) with a warning. A stale lock of
  another host cannot be told apart from a live one: the message says which file to delete.
* **Shared POSIX filesystems** (NFS v3+, Lustre, CephFS, EFS, GPFS): `O_EXCL` creation is atomic on
  these as well, so the exclusion holds across machines; the staleness check only works on the host
  that took the lock.
* **Object stores and other fsspec URIs** (s3://, gs://, ...): there is no atomic create-if-absent;
  the lock is written after checking that none exists, which catches a second run started later but
  not two started within the same second. Keep to one writer per output directory there (e.g. one
  `ray job submit` per run directory).

The holder's command line is recorded with URL credentials removed (`config.safe_url`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from deita_ray import io
from deita_ray.config import safe_url

logger = logging.getLogger("deita_ray")

LOCK_FILE = ".lock"


class OutputLockedError(RuntimeError):
    """Another process writes this output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _holder_record(command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(safe_url(a) for a in sys.argv),
    }


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
        f"{holder.get('command')!r}"
    )


def is_stale(holder: dict[str, Any]) -> bool:
    """A lock whose process is known to be gone: taken on this host by a pid that no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


class OutputLock:
    """The exclusive lock of one output directory (see the module docstring). Use `output_lock`."""

    def __init__(self, root: str, command: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LOCK_FILE}"
        self.record = _holder_record(command)
        self.held = False

    def acquire(self) -> OutputLock:
        io.ensure_dir(self.root)
        fs, inner = io.filesystem(self.path)
        local = io.is_local(fs)
        for _ in range(3):
            if self._create(local):
                self.held = True
                return self
            holder = self._read()
            if holder is None:  # removed in between (its holder finished): try again
                continue
            if not is_stale(holder):
                raise OutputLockedError(
                    f"{self.root} is being written by another run ({describe_holder(holder)}); wait "
                    f"for it to finish or use another output directory (if that process is gone for "
                    f"good, delete {self.path})"
                )
            if self._take_over(holder, local):
                logger.warning("deita-ray: took over the stale lock of %s (%s, no longer running)",
                               self.root, describe_holder(holder))
        raise OutputLockedError(f"could not lock {self.root}: {self.path} keeps changing")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder.get("pid") == self.record["pid"] and \
                holder.get("started") == self.record["started"] and holder.get("host") == self.record["host"]:
            with contextlib.suppress(FileNotFoundError):
                io.remove_tree(self.path)

    # --- internals -------------------------------------------------------------------------------
    def _create(self, local: bool) -> bool:
        data = json.dumps(self.record).encode("utf-8")
        if local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        if io.exists(self.path):  # object stores: no atomic create-if-absent (see the docstring)
            return False
        io.atomic_write_bytes(self.path, data)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = io.read_json(self.path)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # being written right now, or garbage: treat as held, unknown holder
            return {"pid": None, "host": "?", "started": "?", "command": "?"}
        return holder if isinstance(holder, dict) else {}

    def _take_over(self, stale: dict[str, Any], local: bool) -> bool:
        """Move a stale lock away; only the taker that moved exactly that lock may go on."""
        if not local:
            io.remove_tree(self.path)
            return True
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, encoding="utf-8") as handle:
                moved = json.load(handle)
        except (ValueError, OSError):
            moved = None
        if moved != stale:  # another taker re-created the lock in between: give it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            os.remove(aside)
        return moved == stale

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(root: str, command: str | None = None) -> Iterator[OutputLock]:
    """Hold ROOT/.lock while the block runs (created with the directory); released on any exit."""
    lock = OutputLock(root, command).acquire()
    try:
        yield lock
    finally:
        lock.release()
