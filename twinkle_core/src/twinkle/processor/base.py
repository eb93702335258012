"""InputProcessor: encoded rows (``list[dict]``) -> the tensors a model backend consumes.

Two layouts:

* **padded** (default): ``input_ids``/``attention_mask``/``position_ids``/``labels`` of shape
  ``[B, T]``, right-padded (labels -100 on padding).
* **padding-free** (``padding_free=True``): every row concatenated into one ``[1, N]``
  sequence; ``position_ids`` restart at 0 for each sequence and ``cu_seq_lens_q/k``
  (int32 cumulative lengths) plus ``max_length_q/k`` are given for varlen attention
  (``VarlenAttention`` on sdpa, flash-attention); transformers' eager path detects the
  restarts in ``position_ids`` and masks across sequences.

Rows that already hold several sequences (``position_ids`` restarting at 0, as
``PackingDataset`` writes them) are laid out padding-free in either mode: a ``[B, T]``
attention mask cannot keep the sequences of one row apart, the boundaries can.

Both add ``shift_labels`` (the label predicted at each position; never crossing a
sequence boundary) and ``row_ids`` (which input row each position came from, -1 on
padding), and carry extra numeric per-row fields for losses: a number (``advantages``)
is broadcast over the row's positions, a list as long as ``input_ids`` (``old_logps``) is
shifted like the labels. See :mod:`twinkle.loss.base` for the contract.

Rows of vision-language models (:class:`~twinkle.template.vision.VisionTemplate`) carry
per-image fields (``pixel_values``, ``image_grid_thw``, ``high_res_pixel_values``): they are
concatenated over the batch's rows along their first dimension, in row order, which is the
order the model meets the image tokens in; ``mm_token_type_ids`` (per token) is padded with 0.
Such batches are padded (their multimodal RoPE positions come from the model, which computes
them from ``input_ids``, the image grids and the attention mask), so no ``position_ids`` are
given; packing them is refused.
"""

from __future__ import annotations

from numbers import Number
from typing import Any, Mapping, Sequence

#: Per-image fields of vision rows: concatenated over the batch along dim 0 (twinkle.template.vision).
VISION_FIELDS: tuple[str, ...] = (
    "pixel_values",
    "image_grid_thw",
    "high_res_pixel_values",
    "pixel_values_videos",
    "video_grid_thw",
)
#: Per-token integer fields of vision rows: padded with 0, never shifted.
VISION_TOKEN_FIELDS: tuple[str, ...] = ("mm_token_type_ids",)
#: Row fields that are not passed on as float tensors.
_STRUCTURAL = frozenset(
    {"input_ids", "labels", "position_ids", "attention_mask", "length", *VISION_FIELDS, *VISION_TOKEN_FIELDS}
)


class InputProcessor:
    """Collate encoded rows into model inputs, padded or packed.

    Args:
        padding_free: pack all rows into one sequence (no padding) instead of padding. Rows
            that hold several sequences (restarting ``position_ids``) are packed either way.
        pad_token_id: the id used for padding ``input_ids`` (padded layout).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Raises (from :meth:`__call__`):
        ValueError: an empty batch, a row without ``input_ids``, or labels/per-token
            fields whose length differs from ``input_ids``.

    Example::

        processor = InputProcessor(padding_free=True)
        batch = processor([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
        batch["position_ids"]  # tensor([[0, 1, 2]])
    """

    def __init__(self, padding_free: bool = False, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"InputProcessor: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.padding_free = padding_free
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], device: Any = None) -> dict[str, Any]:
        """Collate ``rows`` (or complete an already collated dict of tensors) onto ``device``.

        Args:
            rows: encoded rows with ``input_ids`` and usually ``labels`` (missing labels
                mean every token is trained), optional ``position_ids`` (a packed row) and
                extra numeric fields; or a dict of ``[B, T]`` tensors.
            device: where to put the tensors (``None``: CPU).

        Returns:
            A dict of tensors (see the module docstring).
        """
        if isinstance(rows, Mapping):
            return self._complete_tensors(rows, device)
        if not rows:
            raise ValueError("InputProcessor: the batch is empty; give at least one encoded row")
        seqs = [self._read_row(i, row) for i, row in enumerate(rows)]
        packed_rows = any(len(s["starts"]) > 1 for s in seqs)  # only boundaries keep their sequences apart
        vision = _vision_fields(rows)
        if vision and (self.padding_free or packed_rows):
            raise ValueError(
                "InputProcessor: rows with images (pixel_values) cannot be packed: the model computes their "
                "multimodal positions per padded row. Use the padded InputProcessor (padding_free=False) and "
                "no PackingDataset for vision-language data."
            )
        out = self._pad(seqs) if vision or not (self.padding_free or packed_rows) else self._pack(seqs)
        tensors = _to_tensors(out, device)
        if vision:
            tensors.update(_collate_vision(rows, vision, tensors["input_ids"].shape[-1], device))
            tensors.pop("position_ids", None)  # the model's own (multimodal) positions from the attention mask
        return tensors

    # -- rows --------------------------------------------------------------------
    def _read_row(self, index: int, row: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(row, Mapping) or "input_ids" not in row:
            fields = list(row) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(
                f"InputProcessor: row {index} has no 'input_ids' (fields: {fields}); encode the data set first "
                f"(dataset.set_template(...); dataset.encode()) or call model.set_template(...)"
            )
        ids = _as_list(row["input_ids"])
        n = len(ids)
        if n == 0:
            raise ValueError(f"InputProcessor: row {index} has empty 'input_ids'")
        labels = _as_list(row["labels"]) if row.get("labels") is not None else list(ids)
        if len(labels) != n:
            raise ValueError(f"InputProcessor: row {index}: labels has {len(labels)} entries but input_ids has {n}")
        pos = row.get("position_ids")
        pos = _as_list(pos) if pos is not None else list(range(n))
        if len(pos) != n:
            raise ValueError(f"InputProcessor: row {index}: position_ids has {len(pos)} entries but input_ids has {n}")
        starts = [t for t in range(n) if pos[t] == 0] if row.get("position_ids") is not None else [0]
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        shift = labels[1:] + [-100]
        for s in starts[1:]:
            shift[s - 1] = -100
        extras: dict[str, Any] = {}
        for key, value in row.items():
            if key in _STRUCTURAL or value is None:
                continue
            if isinstance(value, Number) and not isinstance(value, bool):
                extras[key] = ("scalar", float(value))
                continue
            values = _as_list(value) if hasattr(value, "tolist") else value
            if isinstance(values, list) and len(values) == n and (n == 0 or isinstance(values[0], Number)):
                shifted = [float(v) for v in values[1:]] + [0.0]
                for s in starts[1:]:
                    shifted[s - 1] = 0.0
                extras[key] = ("tokens", shifted)
        return {"ids": ids, "labels": labels, "shift": shift, "pos": pos, "starts": starts, "extras": extras}

    # -- layouts -----------------------------------------------------------------
    def _pad(self, seqs: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(s["ids"]) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out: dict[str, Any] = {
            "input_ids": [],
            "attention_mask": [],
            "position_ids": [],
            "labels": [],
            "shift_labels": [],
            "row_ids": [],
        }
        extra_keys = _extra_keys(seqs)
        extras: dict[str, list[list[float]]] = {k: [] for k in extra_keys}
        for r, s in enumerate(seqs):
            n = len(s["ids"])
            pad = width - n
            out["input_ids"].append(s["ids"] + [self.pad_token_id] * pad)
            out["attention_mask"].append([1] * n + [0] * pad)
            out["position_ids"].append(s["pos"] + [0] * pad)
            out["labels"].append(s["labels"] + [-100] * pad)
            out["shift_labels"].append(s["shift"] + [-100] * pad)
            out["row_ids"].append([r] * n + [-1] * pad)
            for k in extra_keys:
                extras[k].append(_extra_values(s, k, n) + [0.0] * pad)
        out["extras"] = extras
        return out

    def _pack(self, seqs: list[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        shift: list[int] = []
        row_ids: list[int] = []
        cu = [0]
        extra_keys = _extra_keys(seqs)
        extras: dict[str, list[float]] = {k: [] for k in extra_keys}
        for r, s in enumerate(seqs):
            n = len(s["ids"])
            offset = len(ids)
            ids += s["ids"]
            pos += s["pos"]
            labels += s["labels"]
            shift += s["shift"]
            row_ids += [r] * n
            for start in s["starts"][1:]:
                cu.append(offset + start)
            cu.append(offset + n)
            for k in extra_keys:
                extras[k] += _extra_values(s, k, n)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        return {
            "input_ids": [ids],
            "position_ids": [pos],
            "labels": [labels],
            "shift_labels": [shift],
            "row_ids": [row_ids],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            "extras": {k: [v] for k, v in extras.items()},
        }

    def _complete_tensors(self, batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
        import torch

        out = {k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v) for k, v in batch.items()}
        if "input_ids" not in out:
            raise ValueError(f"InputProcessor: the batch has no 'input_ids' (keys: {sorted(out)})")
        if "shift_labels" not in out:
            labels = out.get("labels", out["input_ids"])
            shift = torch.full_like(labels, -100)
            shift[:, :-1] = labels[:, 1:]
            if "attention_mask" in out:
                shift = shift.masked_fill(out["attention_mask"] == 0, -100)
            out["shift_labels"] = shift
        return out


def _vision_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-image fields present in any row (``[]`` for text-only batches)."""
    return [k for k in VISION_FIELDS if any(isinstance(r, Mapping) and r.get(k) is not None for r in rows)]


def collate_vision(
    rows: Sequence[Mapping[str, Any]], width: int, device: Any = None, *, left_padding: bool = False
) -> dict[str, Any]:
    """The vision inputs of ``rows``: per-image fields concatenated along dim 0 in row order, per-token
    type ids padded to ``width`` (on the right, or the left for generation prompts); ``{}`` without images.

    Example::

        collate_vision(features, width=batch["input_ids"].shape[1])  # {'pixel_values': ..., 'image_grid_thw': ...}
    """
    fields = _vision_fields(rows)
    return _collate_vision(rows, fields, width, device, left_padding=left_padding) if fields else {}


def _collate_vision(
    rows: Sequence[Mapping[str, Any]], fields: list[str], width: int, device: Any, *, left_padding: bool = False
) -> dict[str, Any]:
    """Per-image fields concatenated along dim 0 in row order; per-token type ids padded to ``width``."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    for key in fields:
        parts = [torch.as_tensor(np.asarray(r[key])) for r in rows if r.get(key) is not None]
        parts = [p for p in parts if p.numel()]
        if parts:
            tensor = torch.cat(parts, dim=0)
            out[key] = tensor.to(device=device, dtype=torch.long if key.endswith("grid_thw") else torch.float32)
    for key in VISION_TOKEN_FIELDS:
        if not any(r.get(key) is not None for r in rows):
            continue
        padded = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            values = _as_list(r[key]) if r.get(key) is not None else []
            if values:
                where = slice(width - len(values), width) if left_padding else slice(0, len(values))
                padded[i, where] = torch.tensor(values, dtype=torch.long)
        out[key] = padded.to(device)
    return out


def _as_list(value: Any) -> list[Any]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def _extra_keys(seqs: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for s in seqs:
        for k in s["extras"]:
            if k not in keys:
                keys.append(k)
    return keys


def _extra_values(seq: dict[str, Any], key: str, n: int) -> list[float]:
    entry = seq["extras"].get(key)
    if entry is None:
        return [0.0] * n
    kind, value = entry
    return [value] * n if kind == "scalar" else value


def _to_tensors(out: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    tensors: dict[str, Any] = {}
    for key, value in out.items():
        if key == "extras":
            for k, v in value.items():
                tensors[k] = torch.tensor(v, dtype=torch.float32, device=device)
        elif key.startswith("cu_seq_lens"):
            tensors[key] = torch.tensor(value, dtype=torch.int32, device=device)
        elif key.startswith("max_length"):
            tensors[key] = value
        else:
            tensors[key] = torch.tensor(value, dtype=torch.long, device=device)
    return tensors


class PaddingFreeProcessor(InputProcessor):
    """:class:`InputProcessor` with ``padding_free=True``: one packed sequence, no padding.

    Example::

        model.set_processor("PaddingFreeProcessor")
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        super().__init__(padding_free=True, pad_token_id=pad_token_id)
