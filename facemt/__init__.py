"""facemt: age group, gender and facial expression from one multi-task network.

``facemt.load()`` returns the built-in base model; ``facemt.load(RUN)`` a run
written by ``facemt fit``. Heavy modules (torch, timm) are imported on first
use of these names, so ``import facemt`` and ``facemt --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

from facemt.errors import FacemtError
from facemt.tasks import TASK_NAMES, TASKS

__version__ = "0.2.0"

_LAZY = {"load": "facemt.inference", "Predictor": "facemt.inference", "Prediction": "facemt.inference",
         "cross_validate": "facemt.evaluation", "TrainConfig": "facemt.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'facemt' has no attribute {name!r}")


__all__ = ["FacemtError", "Prediction", "Predictor", "TASKS", "TASK_NAMES", "TrainConfig", "__version__",
           "cross_validate", "load"]
