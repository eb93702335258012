"""Patches: switchable fixes and fast kernels applied to models."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "patch": {
        # The GPU fast path (twinkle.patch.fastpath lists what each does).
        "FusedLinearCrossEntropy": "twinkle.patch.fused_linear_ce:FusedLinearCrossEntropy",
        "VarlenAttention": "twinkle.patch.varlen:VarlenAttention",
        "Bf16Adapters": "twinkle.patch.lora_fast:Bf16Adapters",
        "FusedLoraLinear": "twinkle.patch.lora_fast:FusedLoraLinear",
        "MergedLoraForward": "twinkle.patch.lora_fast:MergedLoraForward",
        "GroupedLoraProjections": "twinkle.patch.lora_fast:GroupedLoraProjections",
        "FusedLoraMLP": "twinkle.patch.lora_mlp:FusedLoraMLP",
        "FusedOptimizer": "twinkle.patch.optimizer:FusedOptimizer",
        "ActivationCheckpointing": "twinkle.patch.checkpointing:ActivationCheckpointing",
        "RecomputeSwiGLU": "twinkle.patch.checkpointing:RecomputeSwiGLU",
        "CompileDecoderLayers": "twinkle.patch.compile:CompileDecoderLayers",
        "LigerKernels": "twinkle.patch.liger:LigerKernels",
        "Fp8FrozenGemms": "twinkle.patch.fp8:Fp8FrozenGemms",
    }
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.patch.base import Patch as Patch
    from twinkle.patch.checkpointing import ActivationCheckpointing as ActivationCheckpointing
    from twinkle.patch.checkpointing import RecomputeSwiGLU as RecomputeSwiGLU
    from twinkle.patch.compile import CompileDecoderLayers as CompileDecoderLayers
    from twinkle.patch.fp8 import Fp8FrozenGemms as Fp8FrozenGemms
    from twinkle.patch.fused_linear_ce import FusedLinearCrossEntropy as FusedLinearCrossEntropy
    from twinkle.patch.liger import LigerKernels as LigerKernels
    from twinkle.patch.lora_fast import Bf16Adapters as Bf16Adapters
    from twinkle.patch.lora_fast import FusedLoraLinear as FusedLoraLinear
    from twinkle.patch.lora_fast import GroupedLoraProjections as GroupedLoraProjections
    from twinkle.patch.lora_fast import MergedLoraForward as MergedLoraForward
    from twinkle.patch.lora_mlp import FusedLoraMLP as FusedLoraMLP
    from twinkle.patch.optimizer import FusedOptimizer as FusedOptimizer
    from twinkle.patch.varlen import VarlenAttention as VarlenAttention
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
