"""Losses, resolved by name in ``model.set_loss("...")``."""

from twinkle._kinds import kind_module

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
        # distillation (loss/distill.py)
        "GKDLoss": "twinkle.loss.distill:GKDLoss",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("loss",), {"Loss": "twinkle.loss.base:Loss"})
