"""Textual inversion files: where one is, how it is read, and which embedding it holds.

The formats people have (key names as diffusers and A1111 write them):

- diffusers: ``{token: tensor}``, one entry (``learned_embeds.safetensors`` / ``.bin``);
- A1111 ``.pt``: ``{"string_to_param": {"*": tensor}, "name": token, ...}`` (other entries, such
  as ``string_to_token`` or ``step``, are ignored);
- A1111 ``.safetensors``: ``{"emb_params": tensor}``; the file has no token name, so it is the
  ``token`` argument, else the file's stem as A1111 names it (diffusers would name it
  ``emb_params``);
- SDXL: ``{"clip_l": tensor, "clip_g": tensor}``, one half per text encoder;
- a bare tensor (``token=`` names it).

A tensor is ``(dim,)`` or ``(vectors, dim)``; more than one vector makes a multi-vector embedding.
Pickles are read with ``torch.load(weights_only=True)`` only: no code in a file ever runs.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.models.errors import CheckpointError, CheckpointNotFoundError, InputError, UnsafeCheckpointError
from runtime.models.hub import HUB_KWARGS, resolve_folder
from runtime.models.safetensors_io import check_not_lfs_pointer, load_safetensors

SAFE_NAME = "learned_embeds.safetensors"
PICKLE_NAME = "learned_embeds.bin"
A1111_PT_KEY = "string_to_param"
A1111_SAFE_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
# load_textual_inversion's file arguments besides the hub ones; hf_token is the hub's token there,
# since ``token`` names the embedding.
FILE_KWARGS = ("weight_name", "subfolder", "use_safetensors", "hf_token", "mirror", "user_agent")
KNOWN_FORMATS = (f"one {{token: tensor}} entry (diffusers), {A1111_PT_KEY!r} or {A1111_SAFE_KEY!r} (A1111), "
                 f"{SDXL_KEYS[0]!r} / {SDXL_KEYS[1]!r} (SDXL)")


@dataclass
class Embedding:
    """One loaded embedding: its token (None: not named yet) and vectors, or SDXL's two halves."""

    where: str  # the file, or which state dict of the call: for messages
    token: str | None
    vectors: torch.Tensor | None = None  # (n, dim)
    halves: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: "clip_l" / "clip_g" -> (n, dim)


def as_vectors(value, where: str) -> torch.Tensor:
    """A tensor of one embedding as (vectors, dim); anything else is an error naming ``where``."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: expected an embedding tensor, found {type(value).__name__}")
    if not value.is_floating_point():
        raise CheckpointError(f"{where}: an embedding must be floating point, found dtype {value.dtype}")
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise CheckpointError(f"{where}: an embedding is (dim,) or (vectors, dim), found shape {tuple(value.shape)}")
    return value.detach()


def parse_embedding(obj, where: str, token: str | None, default_token: str | None) -> Embedding:
    """The embedding held by a loaded file or a caller's state dict / tensor.

    ``token`` (the caller's) overrides the name in the file; ``default_token`` (a file's stem)
    names an embedding whose format carries no name.
    """
    if isinstance(obj, torch.Tensor):
        if token is None:
            raise InputError(f"{where}: a bare tensor carries no token name; pass token=... to name it")
        return Embedding(where, token, as_vectors(obj, where))
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a path, a state dict or a tensor, got {type(obj).__name__}")
    if A1111_PT_KEY in obj:
        params = obj[A1111_PT_KEY]
        if isinstance(params, dict) and "*" in params:
            value = params["*"]
        elif isinstance(params, dict) and len(params) == 1:
            value = next(iter(params.values()))
        else:
            found = sorted(map(str, params)) if isinstance(params, dict) else type(params).__name__
            raise CheckpointError(f"{where}: {A1111_PT_KEY!r} should hold one tensor under '*', found {found}")
        name = obj.get("name") if isinstance(obj.get("name"), str) and obj.get("name") else None
        return Embedding(where, token or name or default_token, as_vectors(value, f"{where} [{A1111_PT_KEY}]"))
    if A1111_SAFE_KEY in obj:
        return Embedding(where, token or default_token, as_vectors(obj[A1111_SAFE_KEY], f"{where} [{A1111_SAFE_KEY}]"))
    halves = {k: obj[k] for k in SDXL_KEYS if k in obj}
    if halves:
        return Embedding(where, token or default_token,
                         halves={k: as_vectors(v, f"{where} [{k}]") for k, v in halves.items()})
    if len(obj) == 1:
        name, value = next(iter(obj.items()))
        if isinstance(name, str) and name and isinstance(value, torch.Tensor):
            return Embedding(where, token or name, as_vectors(value, f"{where} [{name!r}]"))
    keys = sorted(map(str, obj))
    shown = ", ".join(repr(k) for k in keys[:10]) + (f" ... ({len(keys)} keys)" if len(keys) > 10 else "")
    raise CheckpointError(f"{where}: no textual inversion embedding found; expected {KNOWN_FORMATS}; "
                          f"found keys: {shown or 'none (empty)'}")


# ---- files ------------------------------------------------------------------------------
def resolve_embedding_file(source: str | os.PathLike, *, weight_name: str | None, subfolder: str | None,
                           use_safetensors: bool | None, hub: dict) -> Path:
    """The local path of an embedding file: ``source`` itself, or a file of a folder or hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if weight_name is not None:
        names = [weight_name]
    else:
        names = [n for n, safe in ((SAFE_NAME, True), (PICKLE_NAME, False))
                 if use_safetensors is None or use_safetensors == safe]
    folder = resolve_folder(source, subfolder, allow_patterns=names, **hub)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    hint = f"; embedding-like files there: {', '.join(present)} (pass weight_name=...)" if present else ""
    raise CheckpointNotFoundError(f"{source}: no {' or '.join(names)} in {folder}{hint}")


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # u64 header length, then the JSON header


def read_embedding_file(path: Path) -> dict:
    """A safetensors file, or a torch pickle read with weights_only=True (A1111 ``.pt``, ``.bin``)."""
    if _looks_like_safetensors(path):
        return load_safetensors(path)
    check_not_lfs_pointer(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{path}: not a textual inversion file: neither safetensors nor a torch pickle "
                              f"(it starts with {head!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"{path}: corrupt torch pickle: {str(exc).splitlines()[0]}") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers, "
            f"which only an unsafe load could read; convert it to safetensors from a trusted environment. "
            f"Detail: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable textual inversion file (neither safetensors nor a torch "
                              f"pickle, or truncated): {exc}") from None
    if not isinstance(obj, (dict, torch.Tensor)):
        raise CheckpointError(f"{path}: expected a state dict or a tensor, found {type(obj).__name__}")
    return obj


def load_embeddings(sources: list, tokens: list, kwargs: dict) -> list[Embedding]:
    """Read each source (a path, a folder, a hub id, a state dict or a tensor) into an Embedding."""
    unknown = sorted(k for k in kwargs if k not in FILE_KWARGS and k not in HUB_KWARGS)
    if unknown:
        raise TypeError(f"load_textual_inversion: unexpected arguments {', '.join(unknown)}")
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs and k != "token"}
    if kwargs.get("hf_token") is not None:
        hub["token"] = kwargs["hf_token"]
    out = []
    for i, (source, token) in enumerate(zip(sources, tokens)):
        if isinstance(source, (dict, torch.Tensor)):
            where = f"state dict #{i}" if len(sources) > 1 else "the state dict"
            out.append(parse_embedding(source, where, token, None))
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise InputError(f"load_textual_inversion: expected a path, a hub id, a state dict or a tensor, "
                             f"got {type(source).__name__}")
        path = resolve_embedding_file(source, weight_name=kwargs.get("weight_name"), subfolder=kwargs.get("subfolder"),
                                      use_safetensors=kwargs.get("use_safetensors"), hub=hub)
        out.append(parse_embedding(read_embedding_file(path), str(path), token, path.stem))
    return out
