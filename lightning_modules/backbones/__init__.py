"""Model families: one small file each, all behind ``base.Backbone``."""

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.sd import StableDiffusion

__all__ = ["Backbone", "StableDiffusion"]
