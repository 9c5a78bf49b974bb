"""Bad input that diffusers lets through silently: NaN/inf scalars, over-long prompts, huge sizes.

Each is an error naming the argument (or, for prompts, a warning quoting what was cut, checked
against diffusers' own warning), and each check also shows that the good neighbouring input
still behaves as diffusers does.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, TOL, generator, test_image

import runtime
from runtime.errors import InputError
from runtime.pipelines import checks

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = " ".join(["red"] * 80 + ["blue", "circle"])  # 84 tokens with <bos>/<eos>: 7 past the limit
WANT_CUT = "red red red red red blue circle"


@pytest.fixture(scope="module")
def sd(sd_folder):
    import diffusers

    ours = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    import diffusers

    ours = runtime.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def _sd_tasks(pipe):
    image, mask = test_image()
    return {
        "text2image": (pipe, {}),
        "img2img": (runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe), {"image": image}),
        "inpaint": (runtime.StableDiffusionInpaintPipeline.from_pipe(pipe), {"image": image, "mask_image": mask}),
    }


def _sdxl_tasks(pipe):
    image, mask = test_image()
    return {
        "sdxl": (pipe, {"height": 16, "width": 16}),
        "sdxl_img2img": (runtime.StableDiffusionXLImg2ImgPipeline.from_pipe(pipe), {"image": image}),
        "sdxl_inpaint": (runtime.StableDiffusionXLInpaintPipeline.from_pipe(pipe), {"image": image, "mask_image": mask}),
    }


BAD = [float("nan"), float("inf"), float("-inf"), np.float32("nan"), torch.tensor(float("nan"))]


# ---- NaN / inf scalars ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["guidance_scale", "eta", "guidance_rescale"])
@pytest.mark.parametrize("bad", BAD[:3])
def test_non_finite_scalars_are_errors_for_every_sd_task(sd, sdxl, name, bad):
    tasks = {**_sd_tasks(sd[0]), **_sdxl_tasks(sdxl[0])}
    for task, (pipe, kw) in tasks.items():
        if name == "guidance_rescale" and task in ("text2image", "img2img", "inpaint"):
            continue  # diffusers' SD img2img/inpaint take no guidance_rescale; SD text2image does (below)
        with pytest.raises(InputError, match=f"^{name} must be a finite number, got {bad}"):
            pipe(PROMPT, num_inference_steps=2, output_type="latent", **{name: bad}, **kw)
    if name == "guidance_rescale":
        with pytest.raises(InputError, match=f"^guidance_rescale must be a finite number, got {bad}"):
            sd[0](PROMPT, num_inference_steps=2, output_type="latent", guidance_rescale=bad)


@pytest.mark.parametrize("bad", BAD[3:])
def test_non_finite_numpy_and_tensor_guidance(sd, bad):
    with pytest.raises(InputError, match="^guidance_scale must be a finite number"):
        sd[0](PROMPT, num_inference_steps=1, guidance_scale=bad)


def test_nan_guidance_is_what_diffusers_lets_through(sd):
    """The case the check exists for: diffusers runs guidance_scale=NaN as 'no guidance'."""
    ours, theirs = sd
    nan_image = theirs(PROMPT, num_inference_steps=1, guidance_scale=float("nan"), generator=generator(),
                       output_type="latent").images
    unguided = theirs(PROMPT, num_inference_steps=1, guidance_scale=1.0, generator=generator(),
                      output_type="latent").images
    assert torch.isfinite(nan_image).all() and torch.equal(nan_image, unguided)
    with pytest.raises(InputError, match="guidance_scale"):
        ours(PROMPT, num_inference_steps=1, guidance_scale=float("nan"))


def test_finite_numpy_scalars_still_work_as_in_diffusers(sd):
    ours, theirs = sd
    image, _ = test_image()
    img2img = [runtime.StableDiffusionImg2ImgPipeline.from_pipe(ours)]
    import diffusers

    img2img.append(diffusers.StableDiffusionImg2ImgPipeline.from_pipe(theirs))
    got = [p(PROMPT, image=image, strength=np.float32(0.75), guidance_scale=np.float64(6.0), eta=np.float32(0.5),
             num_inference_steps=4, generator=generator(), output_type="latent").images for p in img2img]
    assert (got[0] - got[1]).abs().max() <= TOL
    got = [p(PROMPT, guidance_scale=torch.tensor(3.0), guidance_rescale=0.7, num_inference_steps=2,
             generator=generator(), output_type="latent").images for p in sd]
    assert (got[0] - got[1]).abs().max() <= TOL


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_strength(sd, bad):
    for task in ("img2img", "inpaint"):
        pipe, kw = _sd_tasks(sd[0])[task]
        with pytest.raises(InputError, match=f"strength must be in \\[0, 1\\], got {bad}"):
            pipe(PROMPT, strength=bad, num_inference_steps=2, **kw)


def test_non_finite_aesthetic_score(sdxl):
    pipe, kw = _sdxl_tasks(sdxl[0])["sdxl_img2img"]
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        with pytest.raises(InputError, match=f"^{name} must be a finite number, got nan"):
            pipe(PROMPT, num_inference_steps=2, **{name: float("nan")}, **kw)


def test_ddpm_eta(ddpm_folder):
    pipe = runtime.DDPMPipeline.from_pretrained(ddpm_folder)
    with pytest.raises(InputError, match="^eta must be a finite number, got nan"):
        pipe(num_inference_steps=1, eta=float("nan"))


def test_not_a_number_at_all(sd):
    with pytest.raises(InputError, match="^guidance_scale must be a real number, got 'high'"):
        sd[0](PROMPT, num_inference_steps=1, guidance_scale="high")


# ---- prompts past the text encoder's 77 tokens -------------------------------------------------

class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run_logged(pipe, logger_name, **kwargs) -> tuple[list[str], torch.Tensor]:
    """The truncation warnings ``pipe(**kwargs)`` logs on ``logger_name`` (diffusers' does not propagate)."""
    handler, logger = _Catch(), logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left
    try:
        out = pipe(num_inference_steps=1, generator=generator(), output_type="latent", **kwargs).images
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [m for m in handler.messages if "truncated" in m], out


def _quoted(message: str) -> list[str]:
    head, _, listed = message.partition(" tokens: ")
    assert re.search(r"because CLIP can only handle sequences up to 77$", head), message
    return eval(listed, {})  # the message quotes a Python list of strings, as diffusers' does


def test_long_prompt_warns_as_diffusers_does(sd, caplog):
    ours, theirs = sd
    with caplog.at_level(logging.WARNING, logger="runtime"):
        mine, out = _run_logged(ours, "runtime", prompt=LONG)
    warned = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warned) == 1 and warned[0].name == "runtime.pipelines.prompts" and warned[0].levelno == logging.WARNING
    want, ref = _run_logged(theirs, "diffusers", prompt=LONG)
    assert len(want) == 1 and mine == want  # the same sentence, the same quoted cut
    assert _quoted(mine[0]) == [WANT_CUT]
    assert (out - ref).abs().max() <= TOL


def test_prompt_within_the_limit_does_not_warn(sd):
    exact = " ".join(["red"] * 75)  # 75 + <bos> + <eos> = 77
    assert _run_logged(sd[0], "runtime", prompt=exact)[0] == []
    assert _run_logged(sd[1], "diffusers", prompt=exact)[0] == []


def test_long_negative_prompt_warns_naming_it(sd):
    """diffusers cuts a long negative_prompt silently; we warn, quoting what diffusers quotes for
    the same text as a prompt, and the images still agree."""
    ours, theirs = sd
    mine, out = _run_logged(ours, "runtime", prompt=PROMPT, negative_prompt=LONG)
    assert len(mine) == 1 and "(negative_prompt)" in mine[0]
    silent, ref = _run_logged(theirs, "diffusers", prompt=PROMPT, negative_prompt=LONG)
    assert silent == []
    as_prompt, _ = _run_logged(theirs, "diffusers", prompt=LONG)
    assert _quoted(mine[0]) == _quoted(as_prompt[0]) == [WANT_CUT]
    assert (out - ref).abs().max() <= TOL


def test_batch_quotes_only_the_prompts_that_were_cut(sd):
    ours, theirs = sd
    mine, out = _run_logged(ours, "runtime", prompt=[PROMPT, LONG])
    want, ref = _run_logged(theirs, "diffusers", prompt=[PROMPT, LONG])
    # diffusers quotes one entry per prompt (the short one's is padding); ours only the cut one
    assert len(_quoted(want[0])) == 2 and _quoted(want[0])[1] == WANT_CUT
    assert _quoted(mine[0]) == [WANT_CUT]
    assert (out - ref).abs().max() <= TOL


def test_sdxl_long_prompt_2_warns_as_diffusers_does(sdxl):
    ours, theirs = sdxl
    kw = dict(prompt=PROMPT, prompt_2=LONG, height=16, width=16)
    mine, out = _run_logged(ours, "runtime", **kw)
    want, ref = _run_logged(theirs, "diffusers", **kw)
    assert len(mine) == len(want) == 1 and "(prompt_2)" in mine[0]
    assert _quoted(mine[0]) == _quoted(want[0]) == [WANT_CUT]
    assert (out - ref).abs().max() <= TOL
    # prompt alone feeds both encoders: two warnings, in diffusers too
    mine, _ = _run_logged(ours, "runtime", prompt=LONG, height=16, width=16)
    want, _ = _run_logged(theirs, "diffusers", prompt=LONG, height=16, width=16)
    assert mine == want and len(mine) == 2


def test_sdxl_long_negative_prompts_warn(sdxl):
    ours, theirs = sdxl
    kw = dict(prompt=PROMPT, negative_prompt=LONG, negative_prompt_2="blue " + LONG, height=16, width=16)
    mine, out = _run_logged(ours, "runtime", **kw)
    assert [_quoted(m) for m in mine] == [[WANT_CUT], ["red " + WANT_CUT]]
    assert "(negative_prompt)" in mine[0] and "(negative_prompt_2)" in mine[1]
    _, ref = _run_logged(theirs, "diffusers", **kw)
    assert (out - ref).abs().max() <= TOL


# ---- sizes that cannot fit -----------------------------------------------------------------

def test_huge_size_is_refused_before_allocating(sd, monkeypatch):
    import runtime.pipelines.sd_base as sd_base

    def no_alloc(*a, **k):
        raise AssertionError("latents were allocated")

    monkeypatch.setattr(sd_base, "randn_tensor", no_alloc)
    monkeypatch.setattr(sd[0].unet, "forward", no_alloc)
    with pytest.raises(InputError) as info:
        sd[0](PROMPT, height=100000, width=100000, num_inference_steps=1)
    message = str(info.value)
    assert message.startswith("height=100000, width=100000 for 1 image(s) needs about ")
    assert "GiB" in message and "Estimate: latents" in message and "VAE decode" in message
    assert ("available (MemAvailable in /proc/meminfo)" in message) == (checks.available_memory(
        torch.device("cpu"))[0] is not None)


def test_memory_estimate_basis_and_size_that_works():
    """SD 1.5's VAE at 1024x1024 fp32: ~3 GiB, well inside 24 GiB; the numbers follow the stated basis."""
    latents, decode, basis = checks.generation_bytes(
        images=1, height=1024, width=1024, factor=8, latent_channels=4,
        vae_block_out_channels=[128, 256, 512, 512], vae_itemsize=4, decode=True)
    assert latents == 4 * 4 * 128 * 128 * 4
    assert decode == 3 * 256 * 1024 * 1024 * 4  # 256 channels at full resolution, 3 alive
    assert "256 channels x 1024 x 1024" in basis
    checks.check_memory(height=1024, width=1024, images=1, factor=8, latent_channels=4,
                        vae_block_out_channels=[128, 256, 512, 512], vae_itemsize=4, decode=True,
                        device=torch.device("meta"))  # unmeasured: the 256 GiB bound lets it through
    assert checks.generation_bytes(images=1, height=1024, width=1024, factor=8, latent_channels=4,
                                   vae_block_out_channels=[128, 256, 512, 512], vae_itemsize=4,
                                   decode=False)[1] == 0


def test_memory_comparison_uses_what_is_available(sd, monkeypatch):
    ours, theirs = sd
    gib = 2**30
    monkeypatch.setattr(checks, "available_memory", lambda device: (24 * gib, "faked 24 GiB"))
    # 1024x1024 on this tiny VAE (64 full-res channels): ~0.75 GiB estimated, runs at output_type="latent"
    # too; a 64x64 request runs and matches diffusers
    checks.check_memory(height=1024, width=1024, images=1, factor=2, latent_channels=4,
                        vae_block_out_channels=[32, 64], vae_itemsize=4, decode=True, device=torch.device("cpu"))
    out = ours(PROMPT, height=64, width=64, num_inference_steps=1, generator=generator(), output_type="latent")
    ref = theirs(PROMPT, height=64, width=64, num_inference_steps=1, generator=generator(), output_type="latent")
    assert (out.images - ref.images).abs().max() <= TOL
    monkeypatch.setattr(checks, "available_memory", lambda device: (gib // 4, "faked"))
    with pytest.raises(InputError, match=r"height=1024, width=1024 for 2 image\(s\) needs about 1\.5 GiB, "
                                         r"more than 0\.2 GiB available \(faked\)"):
        ours(PROMPT, height=1024, width=1024, num_images_per_prompt=2, num_inference_steps=1)
    # latents only (no decode) are far smaller: the same size passes the check
    checks.check_memory(height=1024, width=1024, images=2, factor=2, latent_channels=4,
                        vae_block_out_channels=[32, 64], vae_itemsize=4, decode=False, device=torch.device("cpu"))


def test_unreadable_memory_falls_back_to_a_bound(monkeypatch):
    monkeypatch.setattr(checks, "available_memory", lambda device: (None, "no reading here"))
    with pytest.raises(InputError, match=r"more than the 256\.0 GiB bound used when memory cannot be read "
                                         r"\(no reading here\)"):
        checks.check_memory(height=100000, width=100000, images=1, factor=8, latent_channels=4,
                            vae_block_out_channels=[128, 256, 512, 512], vae_itemsize=2, decode=True,
                            device=torch.device("cpu"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/meminfo"), reason="Linux /proc/meminfo only")
def test_available_memory_reads_meminfo():
    value, source = checks.available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert source == "MemAvailable in /proc/meminfo"
    assert abs(value - kib * 1024) < 2**30  # read a moment apart
