"""Textual inversion against diffusers: the same embedding files, written here in each format,
give the same token ids, token tables and latents; unloading gives back the exact tokenizer and
table; each bad input is an error naming what is wrong.

Every test gets fresh tokenizers and text encoders (the UNet, VAE and scheduler are shared, and
loading never touches them), so what one test loads never reaches another.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline_fixtures import TOL, generator, test_image

import runtime
from runtime.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InputError,
    ShapeMismatchError,
    UnsafeCheckpointError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 32  # hidden size of the tiny CLIP text encoders (both of SDXL's)
STEPS = 2


class NotATensor:
    """An object torch.load(weights_only=True) refuses to build."""


def vectors(n: int, seed: int, dim: int = DIM) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ---- pipelines: ours and diffusers' over the same folder ------------------------------------------
@pytest.fixture(scope="module")
def sd_bases(sd_folder):
    import diffusers

    ours = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    return sd_folder, ours, ref


@pytest.fixture(scope="module")
def sdxl_bases(sdxl_folder):
    import diffusers

    return sdxl_folder, runtime.DiffusionPipeline.from_pretrained(sdxl_folder), \
        diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))


def text_parts(folder: Path, ours: bool, pairs=("",)) -> dict:
    """Freshly loaded tokenizer(s) and text encoder(s) of ``folder``, ours or transformers'."""
    import transformers

    lib = runtime if ours else transformers
    parts = {}
    for suffix in pairs:
        encoder_cls = lib.CLIPTextModelWithProjection if suffix else lib.CLIPTextModel
        parts["tokenizer" + suffix] = lib.CLIPTokenizer.from_pretrained(str(folder / ("tokenizer" + suffix)))
        parts["text_encoder" + suffix] = encoder_cls.from_pretrained(str(folder / ("text_encoder" + suffix))).eval()
    return parts


@pytest.fixture
def sd(sd_bases):
    folder, ours, ref = sd_bases
    mine = type(ours).from_pipe(ours, **text_parts(folder, True))
    theirs = type(ref).from_pipe(ref, **text_parts(folder, False))
    for p in (mine, theirs):
        p.set_progress_bar_config(disable=True)
    return mine, theirs


@pytest.fixture
def sdxl(sdxl_bases):
    folder, ours, ref = sdxl_bases
    mine = type(ours).from_pipe(ours, **text_parts(folder, True, ("", "_2")))
    theirs = type(ref).from_pipe(ref, **text_parts(folder, False, ("", "_2")))
    for p in (mine, theirs):
        p.set_progress_bar_config(disable=True)
    return mine, theirs


# ---- embedding files in each format ------------------------------------------------------------
def diffusers_folder(root: Path, token: str, emb: torch.Tensor, safetensors: bool = True) -> Path:
    folder = root / f"diffusers-{len(list(root.iterdir()))}"
    folder.mkdir()
    if safetensors:
        save_file({token: emb.contiguous()}, str(folder / "learned_embeds.safetensors"))
    else:
        torch.save({token: emb}, folder / "learned_embeds.bin")
    return folder


def a1111_pt(root: Path, name: str, emb: torch.Tensor) -> Path:
    """A1111's .pt: string_to_param plus the bookkeeping entries it writes."""
    path = root / f"{name.strip('<>')}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": name, "step": 3000,
                "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5"}, path)
    return path


def a1111_safetensors(root: Path, stem: str, emb: torch.Tensor) -> Path:
    path = root / f"{stem}.safetensors"
    save_file({"emb_params": emb.contiguous()}, str(path))
    return path


def table(encoder) -> torch.Tensor:
    return encoder.get_input_embeddings().weight


def ids(pipe, tokenizer, prompt: str) -> list[int]:
    return tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer)).input_ids


def latents(pipe, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "output_type": "latent", **kwargs}
    return pipe(generator=generator(0), **kwargs).images


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


FORMATS = ["diffusers-safetensors", "diffusers-bin", "a1111-pt", "a1111-safetensors"]


def write(fmt: str, root: Path, token: str, emb: torch.Tensor) -> tuple[Path, str | None]:
    """(path, token argument) of an embedding file in ``fmt``."""
    if fmt == "diffusers-safetensors":
        return diffusers_folder(root, token, emb), None
    if fmt == "diffusers-bin":
        return diffusers_folder(root, token, emb, safetensors=False), None
    if fmt == "a1111-pt":
        return a1111_pt(root, token, emb), None
    return a1111_safetensors(root, "style", emb), token  # no name in the file: token= names it


# ---- parity with diffusers -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("count", [1, 3], ids=["single", "multi"])
def test_token_ids_and_table_match_diffusers(sd, tmp_path, fmt, count):
    ours, ref = sd
    path, token = write(fmt, tmp_path, "<cat-toy>", vectors(count, seed=count))
    for pipe in (ours, ref):
        pipe.load_textual_inversion(str(path), token=token)
    for prompt in ("a <cat-toy> on a blue square", "<cat-toy><cat-toy> red", "blue <CAT-TOY>", "no token here"):
        assert ids(ours, ours.tokenizer, prompt) == ids(ref, ref.tokenizer, prompt), prompt
    converted = [p.maybe_convert_prompt("a <cat-toy>", p.tokenizer) for p in (ours, ref)]
    assert converted[0] == converted[1]
    assert len(ours.tokenizer) == len(ref.tokenizer)
    assert torch.equal(table(ours.text_encoder), table(ref.text_encoder))
    assert ours.text_encoder.config.vocab_size == len(ours.tokenizer)


def test_latents_match_diffusers_with_prompt_and_negative_tokens(sd, tmp_path):
    ours, ref = sd
    multi = diffusers_folder(tmp_path, "<multi>", vectors(3, seed=4))
    single = a1111_pt(tmp_path, "<one>", vectors(1, seed=5))
    for pipe in (ours, ref):
        pipe.load_textual_inversion([str(multi), str(single)])
    kwargs = dict(prompt=["a <multi> red circle", "<one> on a blue square"], negative_prompt=["<one>", "<multi> blue"])
    a, b = latents(ours, **kwargs), latents(ref, **kwargs)
    assert max_diff(a, b) <= TOL
    plain = latents(ours, prompt=["a red circle", "on a blue square"], negative_prompt=["", "blue"])
    assert max_diff(a, plain) > 1e-3  # the new tokens changed the result


def test_state_dicts_tensors_and_token_lists_match_diffusers(sd):
    ours, ref = sd
    pair = vectors(2, seed=6)
    for pipe in (ours, ref):
        pipe.load_textual_inversion({"<dict>": vectors(2, seed=7)})  # a state dict, multi-vector
        pipe.load_textual_inversion(pair, token=["<s0>", "<s1>"])  # a tensor: one token per row
        pipe.load_textual_inversion(vectors(1, seed=8)[0], token="<vec>")  # a (dim,) tensor
    prompt = "<dict> and <s0> <s1> then <vec>"
    assert ids(ours, ours.tokenizer, prompt) == ids(ref, ref.tokenizer, prompt)
    assert torch.equal(table(ours.text_encoder), table(ref.text_encoder))
    assert max_diff(latents(ours, prompt=prompt), latents(ref, prompt=prompt)) <= TOL


def test_img2img_and_auto_pipelines_use_loaded_tokens(sd, tmp_path):
    import diffusers

    ours, ref = sd
    folder = diffusers_folder(tmp_path, "<multi>", vectors(2, seed=9))
    for pipe in (ours, ref):
        pipe.load_textual_inversion(str(folder))
    mine = runtime.AutoPipelineForImage2Image.from_pipe(ours)
    theirs = diffusers.AutoPipelineForImage2Image.from_pipe(ref)
    assert isinstance(mine, runtime.pipelines.textual_inversion.TextualInversionLoaderMixin)
    for p in (mine, theirs):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a <multi> circle", negative_prompt="<multi>", image=test_image()[0], strength=0.8)
    assert max_diff(latents(mine, **kwargs), latents(theirs, **kwargs)) <= TOL


def test_sdxl_pair_file_matches_diffusers_two_calls(sdxl, tmp_path):
    ours, ref = sdxl
    path = tmp_path / "pair.safetensors"
    save_file({"clip_l": vectors(2, seed=10), "clip_g": vectors(2, seed=11)}, str(path))
    state = load_file(str(path))
    ref.load_textual_inversion(state["clip_l"], token="<xl>", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="<xl>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours.load_textual_inversion(str(path), token="<xl>")  # both halves in one call
    prompt = "a <xl> red! circle"
    for tok in ("tokenizer", "tokenizer_2"):
        assert ids(ours, getattr(ours, tok), prompt) == ids(ref, getattr(ref, tok), prompt)
    for enc in ("text_encoder", "text_encoder_2"):
        assert torch.equal(table(getattr(ours, enc)), table(getattr(ref, enc)))
    kwargs = dict(prompt=prompt, negative_prompt="<xl> blue", prompt_2="<xl> square")
    assert max_diff(latents(ours, **kwargs), latents(ref, **kwargs)) <= TOL


def test_sdxl_explicit_pairs_as_in_diffusers(sdxl, tmp_path):
    """diffusers' documented SDXL calls (one per encoder, a token per row) work unchanged here,
    from the tensors or from the file itself (the half for the named encoder is taken)."""
    ours, ref = sdxl
    path = tmp_path / "pair.safetensors"
    save_file({"clip_l": vectors(2, seed=12), "clip_g": vectors(2, seed=13)}, str(path))
    state = load_file(str(path))
    tokens = ["<s0>", "<s1>"]
    for pipe in (ours, ref):
        pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=tokens, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours.load_textual_inversion(str(path), token=tokens, text_encoder=ours.text_encoder_2, tokenizer=ours.tokenizer_2)
    for enc in ("text_encoder", "text_encoder_2"):
        assert torch.equal(table(getattr(ours, enc)), table(getattr(ref, enc)))
    assert ids(ours, ours.tokenizer_2, "<s0> <s1> x") == ids(ref, ref.tokenizer_2, "<s0> <s1> x")
    for pipe in (ours, ref):
        for suffix in ("", "_2"):
            pipe.unload_textual_inversion(tokens, tokenizer=getattr(pipe, "tokenizer" + suffix),
                                          text_encoder=getattr(pipe, "text_encoder" + suffix))
    for enc in ("text_encoder", "text_encoder_2"):
        assert torch.equal(table(getattr(ours, enc)), table(getattr(ref, enc)))


# ---- unloading -----------------------------------------------------------------------------------
def snapshot(pipe, suffixes=("",)):
    return {s: (table(getattr(pipe, "text_encoder" + s)).clone(), getattr(pipe, "tokenizer" + s).get_vocab(),
                dict(getattr(pipe, "tokenizer" + s).added_tokens_encoder)) for s in suffixes}


def assert_restored(pipe, before, prompt_ids=None):
    for s, (weight, vocab, added) in before.items():
        tok, enc = getattr(pipe, "tokenizer" + s), getattr(pipe, "text_encoder" + s)
        assert torch.equal(table(enc), weight)
        assert tok.get_vocab() == vocab and tok.added_tokens_encoder == added and len(tok) == len(vocab)
        assert enc.config.vocab_size == weight.shape[0]
    if prompt_ids is not None:
        assert ids(pipe, pipe.tokenizer, "a <multi> <one> red") == prompt_ids


def test_unload_restores_tokenizer_and_table_exactly(sd, tmp_path):
    ours, _ = sd
    before = snapshot(ours)
    prompt_ids = ids(ours, ours.tokenizer, "a <multi> <one> red")
    image = latents(ours, prompt="a <multi> <one> red")
    ours.load_textual_inversion(str(diffusers_folder(tmp_path, "<multi>", vectors(3, seed=14))))
    ours.load_textual_inversion(str(a1111_pt(tmp_path, "<one>", vectors(1, seed=15))))
    assert ids(ours, ours.tokenizer, "a <multi> <one> red") != prompt_ids
    ours.unload_textual_inversion()
    assert_restored(ours, before, prompt_ids)
    assert torch.equal(latents(ours, prompt="a <multi> <one> red"), image)
    # again, and by name: a multi-vector token takes its _1, _2 with it
    ours.load_textual_inversion(str(diffusers_folder(tmp_path, "<multi>", vectors(3, seed=14))))
    ours.unload_textual_inversion("<multi>")
    assert_restored(ours, before, prompt_ids)


def test_partial_unload_matches_diffusers(sd):
    ours, ref = sd
    for pipe in (ours, ref):
        pipe.load_textual_inversion([vectors(1, seed=16), vectors(1, seed=17), vectors(1, seed=18)],
                                    token=["<a>", "<b>", "<c>"])
        pipe.unload_textual_inversion("<b>")
    prompt = "<a> <c> <b>"
    assert ids(ours, ours.tokenizer, prompt) == ids(ref, ref.tokenizer, prompt)
    assert torch.equal(table(ours.text_encoder), table(ref.text_encoder))
    for pipe in (ours, ref):
        pipe.load_textual_inversion(vectors(2, seed=19), token="<d>")
    assert torch.equal(table(ours.text_encoder), table(ref.text_encoder))
    assert ids(ours, ours.tokenizer, "<d> <c>") == ids(ref, ref.tokenizer, "<d> <c>")


def test_unload_restores_rows_past_the_tokenizer(sd):
    """A table larger than its tokenizer (common: CLIP tables padded): loading cuts it to the
    tokenizer's size as diffusers does; unloading gives the cut rows back."""
    ours, _ = sd
    ours.text_encoder.resize_token_embeddings(len(ours.tokenizer) + 3)
    before = snapshot(ours)
    ours.load_textual_inversion(vectors(2, seed=20), token="<t>")
    assert table(ours.text_encoder).shape[0] == len(ours.tokenizer)
    ours.unload_textual_inversion()
    assert_restored(ours, before)


def test_sdxl_unload_restores_both_pairs(sdxl, tmp_path):
    ours, _ = sdxl
    before = snapshot(ours, ("", "_2"))
    path = tmp_path / "pair.safetensors"
    save_file({"clip_l": vectors(3, seed=21), "clip_g": vectors(3, seed=22)}, str(path))
    ours.load_textual_inversion(str(path))  # no token: the file's stem names it
    assert "pair_2" in ours.tokenizer_2.get_vocab() and "pair_2" in ours.tokenizer.get_vocab()
    ours.unload_textual_inversion("pair")
    assert_restored(ours, before)


def test_hub_id_from_the_cache(sd, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.file_download import repo_folder_name

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours, _ = sd
    emb = vectors(2, seed=23)
    src = diffusers_folder(tmp_path, "<hub>", emb) / "learned_embeds.safetensors"
    repo = tmp_path / "hub" / repo_folder_name(repo_id="concepts/hub-toy", repo_type="model")
    data = src.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / ("c" * 40) / "learned_embeds.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    ours.load_textual_inversion("concepts/hub-toy", cache_dir=tmp_path / "hub")
    assert torch.equal(table(ours.text_encoder)[-2:], emb)
    with pytest.raises(CheckpointNotFoundError, match="concepts/missing"):
        ours.load_textual_inversion("concepts/missing", cache_dir=tmp_path / "hub")


# ---- bad input -----------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(sd, tmp_path):
    ours, _ = sd
    before = snapshot(ours)
    with pytest.raises(InputError, match=r"'red</w>' is already in text_encoder's tokenizer"):
        ours.load_textual_inversion(vectors(1, seed=0), token="red</w>")
    ours.load_textual_inversion(vectors(2, seed=1), token="<x>")
    with pytest.raises(InputError, match=r"'<x>' is already in"):
        ours.load_textual_inversion(vectors(1, seed=0), token="<x>")
    with pytest.raises(InputError, match=r"'<x>_1' is already in"):  # a multi-vector companion
        ours.load_textual_inversion({"<x>_1": vectors(1, seed=0)})
    with pytest.raises(ShapeMismatchError, match=r"has 16 values per vector.*embeds tokens in 32"):
        ours.load_textual_inversion(vectors(1, seed=0, dim=16), token="<narrow>")
    with pytest.raises(InputError, match=r"2 embeddings were passed with 3 tokens"):
        ours.load_textual_inversion([vectors(1, 0), vectors(1, 1)], token=["<p>", "<q>", "<r>"])
    with pytest.raises(InputError, match=r"2 tokens \['<p>', '<q>'\] for an embedding of 3 vector"):
        ours.load_textual_inversion(vectors(3, seed=0), token=["<p>", "<q>"])
    with pytest.raises(InputError, match="contain duplicates"):
        ours.load_textual_inversion([vectors(1, 0), vectors(1, 1)], token=["<p>", "<p>"])
    with pytest.raises(InputError, match=r"'<p>_1' is also added by state dict #0"):
        ours.load_textual_inversion([{"<p>": vectors(2, 0)}, {"<p>_1": vectors(1, 1)}])
    with pytest.raises(InputError, match="pass token="):
        ours.load_textual_inversion(vectors(1, seed=0))
    bad = tmp_path / "other.safetensors"
    save_file({"weight": vectors(1, 0), "bias": vectors(1, 1)}, str(bad))
    with pytest.raises(CheckpointError, match=r"no textual inversion embedding found.*found keys: 'bias', 'weight'"):
        ours.load_textual_inversion(str(bad))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage.pt: not a textual inversion file: neither safetensors nor"):
        ours.load_textual_inversion(str(garbage), token="<g>")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"string_to_param": {"*": vectors(1, 0)}, "name": "<u>", "extra": NotATensor()}, unsafe)
    with pytest.raises(UnsafeCheckpointError, match="unsafe.pt: refused to unpickle"):
        ours.load_textual_inversion(str(unsafe))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "other.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="cut.safetensors: truncated"):
        ours.load_textual_inversion(str(truncated), token="<g>")
    with pytest.raises(CheckpointNotFoundError, match=r"no learned_embeds.safetensors or learned_embeds.bin.*"
                                                      r"other.safetensors, unsafe.pt \(pass weight_name"):
        ours.load_textual_inversion(str(tmp_path))
    with pytest.raises(CheckpointError, match="must be floating point"):
        ours.load_textual_inversion({"<int>": torch.ones(1, DIM, dtype=torch.long)})
    with pytest.raises(InputError, match=r"none of \['<nope>'\] is a textual inversion token here "
                                         r"\(loaded: \['<x>', '<x>_1'\]\)"):
        ours.unload_textual_inversion("<nope>")
    with pytest.raises(TypeError, match="unexpected arguments bogus"):
        ours.load_textual_inversion(vectors(1, 0), token="<b>", bogus=1)
    ours.unload_textual_inversion()
    assert_restored(ours, before)  # nothing the failed calls did is left behind


def test_optimized_pipeline_asks_for_revert(sd):
    """precision keeps the text encoders' fp32 tensors for its revert: loading on top would revert to
    a table without the new rows, so the loader asks for the revert first; after it, all is exact."""
    from types import SimpleNamespace

    ours, _ = sd
    before = snapshot(ours)
    runtime.optimize(ours, level=0, precision={"dtype": "bfloat16"})
    with pytest.raises(InputError, match=r"optimized with precision.*call pipe.optimization.revert\(\)"):
        ours.load_textual_inversion(vectors(1, 0), token="<o>")
    ours.optimization.revert()
    ours.load_textual_inversion(vectors(2, 0), token="<o>")
    loaded = table(ours.text_encoder).clone()
    runtime.optimize(ours, level=0, precision={"dtype": "bfloat16"})
    assert table(ours.text_encoder).dtype == torch.bfloat16
    with pytest.raises(InputError, match="unload_textual_inversion: this pipeline is optimized with precision"):
        ours.unload_textual_inversion()
    ours.optimization.revert()
    assert torch.equal(table(ours.text_encoder), loaded)
    ours.unload_textual_inversion()
    assert_restored(ours, before)
    ours.optimization = SimpleNamespace(applied=[SimpleNamespace(name="compile", targets=("unet",))])
    ours.load_textual_inversion(vectors(1, 0), token="<o>")  # only the UNet compiled: nothing to revert
    ours.optimization = SimpleNamespace(applied=[SimpleNamespace(name="compile", targets=("text_encoder",))])
    with pytest.raises(InputError, match="optimized with compile"):
        ours.unload_textual_inversion()
    ours.optimization = None


def test_weight_name_and_subfolder_as_in_diffusers(sd, tmp_path):
    ours, ref = sd
    (tmp_path / "embeddings").mkdir()
    a1111_pt(tmp_path / "embeddings", "<turner>", vectors(2, seed=24))
    for pipe in (ours, ref):
        pipe.load_textual_inversion(str(tmp_path), weight_name="turner.pt", subfolder="embeddings")
    assert ids(ours, ours.tokenizer, "a <turner>") == ids(ref, ref.tokenizer, "a <turner>")
    assert torch.equal(table(ours.text_encoder), table(ref.text_encoder))
    with pytest.raises(CheckpointNotFoundError, match=r"no other.pt in .*embeddings"):
        ours.load_textual_inversion(str(tmp_path), weight_name="other.pt", subfolder="embeddings")


def test_saved_pipeline_keeps_the_tokens_for_diffusers(sd, tmp_path):
    import diffusers

    ours, _ = sd
    ours.load_textual_inversion(vectors(2, seed=25), token="<saved>")
    ours.save_pretrained(tmp_path / "saved")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None)
    again = runtime.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    prompt = "a <saved> circle"
    assert ids(theirs, theirs.tokenizer, prompt) == ids(ours, ours.tokenizer, prompt)
    assert ids(again, again.tokenizer, prompt) == ids(ours, ours.tokenizer, prompt)
    assert torch.equal(table(theirs.text_encoder), table(ours.text_encoder))
    assert torch.equal(table(again.text_encoder), table(ours.text_encoder))
