"""The Tinker API's losses are core's (twinkle.loss.tinker): one implementation per formula."""

from __future__ import annotations


def test_server_losses_are_the_core_functions():
    from twinkle.loss import tinker
    from twinkle_server import losses

    assert losses.LOSSES is tinker.LOSSES
    assert losses.check_loss is tinker.check_loss
    assert losses.LossConfigError is tinker.LossConfigError
    assert losses.LOSS_INPUTS is tinker.LOSS_INPUTS and losses.LOSS_CONFIG is tinker.LOSS_CONFIG
