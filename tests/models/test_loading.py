"""from_pretrained: round trips in each dtype, dtype casting, meta-device build, buffers, key
renaming hooks, and interop with diffusers' own save/load on a real UNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.models import ModelMixin, register_to_config
from runtime.models.errors import InputError
from toy_model import HookedToyModel, ToyModel, assert_state_equal, make_toy

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_bit_equal(tmp_path, dtype):
    model = make_toy(width=6).to(dtype)
    model.save_pretrained(tmp_path / "m")
    loaded = ToyModel.from_pretrained(tmp_path / "m", dtype=dtype)
    assert_state_equal(model, loaded)
    assert loaded.proj.weight.dtype == dtype and loaded.scale.dtype == dtype
    assert not loaded.training
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids, image = torch.tensor([[0, 3, 4]]), torch.randn(1, 3, 5, 5, dtype=dtype)
    for ours, ref in zip(loaded(ids, image), model(ids, image)):
        assert torch.equal(ours, ref)


def test_default_dtype_upcasts_like_diffusers(tmp_path):
    """Without dtype, floats come back in the dtype the model is built in (fp32), as diffusers does."""
    half = make_toy().half()
    half.save_pretrained(tmp_path / "m")
    loaded = ToyModel.from_pretrained(tmp_path / "m")
    assert loaded.proj.weight.dtype == torch.float32
    assert torch.equal(loaded.proj.weight, half.proj.weight.float())
    assert loaded.positions.dtype == torch.int64  # integer buffers keep their dtype


@pytest.mark.parametrize("kwarg", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bfloat16"], ids=str)
def test_dtype_cast_and_alias(tmp_path, kwarg, dtype):
    model = make_toy()
    model.save_pretrained(tmp_path / "m")
    loaded = ToyModel.from_pretrained(tmp_path / "m", **{kwarg: dtype})
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert torch.equal(loaded.proj.weight, model.proj.weight.to(want))


def test_dtype_and_torch_dtype_must_agree(tmp_path):
    make_toy().save_pretrained(tmp_path / "m")
    assert ToyModel.from_pretrained(tmp_path / "m", dtype=torch.float16, torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(InputError, match="disagree"):
        ToyModel.from_pretrained(tmp_path / "m", dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(InputError, match="float17"):
        ToyModel.from_pretrained(tmp_path / "m", dtype="float17")


def test_builds_on_meta_and_assigns_mmapped_tensors(tmp_path, monkeypatch):
    """No parameter is allocated or initialised before loading: construction happens on meta."""
    make_toy().save_pretrained(tmp_path / "m")
    seen = []
    original = nn.Linear.reset_parameters

    def spy(self):
        seen.append(self.weight.device.type)
        original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    ToyModel.from_pretrained(tmp_path / "m")
    assert seen and set(seen) == {"meta"}


def test_non_persistent_buffer_from_hook_or_rebuild(tmp_path):
    make_toy(width=7).save_pretrained(tmp_path / "m")
    plain = ToyModel.from_pretrained(tmp_path / "m")  # fallback: buffers from a parameter-less rebuild
    assert torch.equal(plain.positions, torch.arange(7) * 2)
    HookedToyModel.init_calls = 0
    hooked = HookedToyModel.from_pretrained(tmp_path / "m")
    assert HookedToyModel.init_calls == 1
    assert torch.equal(hooked.positions, torch.arange(7) * 2)


def test_low_cpu_mem_usage_false_gives_same_model(tmp_path):
    model = make_toy()
    model.save_pretrained(tmp_path / "m")
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "m", low_cpu_mem_usage=False))
    half = ToyModel.from_pretrained(tmp_path / "m", low_cpu_mem_usage=False, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_subfolder_and_config_override(tmp_path):
    model = make_toy(width=4)
    model.save_pretrained(tmp_path / "pipe" / "unet")
    loaded = ToyModel.from_pretrained(tmp_path / "pipe", subfolder="unet")
    assert_state_equal(model, loaded)
    assert loaded.config["_name_or_path"] == str(tmp_path / "pipe")


class RenamingModel(ModelMixin):
    """Accepts an old key layout through a pre-hook, as the CLIP encoders do."""

    @register_to_config
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_load_state_dict_pre_hook(self._rename)

    @staticmethod
    def _rename(module, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + "old_proj.")]:
            state_dict[prefix + "proj." + key[len(prefix + "old_proj."):]] = state_dict.pop(key)


def test_key_renaming_hook_runs_before_missing_key_check(tmp_path, caplog):
    from safetensors.torch import save_file

    model = RenamingModel()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    renamed = {"old_" + k: v.clone() for k, v in model.state_dict().items()}
    save_file(renamed, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = RenamingModel.from_pretrained(folder, dtype=torch.float16)
    assert torch.equal(loaded.proj.weight, model.proj.weight.half())
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_gradient_checkpointing_flags():
    model = make_toy()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.block.gradient_checkpointing and model.is_gradient_checkpointing
    model.disable_gradient_checkpointing()
    assert not model.block.gradient_checkpointing and not model.is_gradient_checkpointing


def test_num_parameters():
    model = make_toy(width=6, channels=2, vocab=5)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - 5 * 6
    model.proj.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == total - (6 * 6 + 6)
    tied = make_toy(width=6, vocab=6)
    before = tied.num_parameters()
    tied.embed.weight = tied.proj.weight  # a shared parameter counts once
    assert tied.num_parameters() == before - 36


# ---- interop with diffusers on a real network (the UNet helper's model) ------------------------
diffusers = pytest.importorskip("diffusers")


def _tiny_unets():
    unet_module = pytest.importorskip("runtime.models.unet_2d_condition")
    from tiny_configs import UNET_CONFIGS

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**UNET_CONFIGS["sd1"]).eval()
    return theirs, unet_module.UNet2DConditionModel


def _unet_inputs():
    torch.manual_seed(1)
    return torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 3, 24)


@pytest.mark.parametrize("variant,shard", [(None, "10GB"), ("fp16", "60KB")])
def test_diffusers_saved_unet_loads_through_ours_and_back(tmp_path, variant, shard):
    theirs, Ours = _tiny_unets()
    theirs.save_pretrained(tmp_path / "theirs", variant=variant, max_shard_size=shard)
    if shard != "10GB":
        assert len(list((tmp_path / "theirs").glob("*-of-*.safetensors"))) > 1
    ours = Ours.from_pretrained(tmp_path / "theirs", variant=variant)
    assert_state_equal(theirs, ours)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        ref = theirs(x, t, ctx).sample
        torch.testing.assert_close(ours(x, t, ctx).sample, ref, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours", variant=variant, max_shard_size=shard)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours", variant=variant).eval()
    assert_state_equal(theirs, back)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "theirs").iterdir())


def test_parameters_on_meta_only_affects_its_own_thread():
    import threading

    from runtime.models.meta_build import parameters_on_meta

    inside, outside = threading.Event(), threading.Event()
    devices = {}

    def other_thread():
        inside.wait()
        devices["other"] = nn.Linear(2, 2).weight.device.type
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with parameters_on_meta():
        layer = nn.Linear(2, 2)
        layer.register_buffer("b", torch.ones(2))
        inside.set()
        outside.wait(timeout=30)
    thread.join()
    assert layer.weight.is_meta and not layer.b.is_meta
    assert devices["other"] == "cpu"
    assert not nn.Linear(2, 2).weight.is_meta  # restored afterwards


def test_unrecoverable_meta_buffer_is_an_error_naming_it():
    from runtime.models.errors import CheckpointError
    from runtime.models.weight_loading import load_weights

    model = make_toy(width=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        empty = ToyModel(width=4)
    with pytest.raises(CheckpointError, match="positions"):
        load_weights(empty, state, source="ckpt.safetensors", rebuild=None)


def test_skip_init_on_meta_changes_nothing_for_real_tensors():
    from runtime.models.meta_build import skip_init_on_meta

    original = nn.init.kaiming_uniform_
    torch.manual_seed(3)
    reference = nn.Linear(5, 4).weight.detach().clone()
    with skip_init_on_meta():
        assert nn.init.kaiming_uniform_ is not original
        torch.manual_seed(3)
        assert torch.equal(nn.Linear(5, 4).weight, reference)
        meta = torch.empty(3, 3, device="meta")
        assert nn.init.normal_(meta) is meta
    assert nn.init.kaiming_uniform_ is original
