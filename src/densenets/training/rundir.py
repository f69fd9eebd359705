"""One job per run directory, and the ``--auto-resume`` decision that lets a restarted job in.

A training job holds ``DIR/run.lock`` (its host, pid and torchrun run id, as JSON) from the
moment it takes the directory until it ends; a second job pointed at the same directory refuses
with a message naming the holder. A lock is left behind only by a job that died without
cleaning up (SIGKILL, a lost node), and such a stale lock must not block the restart, so a lock
counts as abandoned when any of these holds:

- its holder ran on this host and that process is gone (or its pid now names another process);
- it was taken by an earlier attempt of the same torchrun job (``TORCHELASTIC_RUN_ID``):
  torchrun stops every worker of a failed attempt before it starts the next, and its
  rendezvous admits one group per run id at a time;
- its holder, on another host, stopped refreshing it: a live holder touches the file every
  ``HEARTBEAT_S`` seconds, and one untouched for ``STALE_AFTER_S`` seconds is taken over.

The lock is created with a hard link (atomic on local and network filesystems alike), so two
jobs starting at the same moment cannot both believe they hold it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: long enough for a slow shared filesystem
_HELD: list[RunLock] = []  # the locks this process holds, released by release_locks()


class RunDirLocked(ValueError):
    """Another live job trains into this run directory (a ValueError: the CLI exits 2)."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (Linux), else None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot: it tells the process that
    wrote a lock from a later one that was given the same pid."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to judge further
    stat = _proc_stat(pid)
    if stat is None:
        return True
    if stat[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return started is None or len(stat) <= 19 or stat[19] == started


def _me() -> dict[str, Any]:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()), "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "restart": int(restart) if restart and restart.isdigit() else None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "token": uuid.uuid4().hex}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age(path: Path) -> float | None:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def describe(holder: dict[str, Any] | None) -> str:
    """``host H, pid P, since T`` for a message."""
    if not holder:
        return "an unreadable lock"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def stale_reason(holder: dict[str, Any] | None, age: float | None,
                 me: dict[str, Any] | None = None) -> str | None:
    """Why the lock ``holder`` (last refreshed ``age`` seconds ago) is abandoned; None if its
    job may still be alive."""
    me = me or _me()
    if holder is None:  # a lock file with no readable content was not written by us
        return "it cannot be read" if age is None or age > HEARTBEAT_S else None
    if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
        if any(lock.holder["token"] == holder.get("token") for lock in _HELD):
            return None  # held by this very process, still in use
        return "this process left it behind"
    if me["run_id"] and holder.get("run_id") == me["run_id"]:
        return f"it was taken by an earlier attempt of this torchrun job (run id {me['run_id']})"
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid, holder.get("proc_start")):
            return "that process is no longer running"
        return None
    if age is not None and age > STALE_AFTER_S:
        return f"it has not been refreshed for {age:.0f} s"
    return None


class RunLock:
    """``DIR/run.lock`` held by this process; refreshed in the background until released."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._refresh, name="run-lock-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a filesystem hiccup: the next beat retries
                os.utime(self.path)

    def release(self) -> None:
        """Stop refreshing and remove the lock, if it is still ours."""
        self._stop.set()
        held = _read(self.path)
        if held and held.get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)
        if self in _HELD:
            _HELD.remove(self)


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Create ``path`` holding ``holder``, complete, or not at all; False if it exists."""
    tmp = path.with_name(f"{path.name}.{holder['pid']}.{holder['token'][:8]}.tmp")
    tmp.write_text(json.dumps(holder, indent=2) + "\n")
    try:
        os.link(tmp, path)  # fails if the lock exists: a complete lock or none
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: exclusive create, then the content
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, judged: dict[str, Any] | None) -> None:
    """Move the stale lock aside, unless it changed since it was judged stale."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another job removed it first; the next attempt decides
    moved = _read(aside)
    if (moved or {}).get("token") != (judged or {}).get("token"):
        # Someone else's fresh lock: put it back (unless yet another has appeared since).
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def acquire_lock(run_dir: str | os.PathLike,
                 log: Callable[[str], None] = _stderr) -> RunLock:
    """Take ``run_dir``'s lock; :class:`RunDirLocked` naming the holder if its job is alive.

    A stale lock (see the module docstring) is taken over, and ``log`` says whose it was.
    """
    path = Path(run_dir) / LOCK_NAME
    for _ in range(5):
        me = _me()
        if _create(path, me):
            lock = RunLock(path, me)
            _HELD.append(lock)
            return lock
        holder, age = _read(path), _age(path)
        if age is None:
            continue  # it vanished between our attempt and now: try again
        reason = stale_reason(holder, age, me)
        if reason is None:
            seen = f"; refreshed {age:.0f} s ago" if holder and holder.get("host") != me["host"] \
                else ""
            raise RunDirLocked(
                f"{run_dir} is in use by another job ({describe(holder)}{seen}): wait for it "
                f"to end, stop it, or choose another --out (if that job is gone, remove "
                f"{path}; a lock from another host is taken over after {STALE_AFTER_S:g} s "
                "without a refresh)")
        log(f"taking over the lock of {run_dir} ({describe(holder)}): {reason}")
        _take_over(path, holder)
    raise RunDirLocked(f"could not take the lock {path}: other jobs keep taking it; start one "
                       "job per run directory")


def release_locks() -> None:
    """Release every run-directory lock this process holds (at the end of a command)."""
    for lock in list(_HELD):
        lock.release()


# ---------------------------------------------------------------------------- --auto-resume


def holds_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run to continue (its ``last.pt``)."""
    return (Path(run_dir) / "last.pt").is_file()


def config_differences(command: dict[str, Any], stored: dict[str, Any],
                       ignore: Iterable[str] = ()) -> list[str]:
    """``key: stored -> command`` for every setting the two configurations do not share."""
    skip = {"out", *ignore}
    keys = [k for k in dict.fromkeys([*stored, *command]) if k not in skip]
    return [f"{k} {stored.get(k)!r} there, {command.get(k)!r} here" for k in keys
            if stored.get(k) != command.get(k)]


def auto_resume(fresh: Any, resume: Callable[[str], tuple[Any, dict[str, Any]]], *,
                sync_bn: bool, may_change: Iterable[str],
                resuming: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """``--auto-resume``: start ``fresh`` (a TrainConfig) when its ``--out`` holds no
    checkpoint; else ``resume(out)`` -> (config, checkpoint), refused when the stored
    configuration differs from the command's in anything but ``may_change``.

    The command line a job is restarted with is the one it started with: so a torchrun
    restart, a requeued batch job and a rerun after a crash all continue where it stopped.
    """
    if resuming or not fresh.out:
        raise ValueError("--auto-resume needs --out DIR, the run directory to start or "
                         "continue (it takes the place of --resume)")
    if not holds_checkpoint(fresh.out):
        return fresh, None
    cfg, state = resume(fresh.out)
    stored_sync = bool(((state.get("config") or {}).get("distributed") or {}).get("sync_bn"))
    diff = config_differences({**fresh.to_dict(), "sync_bn": bool(sync_bn)},
                              {**cfg.to_dict(), "sync_bn": stored_sync}, may_change)
    if diff:
        raise ValueError(f"{fresh.out} holds a run with another configuration ({'; '.join(diff)}); "
                         "--auto-resume continues a run only with the command line that started "
                         "it: fix the flags, or choose another --out")
    return cfg, state

