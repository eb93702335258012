"""The TwinkleModel protocol: what every model backend implements with the same semantics."""

from __future__ import annotations

from twinkle.component import Component


class TwinkleModel(Component):
    """Base of model backends (TransformersModel, MegatronModel).

    Backends implement, with identical names, arguments and semantics: ``forward``,
    ``forward_only``, ``forward_backward``, ``calculate_loss``, ``backward``,
    ``clip_grad_norm``, ``step``, ``zero_grad``, ``lr_step``, ``clip_grad_and_step``,
    ``set_loss``, ``set_optimizer``, ``set_lr_scheduler``, ``set_template``,
    ``set_processor``, ``add_metric``, ``calculate_metric``, ``add_adapter_to_model``,
    ``save``, ``load``, ``resume_from_checkpoint`` and ``get_state_dict``.
    """
