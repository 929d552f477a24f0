"""Mask2Former in pure PyTorch: build, load, predict.

import mask2former
predictor = mask2former.load()            # the bundled model (or any checkpoint path)
result = predictor.predict("photo.jpg", task="panoptic")
model = mask2former.build("coco-panoptic-r50")   # a randomly initialised preset
"""

__version__ = "0.1.0"

# Imported on first use so that `import mask2former.rle` (or the CLI) does not pay for the whole model.
_LAZY = {
    "build": "mask2former.api",
    "load": "mask2former.api",
    "load_model": "mask2former.api",
    "presets": "mask2former.api",
    "ModelConfig": "mask2former.config",
    "get_preset": "mask2former.config",
    "Predictor": "mask2former.inference.predictor",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mask2former' has no attribute {name!r}")
