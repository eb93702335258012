"""The converter protocol and the load/save plumbing around it.

A :class:`CheckpointConverter` knows one family's original checkpoint layout (``config.json``
fields and tensor names/shapes) and a transformers-native architecture with the same math. It
maps a config dict and a state dict both ways; everything else (reading shards, building the
model, keeping tensors the target has no place for, writing the original layout back) is here.

Round trip: ``to_original(to_target(sd)) == sd`` bit for bit, tensors that have no place in the
target model (``passthrough``, e.g. ChatGLM's saved ``inv_freq``) are kept aside and written back
as they were.

Example::

    from twinkle.convert import load_converted, save_original
    model = load_converted("/ckpt/internlm2-chat-1_8b")   # a LlamaForCausalLM, no remote code
    save_original(model, "/ckpt/out")                     # InternLM2's layout again
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

#: Files of a checkpoint directory that hold weights or the weights' index (never copied verbatim).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$")
#: Files :func:`save_original` writes itself.
_OWN_FILES = {"config.json", "generation_config.json"}


class ConversionError(ValueError):
    """A checkpoint that a converter cannot map; the message names the field or tensor and why."""


class CheckpointConverter:
    """Maps one family's original checkpoint layout onto a transformers-native model and back.

    Subclasses set :attr:`name`, :attr:`source_model_types` (the ``model_type`` values of the
    original ``config.json``) and :attr:`target_model_type`, and implement the four mappings.
    Register one with ``register("converter", "MyConverter", "pkg.mod:MyConverter")``;
    :func:`find_converter` asks every registered converter about a checkpoint's config.

    Example::

        class MyFamilyConverter(CheckpointConverter):
            name = "MyFamily"
            source_model_types = ("myfamily",)
            target_model_type = "llama"
            def target_config(self, config): ...
            def to_target(self, state_dict, config): ...
            def to_original(self, state_dict, config): ...
    """

    #: A short name for messages.
    name: str = ""
    #: ``model_type`` values of the original ``config.json`` this converter reads.
    source_model_types: tuple[str, ...] = ()
    #: The transformers ``model_type`` the checkpoint becomes.
    target_model_type: str = ""
    #: Regular expressions of original tensor names that have no place in the target model
    #: (recomputed buffers); they are kept aside on load and written back on save.
    passthrough: tuple[str, ...] = ()

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether this converter reads a checkpoint with this original ``config.json``."""
        return config.get("model_type") in self.source_model_types

    def target_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``AutoConfig.for_model(target_model_type, **kwargs)``.

        Raises:
            ConversionError: a config field the target architecture cannot express.
        """
        raise NotImplementedError

    def to_target(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        """Original tensors (without the passthrough ones) -> the target model's state dict."""
        raise NotImplementedError

    def to_original(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        """The target model's state dict -> tensors in the original layout (exact inverse of :meth:`to_target`)."""
        raise NotImplementedError

    def directory_fields(self, model_dir: str | Path) -> dict[str, Any]:
        """Target config fields read from the checkpoint directory's other files (a tokenizer's
        special-token ids); they override :meth:`target_config`'s. Default: none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.source_model_types)} -> {self.target_model_type})"


@dataclass
class Conversion:
    """What a converted model remembers of its original checkpoint (``model.twinkle_conversion``)."""

    converter: CheckpointConverter
    original_config: dict[str, Any]
    passthrough: dict[str, Any] = field(default_factory=dict)
    source_dir: str | None = None


# -- finding a converter -----------------------------------------------------------------------


def find_converter(config: Mapping[str, Any], registry: Any = None) -> CheckpointConverter | None:
    """The registered converter that reads a checkpoint with this ``config.json``, or ``None``.

    Raises:
        ConversionError: more than one registered converter claims the checkpoint.
    """
    if registry is None:
        from twinkle.runtime import get_registry

        registry = get_registry()
    found = []
    for name in registry.names("converter"):
        converter = registry.resolve("converter", name)
        if isinstance(converter, type):
            converter = converter()
        if converter.matches(config):
            found.append((name, converter))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ConversionError(
            f"several converters read model_type {config.get('model_type')!r}: {names}; unregister all but one"
        )
    return found[0][1] if found else None


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """A checkpoint directory's ``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir}: no config.json; point at a model directory") from None


def read_state_dict(model_dir: str | Path) -> dict[str, Any]:
    """Every tensor of a checkpoint directory: ``*.safetensors`` shards, else ``*.bin`` shards.

    Returns an empty dict for a directory without weight files.
    """
    import torch

    root = Path(model_dir)
    state: dict[str, Any] = {}
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    for shard in sorted(root.glob("*.bin")):
        if shard.name == "training_args.bin":
            continue
        state.update(torch.load(str(shard), map_location="cpu", weights_only=True))
    return state


# -- loading -------------------------------------------------------------------------------------


def target_config(
    converter: CheckpointConverter, config: Mapping[str, Any], model_dir: str | Path | None = None
) -> Any:
    """The transformers config object a checkpoint with this original config becomes."""
    from transformers import AutoConfig

    kwargs = converter.target_config(config)
    if model_dir is not None:
        kwargs.update(converter.directory_fields(model_dir))
    return AutoConfig.for_model(converter.target_model_type, **kwargs)


def split_passthrough(converter: CheckpointConverter, state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(tensors to convert, passthrough tensors)``."""
    patterns = [re.compile(p) for p in converter.passthrough]
    kept, aside = {}, {}
    for key, value in state_dict.items():
        (aside if any(p.fullmatch(key) for p in patterns) else kept)[key] = value
    return kept, aside


def load_converted(
    model_dir: str | Path,
    *,
    dtype: Any = None,
    seed: int = 42,
    converter: CheckpointConverter | None = None,
    **model_kwargs: Any,
) -> Any:
    """Load a checkpoint in a converter's original layout as a transformers model, or ``None``.

    ``None`` when no registered converter reads the checkpoint (transformers loads it itself).
    A directory with ``config.json`` and no weights gives a model initialized randomly with
    ``seed``. The model remembers the conversion (``model.twinkle_conversion``) for
    :func:`save_original`.

    Args:
        model_dir: the checkpoint directory (original ``config.json`` + weights).
        dtype: the parameters' dtype; ``None`` or ``"auto"``: the checkpoint's own.
        seed: random initialization when there are no weights.
        converter: use this converter instead of looking one up.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_config`` (``attn_implementation``).

    Raises:
        ConversionError: a config field or tensor the converter cannot map, or tensors missing /
            left over after the conversion (the message lists them).
    """
    import torch

    from twinkle.model.hf import auto_model_class

    original_config = read_config(model_dir)
    converter = converter or find_converter(original_config)
    if converter is None:
        return None
    config = target_config(converter, original_config, model_dir)
    auto_class = auto_model_class(None, config)  # vision-language targets: AutoModelForImageTextToText
    raw = read_state_dict(model_dir)
    if dtype in (None, "auto"):
        floats = [t.dtype for t in raw.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    kwargs = dict(model_kwargs, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if raw:
            kwargs.pop("trust_remote_code", None)
            try:
                from transformers.initialization import no_init_weights
            except ImportError:  # pragma: no cover - older transformers
                from transformers.modeling_utils import no_init_weights
            with no_init_weights():
                model = auto_class.from_config(config, **kwargs)
        else:
            logger.warning(
                "%s has a config.json but no weight files; initializing %s (%s) randomly with seed %d",
                model_dir,
                converter.target_model_type,
                converter.name,
                seed,
            )
            model = auto_class.from_config(config, **kwargs)
    passthrough: dict[str, Any] = {}
    if raw:
        tensors, passthrough = split_passthrough(converter, raw)
        converted = converter.to_target(tensors, original_config)
        _load_exactly(model, converted, converter)
    logger.info("loaded %s as transformers %r through %s (no remote code)", model_dir, config.model_type, converter)
    model.twinkle_conversion = Conversion(converter, original_config, passthrough, str(model_dir))
    return model


def _load_exactly(model: Any, state_dict: Mapping[str, Any], converter: CheckpointConverter) -> None:
    """``load_state_dict`` that names missing and unexpected tensors in a :class:`ConversionError`."""
    expected = set(model.state_dict())
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = sorted(expected - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ConversionError(
            f"{converter.name}: the converted checkpoint does not fit transformers' {converter.target_model_type!r} "
            f"model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model.load_state_dict(dict(state_dict), strict=not tied)


# -- saving --------------------------------------------------------------------------------------


def conversion_of(model: Any) -> Conversion | None:
    """The :class:`Conversion` a model was loaded with (also through a peft wrapper), or ``None``."""
    seen = model
    for _ in range(4):
        conversion = getattr(seen, "twinkle_conversion", None)
        if isinstance(conversion, Conversion):
            return conversion
        inner = getattr(seen, "base_model", None)
        inner = getattr(inner, "model", inner)
        if inner is None or inner is seen:
            break
        seen = inner
    return None


def original_state_dict(model: Any, state_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's weights (or ``state_dict``, in the model's naming) in the original layout."""
    conversion = conversion_of(model)
    if conversion is None:
        raise ConversionError("this model was not loaded through a converter; there is no original layout to write")
    if state_dict is None:
        state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    target = dict(state_dict)
    if getattr(model.config, "tie_word_embeddings", False):
        embed = next(
            k for k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight") if k in target
        )
        target.setdefault("lm_head.weight", target[embed])
    original = conversion.converter.to_original(target, conversion.original_config)
    original.update(conversion.passthrough)
    return {k: v.contiguous() for k, v in original.items()}


def save_original(model: Any, directory: str | Path, state_dict: Mapping[str, Any] | None = None) -> str:
    """Write ``model`` in its original layout: the original ``config.json``, ``model.safetensors``.

    The other files of the source checkpoint (its modeling code, tokenizer files) are copied along,
    so the directory loads wherever the original one did.

    Args:
        model: a model loaded by :func:`load_converted` (or a peft wrapper of one).
        directory: where to write (created).
        state_dict: the weights to write, in the model's naming (default: the model's own).

    Returns:
        The directory.

    Raises:
        ConversionError: the model was not loaded through a converter.
    """
    from safetensors.torch import save_file

    conversion = conversion_of(model)
    tensors = original_state_dict(model, state_dict)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if conversion.source_dir is not None and Path(conversion.source_dir).is_dir():
        for source in Path(conversion.source_dir).iterdir():
            if source.is_file() and source.name not in _OWN_FILES and not _WEIGHT_FILE.fullmatch(source.name):
                target = out / source.name
                if not target.exists():
                    shutil.copy2(source, target)
    (out / "config.json").write_text(json.dumps(conversion.original_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


# -- helpers for converters ---------------------------------------------------------------------


class Renames:
    """A two-way table of tensor names, ``{i}`` standing for a layer number.

    Example::

        names = Renames({"model.tok_embeddings.weight": "model.embed_tokens.weight",
                         "model.layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight"})
        names.forward("model.layers.3.attention.wo.weight")  # 'model.layers.3.self_attn.o_proj.weight'
    """

    def __init__(self, table: Mapping[str, str]) -> None:
        self._forward = [(_pattern(a), b) for a, b in table.items()]
        self._backward = [(_pattern(b), a) for a, b in table.items()]

    @staticmethod
    def _apply(rules: list, name: str) -> str | None:
        for pattern, template in rules:
            match = pattern.fullmatch(name)
            if match:
                return template.format(**match.groupdict())
        return None

    def forward(self, name: str) -> str | None:
        """Original name -> target name (``None``: not in the table)."""
        return self._apply(self._forward, name)

    def backward(self, name: str) -> str | None:
        """Target name -> original name (``None``: not in the table)."""
        return self._apply(self._backward, name)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def layer_of(name: str, pattern: str) -> tuple[str, str] | None:
    """``(layer number, suffix)`` when ``name`` matches ``pattern`` (``{i}`` the layer, ``{s}`` the suffix)."""
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>weight|bias)")
    match = re.fullmatch(regex, name)
    return (match["i"], match["s"]) if match else None


def require(config: Mapping[str, Any], key: str, converter: str) -> Any:
    """``config[key]`` or a :class:`ConversionError` naming the missing field."""
    if key not in config:
        raise ConversionError(f"{converter}: config.json has no {key!r}")
    return config[key]


QKV = ("q_proj", "k_proj", "v_proj")


def gather_qkv(
    state_dict: Mapping[str, Any], renames: Renames, family: str
) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """The first step of writing a fused-QKV family back: every tensor but q/k/v renamed to the
    original layout, and the q/k/v tensors grouped by ``(layer, suffix)`` for the caller to fuse.

    Raises:
        ConversionError: a tensor with no place in ``family``, or a layer missing one of q/k/v.
    """
    out: dict[str, Any] = {}
    fused: dict[tuple[str, str], dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        for proj in QKV:
            found = layer_of(name, f"model.layers.{{i}}.self_attn.{proj}.{{s}}")
            if found is not None:
                fused.setdefault(found, {})[proj] = tensor
                break
        else:
            original = renames.backward(name)
            if original is None:
                raise ConversionError(f"{family}: the model has a tensor {name!r} with no place in {family}")
            out[original] = tensor
    for (layer, suffix), parts in fused.items():
        if set(parts) != set(QKV):
            raise ConversionError(f"{family}: layer {layer} lacks one of q/k/v_proj.{suffix}")
    return out, fused
