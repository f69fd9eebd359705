"""Checkpoints that survive a crash: atomic writes, safe loads, and the RNG states of a run.

A checkpoint is a dict of plain types and tensors, written to a temporary file in the same
directory, fsynced, then renamed over the old one: a process killed at any moment leaves either
the previous file or the new one, never half of one. Loading always uses ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "densenets.checkpoint"
VERSION = 1
TMP_SUFFIX = ".tmp"


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename, fsync the dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left behind in a run directory."""
    stale = sorted(Path(directory).glob(f"*.pt.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a densenets checkpoint with ``weights_only=True``.

    ``path`` may be a run directory (its ``best.pt``, else ``last.pt``). Raises
    FileNotFoundError or ValueError saying which file is missing or unreadable and what to do.
    """
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not saved by torch: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use the other "
            "checkpoint of the run directory (last.pt / best.pt) or train again"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a densenets training checkpoint (no 'format': '{FORMAT}' entry); "
            "for plain state_dicts build the model and call load_state_dict"
        )
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt['version']}; this densenets "
                         f"reads version {VERSION} and older: upgrade densenets")
    return ckpt


def resolve_checkpoint_path(path: str | os.PathLike, prefer: str = "best.pt") -> Path:
    """A checkpoint file from a file or run-directory argument."""
    p = Path(path)
    if p.is_dir():
        for name in (prefer, "last.pt", "best.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} holds no checkpoint (expected {p / 'last.pt'} or "
                                f"{p / 'best.pt'})")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def capture_rng_state() -> dict[str, Any]:
    """The random states of python, numpy and torch (CPU and every CUDA device) as tensors/ints."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_plain(o) for o in obj]
    return obj
