"""AutoPipelineFor{Text2Image, Image2Image, Inpainting}: the task's class for a checkpoint's family."""
from __future__ import annotations

import os

from runtime.models.config import read_json
from runtime.models.errors import ConfigError
from runtime.models.hub import HUB_KWARGS, resolve_file

TASKS = ("text2image", "image2image", "inpainting")


def _families() -> dict[str, dict[str, str]]:
    """Pipeline family -> task -> class name; a class name of any member finds its family."""
    return {
        "stable-diffusion": {
            "text2image": "StableDiffusionPipeline",
            "image2image": "StableDiffusionImg2ImgPipeline",
            "inpainting": "StableDiffusionInpaintPipeline",
        },
        "stable-diffusion-xl": {
            "text2image": "StableDiffusionXLPipeline",
            "image2image": "StableDiffusionXLImg2ImgPipeline",
            "inpainting": "StableDiffusionXLInpaintPipeline",
        },
    }


def task_class(class_name: str, task: str) -> type:
    """Our pipeline class doing ``task`` in the family of ``class_name``; a clear error if none."""
    from . import PIPELINE_CLASSES

    for family in _families().values():
        if class_name in family.values():
            target = family[task]
            if target not in PIPELINE_CLASSES:
                raise ConfigError(f"{task} for {class_name} needs {target}, which diffusion-runtime does not implement")
            return PIPELINE_CLASSES[target]
    raise ConfigError(f"no {task} pipeline for {class_name!r}; supported families: "
                      + ", ".join(sorted(n for f in _families().values() for n in f.values() if n in PIPELINE_CLASSES)))


class _AutoPipeline:
    task: str = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained or from_pipe")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs):
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        index_path = resolve_file(path_or_id, "model_index.json", **hub)
        name = read_json(index_path).get("_class_name")
        return task_class(str(name), cls.task).from_pretrained(path_or_id, **kwargs)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """The same components under this task's pipeline class: no weights are reloaded."""
        return task_class(type(pipe).__name__, cls.task).from_pipe(pipe, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text2image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image2image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
