"""megatron-core's own optimizer path (CUDA only): DDP grad buffers + ``get_megatron_optimizer``.

Selected with ``model.set_optimizer('AdamW', lr=..., use_megatron_optimizer=True)`` on a
CUDA MegatronModel. The semantics stay those of the TwinkleModel protocol:

* the model is wrapped in megatron's ``DistributedDataParallel`` with
  ``calculate_per_token_loss`` (gradients are *summed* over data-parallel ranks, never
  averaged) and ``grad_reduce_in_fp32``; backward accumulates into the fp32 ``main_grad``
  buffers;
* at the end of a window the buffers are all-reduced (``finish_grad_sync``) and scaled by
  ``1 / window tokens`` (``scale_gradients``), exactly like the torch path;
* ``clip_grad_norm(max_grad_norm)`` clips the optimizer's main gradients with megatron's
  tensor-parallel-aware norm and returns the norm; ``step`` then updates (fp32 main
  parameters for bf16/fp16 models, copied back to the model).

Differences from ``torch.optim.AdamW`` that a user can see: megatron exempts biases and
1-D parameters (norm weights) from weight decay. With ``weight_decay=0`` the two paths
agree (the GPU test checks it).

Megatron's optimizers allocate CUDA tensors; on CPU, :func:`build` raises and the torch
optimizer path is the one to use.

Example::

    model.set_optimizer("AdamW", lr=1e-5, weight_decay=0.0, use_megatron_optimizer=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_NAMES = {"AdamW": "adam", "Adam": "adam", "SGD": "sgd"}


@dataclass
class MegatronOptimizer:
    """A megatron-core optimizer over a DDP-wrapped megatron model, with the protocol's steps.

    Attributes:
        ddp: the ``megatron.core.distributed.DistributedDataParallel`` wrapper.
        optimizer: the ``MegatronOptimizer`` (FP32Optimizer or mixed precision).
    """

    ddp: Any
    optimizer: Any
    prepared: bool = False

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def torch_optimizer(self) -> Any:
        """The wrapped ``torch.optim`` optimizer (what an LR scheduler drives)."""
        try:
            inner = self.optimizer.optimizer
        except AssertionError:
            inner = None
        if inner is None:
            raise TypeError(
                f"{type(self.optimizer).__name__} has no single torch optimizer (expert and dense parameters are "
                f"split); LR schedulers need the torch optimizer path on this model"
            )
        return inner

    def finish_window(self, total_tokens: float) -> None:
        """All-reduce the window's gradients over data-parallel ranks and divide them by ``total_tokens``."""
        self.ddp.finish_grad_sync()
        if total_tokens:
            self.ddp.scale_gradients(1.0 / total_tokens)

    def clip(self, max_grad_norm: float) -> float:
        """Clip the main gradients to ``max_grad_norm``; returns the norm before clipping."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if not self.prepared:
            self.optimizer.prepare_grads()
            self.prepared = True
        norm = self.optimizer.get_grad_norm()
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if getattr(inner, "is_stub_optimizer", False):
                continue
            params = inner.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=max_grad_norm,
                    total_norm=norm,
                    use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        return float(norm)

    def step(self) -> None:
        """Update the parameters with the (clipped) gradients."""
        if not self.prepared:
            self.optimizer.prepare_grads()
        self.optimizer.step_with_ready_grads()
        self.prepared = False

    def zero_grad(self) -> None:
        """Clear the grad buffers and the optimizer's gradients."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.prepared = False

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def rebuild(previous: MegatronOptimizer, optimizer_name: str, kwargs: dict[str, Any]) -> MegatronOptimizer:
    """A new megatron optimizer on the DDP wrapper of ``previous`` (set_optimizer called again)."""
    return _optimizer(previous.ddp, previous.ddp.module, optimizer_name, kwargs)


def build(model: Any, optimizer_name: str, kwargs: dict[str, Any], device_type: str) -> MegatronOptimizer:
    """Wrap ``model`` in megatron DDP and build megatron's optimizer for it.

    Args:
        model: the megatron ``GPTModel`` (trainable parameters have ``requires_grad``).
        optimizer_name: ``'AdamW'``, ``'Adam'`` (without weight decay) or ``'SGD'``.
        kwargs: torch-style arguments: ``lr``, ``weight_decay``, ``betas``, ``eps``,
            ``momentum``, ``use_distributed_optimizer``.
        device_type: must be ``'cuda'``.

    Raises:
        ValueError: not CUDA, an optimizer megatron does not provide, or unknown arguments.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if device_type != "cuda":
        raise ValueError(
            "use_megatron_optimizer=True needs CUDA (megatron-core's optimizers allocate CUDA tensors); on CPU "
            "drop it and the torch optimizer of the same name is used"
        )
    config = model.config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=bool(kwargs.get("use_distributed_optimizer", False)),
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    return _optimizer(ddp, model, optimizer_name, kwargs)


def _optimizer(ddp: Any, model: Any, optimizer_name: str, kwargs: dict[str, Any]) -> MegatronOptimizer:
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if optimizer_name not in _NAMES:
        raise ValueError(
            f"use_megatron_optimizer=True supports {', '.join(_NAMES)}; got {optimizer_name!r}. Drop "
            f"use_megatron_optimizer to use any torch.optim optimizer"
        )
    args = dict(kwargs)
    distributed = bool(args.pop("use_distributed_optimizer", False))
    lr = float(args.pop("lr", 1e-3))
    default_wd = 0.01 if optimizer_name == "AdamW" else 0.0
    weight_decay = float(args.pop("weight_decay", default_wd))
    if optimizer_name == "Adam" and weight_decay:
        raise ValueError("megatron's Adam decays weights decoupled (AdamW); use 'AdamW' with weight_decay")
    betas = tuple(args.pop("betas", (0.9, 0.999)))
    eps = float(args.pop("eps", 1e-8))
    momentum = float(args.pop("momentum", 0.0))
    if args:
        raise ValueError(f"use_megatron_optimizer: unsupported optimizer arguments {sorted(args)}")
    dtype = next(model.parameters()).dtype
    opt_config = OptimizerConfig(
        optimizer=_NAMES[optimizer_name],
        lr=lr,
        min_lr=0.0,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        sgd_momentum=momentum,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
        clip_grad=0.0,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    return MegatronOptimizer(ddp=ddp, optimizer=optimizer)
