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


#: a loss input may hold at most this many values per token of its datum (declared shapes are
#: checked before anything is allocated: a sparse tensor's shape costs nothing to declare).
MAX_VALUES_PER_TOKEN = 64


def _tensor(msg: Any, name: str, max_values: int) -> Any:
    import numpy as np

    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
    np_dtype = dtypes.get(msg.dtype)
    if np_dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}] has an unsupported dtype {msg.dtype}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape) or len(shape) > 4:
        raise WireError(f"loss_fn_inputs[{name!r}]: invalid shape {shape}")
    declared = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if declared > max_values:
        raise WireError(
            f"loss_fn_inputs[{name!r}] declares shape {shape} ({declared} values), more than "
            f"{MAX_VALUES_PER_TOKEN} per token of its datum ({max_values})"
        )
    if msg.HasField("sparse_csr"):
        if len(shape) != 2:
            raise WireError(f"loss_fn_inputs[{name!r}]: a sparse tensor needs a 2-d shape")
        values = np.frombuffer(msg.sparse_csr.values, dtype=np_dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        rows, cols = shape
        if len(crow) != rows + 1 or len(col) != len(values):
            raise WireError(f"loss_fn_inputs[{name!r}]: malformed sparse tensor")
        if len(col) and (col.min() < 0 or col.max() >= cols) or (np.diff(crow) < 0).any() or crow[0] != 0:
            raise WireError(f"loss_fn_inputs[{name!r}]: sparse indices out of range")
        if crow[-1] != len(col):
            raise WireError(f"loss_fn_inputs[{name!r}]: sparse indices out of range")
        dense = np.zeros((rows, cols), dtype=np_dtype)
        dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
        return dense
    try:
        arr = np.frombuffer(msg.dense, dtype=np_dtype)
    except ValueError:
        raise WireError(f"loss_fn_inputs[{name!r}]: byte length does not fit its dtype") from None
    if arr.size > max_values:
        raise WireError(f"loss_fn_inputs[{name!r}]: {arr.size} values, more than {max_values} for its datum")
    if shape:
        if declared != arr.size:
            raise WireError(f"loss_fn_inputs[{name!r}]: {arr.size} values do not fill shape {shape}")
        arr = arr.reshape(shape)
    return arr


@dataclass
class ForwardBackwardHeader:
    """A parsed ``ForwardBackwardRequest`` before its tensors are decoded: what the run lookup
    and the rate charge need (:func:`parse_forward_backward`), and the message itself."""

    model_id: str
    seq_id: int | None
    loss_fn: str
    loss_config: dict[str, float | str]
    forward_only: bool
    tokens: int
    datums: int
    message: Any


def parse_forward_backward(body: bytes) -> ForwardBackwardHeader:
    """Parse a protobuf ``ForwardBackwardRequest`` and read its header (no tensor is built).

    Raises:
        WireError: not a valid message, or no ``model_id``.
    """
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
    tokens = sum(len(chunk.encoded_text.tokens) // 4 for d in msg.data for chunk in d.model_input)
    return ForwardBackwardHeader(
        msg.model_id, msg.seq_id or None, msg.loss_fn, config, bool(msg.forward_only), tokens, len(msg.data), msg
    )


def decode_datums(
    header: ForwardBackwardHeader,
) -> tuple[list[Datum], list[list[tuple[str, str, int, int]] | None]]:
    """Build the datums (and their provenance spans) of a parsed request, checking every tensor's
    declared shape before allocating it.

    Raises:
        WireError: non-text input chunks, or malformed or oversized tensors.
    """
    import numpy as np

    datums = []
    spans: list[list[tuple[str, str, int, int]] | None] = []
    for i, d in enumerate(header.message.data):
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
        max_values = MAX_VALUES_PER_TOKEN * max(1, len(flat))
        inputs = {name: _tensor(t, name, max_values) for name, t in d.loss_fn_inputs.items()}
        datums.append(Datum(flat, inputs))
    return datums, spans


def decode_forward_backward(body: bytes) -> ForwardBackwardMessage:
    """Decode a protobuf ``ForwardBackwardRequest`` (:func:`parse_forward_backward` then :func:`decode_datums`).

    Raises:
        WireError: not a valid message, non-text input chunks, or malformed tensors.
    """
    h = parse_forward_backward(body)
    datums, spans = decode_datums(h)
    return ForwardBackwardMessage(h.model_id, h.seq_id, h.loss_fn, h.loss_config, datums, h.forward_only, spans)


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
