"""JSON encoding of the values that cross the wire in http mode (both directions).

Plain JSON values pass through. Other values are tagged objects:

* ``{"__tensor__": {...}}`` / ``{"__ndarray__": {...}}``: dtype, shape and base64 bytes.
* ``{"__lora_config__": {...}}``: a ``peft.LoraConfig`` (its JSON-able fields).
* ``{"__model_output__": {...}}``: a :class:`twinkle.data_format.output.ModelOutput`.
* ``{"__pydantic__": "module:Class", "data": {...}}``: a pydantic model from a ``twinkle``
  module (e.g. ``SamplingParams``); other modules are refused when decoding.
* ``{"__record__": "module:Class", "data": {...}}``: a ``twinkle`` class with ``to_dict`` /
  ``from_dict`` (e.g. ``SampleResponse``); other modules are refused when decoding.
* ``{"__object__": "m1a2b3"}``: a :class:`~twinkle.client.proxy.RemoteComponent` passed as an
  argument (e.g. ``engine.sync(model, sampler)``); it decodes to an :class:`ObjectRef` that the
  server resolves to the tenant's own object, so no weights travel through the client.
* ``{"__float__": "nan"}``: a non-finite float. ``{"__map__": [[k, v], ...]}``: a dict with
  non-string keys, or keys starting with ``__``.

Anything else raises :class:`CodecError` naming the type, so nothing is silently dropped.

Example::

    assert decode(json.loads(json.dumps(encode({"a": [1, 2.5]})))) == {"a": [1, 2.5]}
"""

from __future__ import annotations

import base64
import importlib
import math
from dataclasses import dataclass
from typing import Any

_TAGS = (
    "__object__",
    "__tensor__",
    "__ndarray__",
    "__lora_config__",
    "__model_output__",
    "__pydantic__",
    "__record__",
    "__float__",
    "__map__",
)


class CodecError(TypeError):
    """A value that cannot be sent to (or accepted from) the server."""


@dataclass(frozen=True)
class ObjectRef:
    """A reference to a server-side object (decoded ``__object__``); the server resolves it per tenant."""

    object_id: str


def encode(value: Any) -> Any:
    """Turn ``value`` into JSON-compatible data (see the module docstring).

    Raises:
        CodecError: an unsupported type.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [encode(v) for v in sorted(value, key=repr)]
    cls_name = type(value).__name__
    module = type(value).__module__
    if cls_name == "RemoteComponent" and module == "twinkle.client.proxy":
        return {"__object__": value.remote_id}
    if isinstance(value, ObjectRef):
        return {"__object__": value.object_id}
    if cls_name == "ModelOutput" and module.startswith("twinkle."):
        return {"__model_output__": {str(k): encode(v) for k, v in value.items()}}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {"__map__": [[encode(k), encode(v)] for k, v in value.items()]}
    if module.startswith("torch") and cls_name in ("Tensor", "Parameter"):
        array = value.detach().cpu()
        dtype = str(array.dtype).replace("torch.", "")
        if dtype == "bfloat16":
            array, dtype = array.float(), "float32"
        raw = array.contiguous().numpy()
        return {
            "__tensor__": {"dtype": dtype, "shape": list(raw.shape), "data": base64.b64encode(raw.tobytes()).decode()}
        }
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(value, np.ndarray):
            raw = np.ascontiguousarray(value)
            if raw.dtype.hasobject:
                raise CodecError("numpy arrays of objects cannot be sent to the server")
            data = base64.b64encode(raw.tobytes()).decode()
            return {"__ndarray__": {"dtype": str(raw.dtype), "shape": list(raw.shape), "data": data}}
        if isinstance(value, np.generic):
            return encode(value.item())
    if cls_name == "LoraConfig" and module.startswith("peft"):
        fields = {}
        for key, item in value.to_dict().items():
            try:
                fields[key] = encode(item)
            except CodecError:
                continue
        return {"__lora_config__": fields}
    if hasattr(value, "model_dump") and module.startswith("twinkle."):
        return {"__pydantic__": f"{module}:{type(value).__qualname__}", "data": value.model_dump(mode="json")}
    if (
        callable(getattr(value, "to_dict", None))
        and hasattr(type(value), "from_dict")
        and module.startswith("twinkle.")
    ):
        return {"__record__": f"{module}:{type(value).__qualname__}", "data": encode(value.to_dict())}
    raise CodecError(f"a {module}.{cls_name} cannot be sent over http; pass plain data (lists, dicts, numbers)")


def decode(data: Any) -> Any:
    """Rebuild values produced by :func:`encode`.

    Raises:
        CodecError: a malformed tag or a pydantic class outside ``twinkle``.
    """
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = next((t for t in _TAGS if t in data), None)
    if tag is None:
        return {k: decode(v) for k, v in data.items()}
    try:
        return _decode_tagged(tag, data)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed payload is the sender's problem
        raise CodecError(f"malformed {tag} value: {exc}") from None


def _decode_tagged(tag: str, data: dict[str, Any]) -> Any:
    body = data[tag]
    if tag == "__object__":
        if not isinstance(body, str):
            raise CodecError("__object__ must be an object id string")
        return ObjectRef(body)
    if tag == "__float__":
        return float(body)
    if tag == "__map__":
        return {_hashable(decode(k)): decode(v) for k, v in body}
    if tag == "__model_output__":
        from twinkle.data_format.output import ModelOutput

        return ModelOutput({k: decode(v) for k, v in body.items()})
    if tag in ("__tensor__", "__ndarray__"):
        import numpy as np

        dtype = np.dtype(body["dtype"])
        if dtype.hasobject:
            raise CodecError("object arrays are not accepted")
        array = np.frombuffer(base64.b64decode(body["data"]), dtype=dtype).reshape(body["shape"]).copy()
        if tag == "__ndarray__":
            return array
        import torch

        return torch.from_numpy(array)
    if tag == "__lora_config__":
        from peft import LoraConfig

        fields = {k: decode(v) for k, v in body.items()}
        known = set(LoraConfig.__dataclass_fields__)
        return LoraConfig(**{k: v for k, v in fields.items() if k in known and k not in ("peft_type", "task_type")})
    if tag in ("__pydantic__", "__record__"):
        module_name, _, qualname = str(body).partition(":")
        if not module_name.startswith("twinkle."):
            raise CodecError(f"refusing to build {body}: only twinkle's own data types are accepted")
        cls = getattr(importlib.import_module(module_name), qualname)
        if tag == "__record__":
            return cls.from_dict(decode(data["data"]))
        return cls.model_validate(data["data"])
    raise CodecError(f"unknown tag {tag}")


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
