"""Textual inversion: new words in a tokenizer, their vectors as new rows of the text encoder's table.

``load_textual_inversion`` and ``unload_textual_inversion`` have diffusers' names and arguments
(``TextualInversionLoaderMixin``); files are read by textual_inversion_files.py.

- A token takes the next id of its tokenizer (``len(tokenizer)``), and its vector that row of the
  token table, as diffusers does it (the table is cut or grown to the tokenizer's size first). A
  multi-vector embedding adds ``token``, ``token_1``, ... ; a prompt naming ``token`` is expanded
  to ``token token_1 ...`` on the way into every tokenizer call of the pipelines
  (``expand_prompts``, run by prompts.tokenize: prompts, negative prompts, SDXL's second prompts).
- SDXL: a file with ``clip_l`` / ``clip_g`` loads both halves at once, ``clip_l`` into
  text_encoder / tokenizer and ``clip_g`` into text_encoder_2 / tokenizer_2, when no tokenizer or
  text_encoder is passed. Passing them loads into that pair only (the half matching it for such a
  file), as in diffusers' two calls.
- Unloading gives back the tokenizer (vocabulary, added tokens, ids) and the token table as they
  were before the first load, bit for bit: the rows kept are never recomputed, and rows the first
  load cut off (a table larger than its tokenizer) are kept aside until then. Without a tokenizer
  or text_encoder argument it unloads from every pair of the pipeline (both for SDXL); naming a
  multi-vector token removes its ``token_1, ...`` too.
- An optimization whose revert would put back the old table (precision's saved tensors, compile's
  graph of a text encoder) has to be reverted first: the loader says so rather than leave a
  pipeline that reverts to a table its tokenizer no longer matches.
"""
from __future__ import annotations

import logging

import torch

from runtime.models.errors import CheckpointError, InputError, ShapeMismatchError

from .textual_inversion_files import SDXL_KEYS, Embedding, as_vectors, load_embeddings

logger = logging.getLogger(__name__)

BASE_ATTR = "_textual_inversion_base"  # on a text encoder: its table and tokenizer before the first load
# Passes that hold a text encoder's tensors or graph (runtime/optim): revert first, then load.
HOLDING_PASSES = ("precision", "compile")


# ---- prompts ---------------------------------------------------------------------------
def plain_added_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's added tokens that are not special (textual inversion's), content -> id."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {t.content: i for i, t in decoder.items() if not t.special}


def expand_prompt(prompt: str, tokenizer) -> str:
    """``token`` -> ``token token_1 ...`` for each multi-vector token the prompt uses.

    diffusers' rule (``maybe_convert_prompt``): the tokens the tokenizer finds in the prompt, each
    that is an added token replaced in the text by itself and its ``_1, _2, ...`` companions.
    Tokens are taken in the order they first appear (diffusers takes a set's order).
    """
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token in added:
            parts, i = [token], 1
            while f"{token}_{i}" in added:
                parts.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(parts))
    return prompt


def expand_prompts(tokenizer, texts: list[str]) -> list[str]:
    """``texts`` with multi-vector tokens expanded; unchanged (and no extra tokenizing) without any."""
    if not plain_added_tokens(tokenizer):
        return texts
    return [expand_prompt(t, tokenizer) for t in texts]


# ---- one (tokenizer, text encoder) pair ----------------------------------------------------
def _names(token: str, vectors: torch.Tensor) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]


def _check_new(tokenizer, text_encoder, entries: list[tuple[str, torch.Tensor, str]], label: str) -> None:
    """Every new token unknown to the tokenizer and to the others, every vector of the table's width."""
    vocab = tokenizer.get_vocab()
    dim = text_encoder.get_input_embeddings().embedding_dim
    seen: dict[str, str] = {}
    for token, vectors, where in entries:
        names = _names(token, vectors)
        taken = [n for n in names if n in vocab]
        if taken:
            raise InputError(
                f"{where}: token {taken[0]!r} is already in {label}'s tokenizer; choose another token name "
                f"(token=...) or unload it first (unload_textual_inversion({taken[0]!r}))")
        for name in names:
            if name in seen:
                raise InputError(f"{where}: token {name!r} is also added by {seen[name]}; each token may be added once")
            seen[name] = where
        if vectors.shape[1] != dim:
            shape = tuple(text_encoder.get_input_embeddings().weight.shape)
            raise ShapeMismatchError(
                f"{where}: the embedding of {token!r} has {vectors.shape[1]} values per vector, but {label} "
                f"embeds tokens in {dim} (its token table is {shape}); the file was made for another text encoder")


@torch.no_grad()
def add_to_pair(tokenizer, text_encoder, entries: list[tuple[str, torch.Tensor, str]]) -> list[str]:
    """Add the (token, vectors) entries (checked by _check_new); returns the token names added."""
    table = text_encoder.get_input_embeddings().weight
    start = len(tokenizer)
    if BASE_ATTR not in text_encoder.__dict__:
        tail = table[start:].clone() if table.shape[0] > start else None
        text_encoder.__dict__[BASE_ATTR] = {
            "rows": table.shape[0], "tokens": start, "tail": tail,
            "added": [t.content for t in tokenizer.added_tokens_decoder.values()]}
    names = [n for token, vectors, _ in entries for n in _names(token, vectors)]
    rows = torch.cat([vectors for _, vectors, _ in entries]).to(device=table.device, dtype=table.dtype)
    text_encoder.resize_token_embeddings(start + len(names))  # rows below ``start`` copied exactly
    weight = text_encoder.get_input_embeddings().weight
    weight[start:] = rows
    # The larger table first, then the tokenizer: a call in flight never meets an id past the table.
    tokenizer.add_tokens(names)
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    if ids != list(range(start, start + len(names))):  # not seen with CLIP tokenizers; never leave it half-done
        tokenizer.remove_tokens(names)
        raise CheckpointError(f"textual inversion: the tokenizer gave {names} the ids {ids}, not the rows "
                              f"{start}..{start + len(names) - 1} written for them")
    for name in names:
        logger.info("loaded textual inversion token %r", name)
    return names


def _with_companions(tokens: list[str], plain: dict[str, int]) -> set[str]:
    names = set()
    for token in tokens:
        if token in plain:
            names.add(token)
            i = 1
            while f"{token}_{i}" in plain:
                names.add(f"{token}_{i}")
                i += 1
    return names


@torch.no_grad()
def remove_from_pair(tokenizer, text_encoder, names: set[str]) -> None:
    """Take ``names`` (plain added tokens) out of the tokenizer and their rows out of the table."""
    plain = plain_added_tokens(tokenizer)
    gone = {plain[n] for n in names}
    table = text_encoder.get_input_embeddings().weight
    keep = [i for i in range(table.shape[0]) if i not in gone]
    before = tokenizer.added_tokens_encoder
    tokenizer.remove_tokens(sorted(names))
    after = tokenizer.added_tokens_encoder
    position = {old: new for new, old in enumerate(keep)}
    moved = {t: (before[t], after[t]) for t in after if position.get(before[t]) != after[t]}
    if moved:
        raise CheckpointError(f"unload_textual_inversion: the tokenizer renumbered {moved} (old id, new id) "
                              "in a way the token table's rows cannot follow")
    weight = table.index_select(0, torch.tensor(keep, dtype=torch.long, device=table.device))
    base = text_encoder.__dict__.get(BASE_ATTR)
    if base is not None and list(after) == base["added"]:  # back to the tokenizer before the first load
        weight = weight[: min(base["rows"], base["tokens"])]
        if base["tail"] is not None:
            weight = torch.cat([weight, base["tail"].to(device=weight.device, dtype=weight.dtype)])
        del text_encoder.__dict__[BASE_ATTR]
    text_encoder.set_token_embedding_weight(weight)


# ---- the pipeline mixin ------------------------------------------------------------------------
class TextualInversionLoaderMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` / ``maybe_convert_prompt`` (diffusers')."""

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer):
        """The prompt(s) with each multi-vector token expanded to all its tokens (diffusers' method)."""
        if isinstance(prompt, list):
            return [expand_prompt(p, tokenizer) for p in prompt]
        return expand_prompt(prompt, tokenizer)

    def _text_pairs(self) -> list[tuple[str, object, object]]:
        """(label, tokenizer, text encoder) of each pair the pipeline has, SD's then SDXL's second."""
        pairs = []
        for suffix in ("", "_2"):
            tokenizer, encoder = getattr(self, "tokenizer" + suffix, None), getattr(self, "text_encoder" + suffix, None)
            if tokenizer is not None and encoder is not None:
                pairs.append(("text_encoder" + suffix, tokenizer, encoder))
        return pairs

    def _label(self, text_encoder) -> str:
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self, name, None) is text_encoder:
                return name
        return "the given text_encoder"

    def _check_no_holding_passes(self, what: str, encoders: list) -> None:
        report = getattr(self, "optimization", None)
        labels = {self._label(e) for e in encoders} - {"the given text_encoder"}  # passes touch components only
        holding = []
        for p in getattr(report, "applied", ()) if labels else ():
            if p.name == "precision" or (p.name == "compile" and labels & set(getattr(p, "targets", ()))):
                holding.append(p.name)
        if holding:
            raise InputError(
                f"{type(self).__name__}.{what}: this pipeline is optimized with {', '.join(holding)}, which "
                f"hold(s) the text encoders' tensors or graph (a revert would put back the old token table); "
                f"call pipe.optimization.revert(), then {what}, then optimize again")

    def _explicit_pair(self, tokenizer, text_encoder, what: str):
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            missing = "tokenizer" if tokenizer is None else "text_encoder"
            raise InputError(f"{type(self).__name__}.{what} needs a {missing}: this pipeline has none, pass "
                             f"{missing}=... (for SDXL's second encoder: tokenizer=pipe.tokenizer_2, "
                             "text_encoder=pipe.text_encoder_2)")
        return self._label(text_encoder), tokenizer, text_encoder

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, **kwargs) -> None:
        """Add textual inversion embeddings: a file, a folder or hub id (``weight_name``, else
        learned_embeds.safetensors / .bin), a state dict, a tensor, or a list of these with a list
        of tokens. Keyword arguments: weight_name, subfolder, use_safetensors, and the hub's
        (cache_dir, revision, local_files_only, force_download, proxies; hf_token for the hub)."""
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token]
        if not sources:
            raise InputError("load_textual_inversion: no embeddings given (an empty list)")
        if any(t is not None and (not isinstance(t, str) or not t) for t in tokens):
            raise InputError(f"load_textual_inversion: tokens must be non-empty strings, got {tokens!r}")
        if len(tokens) == 1 and tokens[0] is None:
            tokens = tokens * len(sources)
        if len(sources) > 1 and len(sources) != len(tokens):
            raise InputError(f"load_textual_inversion: {len(sources)} embeddings were passed with {len(tokens)} "
                             "tokens; pass one token per embedding (or none)")
        named = [t for t in tokens if t is not None]
        if len(set(named)) < len(named):
            raise InputError(f"load_textual_inversion: the tokens {tokens} contain duplicates")
        if tokenizer is not None or text_encoder is not None:
            pairs = [self._explicit_pair(tokenizer, text_encoder, "load_textual_inversion")]
            explicit = True
        else:
            pairs, explicit = self._text_pairs(), False
            if not pairs:
                self._explicit_pair(None, None, "load_textual_inversion")  # raises, naming what is missing
        # One embedding with several tokens: a token per vector (diffusers does so for a tensor).
        embeddings = load_embeddings(sources, tokens if len(sources) == len(tokens) else tokens[:1], kwargs)
        plan = self._plan(embeddings, tokens if len(sources) == 1 and len(tokens) > 1 else None, pairs, explicit)
        self._check_no_holding_passes("load_textual_inversion", [encoder for _, _, encoder, _ in plan])
        for label, tok, encoder, entries in plan:
            _check_new(tok, encoder, entries, label)
        for label, tok, encoder, entries in plan:
            add_to_pair(tok, encoder, entries)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None, tokenizer=None,
                                 text_encoder=None) -> None:
        """Remove textual inversion tokens (all of them by default) and their rows of the token table.

        With neither ``tokenizer`` nor ``text_encoder`` it works on every pair of the pipeline (both
        of SDXL's); a multi-vector token takes its ``_1, _2, ...`` with it. When no token is left,
        the tokenizer and the table are those from before the first load, bit for bit."""
        if isinstance(tokens, str):
            tokens = [tokens]
        elif tokens is not None:
            tokens = list(tokens) or None  # an empty list: all of them, as in diffusers
        if tokenizer is not None or text_encoder is not None:
            pairs = [self._explicit_pair(tokenizer, text_encoder, "unload_textual_inversion")]
        else:
            pairs = self._text_pairs()
        work = [(tok, enc, _unload_names(tok, tokens)) for _, tok, enc in pairs]
        work = [w for w in work if w[2]]
        if tokens is not None and not work:
            loaded = sorted({n for _, tok, _ in pairs for n in plain_added_tokens(tok)})
            raise InputError(f"unload_textual_inversion: none of {tokens} is a textual inversion token here "
                             f"(loaded: {loaded or 'none'})")
        self._check_no_holding_passes("unload_textual_inversion", [enc for _, enc, _ in work])
        for tok, enc, names in work:
            remove_from_pair(tok, enc, names)

    def _plan(self, embeddings: list[Embedding], split_tokens: list[str] | None, pairs, explicit: bool):
        """[(label, tokenizer, text encoder, [(token, vectors, where), ...])] for each pair that gets any."""
        plan = {label: (label, tok, enc, []) for label, tok, enc in pairs}
        first = pairs[0][0]
        for emb in embeddings:
            if emb.halves:
                targets = self._halves_for(emb, pairs, explicit)
            else:
                if not explicit and first != "text_encoder":
                    raise InputError(f"{emb.where}: this pipeline has no tokenizer / text_encoder (only the second "
                                     "pair); pass tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2")
                targets = [(first, emb.vectors)]
            for label, vectors in targets:
                plan[label][3].extend(_named(emb, vectors, split_tokens, label))
        return [p for p in plan.values() if p[3]]

    @staticmethod
    def _halves_for(emb: Embedding, pairs, explicit: bool) -> list[tuple[str, torch.Tensor]]:
        """Which SDXL half goes to which pair: clip_l -> text_encoder, clip_g -> text_encoder_2;
        for one pair passed explicitly, the half made for it (by name, else by width)."""
        halves = dict(zip(SDXL_KEYS, ("text_encoder", "text_encoder_2")))
        if not explicit:
            labels = {label for label, _, _ in pairs}
            out = [(halves[k], v) for k, v in emb.halves.items() if halves[k] in labels]
            if not out:
                raise InputError(f"{emb.where}: its halves {sorted(emb.halves)} are for "
                                 f"{[halves[k] for k in emb.halves]}, which this pipeline lacks")
            return out
        label, _, encoder = pairs[0]
        by_name = [k for k, v in halves.items() if v == label and k in emb.halves]
        dim = encoder.get_input_embeddings().embedding_dim
        by_width = [k for k, v in emb.halves.items() if v.shape[1] == dim]
        chosen = by_name or (by_width if len(by_width) == 1 else [])
        if not chosen:
            widths = {k: v.shape[1] for k, v in emb.halves.items()}
            raise ShapeMismatchError(f"{emb.where}: an SDXL embedding ({widths} values per vector); none fits "
                                     f"{label}, whose tokens are {dim} wide")
        return [(label, emb.halves[chosen[0]])]


def _named(emb: Embedding, vectors: torch.Tensor, split_tokens: list[str] | None, label: str):
    """(token, vectors, where) entries: one per vector when a list of tokens names one embedding's rows."""
    if split_tokens is not None:
        if vectors.shape[0] != len(split_tokens):
            raise InputError(f"{emb.where}: {len(split_tokens)} tokens {split_tokens} for an embedding of "
                             f"{vectors.shape[0]} vector(s) ({label}); pass one token per vector, or a single token")
        return [(t, as_vectors(v, emb.where), emb.where) for t, v in zip(split_tokens, vectors)]
    if emb.token is None:
        raise InputError(f"{emb.where}: the embedding has no token name in it; pass token=...")
    return [(emb.token, vectors, emb.where)]


def _unload_names(tokenizer, tokens: list[str] | None) -> set[str]:
    plain = plain_added_tokens(tokenizer)
    return set(plain) if tokens is None else _with_companions(tokens, plain)
