"""Model families: one small file each, all behind ``base.Backbone``."""

from lightning_modules.backbones.base import Backbone
from lightning_modules.engine import Engine
from lightning_modules.backbones.sd import StableDiffusion
from lightning_modules.backbones.sdxl import StableDiffusionXL
from lightning_modules.backbones.sd3 import StableDiffusion3
from lightning_modules.backbones.zero123plus import Zero123Plus

__all__ = ["Backbone", "Engine", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "Zero123Plus"]
