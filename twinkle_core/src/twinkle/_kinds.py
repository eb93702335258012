"""The kind table: one record per component kind, and everything derived from it.

Each :class:`Kind` says where the kind's names are imported from (``module``), which class
its components subclass (``base``), whether plain functions are accepted, which names the
official plugins provide (and so which ``pip install`` fixes a missing name) and what a
component receives and returns (``interface``, rendered into ``docs/plugins.md``).

Derived from :data:`KIND_TABLE`, nowhere else:

* the registry's kinds, base-class checks and not-found hints (:mod:`twinkle.registry`);
* the packages whose ``_BUILTIN`` tables core registers (:mod:`twinkle._builtin`);
* the lazy attributes of each public package (``from twinkle.model import TransformersModel``,
  PEP 562, :func:`kind_module`);
* the kinds table of ``docs/plugins.md`` (:func:`markdown_table`; a test keeps them equal).

Adding a kind: add a record here, create its package with a ``_BUILTIN`` table, the
``TYPE_CHECKING`` imports of its public names and ``__getattr__, __dir__ = kind_module(__name__)``
(copy ``twinkle/metric/__init__.py``), then run ``python -m twinkle._kinds`` and paste the
table into ``docs/plugins.md``. ``tests/plugin_system/test_kinds.py`` checks all of it.

This module imports nothing beyond the standard library: ``import twinkle`` stays light.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Kind:
    """One component kind.

    Args:
        name: the kind, as passed to ``register(kind, ...)`` (``"loss"``).
        module: the public package its names import from (``"twinkle.loss"``); several kinds
            may share one (``preprocessor`` and ``filter``).
        base: ``"module:Class"`` every class of this kind must subclass (checked when a name is
            first resolved); ``None`` accepts any class or callable.
        functions: whether plain functions are components too (rewards, filters, ...).
        official: names the official plugins provide -> the distribution that brings them.
        interface: what a component receives and returns, one line of Markdown.
        importable: whether registered names are attributes of ``module`` (launcher modes such as
            ``"local"`` are not: ``twinkle.launcher.local`` is a submodule).
    """

    name: str
    module: str
    base: str | None = None
    functions: bool = False
    official: Mapping[str, str] = field(default_factory=dict)
    interface: str = ""
    importable: bool = True

    @property
    def base_name(self) -> str | None:
        """The base class's name (``"Loss"``), exported by the kind's package."""
        return self.base.rpartition(":")[2] if self.base else None


_VLLM, _RAY, _MEGATRON, _REWARDS = "twinkle-vllm", "twinkle-ray", "twinkle-megatron", "twinkle-rewards"

KIND_TABLE: tuple[Kind, ...] = (
    Kind(
        "model",
        "twinkle.model",
        "twinkle.model.base:TwinkleModel",
        official={"MegatronModel": _MEGATRON},
        interface="`forward_backward(inputs=rows)`, `clip_grad_and_step()`, `calculate_metric() -> dict`, "
        "`save(dir) -> str`, ... (a `Component`; methods marked `@remote`)",
    ),
    Kind(
        "sampler",
        "twinkle.sampler",
        "twinkle.sampler.base:Sampler",
        official={"VLLMSampler": _VLLM},
        interface="`sample(prompts, sampling_params=None, adapter_name=None) -> list[SampleResponse]` "
        "(one per prompt), `update_weights(...)`, `set_template(...)`",
    ),
    Kind(
        "loss",
        "twinkle.loss",
        "twinkle.loss.base:Loss",
        interface="`__call__(inputs, outputs) -> LossOutput(loss, num_tokens, extra)`: `inputs` the collated "
        "batch (`shift_labels` [B, T], per-token extras), `outputs` holds `logits`; `loss` is a sum, "
        "`num_tokens` its normalizer",
    ),
    Kind(
        "metric",
        "twinkle.metric",
        "twinkle.metric.base:Metric",
        functions=True,
        official={"LogprobConsistency": _VLLM},
        interface="`update(inputs, outputs) -> None` per micro-batch (no gradients), "
        "`compute() -> dict[str, float]`, `reset() -> None`",
    ),
    Kind(
        "reward",
        "twinkle.reward",
        "twinkle.reward.base:Reward",
        functions=True,
        official={
            name: _REWARDS
            for name in (
                "GSM8KAccuracyReward",
                "MathAccuracyReward",
                "FormatReward",
                "LengthPenaltyReward",
                "CountdownReward",
                "CodeExecutionReward",
            )
        },
        interface="`__call__(trajectories, **kwargs) -> list[float]` (one finite float per trajectory); a "
        "`Reward` subclass implements `score(completion: str, trajectory, **kwargs) -> float`",
    ),
    Kind(
        "advantage",
        "twinkle.advantage",
        "twinkle.advantage.base:Advantage",
        functions=True,
        interface="`__call__(rewards, num_generations=G) -> list[float]` (rewards flat, the G samples of a "
        "prompt contiguous); a subclass implements `compute(groups: list[list[float]]) -> list[float]`",
    ),
    Kind(
        "environment",
        "twinkle.env",
        "twinkle.env.base:Environment",
        interface="`reset(task) -> Trajectory` (the opening messages), `step(action: str) -> StepResult` "
        "(`messages` for the model, per-turn `reward`, `done`, `final_reward`); driven by `run_episodes`",
    ),
    Kind(
        "template",
        "twinkle.template",
        "twinkle.template.base:Template",
        interface="`encode(trajectory, add_generation_prompt=False) -> InputFeature`, "
        "`batch_encode(...)`, `decode(ids) -> str`",
    ),
    Kind(
        "preprocessor",
        "twinkle.preprocessor",
        "twinkle.preprocessor.base:Preprocessor",
        interface="`__call__(rows: list[dict]) -> list[dict]` (Trajectories); a subclass implements "
        "`preprocess(row) -> dict | list[dict] | None` and raises `BadRowError` for a bad row",
    ),
    Kind(
        "filter",
        "twinkle.preprocessor",
        "twinkle.preprocessor.base:Filter",
        functions=True,
        interface="`__call__(row: dict) -> bool` (keep the row?)",
    ),
    Kind(
        "processor",
        "twinkle.processor",
        "twinkle.processor.base:InputProcessor",
        interface="`__call__(rows, device=None) -> dict[str, Tensor]`: encoded rows -> the collated, padded or "
        "packed batch (`input_ids`, `shift_labels`, `row_ids`, ...)",
    ),
    Kind(
        "checkpoint_engine",
        "twinkle.checkpoint_engine",
        "twinkle.checkpoint_engine.base:CheckpointEngine",
        official={
            "VLLMCheckpointEngine": _VLLM,
            "DistributedCheckpointEngine": _VLLM,
            "ObjectStoreCheckpointEngine": _VLLM,
        },
        interface="`sync(model, sampler, adapter_name=None) -> dict[str, float]` (`sync_seconds`, "
        "`sync_tensors`, `sync_bytes`)",
    ),
    Kind(
        "patch",
        "twinkle.patch",
        "twinkle.patch.base:Patch",
        interface="`applies_to(model) -> bool`, `apply(model) -> None`, `revert(model) -> None`; "
        "class attributes `name`, `enabled_by_default`",
    ),
    Kind(
        "converter",
        "twinkle.convert",
        "twinkle.convert.base:CheckpointConverter",
        interface="`matches(config) -> bool`, `target_config(config) -> dict`, `to_target(state_dict, config)`, "
        "`to_original(state_dict, config)`: an original checkpoint layout (remote-code families) <-> a "
        "transformers model, applied at load time",
    ),
    Kind(
        "optimizer",
        "twinkle.optim",
        functions=True,
        interface="`Optimizer(params, **kwargs)`: a `torch.optim.Optimizer` class or a factory returning one",
    ),
    Kind(
        "lr_scheduler",
        "twinkle.optim",
        functions=True,
        interface="`Scheduler(optimizer, **kwargs)`: a `torch.optim.lr_scheduler` class or a factory",
    ),
    Kind(
        "launcher",
        "twinkle.launcher",
        "twinkle.launcher.base:Launcher",
        official={"ray": _RAY},
        importable=False,
        interface="`Launcher(runtime, **options)`; `start()`, `create(cls, args, kwargs) -> proxy | None` "
        "(`None`: build here), `shutdown()`; registered by `twinkle_register_launchers` as a mode",
    ),
    Kind(
        "dataset",
        "twinkle.dataset",
        interface="a `Component` built from `DatasetMeta`s: `map(preprocessor)`, `filter(...)`, "
        "`set_template(...)`, `encode()`, `__len__`, `__getitem__`",
    ),
    Kind(
        "dataloader",
        "twinkle.dataloader",
        interface="`DataLoader(dataset, batch_size=..., ...)`: iterates lists of rows (one batch per step)",
    ),
    Kind(
        "tracker",
        "twinkle.tracker",
        "twinkle.tracker.base:Tracker",
        importable=False,  # names are 'jsonl', 'wandb'...: the submodules of twinkle.tracker; classes are exported
        interface="`Tracker(run_dir, **options)`; `log(source, step, metrics) -> None` per metrics emission "
        "(fed by `twinkle_metrics_emitted`), `close()`; selected by `initialize(trackers=[...])` / "
        "`TWINKLE_TRACKERS`",
    ),
)

#: kind name -> record.
KIND_BY_NAME: Mapping[str, Kind] = MappingProxyType({kind.name: kind for kind in KIND_TABLE})
#: Every kind name, in table order.
KINDS: tuple[str, ...] = tuple(KIND_BY_NAME)


def kinds_of_module(module_name: str) -> tuple[str, ...]:
    """The kinds whose names import from ``module_name`` (``twinkle.preprocessor`` -> preprocessor, filter)."""
    return tuple(kind.name for kind in KIND_TABLE if kind.module == module_name)


def kind_packages() -> tuple[str, ...]:
    """Every public kind package, once, in table order (core registers their ``_BUILTIN`` tables)."""
    return tuple(dict.fromkeys(kind.module for kind in KIND_TABLE))


def official_provider(kind: str, name: str) -> str | None:
    """The official distribution that provides ``name`` of ``kind``, if any."""
    record = KIND_BY_NAME.get(kind)
    return record.official.get(name) if record is not None else None


# -- install hints -------------------------------------------------------------------------------


def checkout_root() -> Path | None:
    """The Twinkle source checkout this ``twinkle`` was imported from (an editable install), or ``None``."""
    here = Path(__file__).resolve()
    # <root>/twinkle_core/src/twinkle/_kinds.py
    root = here.parents[3] if len(here.parents) > 3 else None
    if root is not None and (root / "plugins").is_dir() and (root / "twinkle_core" / "pyproject.toml").is_file():
        return root
    return None


def _checkout_path(path: Path) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    if relative.startswith(".."):
        return str(path)
    return relative if relative.startswith(".") else f".{os.sep}{relative}"


def install_hint(distribution: str) -> str:
    """How to install an official plugin, from the package index and from a checkout of Twinkle.

    One sentence, ending with a period, e.g. ``pip install twinkle-rewards (from a checkout of
    Twinkle: pip install ./plugins/twinkle-rewards).``; when this ``twinkle`` runs from a checkout
    that holds the plugin, the checkout's path comes first.
    """
    root = checkout_root()
    if root is not None and (root / "plugins" / distribution / "pyproject.toml").is_file():
        local = _checkout_path(root / "plugins" / distribution)
        return f"pip install {local} (this checkout; from a package index: pip install {distribution})."
    return f"pip install {distribution} (from a checkout of Twinkle: pip install ./plugins/{distribution})."


def extra_hint(extra: str) -> str:
    """How to install one of twinkle-core's extras (``http``, ``hub``, ``torch``), as one sentence."""
    root = checkout_root()
    if root is not None:
        local = _checkout_path(root / "twinkle_core")
        index = f"pip install 'twinkle-core[{extra}]'"
        return f"pip install -e '{local}[{extra}]' (this checkout; from a package index: {index})."
    local = f"pip install -e './twinkle_core[{extra}]'"
    return f"pip install 'twinkle-core[{extra}]' (from a checkout of Twinkle: {local})."


class MissingExtraError(ImportError):
    """A feature needs an optional dependency of twinkle-core that is not installed."""


def require_extra(extra: str, *modules: str, feature: str) -> None:
    """Import ``modules`` or raise :class:`MissingExtraError` naming ``feature`` and the install command.

    Example::

        require_extra("http", "httpx", feature="initialize(mode='http')")
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, from twinkle-core's {extra!r} extra, which is not installed. "
            f"Install it: {extra_hint(extra)}",
            name=missing[0],
        )


# -- docs ------------------------------------------------------------------------------------------


def markdown_table() -> str:
    """The kinds table of ``docs/plugins.md``: kind, where names import from, base class, interface."""
    lines = [
        "| kind | import from | base class | a component receives and returns | official plugins |",
        "|---|---|---|---|---|",
    ]
    for kind in KIND_TABLE:
        base = f"`{kind.base_name}`" if kind.base else "(any callable)"
        if kind.functions and kind.base:
            base += " or a function"
        providers = sorted(set(kind.official.values()))
        lines.append(f"| `{kind.name}` | `{kind.module}` | {base} | {kind.interface} | {', '.join(providers) or '-'} |")
    return "\n".join(lines)


# -- lazy package attributes (PEP 562) ----------------------------------------------------------------


def _asked_by_from_import() -> bool:
    """Whether the attribute lookup in progress comes from a ``from package import name`` statement.

    For a package, that statement runs ``importlib._bootstrap._handle_fromlist``, which probes the
    name with ``hasattr`` (a C call, so the frame above ``__getattr__`` is ``_handle_fromlist``).
    """
    frame = sys._getframe(2)  # 0: this function, 1: __getattr__, 2: whoever asked
    return frame.f_code.co_name == "_handle_fromlist" and frame.f_globals.get("__name__") == "importlib._bootstrap"


def kind_module(
    module_name: str, exports: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a public kind package.

    A name resolves, in order, as: a fixed export (``exports``, plus each kind's base class), a
    registered component of the package's kinds, a submodule. An unknown name raises the
    registry's :class:`~twinkle.registry.ComponentNotFoundError` (an ImportError: registered names,
    close matches, the ``pip install`` of an official name) when asked by ``from package import
    name``, and an AttributeError with the same message otherwise, as ``hasattr``, ``getattr(...,
    default)`` and pickle's module scan expect.
    """
    kinds = kinds_of_module(module_name)
    if not kinds:
        raise ValueError(f"{module_name!r} is not the module of any kind in twinkle._kinds.KIND_TABLE")
    importable = [k for k in kinds if KIND_BY_NAME[k].importable]
    fixed = {KIND_BY_NAME[k].base_name: KIND_BY_NAME[k].base for k in kinds if KIND_BY_NAME[k].base}
    fixed.update(exports or {})

    def __getattr__(name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        if name in fixed:
            from twinkle._utils import import_target

            return import_target(fixed[name])
        from twinkle.registry import ComponentNotFoundError
        from twinkle.runtime import get_registry

        registry = get_registry()
        for kind in importable:
            if (kind, name) in registry:
                return registry.resolve(kind, name)
        try:
            return importlib.import_module(f"{module_name}.{name}")  # a submodule, e.g. `twinkle.model.base`
        except ModuleNotFoundError as exc:
            if exc.name != f"{module_name}.{name}":
                raise
        message = registry._not_found_message(kinds[0], name)
        if _asked_by_from_import():
            raise ComponentNotFoundError(message, name=name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}. {message}", name=name)

    def __dir__() -> list[str]:
        from twinkle.runtime import get_registry

        registry = get_registry()
        names = set(fixed)
        for kind in importable:
            names.update(registry.names(kind))
        return sorted(names)

    return __getattr__, __dir__


if __name__ == "__main__":  # pragma: no cover - `python -m twinkle._kinds` prints the docs table
    print(markdown_table())
