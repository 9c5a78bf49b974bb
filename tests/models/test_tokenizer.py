"""Our CLIPTokenizer against transformers' CLIPTokenizer on the same folder: ids, masks, decoding.

Vocabularies: one trained here in CLIP's format (byte-level alphabet, ``</w>`` suffix, the two
special tokens), and OpenAI's real 49408-token BPE when the ``open_clip_torch`` package is
installed (its wheel ships ``bpe_simple_vocab_16e6.txt.gz``; found without importing open_clip).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
import threading
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402

from runtime.models import CLIPTokenizer  # noqa: E402
from runtime.models.errors import CheckpointNotFoundError, ConfigError, InputError  # noqa: E402
from runtime.models.tokenizer import SPLIT_PATTERN  # noqa: E402

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
WORDS = ("a photo of the red blue green circle square triangle on in with background cat dog astronaut "
         "riding horse painting oil canvas detailed portrait city night sky stars landscape mountain lake "
         "sunset highly intricate trending artstation octane render 4k 8k cinematic lighting").split()
ODD = ["Café", "déjà", "naïve", "Ünïcödé", "😀", "🎉🎉", "東京", "日本語の猫", "ΟΔΟΣ", "İstanbul", "straße",
       "it's", "they're", "we'll", "I'd", "3.14", "1,000,000", "$5", "100%", "#hashtag", "@user", "e-mail",
       "<|endoftext|>", "<|ENDOFTEXT|>", "!!!", "?!", "(((masterpiece)))", "[art:0.5]", "{x|y}", "—", "…",
       "\t", "\n\n", "   ", "a\u00a0b", "ﬁne", "Ａ", "x²", "\u200b"]


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_folder(folder: Path, merges: list[str], pad_token: str = "<|endoftext|>") -> Path:
    """vocab.json + merges.txt + tokenizer_config.json laid out as CLIP's (and SD's) are."""
    base = bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base] + ["".join(m.split()) for m in merges] + SPECIALS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
              "unk_token": SPECIALS[1], "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def prompts(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a photo of a cat", "A PHOTO OF A CAT", "  leading and trailing  ", " ".join(WORDS * 3),
           " ".join(ODD), "photo<|startoftext|>x<|endoftext|>y", "hello!world!!"]
    while len(out) < count:
        n = rng.choice([1, 3, 8, 20, 90])
        parts = [rng.choice(WORDS + ODD) if rng.random() < 0.8 else str(rng.randint(0, 10**6)) for _ in range(n)]
        parts = [p.upper() if rng.random() < 0.1 else p.title() if rng.random() < 0.1 else p for p in parts]
        out.append("".join(p + rng.choice([" ", " ", "  ", ", ", ".", "\t", ""]) for p in parts))
    return out


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A small CLIP-format BPE (merges learned here with the tokenizers library)."""
    model = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    model.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                             normalizers.Lowercase()])
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(prompts(400, seed=7) * 3, trainer=trainer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(model.to_str())["model"]["merges"]]
    return write_clip_folder(tmp_path_factory.mktemp("trained"), merges)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed: no copy of OpenAI's CLIP BPE vocabulary")
    gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # CLIP's own cut: 49408 tokens in all
    folder = write_clip_folder(tmp_path_factory.mktemp("real"), merges)
    assert len(json.loads((folder / "vocab.json").read_text())) == 49408
    return folder


@pytest.fixture(params=["trained", "real"])
def vocab_folder(request) -> Path:
    return request.getfixturevalue(f"{request.param}_folder")


def with_config(src: Path, dst: Path, config: dict, special_tokens_map: dict | None = None) -> Path:
    dst.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if special_tokens_map is not None:
        (dst / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return dst


def assert_same_encoding(ours: CLIPTokenizer, ref, texts: list[str], **kwargs):
    a, b = ours(texts, **kwargs), ref(texts, **kwargs)
    for text, x, y in zip(texts, a["input_ids"], b["input_ids"]):
        assert x == y, f"{text!r}: ours {x} transformers {y}"
    assert a["attention_mask"] == b["attention_mask"]


CALLS = [
    dict(padding="max_length", max_length=77, truncation=True),  # what SD pipelines call
    dict(padding="longest"),  # the pipelines' untruncated check
    dict(),
    dict(padding="max_length", max_length=12, truncation=True),
    dict(padding=True, truncation=True),
    dict(max_length=10),  # truncates: transformers turns truncation on for a max_length without padding
    dict(padding="max_length", max_length=10),  # pads, never truncates
]


CALL_IDS = ["sd", "longest", "plain", "short", "true-true", "max-length-only", "pad-no-truncation"]


@pytest.mark.parametrize("kwargs", CALLS, ids=CALL_IDS)
def test_ids_match_transformers(vocab_folder, kwargs):
    ours = CLIPTokenizer.from_pretrained(vocab_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.model_max_length)
    assert_same_encoding(ours, ref, prompts(), **kwargs)


def test_single_text_tokenize_and_decode_match_transformers(vocab_folder):
    ours = CLIPTokenizer.from_pretrained(vocab_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    texts = prompts(60, seed=3)
    for text in texts:
        assert ours(text) == dict(ref(text)), text
        assert ours.tokenize(text) == ref.tokenize(text), text
    ids = ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(torch.tensor(ids[5])) == ref.decode(ids[5])
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    tokens = ref.convert_ids_to_tokens(ids[6])
    assert ours.convert_ids_to_tokens(ids[6]) == tokens
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)


def test_truncation_keeps_bos_first_tokens_eos(trained_folder):
    ours = CLIPTokenizer.from_pretrained(trained_folder)
    long_text = " ".join(WORDS * 5)
    full = ours(long_text)["input_ids"]
    cut = ours(long_text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(full) > 77 and len(cut) == 77
    assert cut == full[:76] + [ours.eos_token_id]


def test_sdxl_pad_token_bang_matches_transformers(vocab_folder, tmp_path):
    """tokenizer_2 of SD2/SDXL pads with "!" (special_tokens_map.json overrides tokenizer_config.json)."""
    added = lambda c, normalized: {"__type": "AddedToken", "content": c, "lstrip": False,  # noqa: E731
                                   "normalized": normalized, "rstrip": False, "single_word": False}
    folder = with_config(vocab_folder, tmp_path / "tok2",
                         {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True,
                          "bos_token": added(SPECIALS[0], True), "eos_token": added(SPECIALS[1], True),
                          "unk_token": added(SPECIALS[1], True)},
                         {"pad_token": "!", "bos_token": added(SPECIALS[0], True),
                          "eos_token": added(SPECIALS[1], True), "unk_token": added(SPECIALS[1], True)})
    ours = CLIPTokenizer.from_pretrained(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token == "!" and ours.pad_token_id == ref.pad_token_id == 0
    assert_same_encoding(ours, ref, prompts(120), padding="max_length", max_length=77, truncation=True)
    row = ours("a cat", padding="max_length", max_length=8)["input_ids"]
    assert row[-3:] == [0, 0, 0] and row[3] == ours.eos_token_id


def test_special_token_outside_the_vocab_gets_the_next_id_like_transformers(trained_folder, tmp_path):
    folder = with_config(trained_folder, tmp_path / "newpad", {"pad_token": "<|pad|>", "model_max_length": 77})
    ours, ref = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == ref.pad_token_id == len(ours) - 1
    assert_same_encoding(ours, ref, ["a <|pad|> b", "a cat"] + prompts(20), padding="max_length", max_length=77)


def test_added_tokens_decoder_and_tokenizer_json_folders(vocab_folder, tmp_path):
    decoder = {"0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}}
    folder = with_config(vocab_folder, tmp_path / "dec", {"model_max_length": 77, "pad_token": "!",
                                                          "added_tokens_decoder": decoder})
    ours, ref = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert_same_encoding(ours, ref, prompts(80), padding="max_length", max_length=77, truncation=True)
    # transformers 5.x saves tokenizer.json + tokenizer_config.json only
    ref.save_pretrained(tmp_path / "tf_saved")
    assert not (tmp_path / "tf_saved" / "vocab.json").exists()
    ours_json = CLIPTokenizer.from_pretrained(tmp_path / "tf_saved")
    assert_same_encoding(ours_json, ref, prompts(80), padding="max_length", max_length=77, truncation=True)


def test_save_pretrained_round_trips_through_transformers(vocab_folder, tmp_path):
    ours = CLIPTokenizer.from_pretrained(vocab_folder)
    ours.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    texts = prompts(100, seed=5)
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    assert_same_encoding(CLIPTokenizer.from_pretrained(tmp_path / "saved"), ref, texts, padding="longest")
    assert_same_encoding(ours, transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved"), texts,
                         padding="max_length", max_length=77, truncation=True)


def test_subfolder_and_tensors(trained_folder, tmp_path):
    CLIPTokenizer.from_pretrained(trained_folder).save_pretrained(tmp_path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    out = tok(["a cat", "a photo of a dog on a lake"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")
    assert out.input_ids.shape == (2, 77) and out.input_ids.dtype == torch.long
    assert out.attention_mask.sum(dim=1).tolist() == [len(tok("a cat")["input_ids"]),
                                                        len(tok("a photo of a dog on a lake")["input_ids"])]


def test_added_tokens_match_transformers_and_remove_restores(vocab_folder):
    """What textual inversion adds: whole-word tokens matched before BPE on the lowercased text."""
    ours = CLIPTokenizer.from_pretrained(vocab_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    fresh_vocab, fresh_added = ours.get_vocab(), ours.added_tokens_encoder
    new = ["<cat-toy>", "<Cat>", "tok", "tok_1", "photo</w>"]
    assert ours.add_tokens(new) == ref.add_tokens(new) and ours.add_tokens("tok") == ref.add_tokens("tok") == 0
    assert ours.added_tokens_encoder == ref.added_tokens_encoder and len(ours) == len(ref)
    texts = prompts(50) + ["a <cat-toy> photo", "<CAT> tok_1 tok xtoky", "<cat-toy><cat-toy>", "tok_12 photo"]
    assert [ours.tokenize(t) for t in texts] == [ref.tokenize(t) for t in texts]
    assert_same_encoding(ours, ref, texts, padding="max_length", max_length=77, truncation=True)
    assert ours.remove_tokens(["tok", "<cat-toy>"]) == 2
    assert ours.convert_tokens_to_ids("tok_1") == ours.convert_tokens_to_ids("<Cat>") + 1  # moved down
    ours.remove_tokens(["tok_1", "<Cat>", "photo</w>"])
    assert ours.get_vocab() == fresh_vocab and ours.added_tokens_encoder == fresh_added
    with pytest.raises(InputError, match="special tokens of this tokenizer"):
        ours.remove_tokens("<|endoftext|>")


def test_four_threads_share_one_tokenizer(trained_folder):
    tok = CLIPTokenizer.from_pretrained(trained_folder)
    texts = prompts(200, seed=11)
    settings = [dict(padding="max_length", max_length=77, truncation=True), dict(padding="longest"),
                dict(), dict(padding="max_length", max_length=20, truncation=True)]
    expected = [[tok([t], **s)["input_ids"] for t in texts] for s in settings]
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = [tok([t], **settings[i])["input_ids"] for t in texts for _ in range(2)][::2]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == expected


def test_bad_inputs_and_folders_raise_clear_errors(trained_folder, tmp_path):
    tok = CLIPTokenizer.from_pretrained(trained_folder)
    with pytest.raises(InputError, match="padding='sideways'"):
        tok("a", padding="sideways")
    with pytest.raises(InputError, match="lengths"):
        tok(["a", "a photo of a cat"], return_tensors="pt")
    with pytest.raises(InputError, match="return_tensors='np'"):
        tok("a", return_tensors="np")
    with pytest.raises(InputError, match="max_length=1"):
        tok("a", max_length=1, truncation=True)
    with pytest.raises(InputError, match="list of strings"):
        tok(["a", 3])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere" / "tokenizer")
    folder = with_config(trained_folder, tmp_path / "badmerges", {})
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ConfigError, match="merges.txt:2"):
        CLIPTokenizer.from_pretrained(folder)
