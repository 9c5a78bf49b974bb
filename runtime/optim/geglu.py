"""Fused GEGLU feed-forward: the projection and ``value * gelu(gate)`` in one kernel (level 1, exact class).

bf16 calls (CPUs with AVX512-BF16) and fp32 calls (CPUs with AVX-512) run our linear+GEGLU kernel
(runtime/kernels/linear_geglu_cpu.py): the products with fp32 sums, the bias and the erf GELU on those sums;
the (rows, 2d) projection is never written. In bf16 that is one rounding instead of two, and faster
than oneDNN's linear plus the activation kernel on the SD UNets' shapes; in fp32 it differs from eager by
the order of the sums and is faster than eager's linear (which first copies the bias into its
output), GELU and product (measured: bench/RESULTS.md, session 16, 'The feed-forward's projection and
GEGLU in one kernel; AMX and AVX-512-only CPUs'; the ranges first written here: 'Figures moved from
docstrings'). Its packed weight is made on first use and again when the weight changes
(prepack's rule). Calls it does not take (compiling, autograd, other dtypes) run the projection, then
the activation: our bf16 kernel (runtime/kernels/geglu_cpu.c: one read of the projection, one rounding; eager
rounds twice) or, for the rest, the eager formula.
Whether a module's projection is fused is measured (runtime/optim/dispatch.py): our fused kernel against
the projection as it stands (oneDNN's linear, prepacked at level 2) plus the activation, on the module's
own call at the representative size and in its dtype; the faster takes the module's calls in that dtype
(on a CPU with AMX tiles oneDNN's bf16 linear runs on the tiles and may win). ``amx=True`` fuses every
projection the kernel takes without measuring (the name is from the AMX guard it replaced). The
activation kernel, bound by memory, runs wherever it is available.
Plugs into ``GEGLU.fused`` and ``GEGLU.activation`` (docs/ARCHITECTURE.md §3). The fusion computes the
projection from its weight; while the projection's compute chain adds terms that come as low-rank factors
(LoRA adapters: ``Linear.low_rank_terms``, ``h @ up.T``), the kernel adds them inside its sums (``[x, h]``
against ``[w, up]``, the up weights packed as the projection's, again when they change). It declines calls
while the chain changes the operator otherwise; the projection then runs its chain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.models.transformer_2d import GEGLU, geglu_activation

from . import derived_store, dispatch
from .components import pipeline_device
from .derived import derived, served
from .undo import entry
from .slots import CpuKernelSlotPass

DTYPES = (torch.bfloat16, torch.float32)


def cpu_geglu_activation(proj):
    """Our bf16 CPU kernel where it supports the call, the eager formula where it does not."""
    from runtime.kernels.geglu_cpu import try_cpu_geglu

    out = try_cpu_geglu(proj)
    return out if out is not None else geglu_activation(proj)


def fused_linear_geglu(module: GEGLU, dtypes: tuple[torch.dtype, ...]):
    """A ``fused`` slot for ``module``: its CPU calls in ``dtypes`` through our linear+GEGLU kernel, None for the rest."""
    from runtime.kernels.linear_geglu_cpu import linear_geglu_launch, linear_geglu_weight

    linear, cache, ups = module.proj, {}, {}

    def fused(x: torch.Tensor) -> torch.Tensor | None:
        w = linear.weight
        if (torch.compiler.is_compiling() or x.dtype not in dtypes or w.dtype != x.dtype or x.device.type != "cpu"
                or x.ndim < 1 or x.shape[-1] != w.shape[1]
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return None
        low = None
        if not linear.computes_operator():
            low = _low_rank_terms(linear, x, ups)
            if low is None:
                return None
        entry = derived(cache, w)
        if "packed" not in entry:
            entry["packed"] = derived_store.cached(w, "linear-geglu", lambda: linear_geglu_weight(w, w.dtype),
                                                   linear_geglu_weight)
            entry["bias"] = None if linear.bias is None else linear.bias.detach().to(w.dtype).contiguous()
            served(w)
        return linear_geglu_launch(x, entry["packed"], entry["bias"], low or None)

    fused.packed_cache = cache
    return fused


def _low_rank_terms(linear, x: torch.Tensor, ups: dict):
    """The terms ``linear``'s chain adds (``Linear.low_rank_terms``), as the kernel's ``(h, packed up)``; ``()``
    when none is active now, None when some term is not low-rank (the call is declined). ``ups`` caches the
    packed up weights by the tensor and its version: an adapter swap (weights copied in place) packs again, a
    call does not."""
    from runtime.kernels.linear_geglu_cpu import low_rank_input, low_rank_weight

    factors = linear.low_rank_terms(x)
    if not factors:
        return None if factors is None else ()
    hs, weights = zip(*factors)
    up = weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
    # inference tensors are replaced, never written in place: their id is enough
    key = tuple((id(t), None if t.is_inference() else t._version) for t in weights)
    if ups.get("key") != key:
        ups.clear()
        ups.update(key=key, packed=low_rank_weight(up.detach(), x.dtype), sources=weights)  # sources: ids stay theirs
    h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)
    return low_rank_input(h, ups["packed"]), ups["packed"]


def _fusable(module: GEGLU, dtype: torch.dtype) -> bool:
    """Whether the kernel takes the module's shapes: an output width a multiple of 16 (and an even input width in bf16)."""
    return module.proj.out_features % 32 == 0 and (dtype != torch.bfloat16 or module.proj.in_features % 2 == 0)


@dataclass(frozen=True)
class GEGLUPass(CpuKernelSlotPass):
    name = "geglu"
    exact = True
    module_type = GEGLU
    slot = "activation"
    what = "GEGLU feed-forward"
    # True: fuse every projection the kernel takes, without measuring (see the module docstring).
    amx: bool = False

    def kernel(self):
        return cpu_geglu_activation

    def ready(self) -> str | None:
        from runtime.kernels.geglu_cpu import cpu_geglu_ready

        return cpu_geglu_ready()

    def _fused_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes whose calls the linear+GEGLU kernel runs here."""
        from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready

        return tuple(d for d in DTYPES if cpu_linear_geglu_ready(d) is None)

    def supports(self, pipe) -> str | None:
        why = super().supports(pipe)
        if why is None or not self._modules(pipe) or pipeline_device(pipe).type != "cpu":
            return why
        return None if self._fused_dtypes() else why  # no activation kernel here, but the fp32 fusion runs

    def apply(self, pipe) -> None:
        with dispatch.ensure_session():
            self._apply(pipe)

    def _apply(self, pipe) -> None:
        if self.ready() is None:
            super().apply(pipe)  # the activation first: the unfused path measured below runs it
        dtypes = self._fused_dtypes()
        fused = self._state().setdefault("fused", [])
        calls, tally, total = dispatch.probe(pipe), dispatch.Tally(), 0
        for model_name, model in dispatch.networks(pipe):
            for name, module in model.named_modules():
                if not isinstance(module, GEGLU):
                    continue
                total += 1
                dtype = module.proj.weight.dtype
                if dtype not in dtypes or not _fusable(module, dtype):
                    continue
                recorded = calls.of("geglu", model_name, name)
                if self.amx:
                    choice = tally.add(dispatch.forced(_key(module, None, dtype), "fused", "unfused", "amx=True")).choice
                elif recorded:
                    choice = dispatch.choose([tally.add(measure_call(module, shape)) for shape in recorded])
                else:
                    continue  # not reached by the shape probe: left as it runs
                if choice == "fused":
                    self.log().set(module, "fused", fused_linear_geglu(module, (dtype,)))
                    fused.append(module)
                    _drop_packed(module.proj)
        self._state()["total"] = total
        self._state()["measurements"] = tally.records()

    def describe(self) -> str:
        state = self._state()
        text = (f"{len(state.get('fused', []))} of {state.get('total', 0)} GEGLU projections fused with their "
                f"activation, {len(state.get('slotted', []))} activations on our bf16 kernel for the rest")
        summary = dispatch.summarize(state.get("measurements", []))
        return text + (f"; {summary}" if summary else "")


def _key(module: GEGLU, shape, dtype: torch.dtype) -> dispatch.OpKey:
    linear = module.proj
    weight = (linear.out_features, linear.in_features, linear.bias is not None)
    return dispatch.OpKey("linear_geglu", (shape, weight), str(dtype).removeprefix("torch."))


def measure_call(module: GEGLU, shape) -> dispatch.Measurement:
    """Our fused projection+GEGLU against the projection as it runs plus the activation, on one call."""
    dtype = module.proj.weight.dtype
    inputs, ours = [], fused_linear_geglu(module, (dtype,))  # a packed weight of its own, dropped after

    def x():
        if not inputs:
            inputs.append(torch.randn(*shape, dtype=dtype))
        return inputs[0]

    def fused():
        out = ours(x())
        if out is None:
            raise RuntimeError("the fused kernel declined the call")
        return out

    candidates = [dispatch.Candidate("unfused", lambda: module.activation(module.proj(x())), baseline=True),
                  dispatch.Candidate("fused", fused)]
    return dispatch.measure(_key(module, tuple(shape), dtype), candidates)


def _drop_packed(linear) -> None:
    """A fused projection never runs its prepacked weight: free the copy measuring made."""
    packed = entry(linear, "prepack")
    if packed is not None:
        packed.packed_cache.clear()
