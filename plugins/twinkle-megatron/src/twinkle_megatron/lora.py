"""LoRA on megatron-core's linear layers, one LoRA pair per Hugging Face projection.

megatron fuses projections that transformers keeps apart (``linear_qkv`` = q, k, v;
``linear_fc1`` = gate, up). A PEFT adapter has one ``lora_A``/``lora_B`` pair per HF
module, so :class:`LoraLinear` keeps exactly those pairs (``parts``) and adds each
``scaling * B(A(x))`` into its slice of the fused output. The adapter is therefore
*exactly* a PEFT adapter: :func:`peft_state_dict` writes its weights under PEFT's key
names, and peft/transformers load the result unchanged.

Several named adapters live side by side; one is active at a time (or none, for the
reference model).

Example::

    lora = MegatronLora(gpt_model, hf_config)
    params = lora.add("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lora.set_active("default")
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

#: megatron module suffix -> (HF module path inside the layer, its parts) ; parts are HF leaf names.
#: Listed in the order transformers defines the modules inside a layer: LoRA weights are
#: created in this order (see :meth:`MegatronLora._candidates`), as peft creates them.
_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attention.linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    # multi-latent attention (DeepSeek-V2/V3)
    "self_attention.linear_q_proj": ("self_attn", ("q_proj",)),
    "self_attention.linear_q_down_proj": ("self_attn", ("q_a_proj",)),
    "self_attention.linear_q_up_proj": ("self_attn", ("q_b_proj",)),
    "self_attention.linear_kv_down_proj": ("self_attn", ("kv_a_proj_with_mqa",)),
    "self_attention.linear_kv_up_proj": ("self_attn", ("kv_b_proj",)),
    "self_attention.linear_proj": ("self_attn", ("o_proj",)),
    "mlp.linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("mlp", ("down_proj",)),
    "mlp.shared_experts.linear_fc1": ("mlp.shared_expert", ("gate_proj", "up_proj")),
    "mlp.shared_experts.linear_fc2": ("mlp.shared_expert", ("down_proj",)),
}
_ORDER = {suffix: i for i, suffix in enumerate(_TARGETS)}
#: multi-latent-attention families: LoRA on the attention projections only (see :meth:`MegatronLora.add`).
_MLA_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3"})
_MLA_PARTS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_ALL_PARTS = frozenset(p for _, parts in _TARGETS.values() for p in parts)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _make_lora_linear_class() -> type:
    from torch import nn

    class _LoraLinear(nn.Module):
        """A megatron linear layer plus named LoRA adapters on its HF sub-projections.

        Args:
            base: the megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` (returns
                ``(output, bias)``).
            parts: ``[(hf_name, out_features)]`` in the order of the fused output.
            groups: the fused output is ``groups`` repeats of ``[part 0 rows, part 1 rows, ...]``
                (``linear_qkv``: one repeat per key/value group); 1 for a plain concatenation.
        """

        def __init__(self, base: Any, parts: list[tuple[str, int]], groups: int = 1) -> None:
            super().__init__()
            self.base = base
            self.parts = parts
            self.groups = groups
            self.in_features = base.weight.shape[1]
            self.lora_A = nn.ModuleDict()
            self.lora_B = nn.ModuleDict()
            self.scaling: dict[str, float] = {}
            self.dropout = nn.ModuleDict()
            self.active: str | None = None

        @property
        def weight(self) -> Any:
            return self.base.weight

        def add(self, name: str, targeted: set[str], r: int, scaling: float, dropout: float) -> list[Any]:
            ref = self.base.weight
            params = []
            for part, out_features in self.parts:
                if part not in targeted:
                    continue
                key = f"{name}__{part}"
                # Built on the CPU in float32 and then moved, exactly like peft: the same seed gives the
                # same adapter on every device (CUDA's generator would draw other numbers).
                a = nn.Linear(self.in_features, r, bias=False)
                b = nn.Linear(r, out_features, bias=False)
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
                a, b = a.to(ref.device, ref.dtype), b.to(ref.device, ref.dtype)
                self.lora_A[key], self.lora_B[key] = a, b
                params += [a.weight, b.weight]
            self.scaling[name] = scaling
            self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            return params

        def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            """``base(x) + scaling * x A^T B^T`` with the parts' A stacked and B laid out as the fused output.

            Two matmuls for all parts together: ``x`` is read once for every A, and the second
            matmul writes the delta straight into the fused layout and adds it to the base
            output (``addmm``), instead of one full-width tensor per part, a scaling pass, a
            concatenation and an add.
            """
            import torch
            from torch.nn.functional import linear

            out, bias = self.base(x, *args, **kwargs)
            name = self.active
            if name is None or name not in self.scaling:
                return out, bias
            keys = [f"{name}__{part}" for part, _ in self.parts]
            present = [key for key in keys if key in self.lora_A]
            if not present:
                return out, bias
            weight_a = torch.cat([self.lora_A[key].weight for key in present])
            low = linear(self.dropout[name](x), weight_a) * self.scaling[name]
            weight_b = _fused_b([self.lora_B[key].weight if key in self.lora_A else None for key in keys], self)
            if low.dtype == out.dtype:
                flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), weight_b.t())
                return flat.view(out.shape), bias
            return out + linear(low, weight_b).to(out.dtype), bias

    return _LoraLinear


_CLASS: type | None = None


def lora_linear_class() -> type:
    """The ``nn.Module`` class of LoRA-wrapped megatron linears (built lazily: torch is heavy)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_lora_linear_class()
    return _CLASS


def _fused_b(weights_b: list[Any], layer: Any) -> Any:
    """The parts' B matrices as one ``[out, sum of ranks]`` matrix in the fused output's row order.

    Part ``i``'s rows hold its B in its own column block (zeros elsewhere); a part without
    LoRA contributes zero rows. With ``layer.groups > 1`` (``linear_qkv``) each part's rows
    are split per group and the groups interleaved, as megatron lays out q, k and v.
    """
    import torch
    from torch.nn.functional import pad

    groups = layer.groups
    ranks = [w.shape[1] if w is not None else 0 for w in weights_b]
    total = sum(ranks)
    ref = next(w for w in weights_b if w is not None)
    blocks, column = [], 0
    for w, (_, size), rank in zip(weights_b, layer.parts, ranks):
        rows = size // groups
        if w is None:
            blocks.append(ref.new_zeros(groups, rows, total))
        else:
            blocks.append(pad(w.view(groups, rows, rank), (column, total - column - rank)))
        column += rank
    return torch.cat(blocks, dim=1).reshape(-1, total)


def LoraLinear(base: Any, parts: list[tuple[str, int]], groups: int = 1) -> Any:  # noqa: N802 - builds a module
    """Wrap megatron linear ``base`` for LoRA (see :func:`lora_linear_class`)."""
    return lora_linear_class()(base, parts, groups)


class MegatronLora:
    """Named LoRA adapters on a megatron ``GPTModel`` whose HF family is ``hf_config``.

    Args:
        model: the ``GPTModel`` (tensor-parallel size 1).
        hf_config: the transformers configuration (head counts, family).

    Raises:
        ValueError: tensor parallelism > 1 (LoRA shards are not implemented for tp > 1).
    """

    def __init__(self, model: Any, hf_config: Any) -> None:
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                "MegatronModel LoRA needs tp_size=1 (tensor-parallel LoRA shards are not supported); train with "
                "tp_size=1 or full parameters"
            )
        self.model = model
        self.hf_config = hf_config
        self.configs: dict[str, Any] = {}
        self.modules: dict[str, Any] = {}  # megatron module name -> LoraLinear
        self.targets: dict[str, list[str]] = {}  # adapter -> HF module names (relative, e.g. self_attn.q_proj)

    def _wrap(self, name: str) -> Any:
        if name in self.modules:
            return self.modules[name]
        cfg = self.hf_config
        heads = cfg.num_attention_heads
        groups = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        parent_name, _, leaf = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        suffix = _LAYER.match(name).group(2)
        _, hf_parts = _TARGETS[suffix]
        out = base.weight.shape[0]
        if suffix.endswith("linear_qkv"):
            parts = [
                (hf_parts[0], heads * head_dim),
                (hf_parts[1], groups * head_dim),
                (hf_parts[2], groups * head_dim),
            ]
            fused_groups = groups
        elif len(hf_parts) == 2:
            parts = [(hf_parts[0], out // 2), (hf_parts[1], out // 2)]
            fused_groups = 1
        else:
            parts = [(hf_parts[0], out)]
            fused_groups = 1
        wrapper = LoraLinear(base, parts, fused_groups)
        setattr(parent, leaf, wrapper)
        self.modules[name] = wrapper
        return wrapper

    def _candidates(self) -> list[str]:
        """Targetable megatron linears, layer by layer in transformers' module order.

        megatron registers ``linear_proj`` before the query/key/value projections; peft walks
        transformers' order (q, k, v, o). Creating LoRA weights in that order consumes the RNG
        as peft does, so a seeded adapter starts from the same values on both backends.
        """
        names = []
        for name, _ in self.model.named_modules():
            m = _LAYER.match(name)
            if m and m.group(2) in _TARGETS and not name.endswith(".base"):
                names.append(name)
        return sorted(names, key=lambda n: (int(_LAYER.match(n).group(1)), _ORDER[_LAYER.match(n).group(2)]))

    def add(self, adapter_name: str, config: Any) -> list[Any]:
        """Add adapter ``adapter_name`` from a peft ``LoraConfig``; returns its trainable parameters.

        ``target_modules``: ``"all-linear"`` or HF leaf names (``q_proj``, ``k_proj``,
        ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``). MoE routed
        experts are not targeted (transformers keeps them as fused tensors, which peft
        does not adapt either); shared experts are.

        DeepSeek-V2/V3 (multi-latent attention): a list of ``q_proj`` (V2 without query
        compression), ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``,
        ``o_proj``. MLP names and ``"all-linear"`` are refused there: with transformers 5,
        peft 0.21 maps ``gate_proj``/``up_proj``/``down_proj`` on these models onto the fused
        routed experts only (not the dense MLPs, not the shared experts), so no megatron
        adapter would load in peft as the same model.

        Raises:
            ValueError: unknown target names, or options this backend does not support.
        """
        targets = config.target_modules
        if getattr(self.hf_config, "model_type", None) in _MLA_FAMILIES:
            names = {str(t).rsplit(".", 1)[-1] for t in (targets or ())} if not isinstance(targets, str) else None
            if names is None or not names <= set(_MLA_PARTS):
                raise ValueError(
                    f"LoRA target_modules={targets!r} on {self.hf_config.model_type}: MegatronModel adapts the "
                    f"multi-latent attention projections {list(_MLA_PARTS)} of DeepSeek models; MLP names and "
                    f"'all-linear' are refused because peft (with transformers 5) maps them onto the fused routed "
                    f"experts, which MegatronModel does not adapt. Pass a list of those attention names"
                )
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ValueError(
                    f"LoRA target_modules={targets!r}: MegatronModel accepts 'all-linear' or a list of names from "
                    f"{sorted(_ALL_PARTS)}"
                )
            wanted = set(_ALL_PARTS)
        else:
            # peft rewrites target_modules in place to full module paths ('model.layers.0.mlp.up_proj')
            # once a config has been used: the leaf name is what selects the projection.
            wanted = {str(t).rsplit(".", 1)[-1] for t in (targets or ())}
            unknown = wanted - _ALL_PARTS
            if unknown:
                raise ValueError(
                    f"LoRA target_modules {sorted(unknown)} are not supported by MegatronModel; use names from "
                    f"{sorted(_ALL_PARTS)} or 'all-linear'"
                )
        for option in ("use_dora", "fan_in_fan_out"):
            if getattr(config, option, False):
                raise ValueError(f"LoRA {option}=True is not supported by MegatronModel")
        if getattr(config, "bias", "none") != "none":
            raise ValueError("LoRA bias must be 'none' for MegatronModel")
        r = int(config.r)
        scaling = config.lora_alpha / (math.sqrt(r) if getattr(config, "use_rslora", False) else r)
        params: list[Any] = []
        hf_targets: set[str] = set()
        for name in self._candidates():
            suffix = _LAYER.match(name).group(2)
            hf_path, hf_parts = _TARGETS[suffix]
            chosen = wanted & set(hf_parts)
            if not chosen:
                continue
            wrapper = self._wrap(name)
            params += wrapper.add(adapter_name, chosen, r, scaling, float(config.lora_dropout or 0.0))
            hf_targets |= chosen
        if not params:
            raise ValueError(f"adapter {adapter_name!r} matched no layer; check target_modules={targets!r}")
        self.configs[adapter_name] = config
        self.targets[adapter_name] = sorted(hf_targets)
        return params

    def set_active(self, adapter_name: str | None) -> None:
        """Route forwards through ``adapter_name`` (``None``: the base model alone)."""
        for wrapper in self.modules.values():
            wrapper.active = adapter_name

    def peft_config(self, adapter_name: str, base_model_name_or_path: str | None) -> Any:
        """The peft ``LoraConfig`` to save: the user's, with the concrete HF target names."""
        config = self.configs[adapter_name]
        data = config.to_dict()
        data.update(target_modules=self.targets[adapter_name], task_type="CAUSAL_LM")
        if base_model_name_or_path and not data.get("base_model_name_or_path"):
            data["base_model_name_or_path"] = base_model_name_or_path
        from peft import LoraConfig

        allowed = set(LoraConfig.__dataclass_fields__)
        return LoraConfig(**{k: v for k, v in data.items() if k in allowed and k != "peft_type"})

    def _hf_prefix(self, module_name: str) -> tuple[str, list[str]]:
        m = _LAYER.match(module_name)
        hf_path, _ = _TARGETS[m.group(2)]
        return f"base_model.model.model.layers.{m.group(1)}.{hf_path}", []

    def peft_state_dict(self, adapter_name: str) -> dict[str, Any]:
        """The adapter's weights under PEFT's key names (as in ``adapter_model.safetensors``)."""
        out: dict[str, Any] = {}
        for name, wrapper in self.modules.items():
            prefix, _ = self._hf_prefix(name)
            for part, _size in wrapper.parts:
                key = f"{adapter_name}__{part}"
                if key not in wrapper.lora_A:
                    continue
                out[f"{prefix}.{part}.lora_A.weight"] = wrapper.lora_A[key].weight.detach().cpu().contiguous()
                out[f"{prefix}.{part}.lora_B.weight"] = wrapper.lora_B[key].weight.detach().cpu().contiguous()
        return out

    def load_peft_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        """Copy PEFT-named weights (keys with or without the adapter name) into ``adapter_name``.

        Raises:
            ValueError: weights that match no LoRA pair, or pairs the file does not cover.
        """
        import torch

        normalized = {
            re.sub(rf"\.lora_([AB])\.{re.escape(adapter_name)}\.weight$", r".lora_\1.weight", k): v
            for k, v in state.items()
        }
        normalized = {
            re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k) if ".lora_" in k else k: v
            for k, v in normalized.items()
        }
        expected = self.peft_state_dict(adapter_name)
        missing = sorted(set(expected) - set(normalized))
        unexpected = sorted(set(normalized) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit adapter {adapter_name!r}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, wrapper in self.modules.items():
                prefix, _ = self._hf_prefix(name)
                for part, _size in wrapper.parts:
                    key = f"{adapter_name}__{part}"
                    if key not in wrapper.lora_A:
                        continue
                    wrapper.lora_A[key].weight.copy_(normalized[f"{prefix}.{part}.lora_A.weight"])
                    wrapper.lora_B[key].weight.copy_(normalized[f"{prefix}.{part}.lora_B.weight"])

    def base_parameter_names(self) -> Iterable[str]:
        """Names of the model's parameters that are not LoRA weights."""
        return [n for n, _ in self.model.named_parameters() if ".lora_" not in n]
