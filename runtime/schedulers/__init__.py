"""Schedulers with diffusers' names, configs and interface."""
from .base import SchedulerMixin, SchedulerOutput  # noqa: F401
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler_discrete import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .heun_discrete import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .lms_discrete import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc_multistep import UniPCMultistepScheduler

# name -> class: how model_index.json / scheduler_config.json "_class_name" finds our class.
SCHEDULER_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        PNDMScheduler,
        LMSDiscreteScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        LCMScheduler,
    )
}

__all__ = ["SCHEDULER_CLASSES", "SchedulerMixin", "SchedulerOutput", *SCHEDULER_CLASSES]
