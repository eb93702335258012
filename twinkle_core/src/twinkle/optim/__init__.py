"""Optimizers and LR schedulers by name: ``model.set_optimizer('AdamW', lr=1e-4)``.

Every torch.optim optimizer and torch.optim.lr_scheduler scheduler is registered, plus
Twinkle's warmup schedulers.
"""

from twinkle._kinds import kind_module

_TORCH_OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "LBFGS",
    "Adafactor",
    "SparseAdam",
)
_TORCH_SCHEDULERS = (
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "OneCycleLR",
    "PolynomialLR",
)

_BUILTIN: dict[str, dict[str, str]] = {
    "optimizer": {name: f"torch.optim:{name}" for name in _TORCH_OPTIMIZERS},
    "lr_scheduler": {
        **{name: f"torch.optim.lr_scheduler:{name}" for name in _TORCH_SCHEDULERS},
        "CosineWarmupScheduler": "twinkle.optim.schedulers:CosineWarmupScheduler",
        "LinearWarmupScheduler": "twinkle.optim.schedulers:LinearWarmupScheduler",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("optimizer", "lr_scheduler"), {})
