import pytest

from facemt import FacemtError
from facemt.tasks import TASK_NAMES, TASKS, check_schema, schema_dict, select_tasks


def test_schema_order_and_codes():
    assert TASK_NAMES == ("age_group", "gender", "expression")
    assert TASKS["age_group"].classes == ("young", "middle", "old")
    assert TASKS["expression"].codes == ("a", "d", "f", "h", "n", "s")
    assert TASKS["gender"].index("F") == 1
    assert TASKS["expression"].index("happiness") == 3


def test_unknown_label_names_choices():
    with pytest.raises(FacemtError, match="anger"):
        TASKS["expression"].index("surprise")


def test_select_tasks_orders_and_validates():
    assert select_tasks("expression,age_group") == ("age_group", "expression")
    assert select_tasks(None) == TASK_NAMES
    with pytest.raises(FacemtError, match="unknown task 'race'"):
        select_tasks("race")
    with pytest.raises(FacemtError):
        select_tasks(",")


def test_stored_schema_must_match():
    assert check_schema(schema_dict(("gender",))) == ("gender",)
    with pytest.raises(FacemtError):
        check_schema({"gender": ["female", "male"]})
