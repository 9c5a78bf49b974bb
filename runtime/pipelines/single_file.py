"""``from_single_file`` / ``save_single_file`` for the SD and SDXL pipelines (diffusers' names).

``Pipeline.from_single_file(path_or_url, config=None, original_config=None, torch_dtype=None,
prediction_type=None, extract_ema=False, **kwargs)``: the file's type is inferred offline
(runtime/models/single_file/infer.py); each component's config comes from ``config=`` (a diffusers
folder or hub id), else ``original_config=`` (the LDM yaml, for UNet and VAE), else the config
we stored in files we wrote, else the shipped config of the standard type, else the shapes.
Components passed as keywords (``vae=``, ``text_encoder=``, ``tokenizer=``, ``scheduler=``, ...)
replace the file's. ``prediction_type=`` sets the scheduler's (SD 2.x files default to
``v_prediction``; pass ``"epsilon"`` for the 512 "base" models).

``pipe.save_single_file(path)`` writes the original layout: UNet under ``model.diffusion_model.``,
VAE under ``first_stage_model.``, text encoders under ``cond_stage_model.transformer.`` (OpenAI
CLIP), ``cond_stage_model.model.`` (OpenCLIP, SD 2.x) or SDXL's ``conditioner.embedders.{0,1}``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from runtime.models import clip as clip_models
from runtime.models.config import read_json
from runtime.models.errors import ConfigError, InputError
from runtime.models.hub import HUB_KWARGS, resolve_folder
from runtime.models.single_file import components as build
from runtime.models.single_file import infer
from runtime.models.single_file import original_config as ldm_yaml
from runtime.models.single_file import save as writer
from runtime.models.single_file.checkpoint import read
from runtime.models.tokenizer import CLIPTokenizer
from runtime.models.unet_2d_condition import UNet2DConditionModel
from runtime.models.vae import AutoencoderKL

logger = logging.getLogger(__name__)

TEXT_CLASSES = {"text_encoder": clip_models.CLIPTextModel, "text_encoder_2": clip_models.CLIPTextModelWithProjection}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
XL_FAMILIES = ("sdxl", "refiner")
DEFAULT_PAD = {"clip": "<|endoftext|>", "open_clip": "!"}  # what SD 1.x / SD 2.x / SDXL's tokenizers pad with


def _scheduler_class(config: dict, source: str):
    from runtime.schedulers import SCHEDULER_CLASSES

    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise ConfigError(f"{source}: scheduler {name!r} is not one diffusion-runtime implements; pass scheduler=...")
    return SCHEDULER_CLASSES[name]


class FromSingleFileMixin:
    """Mixed into the SD and SDXL pipeline classes (runtime/pipelines/stable_diffusion.py, img2img.py,
    inpaint.py, sdxl.py; the SDXL task classes and depth2img.py inherit it). A depth-to-image file
    holds no depth estimator: it loads as None unless ``depth_estimator=`` / ``feature_extractor=``
    are passed, and calls then need ``depth_map=``."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, config=None, original_config=None, torch_dtype=None,
                         prediction_type: str | None = None, extract_ema: bool = False, **kwargs):
        from runtime.models.modeling import _resolve_dtype

        dtype = _resolve_dtype(kwargs.pop("dtype", None), torch_dtype)
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        given = {n: kwargs.pop(n) for n in list(kwargs) if n in cls.component_names}
        pipe_config = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.config_defaults}
        for legacy in ("load_safety_checker", "scheduler_type", "use_safetensors", "low_cpu_mem_usage", "original_config_file"):
            if legacy in kwargs:
                value = kwargs.pop(legacy)
                if legacy == "original_config_file" and original_config is None:
                    original_config = value
                elif value not in (None, False):
                    logger.warning("%s.from_single_file: %s=%r is ignored", cls.__name__, legacy, value)
        if kwargs:
            logger.warning("%s.from_single_file: ignored unknown argument(s) %s", cls.__name__, ", ".join(sorted(kwargs)))
        if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
            raise InputError(f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample'")

        ckpt = read(pretrained_model_link_or_path, **hub)
        ftype = infer.detect(ckpt.tensors)
        cls._check_family(ftype, ckpt.source)
        folder = None
        if config is not None:
            folder = resolve_folder(config, allow_patterns=["*.json", "*.txt"],
                                    **{k: v for k, v in hub.items() if v is not None})
        yaml_configs = ldm_yaml.configs(original_config, ckpt.tensors) if original_config is not None and folder is None else {}
        stored = infer.metadata_configs(ckpt.metadata) if folder is None and not yaml_configs else {}
        if prediction_type is None and yaml_configs:
            prediction_type = yaml_configs["prediction_type"]
        standard = infer.standard_config(ftype.name)

        def model_config(name: str):
            if folder is not None:
                path = folder / name / "config.json"
                if not path.is_file():
                    raise ConfigError(f"config={config!s}: no {name}/config.json in {folder}")
                return read_json(path), f"config={path}"
            if name in yaml_configs:
                return yaml_configs[name], "original_config"
            if name in stored:
                return stored[name], "the config stored in the file"
            return None, None

        parts = dict(given)
        if "unet" not in parts:
            conf, src = model_config("unet")
            parts["unet"] = build.load_unet(UNet2DConditionModel, ckpt, ftype, config=conf, config_source=src,
                                            dtype=dtype, prediction_type=prediction_type, extract_ema=extract_ema)
        if "vae" not in parts:
            conf, src = model_config("vae")
            if ftype.vae_prefix is None:
                raise ConfigError(f"{ckpt.source}: the file holds no VAE (first_stage_model.* keys); pass vae=...")
            parts["vae"] = build.load_vae(AutoencoderKL, ckpt, ftype, config=conf, config_source=src, dtype=dtype)
        for name, text_cls in TEXT_CLASSES.items():
            if name not in cls.component_names or name in parts:
                continue
            if name not in ftype.text:
                parts[name] = None
                continue
            conf, src = model_config(name)
            parts[name] = build.load_text_encoder(text_cls, ckpt, ftype, name, config=conf, config_source=src, dtype=dtype)
        for text_name, tok_name in TOKENIZER_OF.items():
            if tok_name not in cls.component_names or tok_name in parts:
                continue
            if parts.get(text_name) is None:
                parts[tok_name] = None
            elif folder is not None and (folder / tok_name).is_dir():
                parts[tok_name] = CLIPTokenizer.from_pretrained(folder, subfolder=tok_name)
            else:
                build.check_vocabulary(parts[text_name], ckpt.source, text_name)
                settings = standard.get(tok_name) or {"pad_token": DEFAULT_PAD[ftype.text[text_name][0]]}
                parts[tok_name] = build.shipped_tokenizer(CLIPTokenizer, settings)
        if "depth_estimator" in cls.component_names and folder is not None:
            parts.update(cls._depth_parts(config, folder, parts, dtype, hub))
        if "scheduler" not in parts:
            parts["scheduler"] = cls._single_file_scheduler(folder, config, stored, standard, prediction_type, ckpt.source)
        elif prediction_type is not None:
            logger.warning("from_single_file: prediction_type=%r is ignored because a scheduler was passed", prediction_type)
        for name in cls.component_names:
            parts.setdefault(name, None)
        if folder is not None and (folder / "model_index.json").is_file():
            index = read_json(folder / "model_index.json")
            pipe_config = {**{k: index[k] for k in cls.config_defaults if k in index}, **pipe_config}
        else:
            pipe_config = {**{k: standard[k] for k in cls.config_defaults if k in standard}, **pipe_config}
        if "requires_safety_checker" in cls.config_defaults:
            pipe_config.setdefault("requires_safety_checker", False)
        pipe = cls(**parts, **pipe_config)
        pipe.name_or_path = str(pretrained_model_link_or_path)
        return pipe

    @classmethod
    def _check_family(cls, ftype, source: str) -> None:
        xl_class = "text_encoder_2" in cls.component_names
        if ftype.name == "vae" or ftype.unet_prefix != infer.UNET:
            raise ConfigError(f"{source}: a bare {'VAE' if ftype.name == 'vae' else 'UNet'} file, not a full checkpoint; "
                              f"load it with {'AutoencoderKL' if ftype.name == 'vae' else 'UNet2DConditionModel'}"
                              f".from_single_file and pass it to from_pretrained / from_single_file")
        depth_class = "depth_estimator" in cls.component_names
        if (ftype.name == "depth") != depth_class:
            if depth_class:
                raise ConfigError(f"{source}: not a depth-to-image checkpoint ({ftype.name}, UNet without the 5th "
                                  f"depth input channel); {cls.__name__} cannot run it")
            raise ConfigError(f"{source}: an SD 2.x depth-to-image checkpoint (5 UNet input channels); load it with "
                              f"StableDiffusionDepth2ImgPipeline.from_single_file")
        if xl_class != (ftype.family in XL_FAMILIES):
            kind = "an SDXL" if ftype.family in XL_FAMILIES else "an SD 1.x / 2.x"
            hint = "StableDiffusionXLPipeline" if ftype.family in XL_FAMILIES else "StableDiffusionPipeline"
            raise ConfigError(f"{source}: {kind} checkpoint ({ftype.name}); {cls.__name__} cannot run it, use {hint}")

    @staticmethod
    def _depth_parts(config, folder: Path, parts: dict, dtype, hub: dict) -> dict:
        """The depth estimator and image processor of a ``config=`` folder that has them."""
        from runtime.models.dpt import DPTForDepthEstimation
        from runtime.models.dpt_image_processor import DPTImageProcessor

        found = {}
        if "depth_estimator" not in parts and (folder / "depth_estimator" / "config.json").is_file():
            found["depth_estimator"] = DPTForDepthEstimation.from_pretrained(
                str(config), subfolder="depth_estimator", dtype=dtype, **hub)
        if "feature_extractor" not in parts and (folder / "feature_extractor" / "preprocessor_config.json").is_file():
            found["feature_extractor"] = DPTImageProcessor.from_pretrained(folder, subfolder="feature_extractor")
        return found

    @classmethod
    def _single_file_scheduler(cls, folder, config, stored, standard, prediction_type, source):
        if folder is not None:
            path = folder / "scheduler" / "scheduler_config.json"
            if not path.is_file():
                raise ConfigError(f"config={config!s}: no scheduler/scheduler_config.json in {folder}")
            conf, src = read_json(path), str(path)
        elif "scheduler" in stored:
            conf, src = dict(stored["scheduler"]), "the scheduler config stored in the file"
        else:
            conf, src = dict(standard["scheduler"]), "the shipped scheduler config"
        if prediction_type is not None:
            conf["prediction_type"] = prediction_type
        return _scheduler_class(conf, src).from_config(conf)

    def save_single_file(self, path: str | os.PathLike, dtype=None) -> Path:
        """Write the pipeline's UNet, VAE and text encoders in the original single-file layout (.safetensors)."""
        tensors = {}
        tensors.update(writer.unet_original(self.unet))
        tensors.update(writer.vae_original(self.vae, "first_stage_model."))
        te, te2 = getattr(self, "text_encoder", None), getattr(self, "text_encoder_2", None)
        if "text_encoder_2" in self.component_names:
            if te is not None:
                tensors.update(writer.text_original(te, "clip", "conditioner.embedders.0.transformer.", False))
            if te2 is not None:
                prefix = "conditioner.embedders.1.model." if te is not None else "conditioner.embedders.0.model."
                tensors.update(writer.text_original(te2, "open_clip", prefix, False))
        elif te is not None:
            if not self.unet.config.use_linear_projection:  # SD 1.x: OpenAI CLIP; SD 2.x: OpenCLIP
                tensors.update(writer.text_original(te, "clip", "cond_stage_model.transformer.", False))
            else:  # OpenCLIP (SD 2.x): one layer more than the penultimate-layer encoder uses
                tensors.update(writer.text_original(te, "open_clip", "cond_stage_model.model.", True))
        configs = writer.model_configs(unet=self.unet, vae=self.vae, text_encoder=te, text_encoder_2=te2)
        if getattr(self, "scheduler", None) is not None:
            configs["scheduler"] = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")} | {
                "_class_name": type(self.scheduler).__name__}
        return writer.write(path, tensors, configs, dtype)
