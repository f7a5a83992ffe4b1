"""facemt: age group, gender and facial expression from one multi-task network."""

__version__ = "0.1.0"

from facemt.errors import FacemtError  # noqa: E402
from facemt.inference import Prediction, Predictor, load  # noqa: E402
from facemt.tasks import TASK_NAMES, TASKS  # noqa: E402


def cross_validate(*args, **kwargs):
    """See :func:`facemt.evaluation.cross_validate` (imported lazily: it pulls in scikit-learn)."""
    from facemt.evaluation import cross_validate as _cv

    return _cv(*args, **kwargs)

__all__ = ["FacemtError", "Prediction", "Predictor", "TASKS", "TASK_NAMES", "__version__", "cross_validate", "load"]
