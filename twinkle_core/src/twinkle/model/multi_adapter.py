"""Several adapters of one ``TransformersModel`` in one forward/backward (the service's batched pass).

:func:`forward_backward_multi` takes rows for several adapters (tenants) of one model, packs
them padding-free into one row (``PaddingFreeProcessor``: varlen attention keeps each sequence
to itself, so no token sees another tenant's tokens), runs the frozen base once for all of
them with each adapter's low-rank update on its own token segment
(:func:`twinkle.patch.multi_lora.adapter_segments`), then applies each adapter's own ``Loss``
to its segment of the hidden states (chunked log-probabilities / cross-entropy from the hidden
states: no full-vocabulary logits) and back-propagates once. Each adapter's gradients,
accumulation counters and reports are those that ``model.forward_backward(rows,
adapter_name=...)`` would have left, so its usual ``clip_grad_and_step(adapter_name=...)``,
optimizer and metrics follow unchanged.

A tenant's tokens reach only its own adapter's parameters: every operation of the pass is
row-independent or per sequence, so a NaN in one tenant's rows or weights never reaches another
tenant's loss or gradients (test).

Example::

    outs = forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
    for name in outs:
        model.clip_grad_and_step(adapter_name=name)

:func:`clip_grad_and_step_multi` takes the adapters' optimizer steps together (one gradient-norm
kernel, one host synchronization instead of one per adapter), with the same results::

    clip_grad_and_step_multi(model, list(outs))
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping, Sequence

from twinkle.data_format.output import ModelOutput


def pack_rows(
    model: Any,
    inputs: Mapping[str, Sequence[Mapping[str, Any]]],
    extra: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, int, int, int, int]]]:
    """One padding-free batch of every adapter's rows, and each adapter's span.

    Args:
        model: the ``TransformersModel`` (its adapters' templates encode rows without ``input_ids``).
        inputs: adapter name -> its encoded rows.
        extra: adapter name -> per-row fields for its loss (``{"advantages": [...]}``), lists
            with one entry per row.

    Returns:
        ``(batch, spans)``: the batch on the model's device; ``spans`` of
        ``(adapter, first token, end token, first row, end row)``.

    Raises:
        ValueError: an adapter without rows; extra fields of the wrong length.
    """
    from twinkle.processor.base import PaddingFreeProcessor

    rows: list[Mapping[str, Any]] = []
    spans: list[tuple[str, int, int, int, int]] = []
    token = 0
    for name, adapter_rows in inputs.items():
        state = model.state_of(name)
        adapter_rows = list(adapter_rows)
        if not adapter_rows:
            raise ValueError(f"forward_backward_multi: adapter {name!r} has no rows")
        fields = (extra or {}).get(name) or {}
        for key, values in fields.items():
            if not isinstance(values, Sequence) or len(values) != len(adapter_rows):
                raise ValueError(
                    f"forward_backward_multi: {key}= of adapter {name!r} must be a list with one entry per row "
                    f"({len(adapter_rows)})"
                )
        first_row = len(rows)
        for i, row in enumerate(adapter_rows):
            row = {**row, **{k: v[i] for k, v in fields.items()}}
            if "input_ids" not in row and state.template is not None:
                row = {**state.template.encode(row), **row}
            rows.append(row)
        start = token
        token += sum(len(row["input_ids"]) for row in rows[first_row:])
        spans.append((name, start, token, first_row, len(rows)))
    pad_id = getattr(getattr(model.model, "config", None), "pad_token_id", None) or 0
    batch = PaddingFreeProcessor(pad_token_id=pad_id)(rows, device=None)
    batch = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in batch.items()}
    return batch, spans


def _slice_batch(batch: Mapping[str, Any], start: int, end: int, first_row: int) -> dict[str, Any]:
    """The tokens ``[start, end)`` of a packed ``[1, T]`` batch as a batch of their own (rows renumbered from 0)."""
    import torch

    out: dict[str, Any] = {}
    total = batch["input_ids"].shape[-1]
    for key, value in batch.items():
        if key.startswith("cu_seq_lens"):
            bounds = [b - start for b in value.tolist() if start <= b <= end]
            out[key] = torch.tensor(bounds, dtype=value.dtype, device=value.device)
        elif key.startswith("max_length") or key == "num_label_tokens":
            continue
        elif hasattr(value, "shape") and value.dim() == 2 and value.shape[-1] == total:
            out[key] = value[:, start:end]
        else:
            out[key] = value
    if "row_ids" in out:
        out["row_ids"] = out["row_ids"] - first_row
    lengths = (
        (out["cu_seq_lens_q"][1:] - out["cu_seq_lens_q"][:-1]).tolist() if "cu_seq_lens_q" in out else [end - start]
    )
    out["max_length_q"] = out["max_length_k"] = int(max(lengths))
    out["num_label_tokens"] = int((out["shift_labels"] != -100).sum())
    return out


def _slice_outputs(outputs: Any, start: int, end: int) -> Any:
    """The model outputs of tokens ``[start, end)`` (hidden states for the chunked head, or logits)."""
    from twinkle.patch.fastpath import uses_fused_head

    if uses_fused_head(outputs):
        return outputs.token_slice(start, end)  # with each adapter's own LoRA head term, if any
    return ModelOutput(logits=outputs["logits"][:, start:end])


def _run(model: Any, batch: Mapping[str, Any]) -> Any:
    """The model's forward on a packed batch (varlen attention; hidden states when the fused head is on)."""
    import torch

    from twinkle.patch.fastpath import run_model, unwrap
    from twinkle.patch.varlen import packed_inputs

    model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    context = packed_inputs(unwrap(model.model), batch, model_inputs)
    autocast = getattr(model, "autocast_dtype", None)  # mixed_precision=: the same autocast as run_forward
    with (
        context,
        torch.autocast(model.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext(),
    ):
        return run_model(model.model, model_inputs)


def forward_backward_multi(
    model: Any,
    inputs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    extra: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    kernel: str | None = None,
    solo_fast_path: bool = True,
) -> dict[str, ModelOutput]:
    """forward + loss + backward for several adapters of ``model`` in one pass over the base weights.

    Args:
        model: a ``TransformersModel`` holding every named adapter (one process; no FSDP).
        inputs: adapter name -> encoded rows (each adapter's rows become one token segment).
        extra: adapter name -> per-row loss fields (``{"advantages": [...]}``).
        kernel: the segmented LoRA implementation (``"torch"``, ``"triton"``, ``"auto"``; see
            :class:`twinkle.patch.multi_lora.SegmentPlan`).
        solo_fast_path: a pass of one adapter runs as ``model.forward_backward`` (the single-adapter
            fast path: compiled layers, LoRA through merged weights, the adapter's own processor);
            ``False`` takes the segmented path for it too.

    Returns:
        adapter name -> ``ModelOutput(loss=<this micro-batch's loss / its tokens>, num_tokens=...)``,
        plus the loss's extra numbers, as ``model.forward_backward`` returns them.

    Raises:
        KeyError: an adapter the model does not hold.
        ValueError: a distributed model, bad rows or extra fields.
    """
    from twinkle.loss.base import LossOutput
    from twinkle.patch.multi_lora import SegmentPlan, adapter_segments

    if getattr(model, "world_size", 1) > 1:
        raise ValueError("forward_backward_multi runs in one process; shard tenants across processes instead")
    if solo_fast_path and len(inputs) == 1:
        ((name, rows),) = inputs.items()
        return {name: model.forward_backward(list(rows), adapter_name=name, **dict((extra or {}).get(name) or {}))}
    started = time.perf_counter()
    states = {name: model.state_of(name) for name in inputs}
    for state in states.values():  # peft's set_adapter leaves only the active adapter trainable
        for param in state.params:
            param.requires_grad_(True)
    batch, spans = pack_rows(model, inputs, extra)
    plan = SegmentPlan([(name, s, e) for name, s, e, _, _ in spans], batch["input_ids"].shape[-1], kernel)
    results: dict[str, tuple[dict[str, Any], Any, Any]] = {}
    # sliced before the forward is queued: slicing reads boundaries and label counts on the host
    sub_batches = {name: _slice_batch(batch, start, end, first_row) for name, start, end, first_row, _ in spans}
    with adapter_segments(model.model, plan):  # the backward too: checkpointed layers recompute inside it
        outputs = _run(model, batch)
        total = None
        for name, start, end, _, _ in spans:
            state = states[name]
            if state.report_started is None:
                state.report_started = started
            sub_batch = sub_batches[name]
            sub_out = _slice_outputs(outputs, start, end)
            result = state.loss(sub_batch, sub_out)
            if not isinstance(result, LossOutput):
                raise TypeError(
                    f"{type(state.loss).__name__} returned {type(result).__name__}; a Loss returns LossOutput"
                )
            results[name] = (sub_batch, sub_out, result)
            total = result.loss if total is None else total + result.loss
        total.backward()
    elapsed = time.perf_counter() - started
    all_tokens = max(1, batch["input_ids"].shape[-1])
    answers: dict[str, ModelOutput] = {}
    for name, start, end, _, _ in spans:
        state = states[name]
        sub_batch, sub_out, result = results[name]
        _record(state, sub_batch, sub_out, result)
        state.report["busy_s"] += elapsed * (end - start) / all_tokens
        loss_sum, tokens = state.last_loss
        out = ModelOutput(loss=loss_sum / tokens if tokens else 0.0, num_tokens=int(tokens))
        if result.extra:
            out.update({k: float(v) for k, v in result.extra.items()})
        answers[name] = out
    return answers


def _record(state: Any, batch: Mapping[str, Any], outputs: Any, result: Any) -> None:
    """Bookkeeping of one adapter's micro-batch, as ``TransformersModel.backward`` does it."""
    import torch

    num_tokens = float(result.num_tokens)
    loss = float(result.loss.detach())
    state.window_tokens += num_tokens
    state.micro_step += 1
    state.grads_final = False
    state.last_loss = (loss, num_tokens)
    report = state.report
    report["loss_sum"] += loss
    report["loss_tokens"] += num_tokens
    report["input_tokens"] += float((batch["row_ids"] >= 0).sum())
    for key, value in (result.extra or {}).items():
        report[f"extra:{key}"] = report.get(f"extra:{key}", 0.0) + float(value)
        report[f"extra_n:{key}"] = report.get(f"extra_n:{key}", 0.0) + 1
    with torch.no_grad():
        for metric in state.train_metrics:
            metric.update(batch, outputs)
    state.pending = None
    state.pending_loss = None


def forward_only_multi(
    model: Any,
    inputs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    extra: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    kernel: str | None = None,
) -> dict[str, ModelOutput]:
    """Per-token log-probs of several adapters' rows in one pass without gradients.

    Returns:
        adapter name -> ``ModelOutput(logps=[per row, aligned with its labels, first 0.0], loss, num_tokens)``,
        as ``model.forward_only`` returns them.
    """
    from twinkle.loss.base import token_logps

    answers: dict[str, ModelOutput] = {}
    with _evaluation_pass(model, inputs, extra, kernel) as (batch, spans, outputs):
        for name, start, end, first_row, end_row in spans:
            sub_batch = _slice_batch(batch, start, end, first_row)
            logps = token_logps(sub_batch, _slice_outputs(outputs, start, end))
            mask = sub_batch["shift_labels"] != -100
            tokens = sub_batch["num_label_tokens"]
            loss_sum = float(-(logps * mask).sum())
            values = logps[0].float().cpu()
            row_ids = sub_batch["row_ids"][0].cpu()
            per_row = []
            for r in range(end_row - first_row):
                picked = values[row_ids == r]
                per_row.append([0.0, *picked[:-1].tolist()])
            answers[name] = ModelOutput(logps=per_row, loss=loss_sum / tokens if tokens else 0.0, num_tokens=tokens)
    return answers


@contextlib.contextmanager
def _evaluation_pass(
    model: Any,
    inputs: Mapping[str, Sequence[Mapping[str, Any]]],
    extra: Mapping[str, Mapping[str, Sequence[Any]]] | None,
    kernel: str | None,
) -> Any:
    """One packed pass without gradients in eval mode: yields ``(batch, spans, outputs)`` (segments still on)."""
    import torch

    from twinkle.patch.multi_lora import SegmentPlan, adapter_segments

    batch, spans = pack_rows(model, inputs, extra)
    plan = SegmentPlan([(name, s, e) for name, s, e, _, _ in spans], batch["input_ids"].shape[-1], kernel)
    was_training = model.model.training
    model.model.eval()
    try:
        with torch.no_grad(), adapter_segments(model.model, plan):
            yield batch, spans, _run(model, batch)
    finally:
        model.model.train(was_training)


def forward_loss_multi(
    model: Any,
    inputs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    extra: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    kernel: str | None = None,
) -> dict[str, ModelOutput]:
    """Each adapter's own ``Loss`` on its rows, in one packed pass without gradients or bookkeeping.

    The evaluation twin of :func:`forward_backward_multi` (the service's Tinker ``forward``): the
    same packing, segments and losses, no backward, no counters or reports touched.

    Returns:
        adapter name -> ``ModelOutput(loss=<the loss sum / its normalizer>, num_tokens=<normalizer>)``.
    """
    answers: dict[str, ModelOutput] = {}
    with _evaluation_pass(model, inputs, extra, kernel) as (batch, spans, outputs):
        for name, start, end, first_row, _ in spans:
            result = model.state_of(name).loss(
                _slice_batch(batch, start, end, first_row), _slice_outputs(outputs, start, end)
            )
            tokens = float(result.num_tokens)
            loss = float(result.loss)
            answers[name] = ModelOutput(loss=loss / tokens if tokens else 0.0, num_tokens=tokens)
    return answers


def clip_grad_and_step_multi(
    model: Any,
    adapter_names: Sequence[str],
    max_grad_norm: float = 1.0,
    norm_type: float = 2.0,
    *,
    max_grad_norms: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """``model.clip_grad_and_step`` of several adapters with one host synchronization.

    The gradient norms of every adapter come from one multi-tensor norm over all their
    gradients (per device and dtype); each adapter then gets its own clip factor (its
    ``max_grad_norm``, its window's ``1 / tokens``) and its own optimizer step (its own
    hyperparameters, fused AdamW on CUDA), all queued before the norms are read back to the
    host once. ``model.clip_grad_and_step(adapter_name=name)`` per adapter synchronizes once
    per adapter, after that adapter's step; the results here are the same numbers (each
    adapter's norm is the same per-tensor norms reduced in the same order; test).

    With ``model.skip_nonfinite_steps`` the norms are read (once) before any step, and an
    adapter whose loss or norm is not finite skips its step as ``clip_grad_and_step`` skips it.

    Backends with their own clipping (FSDP, several ranks) take the per-adapter calls.

    Args:
        model: a ``TransformersModel`` (or another ``TrainingMixin`` model) holding the adapters.
        adapter_names: the adapters to step (each at most once).
        max_grad_norm: the clipping bound of every adapter without its own in ``max_grad_norms``.
        norm_type: the norm's order.
        max_grad_norms: adapter name -> its own clipping bound.

    Returns:
        adapter name -> what ``model.clip_grad_and_step(adapter_name=name)`` returns.

    Example::

        forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
        clip_grad_and_step_multi(model, ["alice", "bob"])
    """
    from twinkle.model.training import TrainingMixin

    names = list(adapter_names)
    if len(set(names)) != len(names):
        raise ValueError("clip_grad_and_step_multi: an adapter named twice")
    bounds = {name: float((max_grad_norms or {}).get(name, max_grad_norm)) for name in names}
    cls = type(model)
    generic = (
        getattr(model, "world_size", 1) == 1
        and cls.clip_gradients is TrainingMixin.clip_gradients
        and cls._clip is TrainingMixin._clip
        and cls.step is TrainingMixin.step
        and cls.clip_grad_and_step is TrainingMixin.clip_grad_and_step
    )
    if not generic:
        return {name: model.clip_grad_and_step(bounds[name], norm_type, adapter_name=name) for name in names}
    answers: dict[str, dict[str, Any]] = {}
    ready = []
    for name in names:
        state = model.state_of(name)
        if state.micro_step < state.gradient_accumulation_steps:
            answers[name] = {"stepped": False, "step": state.global_step}
        elif state.optimizer is None:
            raise ValueError(
                f"adapter {name!r} has no optimizer; call model.set_optimizer('AdamW', lr=1e-4) before stepping"
            )
        else:
            ready.append(state)
    lrs = {state.name: model._lr(state) for state in ready}
    norms = _clip_many(model, ready, bounds, norm_type)
    values: dict[str, float] = {}
    stepping = ready
    if model.skip_nonfinite_steps and ready:
        values = _read_norms(norms)
        stepping = []
        for state in ready:
            reason = model._nonfinite_reason(state, values[state.name])
            if reason is None:
                stepping.append(state)
                continue
            message = model._skip_step(state, reason)
            answers[state.name] = {
                "stepped": False,
                "skipped": message,
                "grad_norm": values[state.name],
                "step": state.global_step,
            }
    rest = _fused_adamw_steps(stepping)
    for state in stepping:
        # TrainingMixin.step without its non-finite re-check: the norm above already decided it
        if state in rest:
            state.optimizer.step()
        state.global_step += 1
        model.zero_grad(adapter_name=state.name)
        model.lr_step(adapter_name=state.name)
    if not model.skip_nonfinite_steps:
        values = _read_norms(norms)  # the one synchronization, once every step is queued
    for state in stepping:
        norm = state.last_grad_norm = values[state.name]
        answers[state.name] = {"stepped": True, "grad_norm": norm, "lr": lrs[state.name], "step": state.global_step}
    return {name: answers[name] for name in names}


def _clip_many(model: Any, states: Sequence[Any], bounds: Mapping[str, float], norm_type: float) -> dict[str, Any]:
    """``TrainingMixin.clip_gradients`` of several adapters with one multi-tensor norm per device and dtype.

    Returns:
        adapter name -> its gradient norm before clipping (a tensor; 0.0 without gradients), unread.
    """
    import torch

    from twinkle.model.state import by_device_and_dtype

    scales: dict[str, float] = {}
    grads_of: dict[str, list[Any]] = {}
    norms: dict[str, Any] = {}
    for state in states:
        scale = model.finish_gradients(state, apply_scale=False)
        grads = [p.grad for p in state.params if p.grad is not None]
        if not grads:
            norms[state.name] = 0.0
            continue
        if any(type(g) is not torch.Tensor for g in grads):  # DTensor: the per-adapter hook
            norms[state.name] = model.clip_gradients(state, bounds[state.name], norm_type)
            continue
        # torch.nn.utils.get_total_norm's order: the norms of each (device, dtype) group in turn
        grads_of[state.name] = [g for group in by_device_and_dtype(grads) for g in group]
        scales[state.name] = scale
    every = [g for grads in grads_of.values() for g in grads]
    per_tensor: dict[int, Any] = {}
    for group in by_device_and_dtype(every):
        for g, n in zip(group, torch._foreach_norm(group, float(norm_type))):
            per_tensor[id(g)] = n
    for name, grads in grads_of.items():
        first = grads[0].device
        total = torch.linalg.vector_norm(torch.stack([per_tensor[id(g)].to(first) for g in grads]), float(norm_type))
        scale = scales[name]
        norm = total * scale
        # clip_grads_with_norm_'s factor (same epsilon), times the window's 1 / tokens, as clip_gradients
        factor = torch.clamp(bounds[name] / (norm + 1e-6), max=1.0) * scale
        for group in by_device_and_dtype(grads):
            torch._foreach_mul_(group, factor.to(group[0].device))
        norms[name] = norm
    return norms


def _fused_adamw_steps(states: Sequence[Any]) -> list[Any]:
    """One ``torch._fused_adamw_`` call per set of adapters with the same AdamW hyperparameters.

    Takes the adapters whose optimizer is ``torch.optim.AdamW(fused=True)`` (the fast path's on
    CUDA) with one parameter group, scalar hyperparameters, no amsgrad/maximize/capturable, no
    step hooks and state from an earlier step: the fused kernel updates each tensor on its own
    (its own step count), so one call over several adapters' tensors is what each adapter's
    ``optimizer.step()`` computes, with one launch and one Python pass instead of one each.

    Returns:
        The states left for their own ``optimizer.step()``.
    """
    import torch
    from torch.optim import optimizer as optim_module

    if optim_module._global_optimizer_pre_hooks or optim_module._global_optimizer_post_hooks:
        return list(states)
    rest = []
    calls: dict[tuple[Any, ...], list[list[Any]]] = {}
    for state in states:
        opt = state.optimizer
        groups = getattr(opt, "param_groups", ())
        group = groups[0] if len(groups) == 1 else {}
        usable = (
            type(opt) is torch.optim.AdamW
            and group.get("fused")
            and not group.get("amsgrad")
            and not group.get("maximize")
            and not group.get("capturable")
            and not group.get("differentiable")
            and not opt._optimizer_step_pre_hooks
            and not opt._optimizer_step_post_hooks
            and all(isinstance(group[k], float) for k in ("lr", "eps", "weight_decay"))
        )
        params = [p for p in group.get("params", ()) if p.grad is not None] if usable else []
        if not params or any("step" not in opt.state.get(p, {}) for p in params):
            rest.append(state)  # the first step (lazy state) and anything unusual: the optimizer's own
            continue
        beta1, beta2 = group["betas"]
        for p in params:
            key = (group["lr"], float(beta1), float(beta2), group["eps"], group["weight_decay"], p.device, p.dtype)
            lists = calls.setdefault(key, [[], [], [], [], []])
            st = opt.state[p]
            for i, t in enumerate((p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                lists[i].append(t)
        opt._opt_called = True  # what the LR scheduler's step wrapper records
    with torch.no_grad():
        for (lr, beta1, beta2, eps, weight_decay, _, _), (ps, gs, ms, vs, steps) in calls.items():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                ps,
                gs,
                ms,
                vs,
                [],
                steps,
                amsgrad=False,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=eps,
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
    return rest


def _read_norms(norms: Mapping[str, Any]) -> dict[str, float]:
    """The norms as host floats, in one transfer per device."""
    import torch

    values = {name: float(n) for name, n in norms.items() if not hasattr(n, "device")}
    tensors = {name: n for name, n in norms.items() if hasattr(n, "device")}
    by_device: dict[Any, list[str]] = {}
    for name, n in tensors.items():
        by_device.setdefault(n.device, []).append(name)
    for names in by_device.values():
        stacked = torch.stack([tensors[name].float() for name in names]).tolist()
        values.update(zip(names, (float(v) for v in stacked)))
    return values
