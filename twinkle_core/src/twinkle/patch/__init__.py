"""Patches: switchable fixes and fast kernels applied to models."""

from twinkle._kinds import kind_module

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

__getattr__, __dir__ = kind_module(__name__, ("patch",), {"Patch": "twinkle.patch.base:Patch"})
