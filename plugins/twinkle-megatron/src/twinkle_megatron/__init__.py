"""Twinkle plugin: MegatronModel (TP/PP/EP/CP) on megatron-core."""

__version__ = "0.1.0"
