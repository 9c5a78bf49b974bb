"""The benchmark checkpoints: a CLIP-format vocabulary both tokenizers read alike; seeded, atomic, kept when equal."""
from __future__ import annotations

import json

import pytest

PROMPTS = ["a red circle on a blue background", "An astronaut riding a horse, at night!", "zebra xylophone 42",
           "  many   spaces\tand CAPS  "]


def test_clip_vocab_gives_transformers_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from bench.clip_vocab import write_clip_vocab
    from runtime.models.tokenizer import CLIPTokenizer

    size = write_clip_vocab(tmp_path, num_merges=150)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == size and list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    ref = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    ours = CLIPTokenizer.from_pretrained(str(tmp_path))
    for prompt in PROMPTS:
        expected = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert list(ours(prompt, padding="max_length", max_length=77, truncation=True).input_ids) == expected
    # merges were learned: a corpus word is fewer tokens than its letters
    assert len(ref("circle").input_ids) - 2 < len("circle")


def test_tiny_checkpoint_is_seeded_and_kept(tmp_path):
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from bench.make_checkpoint import STAMP, build_checkpoint

    a = build_checkpoint("tiny", tmp_path / "a", seed=0)
    b = build_checkpoint("tiny", tmp_path / "b", seed=0)
    wa, wb = (load_file(str(next((f / "unet").glob("*.safetensors")))) for f in (a, b))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    assert sorted(p.name for p in a.iterdir()) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", STAMP])
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder left behind"
    mtime = (a / STAMP).stat().st_mtime_ns
    assert build_checkpoint("tiny", a, seed=0) == a and (a / STAMP).stat().st_mtime_ns == mtime  # kept
    build_checkpoint("tiny", a, seed=1)  # made here with other settings: rebuilt
    assert json.loads((a / STAMP).read_text())["seed"] == 1
    assert not load_file(str(next((a / "unet").glob("*.safetensors"))))["conv_in.weight"].equal(wa["conv_in.weight"])
    (tmp_path / "user").mkdir()
    with pytest.raises(SystemExit, match="not made by bench.make_checkpoint"):
        build_checkpoint("tiny", tmp_path / "user", seed=0)  # someone else's folder is never overwritten
