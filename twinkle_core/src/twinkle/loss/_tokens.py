"""Helpers shared by the RL, preference and distillation losses: masks, per-sequence reductions."""

from __future__ import annotations

from typing import Any, Mapping


def label_mask(inputs: Mapping[str, Any]) -> Any:
    """``[B, T]`` bool: positions whose ``shift_labels`` are trained."""
    return inputs["shift_labels"] != -100


def sequence_index(inputs: Mapping[str, Any], mask: Any) -> tuple[Any, int]:
    """Per position, the index of its sequence (0..S-1; -1 on padding) and the number of sequences ``S``.

    Sequences are the input rows (``row_ids``; several per packed row). Without ``row_ids``
    every batch row is one sequence. Rows that appear in the batch count even when they have
    no trained token (as in TRL).
    """
    import torch

    row_ids = inputs.get("row_ids")
    if row_ids is None:
        b, t = mask.shape
        return torch.arange(b, device=mask.device).unsqueeze(1).expand(b, t), b
    row_ids = row_ids.to(mask.device).long()
    present = torch.unique(row_ids[row_ids >= 0])
    if present.numel() == 0:
        return row_ids, 0
    # map row ids to 0..S-1 (they are 0..S-1 already from the InputProcessor; this keeps gaps harmless)
    lookup = torch.full((int(present.max()) + 1,), -1, dtype=torch.long, device=mask.device)
    lookup[present] = torch.arange(present.numel(), device=mask.device)
    index = torch.where(row_ids >= 0, lookup[row_ids.clamp(min=0)], row_ids)
    return index, int(present.numel())


def per_sequence_sum(values: Any, mask: Any, index: Any, num_sequences: int) -> Any:
    """``[S]``: the sum of ``values`` over each sequence's masked positions."""
    import torch

    flat_index = index.reshape(-1)
    keep = (mask.reshape(-1)) & (flat_index >= 0)
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, flat_index[keep], values.reshape(-1)[keep])


def per_sequence_count(mask: Any, index: Any, num_sequences: int) -> Any:
    """``[S]``: trained positions per sequence (float)."""
    return per_sequence_sum(mask.float(), mask, index, num_sequences)


def require(inputs: Mapping[str, Any], key: str, who: str, how: str) -> Any:
    """``inputs[key]`` or a ValueError telling how to provide it."""
    value = inputs.get(key)
    if value is None:
        raise ValueError(f"{who} needs the per-row field {key!r} in the inputs of forward_backward; {how}")
    return value
