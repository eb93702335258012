"""Losses, resolved by name in ``model.set_loss("...")``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "loss": {
        "CrossEntropyLoss": "twinkle.loss.cross_entropy:CrossEntropyLoss",
        # RL (loss/rl.py)
        "GRPOLoss": "twinkle.loss.rl:GRPOLoss",
        "PPOLoss": "twinkle.loss.rl:PPOLoss",
        "DAPOLoss": "twinkle.loss.rl:DAPOLoss",
        "DrGRPOLoss": "twinkle.loss.rl:DrGRPOLoss",
        "GSPOLoss": "twinkle.loss.rl:GSPOLoss",
        "CISPOLoss": "twinkle.loss.rl:CISPOLoss",
        # preference (loss/preference.py)
        "DPOLoss": "twinkle.loss.preference:DPOLoss",
        "SimPOLoss": "twinkle.loss.preference:SimPOLoss",
        "ORPOLoss": "twinkle.loss.preference:ORPOLoss",
        # PPO's critic (loss/value.py)
        "ValueLoss": "twinkle.loss.value:ValueLoss",
        # distillation (loss/distill.py)
        "GKDLoss": "twinkle.loss.distill:GKDLoss",
        # Tinker's losses (loss/tinker.py; the service's Tinker API uses the same functions)
        "TinkerLoss": "twinkle.loss.tinker:TinkerLoss",
    },
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.loss.base import Loss as Loss
    from twinkle.loss.cross_entropy import CrossEntropyLoss as CrossEntropyLoss
    from twinkle.loss.distill import GKDLoss as GKDLoss
    from twinkle.loss.preference import DPOLoss as DPOLoss
    from twinkle.loss.preference import ORPOLoss as ORPOLoss
    from twinkle.loss.preference import SimPOLoss as SimPOLoss
    from twinkle.loss.rl import CISPOLoss as CISPOLoss
    from twinkle.loss.rl import DAPOLoss as DAPOLoss
    from twinkle.loss.rl import DrGRPOLoss as DrGRPOLoss
    from twinkle.loss.rl import GRPOLoss as GRPOLoss
    from twinkle.loss.rl import GSPOLoss as GSPOLoss
    from twinkle.loss.rl import PPOLoss as PPOLoss
    from twinkle.loss.tinker import TinkerLoss as TinkerLoss
    from twinkle.loss.value import ValueLoss as ValueLoss
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
