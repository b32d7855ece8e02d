"""Models: the model type, the registry of named models, diffusers folders, the papers' zoo, the embedded digits
model, CompVis checkpoint conversion, the sampling loop and the noise schedules.

The public entry points are re-exported here (README "Models"): `bench.models.load_model`, `DiffusionModel`,
`register_model`, `available_models`.
"""

from bench.models.model import DiffusionModel
from bench.models.registry import available_models, load_model, register_model

__all__ = ["DiffusionModel", "available_models", "load_model", "register_model"]
