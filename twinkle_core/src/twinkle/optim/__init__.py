"""Optimizers and LR schedulers by name: ``model.set_optimizer('AdamW', lr=1e-4)``.

Every torch.optim optimizer and torch.optim.lr_scheduler scheduler is registered, plus
Twinkle's warmup schedulers.
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from torch.optim import ASGD as ASGD
    from torch.optim import LBFGS as LBFGS
    from torch.optim import SGD as SGD
    from torch.optim import Adadelta as Adadelta
    from torch.optim import Adafactor as Adafactor
    from torch.optim import Adagrad as Adagrad
    from torch.optim import Adam as Adam
    from torch.optim import Adamax as Adamax
    from torch.optim import AdamW as AdamW
    from torch.optim import NAdam as NAdam
    from torch.optim import RAdam as RAdam
    from torch.optim import RMSprop as RMSprop
    from torch.optim import Rprop as Rprop
    from torch.optim import SparseAdam as SparseAdam
    from torch.optim.lr_scheduler import ChainedScheduler as ChainedScheduler
    from torch.optim.lr_scheduler import ConstantLR as ConstantLR
    from torch.optim.lr_scheduler import CosineAnnealingLR as CosineAnnealingLR
    from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts as CosineAnnealingWarmRestarts
    from torch.optim.lr_scheduler import CyclicLR as CyclicLR
    from torch.optim.lr_scheduler import ExponentialLR as ExponentialLR
    from torch.optim.lr_scheduler import LambdaLR as LambdaLR
    from torch.optim.lr_scheduler import LinearLR as LinearLR
    from torch.optim.lr_scheduler import MultiplicativeLR as MultiplicativeLR
    from torch.optim.lr_scheduler import MultiStepLR as MultiStepLR
    from torch.optim.lr_scheduler import OneCycleLR as OneCycleLR
    from torch.optim.lr_scheduler import PolynomialLR as PolynomialLR
    from torch.optim.lr_scheduler import ReduceLROnPlateau as ReduceLROnPlateau
    from torch.optim.lr_scheduler import SequentialLR as SequentialLR
    from torch.optim.lr_scheduler import StepLR as StepLR

    from twinkle.optim.schedulers import CosineWarmupScheduler as CosineWarmupScheduler
    from twinkle.optim.schedulers import LinearWarmupScheduler as LinearWarmupScheduler
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
