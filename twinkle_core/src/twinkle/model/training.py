"""Adapter training state over a window: token-normalized accumulation, clip/step, metrics.

One job: the second half of a training step, the same for every backend. The gradients of
a window's micro-batches are summed; at the step they are reduced over the data ranks and
divided by the window's total token count (:meth:`TrainingMixin.finish_gradients`), so N
micro-batches equal one batch N times as large; then clip, optimizer step, zero_grad and
the LR scheduler (``clip_grad_and_step``), and the metrics of the period
(``calculate_metric``). Backends adjust it through the ``reduce_gradients``,
``clip_gradients`` and ``zero_gradients`` hooks. Mixed into
:class:`~twinkle.model.backend.BackendModel`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from twinkle.dispatch import remote
from twinkle.model.state import FULL_MODEL, AdapterState, by_device_and_dtype

logger = logging.getLogger(__name__)


class TrainingMixin:
    """Gradient finishing, clipping, optimizer/scheduler steps and metrics of the TwinkleModel protocol.

    Attributes:
        skip_nonfinite_steps: when True, a step whose window has a non-finite loss or gradient
            norm is skipped: the gradients are dropped, the adapter, its optimizer state and
            its LR schedule stay as they were, ``clip_grad_and_step`` answers
            ``{"stepped": False, "skipped": <reason>}`` and ``calculate_metric`` counts it in
            ``skipped_steps``. It costs one device sync per step (the check), so it is off by
            default; ``twinkle serve`` turns it on (one tenant's NaN must not poison its adapter).
    """

    skip_nonfinite_steps: bool = False

    def finish_gradients(self, state: AdapterState, *, apply_scale: bool = True) -> float:
        """Average gradients over data ranks and divide by the window's total token count (once per window).

        The window's token count is summed over the ranks (:meth:`all_reduce_floats`), then
        the backend's :meth:`reduce_gradients` hook reduces the gradients and returns the
        factor still to apply. With ``apply_scale=False`` (one process only) the division is
        left to the caller, which gets the factor back: the default :meth:`clip_gradients`
        folds it into the clipping multiply, one pass over the gradients instead of two.

        Returns:
            The factor still to apply (1.0 once applied).
        """
        if state.grads_final:
            return 1.0
        import torch

        tokens = state.window_tokens
        if self.world_size > 1:
            (tokens,) = self.all_reduce_floats([tokens])
        scale = self.reduce_gradients(state, tokens)
        state.grads_final = True
        if not apply_scale and self.world_size == 1:
            return scale
        grads = [p.grad for p in state.params if p.grad is not None]
        if grads and scale != 1.0:
            torch._foreach_mul_(grads, scale)
        return 1.0

    @remote(dispatch="all", collect="first")
    def clip_grad_norm(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None, **kwargs: Any
    ) -> float:
        """Finish the window's gradients and clip them to ``max_grad_norm``.

        Returns:
            The total gradient norm before clipping (over all ranks).
        """
        state = self._state(adapter_name)
        state.last_grad_norm = float(self._clip(state, max_grad_norm, norm_type))
        return state.last_grad_norm

    def _clip(self, state: AdapterState, max_grad_norm: float, norm_type: float) -> Any:
        """The backend's :meth:`clip_gradients` (the name benchmarks and older callers use)."""
        return self.clip_gradients(state, max_grad_norm, norm_type)

    def clip_gradients(self, state: AdapterState, max_grad_norm: float, norm_type: float) -> Any:
        """Hook: finish and clip the window's gradients; the total norm as a tensor (0.0 without gradients), no sync.

        In one process the window's ``1 / tokens`` and the clip factor multiply the gradients
        together (the norm of the unscaled gradients times ``1 / tokens`` is the norm of the
        scaled ones), so the gradients are read twice (norm, multiply) instead of three times.
        """
        import torch

        scale = self.finish_gradients(state, apply_scale=False)
        params = [p for p in state.params if p.grad is not None]
        if not params:
            return 0.0
        grads = [p.grad for p in params]
        if scale == 1.0 or any(type(g) is not torch.Tensor for g in grads):  # DTensor (FSDP): torch's own path
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type=norm_type)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm = torch.nn.utils.get_total_norm(grads, norm_type) * scale
        # clip_grads_with_norm_'s factor (same epsilon), times the window's 1 / tokens
        factor = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) * scale
        for group in by_device_and_dtype(grads):
            torch._foreach_mul_(group, factor.to(group[0].device))
        return norm

    @remote(dispatch="all", collect="none")
    def step(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """One optimizer step with the accumulated (finished) gradients.

        Raises:
            ValueError: no optimizer (call :meth:`set_optimizer`).
        """
        state = self._state(adapter_name)
        if state.optimizer is None:
            raise ValueError(
                f"adapter {state.name!r} has no optimizer; call model.set_optimizer('AdamW', lr=1e-4) before stepping"
            )
        self.finish_gradients(state)
        if self.skip_nonfinite_steps:
            reason = self._nonfinite_reason(state, None)
            if reason is not None:
                self._skip_step(state, reason)
                return
        state.optimizer.step()
        state.global_step += 1

    def _nonfinite_reason(self, state: AdapterState, norm: float | None) -> str | None:
        """Why the window's step must be skipped (a non-finite loss or gradient), or None."""
        import math

        if norm is not None and not math.isfinite(norm):  # the norm is over all ranks: every rank agrees
            return f"the gradient norm is {norm} (not finite)"
        loss = state.last_loss[0]
        bad_loss = not math.isfinite(loss)
        bad_grad = False
        if norm is None:
            import torch

            grads = [p.grad for p in state.params if p.grad is not None]
            bad_grad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.world_size > 1:  # one rank's verdict is every rank's, or their parameters would part
            bad_loss_f, bad_grad_f = self.all_reduce_floats([float(bad_loss), float(bad_grad)])
            bad_loss, bad_grad = bad_loss_f > 0, bad_grad_f > 0
        if bad_loss:
            return f"the loss is {loss} (not finite)" if not math.isfinite(loss) else "a rank's loss is not finite"
        if bad_grad:
            return "a gradient is not finite"
        return None

    def _skip_step(self, state: AdapterState, reason: str) -> str:
        """Drop the window's gradients without stepping; returns the message reported to the caller."""
        message = (
            f"adapter {state.name!r}: step skipped, {reason}; the adapter and its optimizer state are unchanged "
            "(check the batch and the learning rate)"
        )
        logger.warning(message)
        self.zero_grad(adapter_name=state.name)
        state.report["skipped_steps"] = state.report.get("skipped_steps", 0.0) + 1
        return message

    @remote(dispatch="all", collect="none")
    def zero_grad(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Drop gradients and start a new accumulation window."""
        state = self._state(adapter_name)
        self.zero_gradients(state)
        state.micro_step = 0
        state.window_tokens = 0.0
        state.grads_final = False

    @remote(dispatch="all", collect="none")
    def lr_step(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Advance the adapter's LR scheduler (no-op without one)."""
        state = self._state(adapter_name)
        if state.lr_scheduler is not None:
            state.lr_scheduler.step()

    @remote(dispatch="all", collect="first")
    def clip_grad_and_step(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """At the end of the accumulation window: clip, step, zero_grad and lr_step.

        Call it after every forward_backward; it only steps once
        ``gradient_accumulation_steps`` micro-batches have been accumulated.

        Returns:
            ``{"stepped": False}`` mid-window, else ``{"stepped": True, "grad_norm", "lr", "step"}``;
            with :attr:`skip_nonfinite_steps` a window with a non-finite loss or gradient norm
            answers ``{"stepped": False, "skipped": <message>, "grad_norm", "step"}`` (nothing changed).
        """
        state = self._state(adapter_name)
        if state.micro_step < state.gradient_accumulation_steps:
            return {"stepped": False, "step": state.global_step}
        lr = self._lr(state)
        norm = self._clip(state, max_grad_norm, norm_type)
        if self.skip_nonfinite_steps:
            value = float(norm)
            reason = self._nonfinite_reason(state, value)
            if reason is not None:
                message = self._skip_step(state, reason)
                return {"stepped": False, "skipped": message, "grad_norm": value, "step": state.global_step}
        self.step(adapter_name=state.name)
        self.zero_grad(adapter_name=state.name)
        self.lr_step(adapter_name=state.name)
        # read the norm once the optimizer step is queued: the GPU runs it while the host waits
        state.last_grad_norm = float(norm)
        return {"stepped": True, "grad_norm": state.last_grad_norm, "lr": lr, "step": state.global_step}

    @staticmethod
    def _lr(state: AdapterState) -> float | None:
        if state.optimizer is None:
            return None
        return float(state.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ metrics
    @remote(dispatch="all", collect="first")
    def calculate_metric(self, is_training: bool = True, *, adapter_name: str | None = None, **kwargs: Any) -> dict:
        """Metrics since the last call, then reset them; also emitted to lifecycle plugins.

        Training: ``step`` (= ``optimizer_step``, optimizer steps taken), ``micro_batches``
        (forward_backward calls in total), ``lr_schedule_progress`` (optimizer steps / the
        schedule's length, when it has one), ``loss`` (token-weighted), ``grad_norm`` (last step), ``lr``,
        ``mfu`` (where the device's peak is known, :mod:`twinkle.model.mfu`),
        ``tokens_per_s`` (non-padding input tokens over all ranks / wall time),
        ``token_acc`` and the adapter's added metrics. Evaluation (``is_training=False``):
        ``loss`` and metrics of the forward_only calls.

        Example::

            metric = model.calculate_metric(is_training=True)
        """
        from twinkle.optim.schedulers import step_keys
        from twinkle.runtime import current_runtime

        state = self._state(adapter_name)
        if is_training:
            report = state.report
            loss_sum, loss_tokens, input_tokens = report["loss_sum"], report["loss_tokens"], report["input_tokens"]
            if self.world_size > 1:
                loss_sum, loss_tokens, input_tokens = self.all_reduce_floats([loss_sum, loss_tokens, input_tokens])
            elapsed = time.perf_counter() - state.report_started if state.report_started else 0.0
            result: dict[str, Any] = {"step": state.global_step, **step_keys(state)}
            if loss_tokens:
                result["loss"] = loss_sum / loss_tokens
            if state.last_grad_norm is not None:
                result["grad_norm"] = state.last_grad_norm
            lr = self._lr(state)
            if lr is not None:
                result["lr"] = lr
            if elapsed > 0:
                result["tokens_per_s"] = input_tokens / elapsed
                from twinkle.model.mfu import mfu

                lora = state.name != FULL_MODEL
                value = mfu(self.model, lora, result["tokens_per_s"], self.world_size, self.device)
                if value is not None:  # a known accelerator peak (or TWINKLE_PEAK_TFLOPS)
                    result["mfu"] = value
            if report.get("skipped_steps"):
                result["skipped_steps"] = int(report["skipped_steps"])
            for key in [k for k in report if k.startswith("extra:")]:
                name = key[len("extra:") :]
                result[name] = report[key] / report[f"extra_n:{name}"]
            for metric in state.train_metrics:
                result.update(metric.compute())
        else:
            report = state.eval_report
            result = {"step": state.global_step, **step_keys(state)}
            if report["loss_tokens"]:
                result["loss"] = report["loss_sum"] / report["loss_tokens"]
            for metric in state.eval_metrics:
                result.update(metric.compute())
        state.reset_report(is_training)
        runtime = current_runtime()
        if runtime is not None and self.rank == 0:
            source = "train" if is_training else "eval"
            if state.name != FULL_MODEL:
                source = f"{source}/{state.name}"
            runtime.emit_metrics(source, result, step=state.global_step)
        return result
