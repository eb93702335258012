"""A plugin whose metrics hook raises does not break calculate_metric() (issue 29.5)."""

from __future__ import annotations

import warnings

import twinkle
from model_test_utils import make_rows
from twinkle.model import TransformersModel
from twinkle.plugins import PluginHookWarning
from twinkle.testing import registered_plugin


class BrokenSink:
    @twinkle.hookimpl
    def twinkle_metrics_emitted(self, runtime, source, step, metrics):
        raise ConnectionError("metrics server down")


def test_a_raising_metrics_hook_is_skipped_and_calculate_metric_returns(tiny_model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with registered_plugin(BrokenSink(), name="broken-sink", seed=1):
            model = TransformersModel(model_id=tiny_model_dir)
            model.set_optimizer("AdamW", lr=1e-3)
            for _ in range(2):
                model.forward_backward(inputs=make_rows(2))
                model.clip_grad_and_step()
                metric = model.calculate_metric(is_training=True)
                assert metric["loss"] > 0
    named = [str(w.message) for w in caught if issubclass(w.category, PluginHookWarning)]
    assert len(named) == 1, named  # once, though the hook raised twice
    assert "'broken-sink'" in named[0] and "ConnectionError: metrics server down" in named[0]
