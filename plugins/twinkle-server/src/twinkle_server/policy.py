"""What a tenant may ask for: adapter options (an allow-list), finite numbers, strict names.

Nothing a tenant sends may change state other tenants share (the base weights, the
server's files). Options that are not on the allow-list are refused with a 400 that names
them, rather than passed through to peft: several peft initializations rewrite the base
weights in place (``init_lora_weights="pissa"``, ``"olora"``, ``"loftq"``, ``"corda"``,
``"eva"``...), ``modules_to_save`` / ``trainable_token_indices`` train copies of base modules,
``layer_replication`` restructures the base model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from twinkle_server.scheduler import UserError

#: LoraConfig fields a tenant may set, and what values each accepts (checked below).
ALLOWED_LORA_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "init_lora_weights",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "task_type",
        "inference_mode",
        "base_model_name_or_path",
        "revision",
    }
)
#: init_lora_weights values that touch only the adapter's own tensors.
SAFE_INITS = (True, False, "gaussian")
#: add_adapter_to_model keyword arguments that are not LoraConfig fields.
ADAPTER_CALL_OPTIONS = frozenset({"gradient_accumulation_steps"})
MAX_ACCUMULATION_STEPS = 4096
#: keyword arguments that name a model or tokenizer to load: tenants may name only the served model.
MODEL_ID_KEYS = frozenset({"model_id", "tokenizer_id", "model_dir", "pretrained_model_name_or_path", "tokenizer"})


def served_model_ids(value: Any, served: set[str], model_dir: str, *, where: str, depth: int = 0) -> Any:
    """Replace every model/tokenizer id in ``value``'s keyword dicts by ``model_dir``, or refuse it.

    A tenant may name the served model (its public name or ``None``); paths and hub ids
    (``/etc``, ``hf://...``, ``ms://...``) never reach the server's filesystem or the network.
    """
    if depth > 16:
        raise UserError(f"{where}: arguments nested too deeply")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in MODEL_ID_KEYS and (item is None or isinstance(item, str)):
                if item is not None and item not in served:
                    raise UserError(
                        f"{where}: {key}={item!r} is refused; this server serves only {sorted(served)[0]!r} "
                        "(no paths, no hub ids)"
                    )
                out[key] = model_dir if item is not None else None
            else:
                out[key] = served_model_ids(item, served, model_dir, where=where, depth=depth + 1)
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [served_model_ids(v, served, model_dir, where=where, depth=depth + 1) for v in value]
    return value


def lora_fields(config: Any) -> dict[str, Any]:
    """The options a config sets: every field of a peft config that differs from its default, or a dict's keys."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config):
        default = type(config)()
        return {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in ("peft_type",) and getattr(config, f.name) != getattr(default, f.name)
        }
    raise UserError(f"the adapter config must be a LoraConfig or a dict of its fields, not {type(config).__name__}")


def check_adapter_options(config: Any, kwargs: Mapping[str, Any], *, max_rank: int) -> None:
    """Refuse any adapter option that is not on the allow-list, or a value out of range.

    Args:
        config: the ``config`` argument of ``add_adapter_to_model`` (a LoraConfig or dict).
        kwargs: the call's other keyword arguments (LoraConfig field overrides and
            ``gradient_accumulation_steps``).
        max_rank: the server's ``--max-rank``.

    Raises:
        UserError: naming the first refused option.
    """
    if config is not None and not isinstance(config, Mapping) and type(config).__name__ != "LoraConfig":
        raise UserError(f"only LoRA adapters are hosted; {type(config).__name__} is not accepted")
    fields = {**lora_fields(config), **{k: v for k, v in kwargs.items() if k not in ADAPTER_CALL_OPTIONS}}
    for name in sorted(fields):
        if name not in ALLOWED_LORA_FIELDS:
            raise UserError(
                f"adapter option {name!r} is not accepted by this server (it could change the shared base model or "
                f"is not supported); accepted: {', '.join(sorted(ALLOWED_LORA_FIELDS))}"
            )
    value = fields.get("init_lora_weights", True)
    if not any(value is safe or (isinstance(safe, str) and value == safe) for safe in SAFE_INITS):
        raise UserError(
            f"adapter option init_lora_weights={value!r} is refused: it initializes from (and rewrites) the shared "
            "base weights; use True, False or 'gaussian'"
        )
    if fields.get("bias", "none") != "none":
        raise UserError(
            f"adapter option bias={fields['bias']!r} would train the shared base model's biases; use 'none'"
        )
    if fields.get("inference_mode", False) not in (False, None):
        raise UserError("adapter option inference_mode must be False")
    _check_rank("r", fields.get("r", 8), max_rank)
    for key, rank in dict(fields.get("rank_pattern") or {}).items():
        _check_rank(f"rank_pattern[{key!r}]", rank, max_rank)
    for name in ("lora_alpha",):
        if name in fields:
            finite_number(name, fields[name])
    for key, alpha in dict(fields.get("alpha_pattern") or {}).items():
        finite_number(f"alpha_pattern[{key!r}]", alpha)
    if "lora_dropout" in fields:
        dropout = finite_number("lora_dropout", fields["lora_dropout"])
        if not 0 <= dropout < 1:
            raise UserError(f"adapter option lora_dropout={dropout} must be in [0, 1)")
    if "use_rslora" in fields and not isinstance(fields["use_rslora"], bool):
        raise UserError("adapter option use_rslora must be true or false")
    steps = kwargs.get("gradient_accumulation_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_ACCUMULATION_STEPS:
        raise UserError(f"gradient_accumulation_steps must be an integer in [1, {MAX_ACCUMULATION_STEPS}]")


def adapter_rank(config: Any, kwargs: Mapping[str, Any]) -> int:
    """The rank an adapter config asks for (after :func:`check_adapter_options`)."""
    fields = {**lora_fields(config), **kwargs}
    ranks = [int(fields.get("r", 8)), *(int(r) for r in dict(fields.get("rank_pattern") or {}).values())]
    return max(ranks)


def _check_rank(name: str, rank: Any, max_rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise UserError(f"adapter option {name}={rank!r} must be an integer rank in [1, {max_rank}] (--max-rank)")


def finite_number(name: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise UserError(f"{name}={value!r} is not a finite number")
    return float(value)


def check_finite_tree(name: str, value: Any, depth: int = 0) -> None:
    """Refuse NaN/Inf anywhere in a JSON-like value (configs, optimizer settings)."""
    if depth > 32:
        raise UserError(f"{name} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} contains a non-finite number ({value!r})")
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_finite_tree(f"{name}[{k!r}]", v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite_tree(f"{name}[{i}]", v, depth + 1)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.

    JSON has no non-finite numbers; pydantic (the tinker SDK's types) reads these strings back as
    floats, so a future whose result holds a NaN loss stays readable.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
