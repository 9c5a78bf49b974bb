"""A small CLIP-format BPE vocabulary (vocab.json + merges.txt) trained with `tokenizers`, seeded by its corpus.

CLIP's layout: the 256 byte-level characters, the same with the ``</w>`` end-of-word suffix, one
token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. Both transformers'
``CLIPTokenizer`` and ours read these files; the vocabulary is deterministic (same corpus, same files).
"""
from __future__ import annotations

import json
from pathlib import Path

END_OF_WORD = "</w>"
SPECIALS = ("<|startoftext|>", "<|endoftext|>")

# Caption words of the shapes data set plus common prompt words: enough for short prompts to merge.
CORPUS = """
a an the of on in at with and or to by from photo picture painting drawing image render
red green blue yellow orange purple pink white black grey gray brown cyan magenta
circle square triangle star cross ring diamond hexagon rectangle heart shape shapes
small medium large big tiny huge left right top bottom centre center middle corner upper lower
background foreground colour color bright dark light detailed high quality sharp simple
cat dog horse bird tree house mountain river sky sea city street car flower portrait landscape
astronaut riding moon sunset forest lake beach night day snow rain cloud clouds
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def train_merges(num_merges: int) -> list[tuple[str, str]]:
    """BPE merges over CORPUS (each word repeated so frequent pieces win), with CLIP's ``</w>`` suffix."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted(set("".join(CORPUS)))
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) * 2 + num_merges, initial_alphabet=alphabet, end_of_word_suffix=END_OF_WORD,
        show_progress=False, min_frequency=1,
    )
    tok.train_from_iterator([" ".join(CORPUS)] * 4, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers writes a merge as [left, right] (newer) or "left right" (older)
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges][:num_merges]


def write_clip_vocab(folder: Path, num_merges: int = 400) -> int:
    """Write vocab.json, merges.txt and tokenizer configs in CLIP's format; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = train_merges(num_merges)
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + END_OF_WORD for c in chars), *("".join(m) for m in merges), *SPECIALS]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    specials = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "unk_token": SPECIALS[1], "pad_token": SPECIALS[1]}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return len(vocab)
