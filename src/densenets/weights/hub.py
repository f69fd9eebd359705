"""Weights from the Hugging Face Hub (``weights="hf-hub:org/name[@revision]"``), and the folder
layout the Hub and timm expect (``model.safetensors`` + ``config.json``).

Files go through huggingface_hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), so what timm or
any other library fetched is reused. With ``HF_HUB_OFFLINE=1`` only the cache is read, without
any network attempt. ``model.safetensors`` is preferred; a repository that publishes only
``pytorch_model.bin`` (the authors' RDNet repositories) is read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PREFIX = "hf-hub:"
SAFETENSORS, PICKLE, CONFIG = "model.safetensors", "pytorch_model.bin", "config.json"


class HubError(ValueError):
    """A Hub repository or file could not be had; the message names the repository."""


def is_hub_id(weights: object) -> bool:
    return isinstance(weights, str) and weights.startswith(PREFIX)


def parse_hub_id(weights: str) -> tuple[str, str | None]:
    """``"hf-hub:org/name@rev"`` -> ``("org/name", "rev")``."""
    repo = weights[len(PREFIX):]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{weights!r} is not a Hub model id; write hf-hub:ORG/NAME, e.g. "
                       "hf-hub:timm/densenet121.tv_in1k (optionally @REVISION)")
    return repo, revision or None


class _Session:
    """Whether to stay off the network: offline mode, or after the network failed once (so a
    missing repository costs one round of huggingface_hub's retries, not one per file)."""

    def __init__(self) -> None:
        from huggingface_hub import constants

        self.local_only = constants.is_offline_mode()


def _fetch(repo: str, filename: str, revision: str | None, session: _Session) -> str | None:
    """The cached path of one file of ``repo``, downloading it unless offline; None if the
    repository has no such file (or, offline, the cache does not hold it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(repo, filename, revision=revision,
                               local_files_only=session.local_only, library_name="densenets")
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise HubError(f"Hub repository {repo} is not available ({type(e).__name__}): check "
                       "the name, or log in (hf auth login) if it is private or gated") from None
    except RevisionNotFoundError:
        raise HubError(f"Hub repository {repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # not cached, and offline or the network unreachable
        session.local_only = True
        return None
    except EntryNotFoundError:  # the repository exists and lacks the file
        return None


def hub_weights_file(weights: str) -> tuple[Path, dict[str, Any] | None]:
    """The local weights file of ``hf-hub:org/name`` and its ``config.json`` (None if absent)."""
    from huggingface_hub import constants

    repo, revision = parse_hub_id(weights)
    session = _Session()
    path = (_fetch(repo, SAFETENSORS, revision, session)
            or _fetch(repo, PICKLE, revision, session))
    if path is None:
        where = ("the Hugging Face cache" if constants.is_offline_mode()
                 else "the repository or the cache (is the network reachable?)")
        raise HubError(
            f"no weights for Hub repository {repo}{'@' + revision if revision else ''}: "
            f"neither {SAFETENSORS} nor {PICKLE} is in {where}. Offline "
            f"(HF_HUB_OFFLINE=1) only the cache under {constants.HF_HUB_CACHE} is read: fetch "
            "the model once with the network on, or copy the cache there")
    config_path = _fetch(repo, CONFIG, revision, session)
    config = None
    if config_path is not None:
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, ValueError):
            config = None  # a broken config.json does not stop the weights from loading
    return Path(path), config


def hub_meta(config: dict[str, Any] | None, repo_weights: str) -> dict[str, Any]:
    """What a timm ``config.json`` says about its weights, as our weights meta: the
    preprocessing (resize, centre crop, statistics, interpolation) and the class names."""
    meta: dict[str, Any] = {"source": repo_weights}
    cfg = (config or {}).get("pretrained_cfg") or {}
    if cfg.get("input_size"):
        crop = int(cfg["input_size"][-1])
        pre: dict[str, Any] = {"crop": crop,
                               "resize": int(crop / float(cfg.get("crop_pct") or 1.0))}
        pre.update({k: (list(cfg[k]) if k in ("mean", "std") else cfg[k])
                    for k in ("mean", "std", "interpolation") if cfg.get(k) is not None})
        meta["preprocessing"] = pre
    labels = (config or {}).get("label_names")
    if isinstance(labels, list):
        meta["class_names"] = labels
    return meta


def timm_config(architecture: str, num_classes: int, num_features: int, global_pool: str,
                pretrained_cfg: dict[str, Any], label_names: list[str] | None = None
                ) -> dict[str, Any]:
    """The ``config.json`` timm writes beside a model (and reads back with ``hf-hub:`` or
    ``local-dir:``): the architecture at the top, the data configuration under
    ``pretrained_cfg``."""
    keep = ("tag", "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode",
            "mean", "std", "num_classes", "pool_size", "first_conv", "classifier", "license")
    pc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pretrained_cfg.items()
          if k in keep and v is not None}
    pc.setdefault("fixed_input_size", False)
    pc.setdefault("crop_mode", "center")
    pc["num_classes"] = num_classes
    pc["custom_load"] = False
    out: dict[str, Any] = {"architecture": architecture, "num_classes": num_classes,
                           "num_features": num_features}
    if global_pool:
        out["global_pool"] = global_pool
    if label_names and len(label_names) == num_classes:
        out["label_names"] = list(label_names)
    out["pretrained_cfg"] = pc
    return out


def write_config(directory: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``config.json`` into ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    p = d / CONFIG
    p.write_text(json.dumps(config, indent=2) + "\n")
    return p
