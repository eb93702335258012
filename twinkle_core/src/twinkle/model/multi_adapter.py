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
    from twinkle.patch.fastpath import HiddenStatesOutput, uses_fused_head

    if uses_fused_head(outputs):
        return HiddenStatesOutput(
            hidden_states=dict.__getitem__(outputs, "hidden_states")[:, start:end],
            lm_head_weight=dict.__getitem__(outputs, "lm_head_weight"),
            lm_head_bias=dict.get(outputs, "lm_head_bias"),
        )
    return ModelOutput(logits=outputs["logits"][:, start:end])


def _run(model: Any, batch: Mapping[str, Any]) -> Any:
    """The model's forward on a packed batch (varlen attention; hidden states when the fused head is on)."""
    import torch

    from twinkle.patch.fastpath import run_model, unwrap
    from twinkle.patch.varlen import packed_inputs

    model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    context = packed_inputs(unwrap(model.model), batch, model_inputs)
    autocast = getattr(model, "_autocast", None)
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
    import torch

    from twinkle.loss.base import token_logps
    from twinkle.patch.multi_lora import SegmentPlan, adapter_segments

    batch, spans = pack_rows(model, inputs, extra)
    plan = SegmentPlan([(name, s, e) for name, s, e, _, _ in spans], batch["input_ids"].shape[-1], kernel)
    was_training = model.model.training
    model.model.eval()
    answers: dict[str, ModelOutput] = {}
    try:
        with torch.no_grad(), adapter_segments(model.model, plan):
            outputs = _run(model, batch)
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
    finally:
        model.model.train(was_training)
    return answers


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
    import torch

    from twinkle.patch.multi_lora import SegmentPlan, adapter_segments

    batch, spans = pack_rows(model, inputs, extra)
    plan = SegmentPlan([(name, s, e) for name, s, e, _, _ in spans], batch["input_ids"].shape[-1], kernel)
    was_training = model.model.training
    model.model.eval()
    answers: dict[str, ModelOutput] = {}
    try:
        with torch.no_grad(), adapter_segments(model.model, plan):
            outputs = _run(model, batch)
            for name, start, end, first_row, _ in spans:
                result = model.state_of(name).loss(
                    _slice_batch(batch, start, end, first_row), _slice_outputs(outputs, start, end)
                )
                tokens = float(result.num_tokens)
                loss = float(result.loss)
                answers[name] = ModelOutput(loss=loss / tokens if tokens else 0.0, num_tokens=tokens)
    finally:
        model.model.train(was_training)
    return answers
