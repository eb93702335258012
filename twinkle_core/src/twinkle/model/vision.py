"""Vision-language models in TransformersModel: which modules are the vision side, and freezing them.

A transformers vision-language model (``Qwen2_5_VLForConditionalGeneration``,
``Glm4vForConditionalGeneration``, ``DeepseekVLForConditionalGeneration`` ...) holds an inner
``model`` with a ``language_model`` and the vision side next to it: the vision tower
(``visual``, ``vision_model``, SAM's ``high_res_vision_*``) and the projector (``merger`` inside
``visual``, DeepSeek's ``aligner``). Every child of the inner model other than
``language_model`` is the vision side.

By default (``TransformersModel(freeze_vision=True)``) the vision side is frozen: full
training leaves it untouched, and LoRA adapters (``target_modules="all-linear"`` included) go on
the language model only, through peft's ``exclude_modules``.
"""

from __future__ import annotations

import re
from typing import Any


def vision_module_names(model: Any) -> list[str]:
    """Dotted names (relative to ``model``) of the vision tower and projector; ``[]`` for a text-only model."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model"):
        return []
    return [f"model.{name}" for name, _ in inner.named_children() if name != "language_model"]


def freeze_vision(model: Any) -> int:
    """Set ``requires_grad=False`` on the vision side of ``model``; returns the number of tensors frozen."""
    count = 0
    for name in vision_module_names(model):
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(False)
            count += 1
    return count


def exclude_vision(config: Any, model: Any) -> None:
    """Keep a peft LoRA config off the vision side: set ``exclude_modules`` unless the user set it."""
    names = vision_module_names(model)
    if not names or getattr(config, "exclude_modules", None):
        return
    config.exclude_modules = "(?:" + "|".join(re.escape(n) for n in names) + r")(?:\..*)?"
