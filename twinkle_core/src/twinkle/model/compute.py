"""Compute: a batch in, the adapter's loss out, gradients accumulated.

One job: the forward/loss/backward half of a training step, the same for every backend:
``_prepare`` (Template for un-encoded rows, then the adapter's InputProcessor) -> the
backend's ``run_forward`` hook (a ModelOutput with logits, or hidden states for the fused
loss) -> the adapter's Loss (a sum and its token count) -> ``backward`` (gradients add up;
the window's token count grows). ``forward_only`` scores without gradients. Mixed into
:class:`~twinkle.model.backend.BackendModel`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Mapping, Sequence

from twinkle.data_format.output import ModelOutput
from twinkle.dispatch import remote
from twinkle.loss.base import LossOutput, token_logps
from twinkle.model.state import AdapterState, HostScalars, no_grad, per_row_logps

logger = logging.getLogger("twinkle.model")


class ComputeMixin:
    """forward, calculate_loss, backward, forward_backward and forward_only of the TwinkleModel protocol."""

    # ------------------------------------------------------------------ compute
    def _prepare(self, state: AdapterState, inputs: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        batch = self._prepare_batch(state, inputs, extra)
        if "shift_labels" in batch and "num_label_tokens" not in batch:
            # counted now, before the forward is queued: losses need it on the host, and reading it
            # after the forward would make the host wait for the whole forward before queuing backward
            batch["num_label_tokens"] = int((batch["shift_labels"] != -100).sum())
        return batch

    def _prepare_batch(self, state: AdapterState, inputs: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(inputs, Mapping) and "input_ids" not in inputs:
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            return state.processor(inputs, device=self.device)
        rows = list(inputs)
        if extra:
            for key, values in extra.items():
                if not isinstance(values, Sequence) or len(values) != len(rows):
                    raise ValueError(f"forward_backward: {key}= must be a list with one entry per row ({len(rows)})")
            rows = [{**row, **{k: v[i] for k, v in extra.items()}} for i, row in enumerate(rows)]
        if rows and isinstance(rows[0], Mapping) and "input_ids" not in rows[0] and state.template is not None:
            rows = [{**state.template.encode(row), **row} if "input_ids" not in row else row for row in rows]
        return state.processor(rows, device=self.device)

    @remote(dispatch="slice_dp", collect="mean")
    def forward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> ModelOutput:
        """Run the model with gradients; :meth:`calculate_loss` and :meth:`backward` use the result.

        Args:
            inputs: a batch (``list[dict]`` encoded rows, or a dict of tensors).
            adapter_name: which adapter (default: the current one).
            **kwargs: extra per-row fields for the loss (lists with one entry per row).

        Returns:
            ModelOutput with ``logits`` ``[B, T, V]``.
        """
        state = self._state(adapter_name)
        self._activate(state)
        if state.report_started is None:
            state.report_started = time.perf_counter()
        batch = self._prepare(state, inputs, kwargs)
        outputs = self.run_forward(batch)
        state.pending = (batch, outputs)
        state.pending_loss = None
        return outputs

    @remote(dispatch="all", collect="mean")
    def calculate_loss(self, *, adapter_name: str | None = None, **kwargs: Any) -> float:
        """Apply the adapter's Loss to the last :meth:`forward`; returns the loss normalized by its tokens.

        Raises:
            RuntimeError: no forward to compute a loss for.
        """
        result = self._compute_loss(self._state(adapter_name))
        tokens = float(result.num_tokens)
        return float(result.loss.detach()) / tokens if tokens else 0.0

    @staticmethod
    def _compute_loss(state: AdapterState) -> LossOutput:
        """The adapter's Loss on the pending forward, kept for backward (no host sync: the loss stays a tensor)."""
        if state.pending is None:
            raise RuntimeError("calculate_loss: call forward(inputs) first")
        batch, outputs = state.pending
        result = state.loss(batch, outputs)
        if not isinstance(result, LossOutput):
            raise TypeError(f"{type(state.loss).__name__} returned {type(result).__name__}; a Loss returns LossOutput")
        state.pending_loss = result
        return result

    @remote(dispatch="all", collect="none")
    def backward(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Back-propagate the last loss; gradients add up until the optimizer step.

        Raises:
            RuntimeError: no loss to back-propagate.
        """
        state = self._state(adapter_name)
        result = state.pending_loss
        if result is None:
            raise RuntimeError("backward: call forward(inputs) and calculate_loss() first")
        if state.micro_step >= state.gradient_accumulation_steps:
            logger.warning(
                "adapter %r: %d micro-batches accumulated with gradient_accumulation_steps=%d and no step; "
                "call clip_grad_and_step() after each forward_backward",
                state.name,
                state.micro_step + 1,
                state.gradient_accumulation_steps,
            )
        batch, outputs = state.pending
        # the numbers to report are copied to the host while the backward is queued: reading them
        # afterwards waits only for the forward, so the host goes on queuing the optimizer step
        # while the GPU runs the backward
        scalars = {"loss": result.loss, "num_tokens": result.num_tokens}
        scalars["input_tokens"] = (batch["row_ids"] >= 0).sum() if "row_ids" in batch else batch["input_ids"].numel()
        for key, value in (result.extra or {}).items():
            scalars[f"extra:{key}"] = value
        host = HostScalars(scalars)
        result.loss.backward()
        values = host.values()
        state.window_tokens += values["num_tokens"]
        state.micro_step += 1
        state.grads_final = False
        state.last_loss = (values["loss"], values["num_tokens"])
        report = state.report
        report["loss_sum"] += values["loss"]
        report["loss_tokens"] += values["num_tokens"]
        report["input_tokens"] += values["input_tokens"]
        for key in result.extra or {}:
            report[f"extra:{key}"] = report.get(f"extra:{key}", 0.0) + values[f"extra:{key}"]
            report[f"extra_n:{key}"] = report.get(f"extra_n:{key}", 0.0) + 1
        with no_grad():
            for metric in state.train_metrics:
                metric.update(batch, outputs)
        state.pending = None
        state.pending_loss = None

    @remote(dispatch="slice_dp", collect="mean")
    def forward_backward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> ModelOutput:
        """forward + calculate_loss + backward on one micro-batch.

        Args:
            inputs: a DataLoader batch (``list[dict]``) or a dict of tensors.
            adapter_name: which adapter (default: the current one).
            **kwargs: extra per-row fields that reach the Loss (``advantages=[...]`` ...).

        Returns:
            ModelOutput with ``loss`` (normalized over this micro-batch on every data rank)
            and ``num_tokens``.

        Example::

            out = model.forward_backward(inputs=batch)
            model.clip_grad_and_step()
        """
        started = time.perf_counter()
        state = self._state(adapter_name)
        self.forward(inputs, adapter_name=state.name, **kwargs)
        result = self._compute_loss(state)
        self.backward(adapter_name=state.name)  # reads the loss without waiting for the backward
        loss_sum, tokens = state.last_loss
        if self.world_size > 1:
            loss_sum, tokens = self.all_reduce_floats([loss_sum, tokens])
        state.report["busy_s"] += time.perf_counter() - started
        out = ModelOutput(loss=loss_sum / tokens if tokens else 0.0, num_tokens=int(tokens))
        if result.extra:
            out.update({k: float(v) for k, v in result.extra.items()})
        return out

    @remote(dispatch="slice_dp", collect="mean")
    def forward_only(
        self,
        inputs: Any,
        *,
        adapter_name: str | None = None,
        disable_adapters: bool = False,
        return_logits: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """Run without gradients: per-token log-probs of the labels, loss and eval metrics.

        Args:
            inputs: a batch; rows without ``labels`` score every token.
            adapter_name: which adapter (default: the current one).
            disable_adapters: use the base model (the RL reference model).
            return_logits: also return ``logits``.

        Returns:
            ModelOutput with ``logps`` (per row, aligned with its ``labels``; 0.0 where the
            label is -100), ``loss``, ``num_tokens`` and (if asked) ``logits``.
        """
        import torch

        state = self._state(adapter_name)
        self._activate(state)
        batch = self._prepare(state, inputs, kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.adapters_disabled() if disable_adapters else contextlib.nullcontext():
                outputs = self.run_forward(batch)
                logps = token_logps(batch, outputs)
                mask = batch["shift_labels"] != -100
                tokens = batch["num_label_tokens"]  # counted in _prepare
                loss_sum = float(-(logps * mask).sum())
                for metric in state.eval_metrics:
                    metric.update(batch, outputs)
        finally:
            self.model.train(was_training)
        state.eval_report["loss_sum"] += loss_sum
        state.eval_report["loss_tokens"] += tokens
        out = ModelOutput(
            logps=per_row_logps(batch, logps), loss=loss_sum / tokens if tokens else 0.0, num_tokens=tokens
        )
        if return_logits:
            out["logits"] = outputs["logits"]
        return out
