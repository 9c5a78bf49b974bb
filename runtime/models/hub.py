"""Where a checkpoint lives: a local folder, or a hub id resolved through huggingface_hub.

huggingface_hub does the work (cache layout, revisions, ``HF_HUB_OFFLINE``, tokens); this file
only turns its exceptions into ours, naming the id, the file and what was tried.
"""
from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

from .errors import CheckpointNotFoundError

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


def _local_dir(path_or_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    base = Path(path_or_id).expanduser()
    if base.is_dir():
        return base / subfolder if subfolder else base
    return None


def _looks_like_hub_id(path_or_id: str) -> bool:
    text = str(path_or_id)
    return text.count("/") <= 1 and not text.startswith((".", "/", "~")) and not os.path.exists(text)


def resolve_folder(
    path_or_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    proxies: dict | None = None,
) -> Path:
    """Return a local folder holding the checkpoint (downloading into the hub cache if needed).

    ``force_download`` and ``proxies`` go to huggingface_hub; a huggingface_hub whose
    ``snapshot_download`` takes no ``proxies`` (2.x: HTTP(S)_PROXY instead) gets a warning.
    """
    local = _local_dir(path_or_id, subfolder)
    if local is not None:
        if not local.is_dir():
            raise CheckpointNotFoundError(f"{path_or_id}: no subfolder {subfolder!r} in this checkpoint folder")
        return local
    if not _looks_like_hub_id(str(path_or_id)):
        raise CheckpointNotFoundError(f"checkpoint folder not found: {path_or_id}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = allow_patterns
    if subfolder and patterns is not None:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    elif subfolder:
        patterns = [f"{subfolder}/*"]
    try:
        root = snapshot_download(
            str(path_or_id),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=patterns,
            force_download=force_download,
            **_proxies_kwargs(snapshot_download, proxies),
        )
    except LocalEntryNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{path_or_id}: not in the Hugging Face cache"
            f"{' at ' + str(cache_dir) if cache_dir else ''} and the hub cannot be reached "
            f"(offline or local_files_only): {exc}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointNotFoundError(f"{path_or_id}: could not be resolved on the hub: {exc}") from None
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"{path_or_id}: no subfolder {subfolder!r} in the hub snapshot {root}")
    return folder


def resolve_file(
    path_or_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs
) -> Path:
    """Return the local path of one file of a checkpoint; a clear error if it is not there."""
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
    folder = resolve_folder(path_or_id, subfolder, allow_patterns=["*.json", "*.txt"], **hub_kwargs)
    path = folder / filename
    if not path.is_file():
        raise CheckpointNotFoundError(f"{filename} not found in {folder}")
    return path


def _proxies_kwargs(download, proxies: dict | None) -> dict:
    if not proxies:
        return {}
    if "proxies" in inspect.signature(download).parameters:
        return {"proxies": proxies}
    warnings.warn(
        "proxies: this huggingface_hub has no proxies argument, so they are not used; set the "
        "HTTP_PROXY / HTTPS_PROXY environment variables instead", UserWarning, stacklevel=3)
    return {}
