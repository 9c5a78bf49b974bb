"""CLIP's byte-level BPE tokenizer on the ``tokenizers`` library, reading SD ``tokenizer/`` folders.

Gives the same ids as transformers 5.x's ``CLIPTokenizer`` (what diffusers' pipelines call):
NFC, whitespace runs to one space, lowercase; CLIP's split regex; byte-level BPE with the ``</w>``
end-of-word suffix; ``<|startoftext|>`` ... ``<|endoftext|>`` around each sequence. Every special
token of the folder is an added token matched before BPE, as in transformers: with SDXL's
``tokenizer_2`` (pad token ``"!"``) a ``!`` in the prompt becomes the pad id.

Added tokens (textual inversion's new words, ``add_tokens``) are matched whole before BPE, as in
transformers, so each is one id; ``remove_tokens`` takes them out again and gives the following
added tokens the freed ids (what ``unload_textual_inversion`` needs).

Thread safety: a Rust tokenizer is never mutated once built; adding or removing tokens builds a new
one and swaps it in. Truncation, special tokens and padding happen here in Python, so concurrent
calls on one object never touch shared settings (the Rust padding state raises "Already borrowed"
across threads).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .config import read_json
from .errors import CheckpointNotFoundError, ConfigError, InputError
from .files import atomic_write_text

SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's context length: the default when tokenizer_config.json has no model_max_length
# (transformers would then use 1e30, which no CLIP text encoder accepts).
CLIP_CONTEXT_LENGTH = 77
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class BatchEncoding(dict):
    """The tokenizer's result: a dict (``out["input_ids"]``) with attribute access (``out.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _token_spec(value: Any) -> tuple[str, dict]:
    """A special token from a config: a plain string, or transformers' AddedToken dict with flags."""
    if isinstance(value, dict):
        return value["content"], {k: value[k] for k in TOKEN_FLAGS if k in value}
    return str(value), {}


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP; ``__call__`` follows transformers' arguments and defaults."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: Any = DEFAULT_SPECIALS["bos_token"],
        eos_token: Any = DEFAULT_SPECIALS["eos_token"],
        unk_token: Any = DEFAULT_SPECIALS["unk_token"],
        pad_token: Any = DEFAULT_SPECIALS["pad_token"],
        model_max_length: int = CLIP_CONTEXT_LENGTH,
        added_tokens: Iterable[dict] = (),
        name_or_path: str = "",
    ):
        specs = dict(zip(SPECIAL_KEYS, map(_token_spec, (bos_token, eos_token, unk_token, pad_token))))
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (specs[k][0] for k in SPECIAL_KEYS)
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, (int, float)) \
                or not 1 <= model_max_length < 2**31 or model_max_length != int(model_max_length):
            raise ConfigError(f"{name_or_path or 'CLIPTokenizer'}: model_max_length={model_max_length!r} must be "
                              f"an integer from 1 to 2**31 - 1 (CLIP's is {CLIP_CONTEXT_LENGTH})")
        self.model_max_length = int(model_max_length)
        self.name_or_path = name_or_path
        self._vocab, self._merges = dict(vocab), list(merges)
        # Flags from the folder's added-token table win over the special-token entries, as in transformers.
        ordered = sorted(added_tokens, key=lambda t: t.get("id", 0))  # new tokens get ids in this order
        flags = {t["content"]: {k: t[k] for k in TOKEN_FLAGS if k in t} for t in ordered}
        contents = list(dict.fromkeys([c for c, _ in specs.values()] + list(flags)))
        extra = []
        for content in contents:
            spec_flags = next((f for c, f in specs.values() if c == content and f), {})
            f = {"special": True, "normalized": False, **spec_flags, **flags.get(content, {})}
            extra.append(AddedToken(content, **{k: f[k] for k in TOKEN_FLAGS if k in f}))
        self._install(extra)

    def _install(self, added: list[AddedToken]) -> None:
        """Build the Rust tokenizer with ``added`` (ids given in this order) and swap it in whole.

        A backend is never mutated once installed (thread safety, see the module docstring): adding
        or removing tokens builds a new one, and a call in flight keeps the one it started with.
        """
        backend = Tokenizer(BPE(vocab=self._vocab, merges=self._merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=self.unk_token))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens(added)  # a token missing from vocab.json gets the next id, as in transformers
        entries = [{"content": t.content, **{k: getattr(t, k) for k in TOKEN_FLAGS}} for t in added]
        ids = tuple(backend.token_to_id(getattr(self, k)) for k in SPECIAL_KEYS)
        special_ids = sorted({backend.token_to_id(t["content"]) for t in entries if t["special"]})
        self._added, self._backend = entries, backend
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = ids
        self.all_special_ids = special_ids

    # ---- added tokens (textual inversion) --------------------------------------------------
    def add_tokens(self, new_tokens: str | list[str], special_tokens: bool = False) -> int:
        """Add tokens matched whole before BPE, as transformers' ``add_tokens`` does; returns how many.

        A plain (non-special) token is matched on the normalized (lowercased) text, so ``<Cat>``
        also matches ``<cat>``. Tokens already added are skipped; one of vocab.json becomes an added
        token with its vocab id (transformers does both). New tokens take the next ids, in order.
        """
        new_tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        if not all(isinstance(t, str) and t for t in new_tokens):
            raise InputError(f"CLIPTokenizer.add_tokens: expected non-empty strings, got {new_tokens!r}")
        known = {t["content"] for t in self._added}
        fresh = list(dict.fromkeys(t for t in new_tokens if t not in known))
        if fresh:
            added = [AddedToken(t["content"], **{k: t[k] for k in TOKEN_FLAGS}) for t in self._added]
            added += [AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in fresh]
            self._install(added)
        return len(fresh)

    def remove_tokens(self, tokens: str | list[str]) -> int:
        """Drop added tokens that are not special; the added tokens after them move down to fill the ids.

        Returns how many were removed. Removing every token added since loading gives back the
        tokenizer as loaded: the same vocabulary, added tokens and ids.
        """
        names = {tokens} if isinstance(tokens, str) else set(tokens)
        special = [t["content"] for t in self._added if t["special"] and t["content"] in names]
        if special:
            raise InputError(f"CLIPTokenizer.remove_tokens: {special} are special tokens of this tokenizer, "
                             "which cannot be removed")
        kept = [t for t in self._added if t["content"] not in names]
        removed = len(self._added) - len(kept)
        if removed:
            self._install([AddedToken(t["content"], **{k: t[k] for k in TOKEN_FLAGS}) for t in kept])
        return removed

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Added token (special ones included) -> id, by id, as in transformers."""
        pairs = ((t["content"], self._backend.token_to_id(t["content"])) for t in self._added)
        return dict(sorted(pairs, key=lambda p: p[1]))

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """id -> ``tokenizers.AddedToken`` (with its ``special`` and matching flags), by id."""
        tokens = {self._backend.token_to_id(t["content"]): AddedToken(t["content"], **{k: t[k] for k in TOKEN_FLAGS})
                  for t in self._added}
        return dict(sorted(tokens.items()))

    # ---- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs):
        """Read vocab.json + merges.txt (or tokenizer.json) and the token settings of a folder or hub id."""
        from .hub import HUB_KWARGS, resolve_folder

        kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
        folder = resolve_folder(path_or_id, subfolder, allow_patterns=["*.json", "*.txt"], **kwargs)
        try:
            return cls._from_folder(folder, path_or_id)
        except (ConfigError, CheckpointNotFoundError):
            raise
        except Exception as exc:  # a value of the wrong type or shape in one of the files (the Rust side's too)
            raise ConfigError(f"{folder}: cannot build a CLIP tokenizer from these files "
                              f"({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_folder(cls, folder: Path, path_or_id):
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        settings = {k: config[k] for k in SPECIAL_KEYS if config.get(k) is not None}
        if (folder / "special_tokens_map.json").is_file():  # overrides tokenizer_config.json, as in transformers
            stm = read_json(folder / "special_tokens_map.json")
            settings.update({k: stm[k] for k in SPECIAL_KEYS if stm.get(k) is not None})
        added = [dict(v, id=int(k)) for k, v in config.get("added_tokens_decoder", {}).items()]
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            data = read_json(folder / "tokenizer.json")
            model = data.get("model", {})
            if model.get("type") != "BPE":
                raise ConfigError(f"{folder / 'tokenizer.json'}: model type {model.get('type')!r} is not CLIP's BPE")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = list(data.get("added_tokens", [])) + added
        else:
            raise CheckpointNotFoundError(f"{folder}: no vocab.json + merges.txt nor tokenizer.json")
        return cls(vocab, merges, **settings, added_tokens=added, name_or_path=str(path_or_id),
                   model_max_length=config.get("model_max_length", CLIP_CONTEXT_LENGTH))

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write the SD layout (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        specials = {k: getattr(self, k) for k in SPECIAL_KEYS}
        decoder = {str(self._backend.token_to_id(t["content"])): t for t in self._added}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "added_tokens_decoder": decoder, **specials}
        files = {
            "vocab.json": json.dumps(self._vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
        }
        for name, text in files.items():
            atomic_write_text(directory / name, text)
        return tuple(str(directory / name) for name in files)

    # ---- encoding ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` without bos/eos (``"photo</w>"``)."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise InputError(f"CLIPTokenizer: text must be a string or a list of strings, got {type(text).__name__}")
        pad_mode = {True: "longest", "longest": "longest", "max_length": "max_length",
                    False: None, "do_not_pad": None}.get(padding, "invalid")
        if pad_mode == "invalid":
            raise InputError(f"CLIPTokenizer: padding={padding!r}; expected True, False, 'longest' or 'max_length'")
        truncate = truncation not in (None, False, "do_not_truncate")
        if truncation is None and max_length is not None and pad_mode is None:
            truncate = True  # transformers: a max_length alone (no padding) turns truncation on
        limit = self.model_max_length if max_length is None else int(max_length)
        specials = 2 if add_special_tokens else 0
        if truncate and limit < specials:
            raise InputError(f"CLIPTokenizer: max_length={limit} leaves no room for the bos and eos tokens")
        rows = []
        for enc in self._backend.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids[: limit - specials] if truncate else enc.ids
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else list(ids))
        masks = [[1] * len(r) for r in rows]
        target = max(map(len, rows), default=0) if pad_mode == "longest" else limit if pad_mode else None
        if target is not None:
            for row, mask in zip(rows, masks):
                extra = max(0, target - len(row))
                row.extend([self.pad_token_id] * extra)
                mask.extend([0] * extra)
        out = BatchEncoding(input_ids=rows)
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors is None:
            return BatchEncoding({k: v[0] for k, v in out.items()}) if single else out
        if return_tensors != "pt":
            raise InputError(f"CLIPTokenizer: return_tensors={return_tensors!r}; only 'pt' or None")
        if len({len(r) for r in rows}) > 1:
            raise InputError(f"CLIPTokenizer: sequences of lengths {sorted({len(r) for r in rows})} cannot form one "
                             f"tensor; pass padding='longest' or padding='max_length'")
        import torch

        return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})

    # ---- decoding and lookups ----------------------------------------------------------------
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; the ``</w>`` suffixes become spaces, as in transformers."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, pad_token={self.pad_token!r})")


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional ``#version`` header, then one ``left right`` pair per line."""
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: expected two tokens separated by a space, found {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
