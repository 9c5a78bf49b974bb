"""Output classes behave as diffusers' ``BaseOutput``: checked side by side with diffusers' own.

Each check builds our class and diffusers' with the same objects and records what a user can
observe (keys, values, tuple view, indexing, None fields, attribute/key sync, refused dict
mutations, pickling, pytree flattening); the two records must be equal.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.utils._pytree as pytree

from pipeline_fixtures import PROMPT, generator

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def _try(fn):
    """The value, or the exception's type name and message (so failures compare too)."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - recording what happens is the point
        return ("raised", type(e).__name__, str(e))


def _ident(x):
    """Objects compared by identity (the same tensors go into both classes)."""
    if isinstance(x, tuple) and x and x[0] == "ok":
        v = x[1]
        if isinstance(v, (list, tuple)):
            return ("ok", tuple(id(e) for e in v))
        return ("ok", id(v))
    return x


def observe(make, names: list[str]) -> dict:
    """What a user sees of ``make()``'s output; ``names``: every field name of the class."""
    out = make()
    rec = {
        "is_ordered_dict": isinstance(out, OrderedDict),
        "keys": list(out.keys()),
        "values": [id(v) for v in out.values()],
        "items": [(k, id(v)) for k, v in out.items()],
        "iter": list(out),
        "len": len(out),
        "to_tuple": tuple(id(v) for v in out.to_tuple()),
        "bool": bool(out),
    }
    for i in (0, 1, -1, 5):
        rec[f"[{i}]"] = _ident(_try(lambda: out[i]))
    rec["[:]"] = _ident(_try(lambda: out[:]))
    rec["[1:]"] = _ident(_try(lambda: out[1:]))
    for n in names + ["missing"]:
        rec[f"['{n}']"] = _ident(_try(lambda: out[n]))
        rec[f".{n}"] = _ident(_try(lambda: getattr(out, n)))
        rec[f"'{n}' in"] = n in out
    for what, fn in {
        "del": lambda o: o.__delitem__(names[0]),
        "pop": lambda o: o.pop(names[0]),
        "update": lambda o: o.update({names[0]: 1}),
        "setdefault": lambda o: o.setdefault(names[0], 1),
    }.items():
        o = make()
        r = _try(lambda: fn(o))
        rec[what] = (r[0], r[1]) if r[0] == "raised" else r  # messages name the class: compare the type
        rec[what + " keeps keys"] = list(o.keys())
    # attribute and key stay in sync, both ways; a None field set as attribute is not a key
    for n in names:
        o, marker = make(), torch.zeros(1)
        o.__setattr__(n, marker)
        rec[f"setattr {n}"] = (list(o.keys()), id(_try(lambda: o[n])[-1]) == id(marker), getattr(o, n) is marker)
        o, marker = make(), torch.zeros(1)
        r = _try(lambda: o.__setitem__(n, marker))
        rec[f"setitem {n}"] = (r[0], list(o.keys()), getattr(o, n) is marker)
        o = make()
        o.__setattr__(n, None)
        rec[f"setattr {n}=None"] = (list(o.keys()), getattr(o, n) is None)
    def new_key():
        o = make()
        o["extra"] = 1  # a key that is no field: allowed, and becomes an attribute
        return list(o.keys()), getattr(o, "extra", None), o.to_tuple()[-1]

    rec["new key"] = _try(new_key)
    back = pickle.loads(pickle.dumps(make()))
    rec["pickle"] = (type(back).__name__, list(back.keys()), [type(v).__name__ for v in back.values()])
    dup = copy.deepcopy(make())
    rec["deepcopy"] = (list(dup.keys()), all(torch.equal(a, b) for a, b in zip(dup.to_tuple(), make().to_tuple())
                                              if isinstance(a, torch.Tensor)))
    leaves, spec = pytree.tree_flatten(out)
    rec["pytree leaves"] = [id(v) for v in leaves]
    rebuilt = _try(lambda: pytree.tree_unflatten(leaves, spec))
    rec["pytree rebuilt"] = (type(rebuilt[1]).__name__, list(rebuilt[1].keys())) if rebuilt[0] == "ok" else rebuilt
    rec["eq self copy"] = make() == make()
    rec["repr starts"] = repr(out).split("(")[0]
    return rec


def assert_same_behaviour(ours_cls, theirs_cls, *args, **kwargs):
    import dataclasses

    names = [f.name for f in dataclasses.fields(theirs_cls)]
    assert [f.name for f in dataclasses.fields(ours_cls)][: len(names)] == names
    mine = observe(lambda: ours_cls(*args, **kwargs), names)
    want = observe(lambda: theirs_cls(*args, **kwargs), names)
    assert mine.keys() == want.keys()
    diffs = {k: (mine[k], want[k]) for k in want if mine[k] != want[k]}
    assert not diffs, diffs


T1, T2 = torch.randn(2, 3), torch.randn(2, 3)


def _pairs():
    from diffusers import ImagePipelineOutput as DImage
    from diffusers.models.autoencoders.vae import DecoderOutput as DDecoder
    from diffusers.models.modeling_outputs import AutoencoderKLOutput as DKL
    from diffusers.models.unets.unet_2d import UNet2DOutput as DUNet2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput as DUNet
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput as DSD
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput as DSDXL

    from runtime.models import outputs
    from runtime.models.unet_2d_condition import UNet2DConditionOutput
    from runtime.pipelines import output

    return {
        "UNet2DConditionOutput": (UNet2DConditionOutput, DUNet, (T1,)),
        "UNet2DOutput": (outputs.UNet2DOutput, DUNet2D, (T1,)),
        "DecoderOutput": (outputs.DecoderOutput, DDecoder, (T1,)),
        "DecoderOutput+commit_loss": (outputs.DecoderOutput, DDecoder, (T1, T2)),
        "AutoencoderKLOutput": (outputs.AutoencoderKLOutput, DKL, (T1,)),
        "ImagePipelineOutput": (output.ImagePipelineOutput, DImage, (T1,)),
        "StableDiffusionPipelineOutput(nsfw=None)": (output.StableDiffusionPipelineOutput, DSD, (T1, None)),
        "StableDiffusionPipelineOutput(nsfw)": (output.StableDiffusionPipelineOutput, DSD, (T1, [False])),
        "StableDiffusionXLPipelineOutput": (output.StableDiffusionXLPipelineOutput, DSDXL, (T1,)),
        "dict as first argument": (output.StableDiffusionPipelineOutput, DSD, ({"images": T1, "x": T2}, None)),
    }


@pytest.mark.parametrize("case", list(_pairs()))
def test_output_class_behaves_as_diffusers(case):
    ours, theirs, args = _pairs()[case]
    assert_same_behaviour(ours, theirs, *args)


@dataclasses.dataclass
class _PlainDecoderOutput:
    """What the outputs were before: a dataclass that indexes by position and name."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None

    def to_tuple(self):
        return tuple(v for v in (self.sample, self.commit_loss) if v is not None)

    def __getitem__(self, k):
        return getattr(self, k) if isinstance(k, str) else self.to_tuple()[k]

    def keys(self):
        return ["sample"]

    def values(self):
        return [self.sample]

    def items(self):
        return [("sample", self.sample)]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return 1


def test_observe_tells_classes_apart():
    """The recorder sees the difference between BaseOutput and a look-alike dataclass."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    with pytest.raises(AssertionError, match="'del'"):
        assert_same_behaviour(_PlainDecoderOutput, DecoderOutput, T1)


def test_no_fields_is_an_error_as_in_diffusers():
    import dataclasses

    from runtime.models.outputs import BaseOutput

    @dataclasses.dataclass
    class Empty(BaseOutput):
        pass

    with pytest.raises(ValueError, match="no fields"):
        Empty()


def test_clip_outputs_keep_transformers_tuple_view(sd_folder):
    """CLIP outputs share the base: None fields are no keys; out[0] is the last hidden state."""
    from transformers import CLIPTextModel as TheirCLIP

    ids = torch.tensor([[3, 40, 7]])
    ours = runtime.CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
    theirs = TheirCLIP.from_pretrained(str(sd_folder), subfolder="text_encoder")
    a, b = ours(ids), theirs(ids)
    assert list(a.keys()) == list(b.keys()) == ["last_hidden_state", "pooler_output"]
    assert len(a.to_tuple()) == len(b.to_tuple()) == 2
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    a, b = ours(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
    assert list(a.keys()) == list(b.keys())
    assert len(a[-1]) == len(b[-1]) == 3  # hidden_states: embeddings + 2 layers


# ---- what the models, the pipelines and the schedulers actually return -------------------------

def _shape_tree(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_shape_tree(v) for v in x))
    return type(x).__name__ if x is not None else None


def _returned(out) -> dict:
    return {"type": type(out).__name__, "is_dict": isinstance(out, OrderedDict),
            "keys": list(out.keys()) if isinstance(out, dict) else None,
            "tuple": _shape_tree(out.to_tuple() if isinstance(out, dict) else out)}


def test_model_calls_return_what_diffusers_returns(sd_folder):
    import diffusers

    unet = runtime.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    vae = runtime.AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    ref_vae = diffusers.AutoencoderKL.from_pretrained(str(sd_folder), subfolder="vae")
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 5, 32)
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for rd in (True, False):
            a, b = unet(x, t, cond, return_dict=rd), ref_unet(x, t, cond, return_dict=rd)
            assert _returned(a) == _returned(b)
            torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)
            assert _returned(vae.decode(x, return_dict=rd)) == _returned(ref_vae.decode(x, return_dict=rd))
            a, b = vae.encode(image, return_dict=rd), ref_vae.encode(image, return_dict=rd)
            assert (type(a).__name__, list(a.keys()) if rd else len(a)) == (type(b).__name__, list(b.keys()) if rd else len(b))
        out = unet(x, t, cond)
        assert out["sample"] is out.sample is out[0] and out.to_tuple() == (out.sample,)


@pytest.fixture(scope="module")
def sd_pipes(sd_folder):
    import diffusers

    ours = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("output_type", ["latent", "np"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_sd_pipeline_returns_what_diffusers_returns(sd_pipes, return_dict, output_type):
    got = [_returned(p(PROMPT, num_inference_steps=1, generator=generator(), output_type=output_type,
                        return_dict=return_dict)) for p in sd_pipes]
    assert got[0] == got[1]
    if return_dict:
        assert got[0]["keys"] == ["images"]  # nsfw_content_detected None: no key, not in the tuple
    else:
        assert got[0]["tuple"][0] == "tuple" and got[0]["tuple"][1][1] is None  # (images, None)


@pytest.mark.parametrize("return_dict", [True, False])
def test_sdxl_pipeline_returns_what_diffusers_returns(sdxl_folder, return_dict):
    import diffusers

    ours = runtime.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    got = []
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
        got.append(_returned(p(PROMPT, num_inference_steps=1, generator=generator(), output_type="latent",
                               height=16, width=16, return_dict=return_dict)))
    assert got[0] == got[1]
    assert got[0]["type"] == ("StableDiffusionXLPipelineOutput" if return_dict else "tuple")


def test_ddpm_pipeline_returns_what_diffusers_returns(ddpm_folder):
    import diffusers

    ours = runtime.DDPMPipeline.from_pretrained(ddpm_folder)
    theirs = diffusers.DDPMPipeline.from_pretrained(str(ddpm_folder))
    for rd in (True, False):
        got = []
        for p in (ours, theirs):
            p.set_progress_bar_config(disable=True)
            got.append(_returned(p(num_inference_steps=1, generator=generator(), output_type="np", return_dict=rd)))
        assert got[0] == got[1]


SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler", "LCMScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_step_output_behaves_as_diffusers(sd_folder, name):
    """The step outputs (runtime/schedulers/outputs.py) are built on the one BaseOutput."""
    import diffusers

    ours = getattr(runtime, name).from_pretrained(sd_folder, subfolder="scheduler")
    theirs = getattr(diffusers, name).from_pretrained(str(sd_folder), subfolder="scheduler")
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(4)
        outs.append(s.step(eps, s.timesteps[-1], x, generator=torch.Generator().manual_seed(0))
                    if name == "LCMScheduler" else s.step(eps, s.timesteps[0], x))
    a, b = outs
    torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-4, rtol=0)
    assert a[0] is a.prev_sample
    assert isinstance(a, OrderedDict)
    assert list(a.keys()) == list(b.keys())
    assert len(a.to_tuple()) == len(b.to_tuple())
    assert [type(v) for v in a.values()] == [type(v) for v in b.values()]
