"""Real pretrained models that install from a package registry (no model hub needed)."""

from trl_flower.models import smollm2 as _smollm2
from trl_flower.models.smollm2 import *  # noqa: F403  (the public names are smollm2.__all__, listed once there)

__all__ = list(_smollm2.__all__)
