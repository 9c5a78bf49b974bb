"""Reading one single-file checkpoint: a local path, a hub URL or ``owner/repo/file``; safetensors
(validated, memory-mapped) or a pickle through ``torch.load(weights_only=True)`` only; weights
nested under ``"state_dict"`` unwrapped; EMA weights selected on request.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointNotFoundError
from ..hub import HUB_KWARGS
from ..pickle_io import load_pickle
from ..safetensors_io import load_safetensors, read_header
from .infer import EMA_PREFIX, UNET

logger = logging.getLogger(__name__)

URL_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/", "https://hf.co/")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Checkpoint:
    source: str
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)


def resolve(path_or_url: str | os.PathLike, **hub) -> Path:
    """A local file, or one file of a hub repo (URL ``https://huggingface.co/o/r/blob/rev/f`` or ``o/r/f``)."""
    text = str(path_or_url)
    local = Path(text).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        raise CheckpointNotFoundError(f"{text}: a folder, not a single-file checkpoint (use from_pretrained for "
                                      f"diffusers folders)")
    revision = hub.get("revision")
    if text.startswith(URL_PREFIXES):
        rest = text.split("huggingface.co/", 1)[-1] if "huggingface.co/" in text else text.split("hf.co/", 1)[-1]
        m = re.match(r"([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)", rest)
        if not m:
            raise CheckpointNotFoundError(f"{text}: not a hub file URL (expected .../owner/repo/blob/revision/file)")
        repo, revision, filename = m.group(1), m.group(2), m.group(3)
    elif text.count("/") >= 2 and not text.startswith((".", "/", "~")):
        parts = text.split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    else:
        raise CheckpointNotFoundError(f"single-file checkpoint not found: {text}")
    from huggingface_hub import hf_hub_download

    kwargs = {k: v for k, v in hub.items() if k in HUB_KWARGS and k != "revision" and v is not None}
    kwargs.pop("proxies", None)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, **kwargs))
    except Exception as exc:  # offline, not cached, no such repo or file
        raise CheckpointNotFoundError(f"{text}: could not fetch {filename} from the hub repo {repo} (offline and "
                                      f"not in the cache?): {str(exc).splitlines()[0]}") from None


def read(path_or_url: str | os.PathLike, **hub) -> Checkpoint:
    """Read every tensor (memory-mapped, no copies); a pickle only with ``weights_only=True``."""
    path = resolve(path_or_url, **hub)
    if path.suffix == ".safetensors":
        header = read_header(path)
        tensors = load_safetensors(path)
        metadata = header.get("__metadata__") or {}
    elif path.suffix in PICKLE_SUFFIXES or not path.suffix:
        tensors = load_pickle(path)  # UnsafeCheckpointError for anything weights_only refuses
        metadata = {}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors "
                              f"(or a {', '.join(PICKLE_SUFFIXES)} pickle)")
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return Checkpoint(str(path), tensors, dict(metadata))


def ema_key(key: str) -> str:
    """The LDM EMA name of a UNet weight: ``model_ema.`` + the key past ``model.`` without its dots."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def select_unet_weights(ckpt: Checkpoint, extract_ema: bool) -> dict[str, torch.Tensor]:
    """The UNet's original-layout keys (prefix kept), the EMA copies in their place if asked for."""
    sd = ckpt.tensors
    has_ema = any(k.startswith(EMA_PREFIX) for k in sd)
    if extract_ema and not has_ema:
        logger.warning("%s: extract_ema=True but the file has no model_ema.* weights; loading the regular ones", ckpt.source)
    if not (extract_ema and has_ema):
        if has_ema:
            logger.info("%s: the file also holds EMA weights; pass extract_ema=True to load those", ckpt.source)
        return {k: v for k, v in sd.items() if k.startswith(UNET)}
    out, missing = {}, []
    for key, value in sd.items():
        if key.startswith(UNET):
            ema = sd.get(ema_key(key))
            if ema is None:
                missing.append(key)
            out[key] = value if ema is None else ema
    if missing:
        raise CheckpointError(f"{ckpt.source}: extract_ema=True but the EMA copy of {len(missing)} UNet weight(s) is "
                              f"missing, e.g. {ema_key(missing[0])} for {missing[0]}")
    return out
