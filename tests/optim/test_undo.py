"""The layers' compute slots, the passes' one undo log and the derived-weight rule: the default is
torch's operator bit for bit, the chain order is ORDER's whatever the order passes ran in, applying
and reverting ten times leaves no residue, a revert that fails halfway names what it could not
restore."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from runtime import optim
from runtime.models.layers import Conv2d, Linear
from runtime.optim.derived import derived
from runtime.optim.levels import PASSES
from runtime.optim.undo import ORDER, RevertError, UndoLog, chain_with, entry
from runtime.optim.winograd import kernel_ready

# these plug the fp32 Winograd kernel into the tiny fp32 pipeline: a CPU with AVX-512 (and a compiler)
needs_winograd = pytest.mark.skipif(kernel_ready(torch.float32) is not None,
                                    reason=f"the fp32 Winograd kernel: {kernel_ready(torch.float32)}")
from pipeline_fixtures import quiet_pipeline

PROMPT = "a red circle on a blue square"


def run(pipe, steps=4):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


# ---- the layers -------------------------------------------------------------------------------------
def test_empty_slot_is_torchs_operator_bit_for_bit_and_loads_the_same_keys():
    torch.manual_seed(0)
    plain_conv, plain_linear = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(8, 16)
    conv, linear = Conv2d(8, 16, 3, padding=1), Linear(8, 16)
    conv.load_state_dict(plain_conv.state_dict())
    linear.load_state_dict(plain_linear.state_dict())
    assert list(conv.state_dict()) == list(plain_conv.state_dict())
    x, t = torch.randn(2, 8, 9, 7), torch.randn(3, 5, 8)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert torch.equal(linear(t), F.linear(t, linear.weight, linear.bias))
    assert conv.compute == () and "_compute" not in conv.__dict__


def test_chain_runs_in_order_hands_on_and_empties_cleanly():
    conv = Conv2d(4, 4, 3, padding=1)
    calls = []

    def tagged(tag):
        def impl(layer, x, rest, add):
            calls.append(tag)
            return rest(x, add)
        return impl

    log = UndoLog("test")
    # plugged innermost first: the chain still runs in ORDER
    log.plug(conv, "prepack", tagged("prepack"))
    log.plug(conv, "winograd", tagged("winograd"))
    log.plug(conv, "lora", tagged("lora"))
    assert [n for n, _ in conv.compute] == [n for n in ORDER if n in ("lora", "winograd", "prepack")]
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert calls == ["lora", "winograd", "prepack"]
    with pytest.raises(ValueError, match="already has"):
        chain_with(conv.compute, "prepack", tagged("again"))
    with pytest.raises(ValueError, match="no place"):
        chain_with((), "mystery", tagged("x"))
    log.replay()
    assert conv.compute == () and not {"_compute", "_chain"} & set(conv.__dict__)


@pytest.mark.parametrize("layer", [Conv2d(4, 6, 3, padding=1), Linear(4, 6)], ids=["conv", "linear"])
def test_add_input_is_the_residual_sum_bit_for_bit_through_any_chain(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5) if isinstance(layer, Conv2d) else torch.randn(2, 3, 4)
    out = layer(x)
    add = torch.randn_like(out)
    assert torch.equal(layer(x, add=add), out + add)

    def hands_on(layer, x, rest, add):  # passes the add on: the plain operator adds it
        return rest(x, add)

    def takes(layer, x, rest, add):  # takes the add itself
        y = rest(x)
        return y if add is None else add + y

    for chain in ((("a", hands_on),), (("a", takes),), (("a", hands_on), ("b", takes))):
        layer.compute = chain
        assert torch.equal(layer(x, add=add), out + add) and torch.equal(layer(x), out)
    layer.compute = ()


def test_computes_operator_only_while_every_entry_says_it_computes_the_layers_operator():
    linear = Linear(4, 4)

    def same(layer, x, rest, add):
        return rest(x, add)

    same.same_operator = True

    def extra(layer, x, rest, add):
        return rest(x, add) + 1

    assert linear.computes_operator()
    linear.compute = (("prepack", same),)
    assert linear.computes_operator()
    linear.compute = (("lora", extra), ("prepack", same))
    assert not linear.computes_operator()
    linear.compute = ()
    assert linear.computes_operator()


def test_side_terms_and_fused_outputs_add_only_what_additive_entries_add():
    from runtime.models.layers import fused_outputs

    torch.manual_seed(0)
    parts = [Linear(6, 4) for _ in range(3)]
    fused = Linear(6, 12)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    x = torch.randn(2, 5, 6)
    term = torch.randn(4)

    class Adds:  # rest(x) + term, and the term alone
        def __call__(self, layer, x, rest, add=None):
            out = rest(x) + term
            return out if add is None else add + out

        def add_term(self, layer, out, x):
            return out + term

    def other(layer, x, rest, add=None):  # changes the operator another way: no delta
        return rest(x, add) * 2

    def same(layer, x, rest, add=None):
        return rest(x, add)

    same.same_operator = True
    assert parts[0].side_terms() == []
    parts[1].compute = (("lora", Adds()), ("prepack", same))
    assert len(parts[1].side_terms()) == 1 and not parts[1].computes_operator()
    with torch.no_grad():
        got = fused_outputs(fused, parts, x)
        want = [p(x) for p in parts]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    parts[2].compute = (("lora", other),)
    assert parts[2].side_terms() is None and fused_outputs(fused, parts, x) is None
    for p in parts:
        p.compute = ()


# ---- the undo log ---------------------------------------------------------------------------------------
def test_set_restores_instance_values_and_class_defaults():
    class Thing:
        default = "class"

    thing = Thing()
    thing.own = 1
    log = UndoLog("test")
    log.set(thing, "own", 2)
    log.set(thing, "default", "instance")
    log.set(thing, "new", 3)
    log.replay()
    assert vars(thing) == {"own": 1} and thing.default == "class"


def test_a_revert_that_fails_halfway_names_what_it_could_not_restore():
    class Stubborn:
        def __init__(self):
            self.__dict__["locked"] = False
            self.value = 0

        def __setattr__(self, name, value):
            if self.__dict__.get("locked") and name == "value":
                raise AttributeError("value is locked")
            self.__dict__[name] = value

    first, second = Stubborn(), Stubborn()
    log = UndoLog("pass 'demo'")
    log.set(first, "value", 1)
    log.set(second, "value", 2)
    second.__dict__["locked"] = True
    with pytest.raises(RevertError, match=r"pass 'demo'.*could not restore 1 change.*Stubborn\.value.*locked") as err:
        log.replay()
    assert [what for what, _ in err.value.failed] == ["Stubborn.value"]
    assert first.value == 0  # the rest was restored
    assert len(log) == 1  # what failed stays in the log


@needs_winograd
def test_pipeline_revert_that_fails_names_the_pass_and_the_slot(pipe):
    optim.optimize(pipe, level=0, prepack={"fp32": True}, winograd=True)
    assert "winograd" in [p.name for p in pipe.optimization.applied]
    conv = next(m for m in pipe.unet.modules() if entry(m, "winograd") is not None)
    conv.compute = tuple(e for e in conv.compute if e[0] != "winograd")  # changed behind the log's back
    with pytest.raises(RevertError, match=r"winograd: Conv2d\.compute\['winograd'\]"):
        pipe.optimization.revert()
    # everything else was restored
    assert not any(getattr(m, "compute", ()) for model in (pipe.unet, pipe.vae, pipe.text_encoder)
                   for m in model.modules())
    pipe.optimization = None


@needs_winograd
def test_a_pass_that_fails_in_apply_leaves_nothing_behind(pipe, monkeypatch):
    before = fingerprint(pipe)
    from runtime.optim import winograd

    calls = {"n": 0}
    real = winograd.WinogradConv

    def failing():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(winograd, "WinogradConv", failing)
    with pytest.raises(RuntimeError, match="boom"):
        optim.optimize(pipe, level=0, attention=True, winograd=True)
    assert fingerprint(pipe) == before


# ---- residue and order ------------------------------------------------------------------------------------
def fingerprint(pipe) -> dict:
    """Every module's own attributes (by identity), slots, hooks, parameters and buffers (by storage)."""
    out = {}
    for name, model in optim.components.pipeline_models(pipe).items():
        for path, m in model.named_modules():
            attrs = {}
            for key, value in vars(m).items():
                if key in ("_parameters", "_buffers", "_modules"):
                    continue
                if key == "_announcer":  # the pipeline's step announcer: made by the first call, not by a pass
                    continue
                if isinstance(value, dict) and ("hook" in key or key.startswith("_state_dict")):
                    attrs[key] = len(value)
                elif isinstance(value, (bool, int, float, str, type(None))):
                    attrs[key] = value
                else:
                    attrs[key] = id(value)
            params = {k: (p.data_ptr(), p.dtype, id(p)) for k, p in m._parameters.items() if p is not None}
            buffers = {k: (b.data_ptr(), b.dtype) for k, b in m._buffers.items() if b is not None}
            out[f"{name}.{path}"] = (type(m).__name__, attrs, params, buffers, sorted(m._modules))
    return out


def test_apply_revert_ten_times_leaves_no_residue(pipe):
    run(pipe, steps=2)  # the first call makes the step announcer
    before = fingerprint(pipe)
    everything = dict(prepack={"fp32": True}, tome={"max_downsample": 2}, compile=False)
    for i in range(10):
        optim.optimize(pipe, level=3 if i % 2 else 1, **everything)
        if i in (0, 9):
            run(pipe, steps=2)
        pipe.optimization.revert()
        assert fingerprint(pipe) == before, f"residue after round {i + 1}"


# Orders the plan allows: precision before anything that reads dtypes, fused_qkv before prepack (it
# packs the fused projection), upsample before winograd (which takes its conv_2x); the rest free.
# precision before the passes that measure which implementation runs (they decide per dtype: dispatch.py)
BEFORE = [("precision", "prepack"), ("precision", "winograd"), ("precision", "geglu"), ("precision", "attention"),
          ("fused_qkv", "prepack"), ("fused_qkv", "geglu"), ("upsample", "winograd")]


def allowed_orders(names, count, seed=0):
    rng = random.Random(seed)
    orders = []
    while len(orders) < count:
        order = names[:]
        rng.shuffle(order)
        if all(order.index(a) < order.index(b) for a, b in BEFORE if a in order and b in order):
            orders.append(order)
    return orders


def apply_in(pipe, order, settings):
    passes = [PASSES[n].with_settings(settings.get(n, {})) for n in order]
    applied = []
    for p in passes:
        if p.supports(pipe) is None:
            p.apply(pipe)
            applied.append(p)
    return applied


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_any_order_the_plan_allows_gives_the_same_result(pipe, dtype, host_without_amx):
    if dtype == "bfloat16" and not optim.hardware.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    names = ["attention", "fused_qkv", "geglu", "group_norm", "upsample", "prepack", "winograd", "tome", "tgate",
             "deepcache"] + (["precision"] if dtype == "bfloat16" else [])
    settings = {"prepack": {"fp32": True}, "tome": {"max_downsample": 2}, "precision": {"dtype": dtype}}
    plan_order = [n for n in PASSES if n in names]
    results, chains = [], []
    for order in [plan_order, *allowed_orders(names, 3)]:
        applied = apply_in(pipe, order, settings)
        try:
            chains.append({k: [n for n, _ in m.compute] for k, m in pipe.unet.named_modules() if getattr(m, "compute", ())})
            results.append(run(pipe))
        finally:
            for p in reversed(applied):
                p.revert(pipe)
    assert chains[0] and all(c == chains[0] for c in chains)
    assert all(np.array_equal(r, results[0]) for r in results)


# ---- the derived-weight rule ---------------------------------------------------------------------------------
def test_derived_copies_follow_in_place_edits_and_new_storage_but_not_data_edits():
    w = torch.randn(4, 4)
    cache = derived({}, w)
    cache["copy"] = w.clone()
    assert "copy" in derived(cache, w)  # unchanged: kept
    w.mul_(2)  # in place: the version counter moves
    assert "copy" not in derived(cache, w)
    cache["copy"] = w.clone()
    w.data.mul_(2)  # through .data: a separate version counter, not seen (documented)
    assert "copy" in derived(cache, w)
    assert "copy" not in derived(cache, w.to(torch.bfloat16))  # another dtype / storage
