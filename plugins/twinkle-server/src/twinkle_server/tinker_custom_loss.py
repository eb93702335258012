"""Server-side custom losses of the Tinker SDK 0.38 (``ServiceClient.create_custom_loss``).

With ``custom_loss_server_side`` on (``/client/config``), the SDK traces the user's per-datum
loss with ``torch.fx`` and uploads it as plain data (``/api/v1/create_custom_loss``: nodes
with a qualified function or method name and JSON-encoded arguments); ``forward_backward_custom``
then sends an ordinary ``forward_backward`` with ``loss_fn="custom"`` and
``loss_fn_config={"loss_id": ...}``, and the server runs the loss on each datum's target
logprobs in its own batched pass.

Nothing the client sends is executed as code. The graph is rebuilt by :func:`compile_graph`
from this module's allow-lists only: :data:`FUNCTIONS` (torch math, ``torch.nn.functional``
activations, Python operators), :data:`METHODS` (tensor methods) and :data:`ATTRIBUTES`
(``shape``, ``ndim``, ``dtype``). Every other name (``builtins.eval``, ``os.system``,
``torch.load``, ``getattr(x, "__class__")``, a ``call_module``/``get_attr`` node...) is refused
with a 400 that names it. Limits: :data:`MAX_NODES` nodes (an unrolled Python loop is many nodes),
arguments nested at most :data:`MAX_DEPTH` deep, every tensor a node makes at most
:data:`MAX_ELEMENTS` elements, checked *before* the operation allocates it (broadcasts,
``expand``, ``stack``/``cat``), integer arithmetic on Python ints within 64 bits, and
:data:`TIME_LIMIT_S` seconds of execution per request (a loss past it fails its request).

Inputs: ``logprobs`` has rank 1 (``[T]``, the datum's target tokens); ``loss_fn_inputs`` may be
rank 1 (``[T]``) or rank 0 (a scalar, sent as a one-element tensor). Rank-2 inputs (``[T, K]``)
are refused: this server's pass takes one target token per position. Inputs reach the loss as
float32 tensors (as every Tinker loss input here).

Losses live in server memory for their tenant and session (a restart forgets them: the SDK's
``LossHandle`` then gets a 400 saying to create it again); a tenant keeps at most
:data:`MAX_LOSSES_PER_TENANT`.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from twinkle_server.auth import current_state, current_tenant
from twinkle_server.state import JSON, ServerState
from twinkle_server.store import Tenant

router = APIRouter(prefix="/api/v1", tags=["tinker"])

MAX_NODES = 1000
MAX_DEPTH = 8
MAX_LIST = 64
MAX_ELEMENTS = 1 << 22
TIME_LIMIT_S = 10.0
MAX_LOSSES_PER_TENANT = 64
MAX_INPUTS = 16
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: the engine's loss-registry key prefix of an uploaded loss (never a name a client can send)
KEY_PREFIX = "custom:"


class CustomLossError(ValueError):
    """A custom loss this server refuses (at upload) or that failed a limit (at run time)."""


# -- the allow-lists -----------------------------------------------------------------------
def _torch_functions() -> dict[str, Callable[..., Any]]:
    import torch
    import torch.nn.functional as F
    from torch.fx.node import _get_qualified_name

    funcs = [
        torch.exp, torch.log, torch.log1p, torch.expm1, torch.exp2, torch.log2, torch.sigmoid, torch.tanh,
        torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.neg, torch.sign, torch.relu, torch.sum,
        torch.mean, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.minimum, torch.maximum,
        torch.where, torch.pow, torch.logsumexp, torch.softmax, torch.log_softmax, torch.stack, torch.cat,
        torch.zeros_like, torch.ones_like, torch.full_like, torch.logaddexp, torch.isfinite, torch.nan_to_num,
        torch.max, torch.min, torch.amax, torch.amin, torch.mul, torch.add, torch.sub, torch.div,
        torch.dot, torch.cumsum, torch.flip, torch.std, torch.var, torch.numel, torch.logical_and,
        torch.logical_or, torch.logical_not, torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne,
        torch.argmax, torch.argmin, torch.prod, torch.norm,
        F.logsigmoid, F.softplus, F.relu, F.log_softmax, F.softmax, F.silu, F.gelu,
    ]  # fmt: skip
    out = {}
    for fn in funcs:
        name = _get_qualified_name(fn)
        out[name] = fn
        out.setdefault(f"torch.{fn.__name__}", fn)
    return out


_OPERATORS: dict[str, Callable[..., Any]] = {
    f"operator.{name}": getattr(operator, name)
    for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "pow", "abs", "getitem",
        "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_", "invert", "matmul",
    )
}  # fmt: skip
_MATH: dict[str, Callable[..., Any]] = {
    f"math.{name}": getattr(math, name) for name in ("sqrt", "log", "exp", "log1p", "expm1", "tanh", "fabs")
}
#: tensor methods a loss may call (``x.sum()``); ``to`` takes a dtype only.
METHODS = frozenset(
    """sum mean exp log log1p expm1 sigmoid tanh abs neg sqrt rsqrt square pow clamp clamp_min clamp_max
    clip detach float double to size dim numel unsqueeze squeeze reshape view flatten gather max min amax
    amin logsumexp softmax log_softmax masked_fill where sign relu mul add sub div ne eq lt le gt ge
    logical_and logical_or logical_not isfinite nan_to_num contiguous clone type_as expand expand_as
    cumsum flip std var norm argmax argmin prod t""".split()
)
#: attributes ``getattr`` may read (``x.shape`` traces as ``builtins.getattr(x, "shape")``).
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T"})
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")

_FUNCTIONS: dict[str, Callable[..., Any]] | None = None


def functions() -> dict[str, Callable[..., Any]]:
    """Every callable a ``call_function`` node may name, by its wire name."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = {**_torch_functions(), **_OPERATORS, **_MATH, "builtins.getattr": getattr}
    return _FUNCTIONS


# -- decoding and checking the graph -----------------------------------------------------------
@dataclass
class _Ref:
    name: str


@dataclass
class Node:
    """A checked node: its op, name, callable (or method name) and decoded arguments."""

    op: str
    name: str
    target: Any
    args: list[Any]
    kwargs: dict[str, Any]
    label: str


def _decode(value: Any, known: set[str], where: str, depth: int = 0) -> Any:
    import torch

    if depth > MAX_DEPTH:
        raise CustomLossError(f"{where}: arguments nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            raise CustomLossError(f"{where}: integer constant {value} does not fit 64 bits")
        return value
    if isinstance(value, str):
        if len(value) > 64:
            raise CustomLossError(f"{where}: string constants longer than 64 characters are refused")
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise CustomLossError(f"{where}: a list of {len(value)} items (at most {MAX_LIST})")
        return [_decode(v, known, where, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise CustomLossError(f"{where}: malformed argument {str(value)[:80]!r}")
    [(kind, inner)] = value.items()
    if kind == "ref":
        if inner not in known:
            raise CustomLossError(f"{where}: refers to {str(inner)[:64]!r}, which no earlier node defines")
        return _Ref(inner)
    if kind == "tuple" and isinstance(inner, list) and len(inner) <= MAX_LIST:
        return tuple(_decode(v, known, where, depth + 1) for v in inner)
    if kind == "dict" and isinstance(inner, dict) and len(inner) <= MAX_LIST:
        return {str(k)[:64]: _decode(v, known, where, depth + 1) for k, v in inner.items()}
    if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        parts = [_decode(v, known, where, depth + 1) for v in inner]
        if any(p is not None and not isinstance(p, (int, _Ref)) for p in parts):
            raise CustomLossError(f"{where}: slice bounds must be integers")
        return slice(*parts)
    if kind == "ellipsis" and inner is True:
        return Ellipsis
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if kind == "dtype" and inner in _DTYPES:
        return getattr(torch, inner)
    if kind in ("dtype", "device", "layout", "memory_format"):
        raise CustomLossError(
            f"{where}: {kind} argument {str(inner)[:32]!r} is not allowed in a custom loss on this server"
            + (f" (dtypes: {', '.join(_DTYPES)})" if kind == "dtype" else "")
        )
    raise CustomLossError(f"{where}: unsupported argument kind {kind!r}")


def compile_graph(nodes: list[dict[str, Any]], inputs: list[tuple[str, int]]) -> list[Node]:
    """Check an uploaded graph against the allow-lists and limits; returns its executable nodes.

    Raises:
        CustomLossError: the first thing refused, named.
    """
    if not nodes:
        raise CustomLossError("the graph has no nodes")
    if len(nodes) > MAX_NODES:
        raise CustomLossError(
            f"the graph has {len(nodes)} nodes; this server runs custom losses of at most {MAX_NODES} "
            "(a Python loop traces into one node per iteration: vectorise it)"
        )
    table = functions()
    known: set[str] = set()
    out: list[Node] = []
    placeholders: list[str] = []
    for i, raw in enumerate(nodes):
        op, name, target = raw.get("op"), raw.get("name"), raw.get("target")
        if not isinstance(name, str) or not _NODE_NAME.fullmatch(name) or name in known:
            raise CustomLossError(f"node {i}: invalid or repeated node name {str(name)[:64]!r}")
        if not isinstance(target, str) or len(target) > 200:
            raise CustomLossError(f"node {i} ({name}): invalid target")
        where = f"node {name} ({target})"
        args = raw.get("args") or []
        kwargs = raw.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict) or len(args) > MAX_LIST:
            raise CustomLossError(f"{where}: malformed args")
        dargs = [_decode(a, known, where) for a in args]
        dkwargs = {str(k)[:64]: _decode(v, known, where) for k, v in kwargs.items()}
        if op == "placeholder":
            if out and out[-1].op != "placeholder":
                raise CustomLossError(f"{where}: placeholders must come first")
            placeholders.append(target)
            fn: Any = None
        elif op == "call_function":
            fn = table.get(target)
            if fn is None:
                raise CustomLossError(
                    f"{where}: function {target!r} is not allowed in a custom loss on this server "
                    "(allowed: torch math and reductions, torch.nn.functional activations, Python operators)"
                )
            if fn is getattr and (len(dargs) != 2 or dargs[1] not in ATTRIBUTES):
                attr = dargs[1] if len(dargs) > 1 else None
                raise CustomLossError(
                    f"{where}: getattr of {str(attr)[:64]!r} is not allowed (only {', '.join(sorted(ATTRIBUTES))})"
                )
        elif op == "call_method":
            if target not in METHODS:
                raise CustomLossError(
                    f"{where}: tensor method {target!r} is not allowed in a custom loss on this server"
                )
            fn = target
        elif op == "output":
            fn = None
        elif op in ("call_module", "get_attr"):
            raise CustomLossError(
                f"{where}: {op} nodes are not allowed (a custom loss may not use modules or captured tensors)"
            )
        else:
            raise CustomLossError(f"{where}: unknown node op {str(op)[:32]!r}")
        out.append(Node(str(op), name, fn, dargs, dkwargs, where))
        known.add(name)
    expected = [n for n, _ in inputs]
    if placeholders != expected:
        raise CustomLossError(f"the graph's inputs {placeholders} do not match the declared inputs {expected}")
    if out[-1].op != "output" or sum(n.op == "output" for n in out) != 1:
        raise CustomLossError("the graph must end with its one output node")
    result = out[-1].args[0] if out[-1].args else None
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict)):
        raise CustomLossError("the loss must return (loss, metrics) with metrics a dict")
    for key in result[1]:
        if not _METRIC_KEY.fullmatch(key):
            raise CustomLossError(f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean")
    return out


# -- execution ---------------------------------------------------------------------------------
def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _check_size(node: Node, n: int) -> None:
    if n > MAX_ELEMENTS:
        raise CustomLossError(f"{node.label}: would make a tensor of {n} elements (at most {MAX_ELEMENTS})")


def _precheck(node: Node, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse, before it allocates, an operation whose result would be over the size limits."""
    import torch

    tensors = _tensors(args) + _tensors(list(kwargs.values()))
    if node.op == "call_method" and fn in ("expand", "reshape", "view"):
        rest = args[1:]
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        try:
            total = _numel(abs(int(s)) for s in sizes)
        except (TypeError, ValueError):
            raise CustomLossError(f"{node.label}: sizes must be integers") from None
        _check_size(node, total)
        return
    if fn in (torch.stack, torch.cat):
        _check_size(node, sum(t.numel() for t in tensors))
        return
    if len(tensors) >= 2:
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        except RuntimeError:
            return  # not a broadcast: the operation checks its own shapes
        _check_size(node, _numel(shape))
    if fn in (operator.mul, operator.pow, operator.add, operator.sub, operator.floordiv) and not tensors:
        a, b = (args + [0, 0])[:2]
        if not all(isinstance(v, (int, float, bool)) for v in (a, b)):
            raise CustomLossError(f"{node.label}: Python arithmetic only on numbers")
        if isinstance(a, int) and isinstance(b, int):
            bits = a.bit_length() * max(b, 1) if fn is operator.pow else a.bit_length() + b.bit_length()
            if bits > 64 or (fn is operator.pow and b < 0):
                raise CustomLossError(f"{node.label}: integer arithmetic beyond 64 bits")


def _resolve(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


def run_graph(nodes: list[Node], values: list[Any], deadline: float) -> tuple[Any, dict[str, Any]]:
    """Execute checked nodes on one datum's inputs; returns ``(loss, metrics)``.

    Raises:
        CustomLossError: a size or time limit, a method on a non-tensor, a non-scalar loss.
    """
    import torch

    env: dict[str, Any] = {}
    feed = iter(values)
    for node in nodes:
        if time.monotonic() > deadline:
            raise CustomLossError(f"the custom loss ran past this server's limit of {TIME_LIMIT_S:g} s per request")
        if node.op == "placeholder":
            env[node.name] = next(feed)
            continue
        args = _resolve(node.args, env)
        kwargs = _resolve(node.kwargs, env)
        if node.op == "output":
            loss, metrics = args[0]
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise CustomLossError(
                    f"the loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}"
                )
            for key, value in metrics.items():
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise CustomLossError(f"metric {key!r} must be a scalar tensor")
            return loss, metrics
        if node.op == "call_method":
            if not args or not isinstance(args[0], torch.Tensor):
                raise CustomLossError(f"{node.label}: method called on a non-tensor")
            if node.target == "to" and any(not isinstance(a, torch.dtype) for a in [*args[1:], *kwargs.values()]):
                raise CustomLossError(f"{node.label}: .to() takes a dtype only")
            _precheck(node, node.target, args, kwargs)
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            _precheck(node, node.target, args, kwargs)
            result = node.target(*args, **kwargs)
        for t in _tensors(result):
            _check_size(node, t.numel())
        if isinstance(result, int) and not isinstance(result, bool) and abs(result) >= 1 << 63:
            raise CustomLossError(f"{node.label}: integer result beyond 64 bits")
        env[node.name] = result
    raise CustomLossError("the graph has no output")  # compile_graph guarantees one


# -- the per-tenant registry -------------------------------------------------------------------
@dataclass
class StoredLoss:
    """An uploaded loss: who may use it, its inputs and its checked nodes."""

    tenant_id: str
    session_id: str
    name: str
    inputs: list[tuple[str, int]]
    nodes: list[Node]
    key: str


@dataclass
class _Registry:
    losses: dict[str, StoredLoss] = field(default_factory=dict)
    #: job token -> (metric sums, [datums seen], [created, first loss call or 0])
    metrics: dict[float, tuple[dict[str, float], list[int], list[float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))


REGISTRY = _Registry()


def _engine_loss(stored: StoredLoss) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """The loss as the engine calls it: ``(logp [T], {input: [T] tensor}, config) -> (loss, outputs)``."""

    def loss(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
        token = config["job"]
        with REGISTRY.lock:
            entry = REGISTRY.metrics.get(token)
            if entry is not None and not entry[2][1]:
                entry[2][1] = time.monotonic()  # the clock starts at the job's first datum, not in the queue
        deadline = (entry[2][1] if entry else time.monotonic()) + TIME_LIMIT_S
        values = [logp]
        for name, rank in stored.inputs[1:]:
            value = inputs[name]
            values.append(value[0] if rank == 0 else value)
        value, metrics = run_graph(stored.nodes, values, deadline)
        if entry is not None:
            sums, count, _ = entry
            count[0] += 1
            for key, m in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(m.detach().reshape(()).item())
        return value, {"logprobs": logp.detach()}

    return loss


def _register(stored: StoredLoss) -> None:
    from twinkle.loss import tinker as core

    core.LOSSES[stored.key] = _engine_loss(stored)
    core.LOSS_INPUTS[stored.key] = ("target_tokens", *(n for n, _ in stored.inputs[1:]))
    core.LOSS_CONFIG[stored.key] = {"job": None}
    core.PER_SEQUENCE.add(stored.key)  # one call per datum, as Tinker calls a custom loss


# -- routes ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CustomLossInputBody(_Body):
    name: str = Field(max_length=64)
    rank: int = Field(ge=0, le=2)


class CustomLossGraphBody(_Body):
    format: int = 1
    nodes: list[dict[str, Any]] = Field(max_length=MAX_NODES + 1)


class CreateCustomLossBody(_Body):
    session_id: str = Field(max_length=200)
    custom_loss_seq_id: int = Field(ge=0)
    name: str = Field(max_length=200)
    inputs: list[CustomLossInputBody] = Field(max_length=MAX_INPUTS)
    graph: CustomLossGraphBody


def _check_inputs(inputs: list[CustomLossInputBody]) -> list[tuple[str, int]]:
    if not inputs or inputs[0].name != "logprobs":
        raise CustomLossError("a custom loss takes logprobs first")
    if inputs[0].rank != 1:
        raise CustomLossError(
            "logprobs of rank 2 ([T, K], several targets per position) are not supported by this server; use rank 1"
        )
    seen: set[str] = set()
    out = []
    for item in inputs:
        if not _INPUT_NAME.fullmatch(item.name) or item.name in seen:
            raise CustomLossError(f"invalid or repeated input name {item.name!r}")
        if item.name == "target_tokens":
            raise CustomLossError("target_tokens is the loss's target, not an input it may read")
        if item.rank == 2:
            raise CustomLossError(
                f"input {item.name!r} has rank 2 ([T, K]); this server's custom losses take rank 0 or 1 inputs"
            )
        seen.add(item.name)
        out.append((item.name, item.rank))
    return out


@router.post("/create_custom_loss")
def create_custom_loss(
    body: CreateCustomLossBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Check and store a traced loss; the future resolves to ``{"loss_id": ...}`` (400 names what is refused)."""
    import json

    session = state.store.session(tenant.id, body.session_id)
    if session is None:
        raise HTTPException(404, f"session {body.session_id!r} not found")
    if body.graph.format != 1:
        raise HTTPException(400, f"custom loss graph format {body.graph.format} is not supported (this server reads 1)")
    try:
        inputs = _check_inputs(body.inputs)
        nodes = compile_graph(body.graph.nodes, inputs)
    except CustomLossError as exc:
        raise HTTPException(400, f"create_custom_loss {body.name[:64]!r}: {exc}") from None
    with REGISTRY.lock:
        held = sum(1 for s in REGISTRY.losses.values() if s.tenant_id == tenant.id)
        if held >= MAX_LOSSES_PER_TENANT:
            raise HTTPException(
                403, f"tenant {tenant.name!r} already has {held} custom losses (at most {MAX_LOSSES_PER_TENANT})"
            )
        loss_id = f"loss-{secrets.token_hex(8)}"
        stored = StoredLoss(tenant.id, body.session_id, body.name[:200], inputs, nodes, KEY_PREFIX + loss_id)
        REGISTRY.losses[loss_id] = stored
        _register(stored)
    future_id = state.store.create_future(tenant.id, None, "create_custom_loss")
    payload = json.dumps({"loss_id": loss_id, "type": "create_custom_loss"}).encode()
    state.store.finish_future(future_id, JSON, payload)
    state.waiters.notify(future_id)
    return {"request_id": future_id, "model_id": None}


@dataclass
class BoundJob:
    """A ``loss_fn="custom"`` request bound to its stored loss: collects its metrics."""

    stored: StoredLoss
    token: float

    def prepare_datums(self, datums: list[Any]) -> None:
        """Check each datum against the loss's inputs; a scalar input becomes a ``[T]`` row."""
        import numpy as np

        names = {n for n, _ in self.stored.inputs[1:]}
        for i, datum in enumerate(datums):
            target = datum.inputs.get("target_tokens")
            if target is None:
                raise HTTPException(400, f"datum {i} has no loss_fn_inputs['target_tokens']")
            if np.asarray(target).ndim != 1:
                raise HTTPException(400, f"datum {i}: target_tokens of rank 2 are not supported by custom losses here")
            n = len(datum.tokens)
            for name, rank in self.stored.inputs[1:]:
                if name not in datum.inputs:
                    raise HTTPException(
                        400, f"datum {i} has no loss_fn_inputs[{name!r}], which loss {self.stored.name!r} takes"
                    )
                arr = np.asarray(datum.inputs[name])
                if rank == 0:
                    if arr.size != 1:
                        raise HTTPException(400, f"datum {i}: loss_fn_inputs[{name!r}] must be a scalar (rank 0)")
                    datum.inputs[name] = np.full(n, float(arr.reshape(-1)[0]), dtype=np.float32)
                elif arr.ndim != 1:
                    raise HTTPException(400, f"datum {i}: loss_fn_inputs[{name!r}] must have rank 1")
            for extra in set(datum.inputs) - names - {"target_tokens"}:
                del datum.inputs[extra]

    def finish(self, result: Any) -> None:
        """Add the loss's ``custom/...`` metrics (``:sum`` summed, ``:mean`` averaged over datums)."""
        with REGISTRY.lock:
            sums, count, _ = REGISTRY.metrics.pop(self.token, ({}, [0], [0.0, 0.0]))
        for key, value in sums.items():
            result.metrics[key] = value / max(count[0], 1) if key.endswith(":mean") else value


def bind(state: ServerState, tenant: Tenant, run: Any, header: Any) -> BoundJob:
    """Turn a ``loss_fn="custom"`` request into one for its stored loss (rewrites ``header``).

    Raises:
        HTTPException: 400 without a known ``loss_id`` of this tenant's session.
    """
    loss_id = header.loss_config.get("loss_id")
    if not isinstance(loss_id, str):
        raise HTTPException(400, "loss_fn='custom' needs loss_fn_config {'loss_id': <id from create_custom_loss>}")
    if set(header.loss_config) != {"loss_id"}:
        raise HTTPException(400, "loss_fn='custom' takes only loss_fn_config['loss_id']")
    with REGISTRY.lock:
        stored = REGISTRY.losses.get(loss_id)
        if stored is None or stored.tenant_id != tenant.id:
            raise HTTPException(
                400,
                f"custom loss {loss_id[:64]!r} is not known to this server (a restart forgets them); create it again",
            )
        if stored.session_id != run.session_id:
            raise HTTPException(400, f"custom loss {loss_id!r} belongs to another session; create it in this one")
        token = float(next(REGISTRY.counter))
        now = time.monotonic()
        for old in [t for t, (_, _, times) in REGISTRY.metrics.items() if now - times[0] > 3600]:
            del REGISTRY.metrics[old]  # jobs that never finished (their request failed)
        REGISTRY.metrics[token] = ({}, [0], [now, 0.0])
    header.loss_fn = stored.key
    header.loss_config = {"job": token}
    return BoundJob(stored, token)


def custom_loss_for(loss_fn: str) -> Optional[StoredLoss]:
    """The stored loss behind an engine key (tests)."""
    if not loss_fn.startswith(KEY_PREFIX):
        return None
    return REGISTRY.losses.get(loss_fn[len(KEY_PREFIX) :])
