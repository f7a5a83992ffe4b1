"""facemt: age group, gender and facial expression from one multi-task network."""

__version__ = "0.1.0"

from facemt.errors import FacemtError  # noqa: E402
from facemt.inference import Prediction, Predictor, load  # noqa: E402
from facemt.tasks import TASK_NAMES, TASKS  # noqa: E402

__all__ = ["FacemtError", "Prediction", "Predictor", "TASKS", "TASK_NAMES", "__version__", "load"]
