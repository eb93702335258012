"""Transformers causal LMs from a directory, a config object or a dict: the one way backends build them.

One job: turn the ``model_id`` / ``config`` arguments every backend takes into a
``transformers`` config and a model: loaded from the weights when the directory has them
(:func:`twinkle.model.files.has_weights`), else initialized randomly from the config with a
seed, so every backend (TransformersModel, MegatronModel's conversion source, samplers)
starts from the same weights.

Example::

    from twinkle.model.hf import build_causal_lm
    model = build_causal_lm("twinkle_core/src/twinkle/assets/tiny-qwen2", None, dtype=None, seed=42)
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping

from twinkle.model.files import has_weights

logger = logging.getLogger("twinkle.model")


def resolve_config(model_dir: str | None, config: Any, *, owner: str, trust_remote_code: bool = False) -> Any:
    """The ``transformers.PretrainedConfig`` for a model directory or a ``config=`` argument.

    Args:
        model_dir: the local model directory (``config.json``), used when ``config`` is ``None``.
        config: a ``PretrainedConfig`` (deep-copied: patches may change the model's copy), a
            dict with ``model_type``, or ``None``.
        owner: the class name the error messages start with.
        trust_remote_code: passed to transformers.

    Raises:
        FileNotFoundError: ``model_dir`` without ``config.json``.
        ValueError: a dict without ``model_type``.
    """
    from transformers import AutoConfig

    if config is None:
        check_model_dir(model_dir, owner=owner)
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if isinstance(config, Mapping):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{owner}(config=dict): the dict needs a 'model_type' such as 'qwen2'")
        return AutoConfig.for_model(model_type, **data)
    return copy.deepcopy(config)


def auto_model_class(model_dir: str | None, config: Any = None) -> Any:
    """``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language ``model_type``.

    Vision-language families (Qwen2.5-VL, Qwen3-VL, GLM-4V, DeepSeek-VL) are not causal-LM
    auto classes in transformers 5; their ``...ForConditionalGeneration`` class is the same
    causal LM over text with images spliced in.
    """
    import json

    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    if model_type is None and model_dir is not None and os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - other transformers layouts
        return AutoModelForCausalLM
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def check_model_dir(model_dir: str | None, *, owner: str) -> None:
    """Raise ``FileNotFoundError`` (naming the fix) when ``model_dir`` has no ``config.json``."""
    if model_dir is None or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{owner}: {model_dir!r} has no config.json; point model_id at a model directory "
            f"(config.json plus weights) or a hub id such as 'ms://Qwen/Qwen2.5-0.5B-Instruct'"
        )


def build_causal_lm(
    model_dir: str | None,
    config: Any,
    *,
    dtype: Any,
    seed: int,
    owner: str = "TransformersModel",
    trust_remote_code: bool = False,
    check: Any = None,
    **kwargs: Any,
) -> Any:
    """A ``transformers`` causal LM: the weights of ``model_dir``, or a seeded random init.

    Args:
        model_dir: a local model directory (used when ``config`` is ``None``).
        config: a config object or dict (random init), or ``None`` (``model_dir``).
        dtype: the parameter dtype (``None``/``'auto'``: transformers' default).
        seed: the seed of a random initialization (forked RNG: the caller's stream is kept).
        owner: the class name used in messages.
        trust_remote_code: passed to transformers.
        check: an optional ``f(config)`` run before any weights are built (raises to refuse).
        **kwargs: passed to ``from_pretrained`` / ``from_config`` (``attn_implementation`` ...).

    Raises:
        FileNotFoundError: ``model_dir`` without ``config.json``.
        ValueError: a config dict without ``model_type``.
    """
    import torch

    if config is None:
        check_model_dir(model_dir, owner=owner)
    from_weights = config is None and has_weights(model_dir)
    resolved = None
    if check is not None or not from_weights:
        resolved = resolve_config(model_dir, config, owner=owner, trust_remote_code=trust_remote_code)
        if check is not None:
            check(resolved)
    auto_class = auto_model_class(model_dir, resolved)
    if from_weights:
        return auto_class.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    if config is None:
        logger.warning(
            "%s: %s has a config.json but no weight files; initializing %s randomly from the config with seed %d",
            owner,
            model_dir,
            resolved.model_type,
            seed,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dtype not in (None, "auto"):
            kwargs["dtype"] = dtype
        return auto_class.from_config(resolved, trust_remote_code=trust_remote_code, **kwargs)
