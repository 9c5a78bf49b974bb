"""CPU offload for pipelines: diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``.

No accelerate: the hooks are ours, with its semantics.

- Model offload (``ModelOffload``): every network rests on the CPU; the one about to run is moved
  whole to the accelerator and the one that ran before it goes back, so one network at a time
  holds accelerator memory (order ``model_cpu_offload_seq``, "text_encoder->unet->vae" for SD).
  Moving happens in a forward pre-hook (direct calls such as a custom loop's ``pipe.unet(...)``
  work), in ``AutoencoderKL._offload_hook`` for ``encode`` / ``decode``, and explicitly at the
  start of each phase of a pipeline call (``onload``). The hooks do nothing inside a compiled
  region (``torch.compiler.is_compiling()``): the pipeline has already onloaded the network a
  compiled call runs, so optimize's compile pass traces no device moves.
- Sequential offload (``SequentialOffload``): every module with its own parameters or buffers
  keeps them on the CPU and gets them on the accelerator only for its own forward (pre-hook: the
  resting tensors are copied in, post-hook: the resting ones are put back). Parameter objects
  are never replaced, only their ``.data``, so passes that cast or re-lay weights at rest
  (precision, memory_format) and revert them stay correct. Modules a pass adds later (fused
  QKV projections) are hooked at the next call (``refresh``). Compiled modules cannot take
  per-module device moves: combining the two is an ``InputError``, not a failure inside dynamo.

Both need an accelerator: on a machine without one, ``enable_*`` raise diffusers'
``RuntimeError`` ("`enable_model_cpu_offload` requires accelerator, but not found").
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.models.errors import InputError


def accelerator_device() -> str:
    """The accelerator's device type here ("cuda", "xpu", "mps"), or "cpu" when there is none."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(method: str, gpu_id: int | None, device, previous_id: int | None) -> tuple[torch.device, int]:
    """diffusers' device rules for ``enable_*_cpu_offload``: (the execution device, its index)."""
    if device is None:
        device = accelerator_device()
        if device == "cpu":
            raise RuntimeError(f"`{method}` requires accelerator, but not found")
    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        raise RuntimeError(f"`{method}` requires accelerator, but not found (device={device!r} is the CPU)")
    if gpu_id is not None and torch_device.index is not None:
        raise ValueError(
            f"You have passed both `gpu_id`={gpu_id} and an index as part of the passed device `device`={device}. "
            f"Cannot pass both. Please make sure to either not define `gpu_id` or not pass the index as part of "
            f"the device: `device`={torch_device.type}")
    index = gpu_id or torch_device.index or previous_id or 0
    return torch.device(f"{torch_device.type}:{index}"), index


def empty_cache(device_type: str) -> None:
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device_type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _first_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


def _is_compiled(module: nn.Module) -> bool:
    return any(m.__dict__.get("call_with") is not None for m in module.modules())


class ModelOffload:
    """One network at a time on ``device``; the rest on the CPU."""

    kind = "model"

    def __init__(self, models: list[tuple[str, nn.Module]], device: torch.device, excluded: tuple = ()):
        self.device = torch.device(device)
        self.models = models
        self.excluded = set(excluded)
        self.current: nn.Module | None = None
        self._handles = []

    def attach(self) -> None:
        for name, module in self.models:
            if name in self.excluded:
                module.to(self.device)
                continue
            module.to("cpu")
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            if hasattr(module, "_offload_hook"):  # AutoencoderKL: encode / decode are not forward
                module._offload_hook = self.onload

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for _, module in self.models:
            if getattr(module, "_offload_hook", None) is not None:
                module._offload_hook = None
        self.current = None

    def onload(self, module: nn.Module) -> None:
        """Move ``module`` to the device and the network that ran before it back to the CPU."""
        if torch.compiler.is_compiling():
            return
        if self.current is module and _first_device(module) in (None, self.device):
            return
        if self.current is not None and self.current is not module:
            self.current.to("cpu")
        module.to(self.device)
        self.current = module

    def onload_names(self, pipe, names) -> None:
        """A pipeline phase begins: its networks (e.g. both SDXL text encoders) on the device."""
        modules = [getattr(pipe, n, None) for n in names]
        modules = [m for m in modules if isinstance(m, nn.Module) and any(m is x for _, x in self.models)]
        if not modules or torch.compiler.is_compiling():
            return
        for _, other in self.models:
            if other not in modules and other is self.current and other is not None:
                other.to("cpu")
        for m in modules:
            m.to(self.device)
        self.current = modules[-1]

    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        self.onload(module)
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def offload_all(self) -> None:
        """After a call (diffusers' ``maybe_free_model_hooks``): every network back on the CPU."""
        if self.current is not None:
            self.current.to("cpu")
            self.current = None
        empty_cache(self.device.type)

    def refresh(self, pipe) -> None:
        pass

    def check_call(self) -> None:
        pass


class SequentialOffload:
    """Each module's own weights on ``device`` only while that module runs."""

    kind = "sequential"

    def __init__(self, models: list[tuple[str, nn.Module]], device: torch.device, excluded: tuple = ()):
        self.device = torch.device(device)
        self.models = models
        self.excluded = set(excluded)
        self._hooked: dict[int, tuple] = {}  # id(module) -> (module, handles)

    def _hook(self, module: nn.Module) -> None:
        if id(module) in self._hooked:
            return
        own = [n for n, p in module._parameters.items() if p is not None]
        bufs = [n for n, b in module._buffers.items() if b is not None]
        if not own and not bufs:
            return
        resting: dict = {}

        def pre(mod, args, kwargs):
            if torch.compiler.is_compiling():
                return None
            for n in own:
                p = mod._parameters[n]
                if p is not None:
                    resting[("p", n)] = p.data
                    p.data = p.data.to(self.device, non_blocking=True)
            for n in bufs:
                b = mod._buffers[n]
                if b is not None:
                    resting[("b", n)] = b
                    mod._buffers[n] = b.to(self.device, non_blocking=True)
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        def post(mod, args, kwargs, output):
            for (kind, n), tensor in list(resting.items()):
                if kind == "p" and mod._parameters.get(n) is not None:
                    mod._parameters[n].data = tensor
                elif kind == "b":
                    mod._buffers[n] = tensor
            resting.clear()
            return None

        handles = (module.register_forward_pre_hook(pre, with_kwargs=True),
                   module.register_forward_hook(post, with_kwargs=True, always_call=True))
        self._hooked[id(module)] = (module, handles)

    def attach(self) -> None:
        for name, model in self.models:
            if name in self.excluded:
                model.to(self.device)
                continue
            model.to("cpu")
            for module in model.modules():
                self._hook(module)

    def refresh(self, pipe) -> None:
        """Hook modules added since (a pass's fused projections)."""
        for name, model in self.models:
            if name not in self.excluded:
                for module in model.modules():
                    self._hook(module)

    def check_call(self) -> None:
        for name, model in self.models:
            if name not in self.excluded and _is_compiled(model):
                raise InputError(
                    f"enable_sequential_cpu_offload: {name} is compiled (runtime.optimize's compile pass); a "
                    "compiled graph cannot move each layer's weights in and out. Optimize with compile=False, "
                    "or use enable_model_cpu_offload()")

    def detach(self) -> None:
        for module, handles in self._hooked.values():
            for h in handles:
                h.remove()
        self._hooked = {}

    def onload(self, module) -> None:
        pass

    def onload_names(self, pipe, names) -> None:
        pass

    def offload_all(self) -> None:
        empty_cache(self.device.type)


def model_components(pipe, seq: str | None) -> list[tuple[str, nn.Module]]:
    """The pipeline's networks: those in ``seq`` ("a->b->c") in that order, then the others."""
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, nn.Module)}
    ordered = []
    for name in (seq or "").split("->"):
        name = name.strip()
        if name in modules:
            ordered.append((name, modules.pop(name)))
    return ordered + list(modules.items())


def enable(pipe, kind: str, gpu_id=None, device=None, _allow_device=None) -> None:
    """Install ``kind`` ("model" or "sequential") offload on ``pipe``; ``_allow_device`` is for tests."""
    method = "enable_model_cpu_offload" if kind == "model" else "enable_sequential_cpu_offload"
    if getattr(pipe, "hf_device_map", None) is not None:
        raise ValueError(f"It seems like you have activated a device mapping strategy on the pipeline so calling "
                         f"`{method}() isn't allowed. You can call `reset_device_map()` first and then call `{method}()`.")
    if kind == "model" and not pipe.model_cpu_offload_seq:
        raise ValueError("Model CPU offload cannot be enabled because no `model_cpu_offload_seq` class attribute is set.")
    if _allow_device is not None:
        target, index = torch.device(_allow_device), 0
    else:
        target, index = resolve_device(method, gpu_id, device, pipe.__dict__.get("_offload_gpu_id"))
    remove(pipe)
    pipe._offload_gpu_id = index
    previous_type = pipe.device.type
    models = model_components(pipe, pipe.model_cpu_offload_seq)
    cls = ModelOffload if kind == "model" else SequentialOffload
    offload = cls(models, target, tuple(pipe._exclude_from_cpu_offload))
    offload.check_call()
    offload.attach()
    if previous_type != "cpu":
        empty_cache(previous_type)
    pipe.__dict__["_offload"] = offload
    pipe.__dict__["_offload_device"] = target


def remove(pipe) -> None:
    """Take every offload hook off (``remove_all_hooks``); the networks stay where they are."""
    offload = pipe.__dict__.pop("_offload", None)
    pipe.__dict__.pop("_offload_device", None)
    if offload is not None:
        offload.detach()


def active(pipe):
    return pipe.__dict__.get("_offload")
