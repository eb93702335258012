"""The Tinker protobuf wire format: decode forward_backward requests, encode results.

The message classes come from the official SDK (``tinker.proto.tinker_public_pb2``), so
the server speaks exactly what the installed SDK sends and reads. Decoding never trusts
sizes: tensors are checked against their declared shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from twinkle_server.engine import Datum, JobResult

PROTO_CONTENT_TYPE = "application/x-protobuf"


class WireError(ValueError):
    """A request body that is not a valid Tinker message."""


def _pb() -> Any:
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


@dataclass
class ForwardBackwardMessage:
    """A decoded ``ForwardBackwardRequest``."""

    model_id: str
    seq_id: int | None
    loss_fn: str
    loss_config: dict[str, float | str]
    datums: list[Datum]
    forward_only: bool
    #: per datum, its ``loss_fn_input_spans`` as ``(kind, sequence_id, offset, length)``
    #: (kind ``sampled`` or ``prompt``), or ``None`` without provenance.
    spans: list[list[tuple[str, str, int, int]] | None] | None = None


def _tensor(msg: Any, name: str) -> Any:
    import numpy as np

    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    np_dtype = dtypes.get(msg.dtype)
    if np_dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}] has an unsupported dtype {msg.dtype}")
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):
        if len(shape) != 2:
            raise WireError(f"loss_fn_inputs[{name!r}]: a sparse tensor needs a 2-d shape")
        values = np.frombuffer(msg.sparse_csr.values, dtype=np_dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        rows, cols = shape
        if rows * cols > 50_000_000 or len(crow) != rows + 1 or len(col) != len(values):
            raise WireError(f"loss_fn_inputs[{name!r}]: malformed sparse tensor")
        if len(col) and (col.min() < 0 or col.max() >= cols) or (np.diff(crow) < 0).any() or crow[-1] != len(col):
            raise WireError(f"loss_fn_inputs[{name!r}]: sparse indices out of range")
        dense = np.zeros((rows, cols), dtype=np_dtype)
        for r in range(rows):
            dense[r, col[crow[r] : crow[r + 1]]] = values[crow[r] : crow[r + 1]]
        return dense
    try:
        arr = np.frombuffer(msg.dense, dtype=np_dtype)
    except ValueError:
        raise WireError(f"loss_fn_inputs[{name!r}]: byte length does not fit its dtype") from None
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise WireError(f"loss_fn_inputs[{name!r}]: {arr.size} values do not fill shape {shape}")
        arr = arr.reshape(shape)
    return arr


def decode_forward_backward(body: bytes) -> ForwardBackwardMessage:
    """Decode a protobuf ``ForwardBackwardRequest``.

    Raises:
        WireError: not a valid message, non-text input chunks, or malformed tensors.
    """
    import numpy as np
    from google.protobuf.message import DecodeError

    msg = _pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError):
        raise WireError("the body is not a protobuf ForwardBackwardRequest") from None
    if not msg.model_id:
        raise WireError("model_id is required")
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    datums = []
    spans: list[list[tuple[str, str, int, int]] | None] = []
    for i, d in enumerate(msg.data):
        runs: list[tuple[str, str, int, int]] = []
        for span in d.loss_fn_input_spans:
            kind = span.WhichOneof("span")
            if kind == "sampled_tokens":
                arm, name = span.sampled_tokens, "sampled"
            elif kind == "prompt_tokens":
                arm, name = span.prompt_tokens, "prompt"
            else:
                raise WireError(f"datum {i}: a provenance span of unknown kind")
            runs.append((name, arm.sequence_id, int(arm.offset), int(arm.length)))
        spans.append(runs if len(d.loss_fn_input_spans) else None)
        tokens: list[Any] = []
        for chunk in d.model_input:
            kind = chunk.WhichOneof("chunk") if chunk.DESCRIPTOR.oneofs else None
            if kind not in (None, "encoded_text") or not chunk.HasField("encoded_text"):
                raise WireError(f"datum {i}: only encoded_text chunks are supported (no images or audio)")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise WireError(f"datum {i}: token bytes are not int32")
            tokens.append(np.frombuffer(raw, dtype=np.int32))
        flat = np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, dtype=np.int64)
        inputs = {name: _tensor(t, name) for name, t in d.loss_fn_inputs.items()}
        datums.append(Datum(flat, inputs))
    return ForwardBackwardMessage(
        msg.model_id, msg.seq_id or None, msg.loss_fn, config, datums, bool(msg.forward_only), spans
    )


def encode_forward_backward_output(result: JobResult) -> bytes:
    """Encode a job's outputs as a protobuf ``ForwardBackwardOutput`` (one batched ArrayRecord)."""
    import numpy as np

    pb = _pb()
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    for k, v in result.metrics.items():
        out.metrics[k] = float(v)
    if result.outputs:
        record = out.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(result.outputs)
        for name in result.outputs[0]:
            arrays = [np.asarray(o[name], dtype=np.float32).reshape(-1) for o in result.outputs]
            bt = record.fields[name]
            bt.dtype = pb.DTYPE_FLOAT32
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([a.nbytes for a in arrays])
            bt.offsets = offsets.tobytes()
            bt.data = b"".join(a.tobytes() for a in arrays)
    return out.SerializeToString()


def encode_sample_response(
    sequences: Sequence[tuple[Sequence[int], Sequence[float], str]],
    prompt_logprobs: Sequence[float] | None,
    topk_prompt: tuple[Any, Any] | None = None,
) -> bytes:
    """Encode sampled sequences as a protobuf ``SampleResponse`` (``topk_prompt``: ``(ids, logprobs)``, each
    ``(len(prompt), k)``)."""
    import numpy as np

    pb = _pb()
    out = pb.SampleResponse()
    for tokens, logprobs, reason in sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    if topk_prompt is not None:
        ids, lps = (np.asarray(topk_prompt[0], dtype=np.int32), np.asarray(topk_prompt[1], dtype=np.float32))
        out.topk_prompt_logprobs.length, out.topk_prompt_logprobs.k = ids.shape
        out.topk_prompt_logprobs.token_ids = ids.tobytes()
        out.topk_prompt_logprobs.logprobs = lps.tobytes()
    return out.SerializeToString()
