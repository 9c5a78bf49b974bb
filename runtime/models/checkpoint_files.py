"""Which weight files of a checkpoint folder to read, and the names a save writes.

Names follow diffusers 0.42 and transformers (the ``_add_variant`` rule: the variant goes before
the last suffix):

| what | diffusers model | transformers model (CLIP) |
| --- | --- | --- |
| single file | ``diffusion_pytorch_model[.fp16].safetensors`` | ``model[.fp16].safetensors`` |
| shards | ``diffusion_pytorch_model[.fp16]-00001-of-00002.safetensors`` | ``model[.fp16]-00001-of-00002.safetensors`` |
| index | ``diffusion_pytorch_model.safetensors.index[.fp16].json`` | ``model.safetensors.index[.fp16].json`` |
| pickle | ``diffusion_pytorch_model[.fp16].bin`` | ``pytorch_model[.fp16].bin`` |

Safetensors always wins over a pickle in the same folder; a pickle is read only when no
safetensors file exists (and ``use_safetensors`` is not True), or when ``use_safetensors=False``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointNotFoundError, UnsafeCheckpointError
from .safetensors_io import SHARD_SUFFIX, shard_files


def add_variant(filename: str, variant: str | None) -> str:
    """``a.safetensors`` + ``fp16`` -> ``a.fp16.safetensors``; ``a.safetensors.index.json`` -> ``a.safetensors.index.fp16.json``."""
    if not variant:
        return filename
    parts = filename.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


@dataclass(frozen=True)
class WeightNames:
    """The file names of one weights family (model kind + variant)."""

    stem: str  # "diffusion_pytorch_model" or "model"
    pickle_stem: str  # "diffusion_pytorch_model" or "pytorch_model"
    variant: str | None = None

    @property
    def safetensors(self) -> str:
        return add_variant(f"{self.stem}.safetensors", self.variant)

    @property
    def safetensors_index(self) -> str:
        return add_variant(f"{self.stem}.safetensors.index.json", self.variant)

    @property
    def pickle(self) -> str:
        return add_variant(f"{self.pickle_stem}.bin", self.variant)

    @property
    def pickle_index(self) -> str:
        return add_variant(f"{self.pickle_stem}.bin.index.json", self.variant)

    def hub_patterns(self, safetensors: bool) -> list[str]:
        """``allow_patterns`` for a hub download of this family (one format)."""
        stem = self.stem if safetensors else self.pickle_stem
        ext = "safetensors" if safetensors else "bin"
        return [f"{stem}*.{ext}", f"{stem}.{ext}.index*.json"]

    def is_own_file(self, name: str) -> bool:
        """True for a file this family's save would write or replace (single, shard or index)."""
        if name in (self.safetensors, self.safetensors_index, self.pickle, self.pickle_index):
            return True
        for single in (self.safetensors, self.pickle):
            stem, ext = single.rsplit(".", 1)
            if re.fullmatch(re.escape(stem) + SHARD_SUFFIX.pattern.rstrip("$") + re.escape("." + ext), name):
                return True
        return False


@dataclass(frozen=True)
class WeightFiles:
    """The files to read for one load: all safetensors, or all pickle."""

    format: str  # "safetensors" or "pickle"
    files: tuple[Path, ...]
    index: Path | None = None


def _present_weight_files(folder: Path) -> list[str]:
    pattern = re.compile(r".*\.(safetensors|bin|ckpt|pt|pth)$|.*\.index(\.[^.]+)?\.json$")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and pattern.match(p.name)) if folder.is_dir() else []


def _files_of(folder: Path, single: str, index: str) -> WeightFiles | None:
    index_path = folder / index
    if index_path.is_file():
        return WeightFiles("?", tuple(shard_files(index_path)), index_path)
    if (folder / single).is_file():
        return WeightFiles("?", (folder / single,))
    return None


def find_weight_files(folder: Path, names: WeightNames, use_safetensors: bool | None) -> WeightFiles:
    """Pick the weight files in ``folder`` by the rules in the module docstring."""
    if use_safetensors is not False:
        found = _files_of(folder, names.safetensors, names.safetensors_index)
        if found is not None:
            return WeightFiles("safetensors", found.files, found.index)
    pickled = _files_of(folder, names.pickle, names.pickle_index)
    if pickled is not None and use_safetensors is True:
        raise UnsafeCheckpointError(
            f"{folder}: use_safetensors=True but there is no {names.safetensors} (or "
            f"{names.safetensors_index}), only the pickle {pickled.files[0].name}; pass "
            f"use_safetensors=False to read the pickle (loaded with torch.load(weights_only=True))"
        )
    if pickled is not None:
        return WeightFiles("pickle", pickled.files, pickled.index)
    looked = [names.safetensors, names.safetensors_index]
    if use_safetensors is not True:
        looked += [names.pickle, names.pickle_index]
    present = _present_weight_files(folder)
    variant = f" for variant {names.variant!r}" if names.variant else ""
    raise CheckpointNotFoundError(
        f"{folder}: no weights{variant}: looked for {', '.join(looked)}; "
        f"weight files present: {', '.join(present) if present else 'none'}"
    )
