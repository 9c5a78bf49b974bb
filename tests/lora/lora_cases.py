"""Random LoRA adapters made with diffusers + peft (test-only references) on tiny SD-like and
SDXL-like UNets and CLIP text encoders, and diffusers' own reading of a LoRA file.

A ``LoraCase`` holds the base models (no adapter), the adapter's PEFT state dict per component
(module paths as keys, as ``get_peft_model_state_dict`` gives them), the ``LoraConfig`` of each
(``to_dict()``), and the truth: each layer's delta weight as peft computes it
(``get_delta_weight``), keyed by our module paths (``text_model.`` kept for the text encoders).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class LoraCase:
    pipeline: type  # the diffusers pipeline class whose lora_state_dict / load_lora_into_* read files
    base: dict  # component -> diffusers / transformers model without adapter
    peft: dict  # component -> {"<module>.lora_A.weight": tensor, ...} as peft saves it
    config: dict  # component -> LoraConfig.to_dict()
    truth: dict  # component -> {our module path: delta weight}
    modules: dict = field(default_factory=dict)  # component -> {our module path: peft's module path}
    alphas: dict = field(default_factory=dict)  # component -> {our module path: the layer's lora_alpha}

    @property
    def unet_config(self):
        return self.base["unet"].config

    def layers(self, component: str):
        """(our module path, lora_A, lora_B) of every layer of ``component``."""
        sd = self.peft[component]
        return [(ours, sd[f"{theirs}.lora_A.weight"], sd[f"{theirs}.lora_B.weight"])
                for ours, theirs in self.modules[component].items()]

    def peft_file(self) -> dict:
        """The pipeline-level PEFT state dict (``unet.``, ``text_encoder.`` ... prefixes)."""
        return {f"{c}.{k}": v for c, sd in self.peft.items() for k, v in sd.items()}


def our_path(model, name: str) -> str:
    """transformers 5.x's CLIPTextModel has no ``text_model`` level; our models (and files) do."""
    from transformers import CLIPTextModel

    return "text_model." + name if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model") else name


def peft_deltas(model, adapter: str) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {our_path(model, n): m.get_delta_weight(adapter).detach() for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})}


def _inject(model, config, adapter: str) -> None:
    """diffusers' ``add_adapter`` on the UNet; peft's ``inject_adapter_in_model`` on a text encoder,
    which is what transformers' ``add_adapter`` / ``load_adapter`` do, but those refuse the pinned
    peft 0.21.2 (transformers 5.25 asks for >= 0.22)."""
    from peft import inject_adapter_in_model

    if "diffusers" in type(model).__module__:
        model.add_adapter(config, adapter_name=adapter)
    else:
        inject_adapter_in_model(config, model, adapter)
        model.peft_config = {**getattr(model, "peft_config", {}), adapter: config}


def tiny_text_encoder(projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=99, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _adapt(base, targets, seed: int, **patterns):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **patterns)
    _inject(model, config, "default")  # random A and B
    sd = get_peft_model_state_dict(model, adapter_name="default")
    modules = {our_path(base, k[: -len(".lora_A.weight")]): k[: -len(".lora_A.weight")]
               for k in sd if k.endswith(".lora_A.weight")}
    alphas = {our_path(base, n): float(m.lora_alpha["default"]) for n, m in model.named_modules()
              if hasattr(m, "lora_alpha") and "default" in getattr(m, "lora_A", {})}
    return sd, config.to_dict(), peft_deltas(model, "default"), modules, alphas


def make_case(pipeline, base: dict, seed: int) -> LoraCase:
    case = LoraCase(pipeline=pipeline, base=base, peft={}, config={}, truth={})
    for i, (component, model) in enumerate(base.items()):
        if component == "unet":
            got = _adapt(model, UNET_TARGETS, seed + i, rank_pattern={"conv1": 2},
                         alpha_pattern={"to_k": 3.0, "conv_in": 1.0})
        else:
            got = _adapt(model, TEXT_TARGETS, seed + i, alpha_pattern={"fc2": 2.0})
        (case.peft[component], case.config[component], case.truth[component], case.modules[component],
         case.alphas[component]) = got
    return case


def _diffusers_text_encoder(pipe, state, alphas, metadata, model, prefix: str) -> None:
    """diffusers' ``_load_lora_into_text_encoder`` (lora_base.py) step by step with diffusers' own
    conversions and config, ending in peft's inject + set_peft_model_state_dict where diffusers
    calls transformers' ``load_adapter`` (which refuses peft 0.21.2)."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import set_peft_model_state_dict

    sd = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not sd:
        return
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(model, "text_model"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    rank = {f"{n}.lora_B.weight": sd[f"{n}.lora_B.weight"].shape[1] for n, _ in model.named_modules()
            if n.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")) and f"{n}.lora_B.weight" in sd}
    if alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    config = _create_lora_config(sd, alphas, metadata, rank, is_unet=False)
    _inject(model, config, "ref")
    set_peft_model_state_dict(model, sd, adapter_name="ref")


def diffusers_deltas(case: LoraCase, source, **kwargs) -> dict:
    """What diffusers loads from ``source`` (a path or a state dict, copied first): its
    ``lora_state_dict`` then ``load_lora_into_unet`` (text encoders: ``_diffusers_text_encoder``)
    into copies of the base models; each layer's delta weight as peft computes it."""
    pipe = case.pipeline
    if isinstance(source, dict):
        source = dict(source)
    if pipe.__name__.startswith("StableDiffusionXL"):
        kwargs.setdefault("unet_config", case.unet_config)
    state, alphas, metadata = pipe.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    out = {}
    for component, base in case.base.items():
        model = copy.deepcopy(base)
        if component == "unet":
            pipe.load_lora_into_unet(state, alphas, model, adapter_name="ref", metadata=metadata)
        else:
            _diffusers_text_encoder(pipe, state, alphas, metadata, model, component)
        deltas = peft_deltas(model, "ref")
        if deltas:
            out[component] = deltas
    return out
