"""ModelMixin: a torch module with diffusers' config and checkpoint contract.

Loading (``from_pretrained``): resolve the folder (local or hub cache, runtime/models/hub.py), read the
config, build the model on the meta device, load memory-mapped safetensors with ``assign=True``
(runtime/models/weight_loading.py lists the checks). Saving (``save_pretrained``) writes safetensors and
config atomically (runtime/models/checkpoint_save.py). File names: runtime/models/checkpoint_files.py.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .attention import Attention, AttentionBackend, sdpa_backend, xformers_backend, xformers_ready
from .checkpoint_files import WeightNames, find_weight_files
from .checkpoint_save import save_folder
from .config import ConfigMixin, read_json
from .device_map import auto_device_map, dispatch, normalize_device_map, parse_max_memory
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError
from .hub import _local_dir, resolve_folder
from .meta_build import skip_init_on_meta
from .pickle_io import load_pickle
from .safetensors_io import load_safetensors, prepare_for_save
from .step_context import StepAnnouncer, StepContext
from .weight_loading import load_weights
from .call_slot import CallSlot

logger = logging.getLogger(__name__)

# diffusers from_pretrained options that would change what is loaded and that we do not implement:
# a clear error rather than a silently different model.
_UNSUPPORTED = {
    "quantization_config": "quantized loading is not implemented",
    "parallel_config": "tensor / context parallel loading is not implemented",
    "use_flashpack": "FlashPack checkpoints are not implemented",
}


def _check_unsupported(cls, kwargs: dict) -> None:
    for key, why in _UNSUPPORTED.items():
        if key in kwargs and key not in cls._init_parameter_names():
            value = kwargs.pop(key)
            if value not in (None, False):
                raise InputError(f"{cls.__name__}.from_pretrained: {key}={value!r} is not supported ({why})")

def _resolve_dtype(dtype, torch_dtype) -> torch.dtype | None:
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise InputError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one")
    value = dtype if dtype is not None else torch_dtype
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise InputError(f"from_pretrained: unknown dtype {dtype if dtype is not None else torch_dtype!r}")
    if value is not None and not isinstance(value, torch.dtype):
        raise InputError(f"from_pretrained: dtype must be a torch.dtype, got {value!r}")
    return value


def _check_finite_weights(tensors: dict, file) -> None:
    """``from_pretrained(check_finite=True)``: NaN/inf in a weight is an error naming file and key."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{file}: weight {key!r} ({tensor.dtype}, shape {tuple(tensor.shape)}) holds {bad} "
                                  f"NaN/inf value(s) of {tensor.numel()}")


class ModelMixin(CallSlot, ConfigMixin):
    config_name = "config.json"
    # Weight file stem: "diffusion_pytorch_model" (diffusers models) or "model" (transformers-style
    # models such as the CLIP text encoders, whose pickle stem is then "pytorch_model").
    weights_name = "diffusion_pytorch_model"
    # Other ``_class_name`` values whose checkpoints this class loads (besides its own name, its
    # base classes' and its subclasses' names).
    config_class_aliases: tuple[str, ...] = ()

    # ---- extension points shared by every model -----------------------------------------
    def attention_modules(self):
        """Every submodule with an attention ``backend`` slot (ours and the CLIP encoder's)."""
        return [m for m in self.modules() if isinstance(m, Attention) or hasattr(m, "backend")]

    # ``None`` or a callable ``(index, count) -> bool`` the pipelines ask before each denoising step
    # of a guided call: True runs that step on the conditional half alone and takes its prediction
    # unguided (TGATE drops classifier-free guidance after its gate; optim/tgate.py).
    guidance_gate = None

    def announce_step(self, index: int, count: int, timestep: float, guided: bool = False) -> None:
        """Called by pipelines before each denoising step (per thread; see step_context.py)."""
        self._step_announcer().set(StepContext(int(index), int(count), float(timestep), bool(guided)))

    def clear_step(self) -> None:
        self._step_announcer().set(None)

    @property
    def step_context(self) -> StepContext | None:
        return self._step_announcer().get()

    def _step_announcer(self) -> StepAnnouncer:
        announcer = self.__dict__.get("_announcer")
        if announcer is None:
            announcer = StepAnnouncer()
            self.__dict__["_announcer"] = announcer
        return announcer

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward (training only); see checkpointing.py."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def set_attention_backend(self, backend: AttentionBackend | None = None) -> None:
        """Route every Attention module through ``backend`` (``None``: PyTorch SDPA)."""
        for m in self.attention_modules():
            m.backend = backend or sdpa_backend

    def fuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            if hasattr(m, "fuse_projections"):
                m.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            if hasattr(m, "unfuse_projections"):
                m.unfuse_projections()

    def refresh_fused_projections(self) -> None:
        """Copy the separate projections' current weights into every fused ``to_qkv`` / ``to_kv`` in place:
        after editing ``to_q`` / ``to_k`` / ``to_v`` (``fuse_lora`` calls it), the fused copy matches again."""
        for m in self.attention_modules():
            if getattr(m, "fused", None) and hasattr(m, "refresh_fused_projection"):
                m.refresh_fused_projection()

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # ---- checkpoints ------------------------------------------------------------------------
    @classmethod
    def weight_names(cls, variant: str | None = None) -> WeightNames:
        pickle_stem = "pytorch_model" if cls.weights_name == "model" else cls.weights_name
        return WeightNames(cls.weights_name, pickle_stem, variant)

    @classmethod
    def _accepted_class_names(cls) -> set[str]:
        names = {c.__name__ for c in cls.__mro__ if isinstance(c, type) and issubclass(c, ModelMixin)}
        names.discard("ModelMixin")
        stack = list(cls.__subclasses__())
        while stack:
            sub = stack.pop()
            names.add(sub.__name__)
            stack.extend(sub.__subclasses__())
        return names | set(cls.config_class_aliases)

    @classmethod
    def _check_class_name(cls, config: dict, config_path: Path) -> None:
        name = config.get("_class_name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{config_path}: _class_name must be a string naming the model class, "
                              f"got {type(name).__name__} {name!r}")
        if name is not None and name not in cls._accepted_class_names():
            raise ConfigError(
                f"{config_path}: _class_name {name!r} is not {cls.__name__} (nor a known alias or "
                f"subclass); load it with the {name} class"
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        low_cpu_mem_usage: bool | None = True,
        force_download: bool = False,
        resume_download: bool | None = None,
        proxies: dict | None = None,
        output_loading_info: bool = False,
        mirror: str | None = None,
        device_map=None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        offload_state_dict: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        disable_mmap: bool = False,
        check_finite: bool = False,
        **config_overrides,
    ):
        """Load a model from a diffusers-layout folder or hub id (``torch_dtype`` is ``dtype``'s alias).

        Safetensors only, unless no safetensors file exists (or ``use_safetensors=False``): then a
        pickle through ``torch.load(weights_only=True)``. ``config_overrides`` replace config keys
        (other unknown keywords are ignored with a warning, as diffusers ignores them).
        The model is returned in eval mode; floating weights are cast to ``dtype`` (default: the
        dtype the model is built in, fp32), as diffusers does.

        diffusers' other arguments: ``force_download`` and ``proxies`` go to huggingface_hub;
        ``resume_download`` (deprecated) and ``mirror`` are accepted and ignored (warning);
        ``output_loading_info=True`` returns ``(model, {"missing_keys", "unexpected_keys",
        "mismatched_keys", "error_msgs"})``; ``device_map`` / ``max_memory`` / ``offload_folder`` /
        ``offload_state_dict``: runtime/models/device_map.py (no accelerate needed);
        ``check_finite=True`` reads every floating tensor once and raises CheckpointError naming
        the file and the first key that holds NaN or inf (off by default: it reads all the weights).
        ``ignore_mismatched_sizes=True`` keeps the model's freshly initialised tensor for each
        weight whose checkpoint shape differs (warning naming key and shapes); the model is then
        built with real tensors, as with ``low_cpu_mem_usage=False``. ``disable_mmap=True``
        copies the weights into memory instead of memory-mapping the files.
        """
        dtype = _resolve_dtype(dtype, torch_dtype)
        _check_unsupported(cls, config_overrides)
        if resume_download is not None:
            warnings.warn("from_pretrained: resume_download is deprecated and ignored (downloads resume "
                          "whenever possible)", FutureWarning, stacklevel=2)
        if mirror is not None:
            logger.warning("from_pretrained: mirror=%r is ignored (set HF_ENDPOINT to use a mirror)", mirror)
        low_cpu_mem_usage = True if low_cpu_mem_usage is None else bool(low_cpu_mem_usage)
        device_map = normalize_device_map(device_map, low_cpu_mem_usage)
        budgets = parse_max_memory(max_memory)
        if offload_folder is not None:
            os.fspath(offload_folder)  # a TypeError for a non-path, before anything is read
        path = str(pretrained_model_name_or_path)
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                   force_download=force_download, proxies=proxies)
        names = cls.weight_names(variant)
        patterns = [cls.config_name] + names.hub_patterns(safetensors=use_safetensors is not False)
        folder = resolve_folder(path, subfolder, allow_patterns=patterns, **hub)
        config_path = folder / cls.config_name
        if not config_path.is_file():
            raise CheckpointNotFoundError(f"{path}: no {cls.config_name} in {folder}")
        config = read_json(config_path)
        cls._check_class_name(config, config_path)
        config["_name_or_path"] = path
        params = cls._init_parameter_names()
        ignored = sorted(k for k in config_overrides if k not in params)
        if ignored:
            logger.warning("%s.from_pretrained: ignored keyword argument(s) that are neither loading options nor "
                           "config keys: %s", cls.__name__, ", ".join(ignored))
        config.update({k: v for k, v in config_overrides.items() if k in params})
        try:
            files = find_weight_files(folder, names, use_safetensors)
        except CheckpointNotFoundError:
            if use_safetensors is not None or _local_dir(path, subfolder) is not None:
                raise
            # A hub checkpoint with only pickles: fetch those (still loaded weights_only).
            folder = resolve_folder(path, subfolder, allow_patterns=[cls.config_name] + names.hub_patterns(False), **hub)
            files = find_weight_files(folder, names, use_safetensors)

        def build():
            try:
                return cls.from_config(config, _source=str(config_path))
            except ConfigError as exc:
                if str(config_path) in str(exc):
                    raise
                raise ConfigError(f"{config_path}: {exc}") from None
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                    RuntimeError) as exc:  # a value of a type or range the constructor cannot take
                raise ConfigError(f"{config_path}: cannot build {cls.__name__} from this config "
                                  f"({type(exc).__name__}: {exc})") from exc

        on_meta = low_cpu_mem_usage and not ignore_mismatched_sizes
        if on_meta:
            with torch.device("meta"), skip_init_on_meta():
                model = build()
        else:
            model = build()

        state_dict: dict[str, torch.Tensor] = {}
        for file in files.files:
            part = load_safetensors(file) if files.format == "safetensors" else load_pickle(file)
            if check_finite:
                _check_finite_weights(part, file)
            state_dict.update(part)
        if disable_mmap:
            state_dict = {k: v.clone() for k, v in state_dict.items()}
        source = str(files.index or files.files[0])
        info = load_weights(model, state_dict, source=source, dtype=dtype, assign=on_meta,
                            rebuild=lambda: _quietly(build), ignore_mismatched_sizes=ignore_mismatched_sizes)
        del state_dict
        if not on_meta and dtype is not None:
            model.to(dtype)
        if device_map is not None:
            if isinstance(device_map, str):
                device_map = auto_device_map(model, budgets, dtype)
            model.hf_device_map = dispatch(model, device_map)
        model.eval()
        if output_loading_info:
            return model, info
        return model

    @classmethod
    def _init_parameter_names(cls) -> set[str]:
        from .config import _init_parameters

        return set(_init_parameters(cls))

    def _state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The canonical state dict: fused QKV/KV projections are left out.

        ``Attention.fuse_projections`` keeps the separate to_q/to_k/to_v weights (fusing only adds
        ``to_qkv`` / ``to_kv``), so dropping the fused copy saves exactly what an unfused model
        holds, without touching the live model.
        """
        state = self.state_dict()
        fused = [f"{name}.to_{m.fused}." if name else f"to_{m.fused}."
                 for name, m in self.named_modules() if getattr(m, "fused", None)]
        return {k: v for k, v in state.items() if not any(k.startswith(p) for p in fused)}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> Path | None:
        """Write config.json and the weights (safetensors, sharded above ``max_shard_size``) atomically.

        Only the main process writes (``is_main_process=False`` writes nothing). ``save_function``
        replaces ``torch.save`` for pickle weights (``safe_serialization=False``), as diffusers
        documents; safetensors are always written by safetensors. ``variant`` names the files
        ``diffusion_pytorch_model.<variant>.safetensors``. With ``push_to_hub=True`` the folder is
        then uploaded; kwargs: repo_id (default: the folder name), commit_message, private, token,
        create_pr. Other keywords are ignored with a warning (diffusers ignores them).
        """
        if not is_main_process:
            return None
        hub_keys = {"repo_id", "commit_message", "private", "token", "create_pr"}
        unknown = sorted(set(kwargs) - hub_keys)
        if unknown:
            logger.warning("save_pretrained: ignored keyword argument(s): %s", ", ".join(unknown))
        if save_function is not None and not callable(save_function):
            raise InputError(f"save_pretrained: save_function must be callable, got {save_function!r}")
        tensors = prepare_for_save(self._state_dict_for_save())
        target = save_folder(save_directory, self.save_config, tensors, self.weight_names(variant),
                             config_name=self.config_name, max_shard_size=max_shard_size, safe=safe_serialization,
                             save_function=save_function)
        if push_to_hub:
            hub = {k: v for k, v in kwargs.items() if k in hub_keys}
            repo_id = hub.pop("repo_id", None) or target.name
            _upload(target, repo_id, **hub)
        return target

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
        max_shard_size: int | str = "10GB",
    ):
        """Save into a temporary folder and upload it to ``repo_id`` (created if missing) through
        huggingface_hub's ``HfApi`` (``create_repo`` then ``upload_folder``; ``subfolder``: the
        folder inside the repo). Returns what ``upload_folder`` returns (the commit info)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", variant=variant, max_shard_size=max_shard_size,
                                          safe_serialization=safe_serialization)
            return _upload(folder, repo_id, commit_message=commit_message, private=private, token=token,
                           create_pr=create_pr, subfolder=subfolder)

    # ---- xformers (diffusers' API; through the attention backend slot) ----------------------
    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Route every attention module through xformers' ``memory_efficient_attention``.

        ``attention_op`` is handed to it as ``op`` (e.g. ``MemoryEfficientAttentionFlashAttentionOp``).
        Raises DependencyMissingError (a ModuleNotFoundError) without xformers and
        BackendUnavailableError (a ValueError) without a CUDA device, as diffusers refuses then.
        The backend each module had is kept for ``disable_xformers_memory_efficient_attention``.
        """
        xformers_ready()
        backend = xformers_backend(attention_op)
        for m in self.attention_modules():
            if not getattr(m.backend, "is_xformers", False):
                m.__dict__["_backend_before_xformers"] = m.backend
            m.backend = backend

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Give every module routed through xformers its previous backend back (PyTorch SDPA by default)."""
        for m in self.attention_modules():
            if getattr(m.backend, "is_xformers", False):
                m.backend = m.__dict__.pop("_backend_before_xformers", None) or sdpa_backend

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (shared parameters once), optionally trainable only / without embeddings."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))


def _quietly(build):
    """Run ``build`` with config warnings muted (they were already shown for the first build)."""
    config_logger = logging.getLogger("runtime.models.config")
    previous = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        return build()
    finally:
        config_logger.setLevel(previous)


def _upload(folder: Path, repo_id: str, commit_message=None, private=None, token=None, create_pr=False,
            subfolder=None):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(
        repo_id=getattr(repo, "repo_id", repo_id),
        folder_path=str(folder),
        path_in_repo=subfolder,
        commit_message=commit_message or "Upload model",
        create_pr=create_pr,
        repo_type="model",
    )
