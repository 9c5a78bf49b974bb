"""Single-file checkpoints (the original Stable Diffusion ``.safetensors`` / ``.ckpt`` files), offline.

One module per family for the key mapping (unet_keys, vae_keys, clip_keys, open_clip_keys), each
both ways; infer.py tells the type and settles configs; configs/ ships what standard types need;
checkpoint.py reads files safely; components.py builds models; save.py writes the original layout.
Pipelines: runtime/pipelines/single_file.py.
"""
from .checkpoint import Checkpoint, read
from .infer import FileType, detect
from .model_mixin import FromOriginalModelMixin

__all__ = ["Checkpoint", "FileType", "FromOriginalModelMixin", "detect", "read"]
