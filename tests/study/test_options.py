"""moegrad.study.options (the parser's torch-free names) equals what the code accepts."""

import inspect

from moegrad import _spec
from moegrad.experts import IMPLS
from moegrad.study import options
from moegrad.study.tasks import TASKS


def test_options_equal_the_names_the_code_takes():
    assert options.IMPLS == IMPLS
    assert sorted(options.TASK_NAMES) == sorted(TASKS) and list(options.TASK_NAMES) == sorted(TASKS)
    assert options.ROUTINGS == _spec.ROUTINGS
    for name, cls in TASKS.items():
        params = inspect.signature(cls.__init__).parameters
        assert set(options.TASK_KNOBS[name].values()) <= set(params), name


def test_layer_estimator_maps_the_remoe_name_to_none():
    assert options.layer_estimator("remoe") is None
    assert options.layer_estimator("dense") == "dense"
    assert options.ROUTING_ESTIMATORS["expert_choice"] == _spec.EXPERT_CHOICE_ESTIMATORS
    assert options.ROUTING_ESTIMATORS["remoe"] == (options.NO_ESTIMATOR,)
