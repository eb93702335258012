"""Kernel tuning: one config object, read when a kernel runs (not when its module is imported).

Every tile size, warp count, chunk size and kernel choice of the fast path is a field of
:class:`KernelConfig`. The kernels read :func:`kernel_config` each time they run, so a change
takes effect at the next call, whenever it is made. The defaults come from the environment
(``TWINKLE_`` + the field name in capitals, e.g. ``TWINKLE_LCE_CHUNK_BYTES``), read once, when
the config is first used (or again by :func:`reset_kernel_config`).

=================================  ============  ==========================================================
field (environment variable)       default       what it tunes
=================================  ============  ==========================================================
``lce_chunk_bytes``                512 MiB       float32 logits one chunk of the fused cross-entropy holds
``lce_weight_grad_chunk_bytes``    2 GiB         the same when the LM head trains (full fine-tuning)
``lce_kernel``                     ``auto``      a chunk's loss: ``auto``, ``triton``, ``inductor``, ``eager``
``lce_compile``                    ``True``      ``False``: ``auto``/``inductor`` run the eager chunk
``ce_block``                       4096          vocabulary columns per loop of the Triton CE kernel
``ce_warps``                       8             its warps per program (one program per row)
``lora_grad_kernel``               ``auto``      ``twinkle::lora_grads`` for MergedLoraForward
``lora_merge_kernel``              ``auto``      ``twinkle::lora_merge`` for MergedLoraForward
``swiglu_backward_kernel``         ``auto``      ``twinkle::swiglu_backward`` for FusedLoraMLP
``lora_grad_block_t``              64            ``lora_grads``: tokens per tile
``lora_grad_block_o``              128           ``lora_grads``: outputs per tile
``lora_grad_warps``                4             ``lora_grads``: warps per program
``lora_target_programs``           264           programs the LoRA/SwiGLU kernels aim for (two per H200 SM)
``lora_merge_block_o``             32            ``lora_merge``: rows of ``W`` per tile
``lora_merge_block_i``             256           ``lora_merge``: columns of ``W`` per tile
``lora_merge_warps``               4             ``lora_merge``: warps per program
``swiglu_block_t``                 32            ``swiglu_low``/``swiglu_lora_grads``: tokens per tile
``swiglu_block_c``                 128           the same: columns per tile
``swiglu_warps``                   8             the same: warps per program
``swiglu_bwd_block``               1024          ``swiglu_backward``: columns per program
``swiglu_bwd_warps``               4             ``swiglu_backward``: warps per program
``fp8_min_features``               1024          Fp8FrozenGemms takes layers with at least this many features
``compile_mode``                   ``None``      ``torch.compile`` mode of CompileDecoderLayers
``multi_lora_kernel``              ``auto``      a multi-adapter pass: ``auto``, ``torch``, ``triton`` (multi_lora)
=================================  ============  ==========================================================

The three ``*_kernel`` choices are ``"auto"`` (on CUDA when triton imports), ``True`` (also
elsewhere: the CPU runs Triton's interpreter, for tests) or ``False``; a patch's own argument
(``MergedLoraForward(grad_kernel=...)``) wins over them.

Example::

    from twinkle.patch.kernel_config import kernel_config, kernel_settings, set_kernel_config

    set_kernel_config(lce_chunk_bytes=256 << 20)  # from now on
    with kernel_settings(lora_merge_block_o=128, lora_merge_warps=8):  # only inside the block
        ...
    kernel_config().ce_block  # 4096
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Mapping

_KERNEL_CHOICES = ("auto", "1", "0", "true", "false", "on", "off")


@dataclasses.dataclass
class KernelConfig:
    """The fast path's kernel tuning (see the module docstring for each field)."""

    lce_chunk_bytes: int = 1 << 29
    lce_weight_grad_chunk_bytes: int = 1 << 31
    lce_kernel: str = "auto"
    lce_compile: bool = True
    ce_block: int = 4096
    ce_warps: int = 8
    lora_grad_kernel: str | bool = "auto"
    lora_merge_kernel: str | bool = "auto"
    swiglu_backward_kernel: str | bool = "auto"
    lora_grad_block_t: int = 64
    lora_grad_block_o: int = 128
    lora_grad_warps: int = 4
    lora_target_programs: int = 264
    lora_merge_block_o: int = 32
    lora_merge_block_i: int = 256
    lora_merge_warps: int = 4
    swiglu_block_t: int = 32
    swiglu_block_c: int = 128
    swiglu_warps: int = 8
    swiglu_bwd_block: int = 1024
    swiglu_bwd_warps: int = 4
    fp8_min_features: int = 1024
    compile_mode: str | None = None
    multi_lora_kernel: str = "auto"

    @staticmethod
    def env_name(field: str) -> str:
        """The environment variable that sets ``field``'s default (``lce_kernel`` -> ``TWINKLE_LCE_KERNEL``)."""
        return "TWINKLE_" + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """The defaults, each replaced by its environment variable where that is set (and not empty).

        Raises:
            ValueError: a variable that does not parse (``TWINKLE_CE_BLOCK=big``).
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(field.name), "").strip()
            if raw:
                values[field.name] = _parse(field.name, field.default, raw, cls.env_name(field.name))
        return cls(**values)

    def replace(self, **changes: Any) -> KernelConfig:
        """A copy with ``changes`` (field names; unknown ones raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)


def _parse(name: str, default: Any, raw: str, source: str) -> Any:
    if isinstance(default, bool):
        choice = raw.lower()
        if choice not in ("1", "0", "true", "false", "on", "off"):
            raise ValueError(f"{source}={raw!r}: {name} takes 1/0, true/false or on/off")
        return choice in ("1", "true", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r}: {name} takes an integer") from None
    return raw


_current: list[KernelConfig] = []


def kernel_config() -> KernelConfig:
    """The config in effect: the one last set, else the environment's (:meth:`KernelConfig.from_env`)."""
    if not _current:
        _current.append(KernelConfig.from_env())
    return _current[0]


def set_kernel_config(config: KernelConfig | None = None, /, **changes: Any) -> KernelConfig:
    """Put ``config`` (default: the one in effect) with ``changes`` in effect; returns the previous one.

    Example::

        previous = set_kernel_config(ce_block=2048, ce_warps=4)
        ...
        set_kernel_config(previous)
    """
    previous = kernel_config()
    _current[0] = (config if config is not None else previous).replace(**changes)
    return previous


def reset_kernel_config() -> KernelConfig:
    """Read the environment again (:meth:`KernelConfig.from_env`) and put that in effect; returns it."""
    _current.clear()
    return kernel_config()


@contextlib.contextmanager
def kernel_settings(config: KernelConfig | None = None, /, **changes: Any) -> Iterator[KernelConfig]:
    """``config`` (default: the one in effect) with ``changes`` in effect inside the block, the previous after it.

    Example::

        with kernel_settings(swiglu_bwd_block=256):
            out = model(...)
    """
    previous = set_kernel_config(config, **changes)
    try:
        yield kernel_config()
    finally:
        set_kernel_config(previous)


def kernel_choice(name: str, value: str | bool | None, field: str, owner: str) -> str | bool:
    """``"auto"``, ``True`` or ``False``: ``value``, or when it is ``None`` the config's ``field``.

    Raises:
        ValueError: a string other than ``auto``, ``1``/``0``, ``true``/``false``, ``on``/``off``.
    """
    if value is None:
        value = getattr(kernel_config(), field)
    if isinstance(value, str):
        choice = value.strip().lower()
        if choice not in _KERNEL_CHOICES:
            raise ValueError(
                f"{owner}: {name} must be 'auto', True or False ({KernelConfig.env_name(field)}), got {value!r}"
            )
        return "auto" if choice == "auto" else choice in ("1", "true", "on")
    return bool(value)
