"""TorchSampler: sampling with transformers ``generate`` (KV cache), batched with left padding.

Per-token log-probabilities are those of the model's own distribution (``log_softmax`` of
the raw logits, before temperature / top-p / top-k), i.e. what the trainer computes for the
same tokens, so they can serve as ``old_logps`` of RL losses.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, Mapping

from twinkle.data_format.sampling import (
    SampledSequence,
    SampleResponse,
    SamplingParams,
    as_sampling_params,
    sampled_sequence,
)
from twinkle.dispatch import remote
from twinkle.processor.base import collate_vision
from twinkle.sampler.base import Sampler


class TorchSampler(Sampler):
    """A Sampler on a transformers causal LM in this process (CPU or one GPU).

    Args:
        model_id: a local directory (``config.json`` + weights; only ``config.json`` = random
            init with ``seed``), or ``ms://`` / ``hf://`` ids.
        model: an already built ``transformers`` causal LM to sample with (instead of ``model_id``).
        template: a Template (or registered template name) that renders Trajectory prompts;
            default: ``Template(model_id)`` when the model directory has a tokenizer.
        torch_dtype: parameter dtype (``"float32"``, ``"bfloat16"`` ...).
        device: ``"cpu"`` / ``"cuda"``; default CUDA when available.
        seed: weight initialization seed for a config-only directory.
        max_batch_size: most sequences generated together (prompts x num_samples), to bound memory.
        remote_group / device_mesh: placement (ray/http modes).

    Raises:
        ValueError: neither or both of ``model_id`` and ``model``.

    Example::

        sampler = TorchSampler(model_id="twinkle_core/src/twinkle/assets/tiny-qwen2")
        responses = sampler.sample([{"messages": [{"role": "user", "content": "hi"}]}],
                                   SamplingParams(max_tokens=16, num_samples=2, seed=0))
        responses[0].sequences[0].text
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        model: Any = None,
        template: Any = None,
        torch_dtype: str = "float32",
        device: Any = None,
        seed: int = 42,
        max_batch_size: int = 64,
        remote_group: str | None = None,
        device_mesh: Any = None,
    ) -> None:
        import torch

        if (model_id is None) == (model is None):
            raise ValueError("TorchSampler needs exactly one of model_id=... or model=...")
        if max_batch_size < 1:
            raise ValueError(f"TorchSampler: max_batch_size must be >= 1, got {max_batch_size}")
        self.model_id = model_id
        self.remote_group = remote_group
        self.device_mesh = device_mesh
        self.max_batch_size = max_batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_dir = None
        if model is None:
            from twinkle.model.transformers_model import resolve_model_dir

            self.model_dir = resolve_model_dir(model_id)
            model = self._load(self.model_dir, torch_dtype, seed)
        self.model = model.to(self.device).eval()
        self._peft: Any = None
        self._template: Any = None
        if template is not None:
            self.set_template(template)
        elif self.model_dir is not None and os.path.isfile(os.path.join(self.model_dir, "tokenizer_config.json")):
            from twinkle.template.base import Template
            from twinkle.template.vision import FAMILIES, VisionTemplate

            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            self._template = VisionTemplate(self.model_dir) if model_type in FAMILIES else Template(self.model_dir)

    @staticmethod
    def _load(model_dir: str, torch_dtype: str, seed: int) -> Any:
        import torch
        from transformers import AutoConfig

        from twinkle.model.files import has_weights
        from twinkle.model.hf import auto_model_class

        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        auto_class = auto_model_class(model_dir)  # vision-language families: AutoModelForImageTextToText
        if has_weights(model_dir):
            return auto_class.from_pretrained(model_dir, dtype=dtype)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return auto_class.from_config(config, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    @property
    def tokenizer(self) -> Any:
        """The template's tokenizer (``None`` without a template)."""
        return self._template.tokenizer if self._template is not None else None

    @remote(dispatch="all", collect="first")
    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Add a LoRA adapter: ``config`` is a LoraConfig, a dict of its fields, or a saved adapter directory.

        Raises:
            ValueError: the name exists already.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_name in self.adapter_names():
            raise ValueError(
                f"TorchSampler: adapter {adapter_name!r} exists; remove_adapter it first or pick another name"
            )
        if isinstance(config, (str, os.PathLike)):
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(config), adapter_name=adapter_name)
            else:
                self._peft.load_adapter(str(config), adapter_name=adapter_name)
        else:
            if isinstance(config, Mapping):
                config = LoraConfig(**dict(config))
            if getattr(config, "task_type", None) is None:
                config.task_type = "CAUSAL_LM"
            if self._peft is None:
                self._peft = get_peft_model(self.model, config, adapter_name=adapter_name)
            else:
                self._peft.add_adapter(adapter_name, config)
        self._peft.to(self.device).eval()

    @remote(dispatch="all", collect="first")
    def remove_adapter(self, adapter_name: str) -> None:
        """Delete adapter ``adapter_name``. Raises KeyError when it does not exist."""
        self._require_adapter(adapter_name)
        self._peft.delete_adapter(adapter_name)

    @remote(dispatch="all", collect="first")
    def adapter_names(self) -> list[str]:
        """Names of the adapters this sampler holds."""
        return list(self._peft.peft_config) if self._peft is not None else []

    def _require_adapter(self, adapter_name: str) -> None:
        names = self.adapter_names()
        if adapter_name not in names:
            raise KeyError(
                f"TorchSampler has no adapter {adapter_name!r} (adapters: {names or 'none'}); "
                "add it with add_adapter(name, config) or sync it with a CheckpointEngine"
            )

    @contextlib.contextmanager
    def _use(self, adapter_name: str | None) -> Iterator[Any]:
        """The module to run with ``adapter_name`` active (the base model for ``None``)."""
        if self._peft is None:
            if adapter_name is not None:
                self._require_adapter(adapter_name)
            yield self.model
            return
        if adapter_name is None:
            with self._peft.disable_adapter():
                yield self._peft
            return
        self._require_adapter(adapter_name)
        self._peft.set_adapter(adapter_name)
        yield self._peft

    # ------------------------------------------------------------------ weights
    @remote(dispatch="all", collect="first")
    def update_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        adapter_name: str | None = None,
        peft_config: Any = None,
    ) -> int:
        """Load base weights (HF names) or adapter ``adapter_name``'s LoRA tensors (PEFT saved names).

        See :meth:`Sampler.update_weights`. Returns the number of tensors loaded.
        """
        import torch

        items = weights.items() if isinstance(weights, Mapping) else weights
        if adapter_name is not None:
            from peft import set_peft_model_state_dict

            if adapter_name not in self.adapter_names():
                if peft_config is None:
                    raise KeyError(f"TorchSampler has no adapter {adapter_name!r}; pass peft_config=... to create it")
                self.add_adapter(adapter_name, peft_config)
            state = dict(items)
            result = set_peft_model_state_dict(self._peft, state, adapter_name=adapter_name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise KeyError(f"TorchSampler.update_weights: LoRA tensors match no module: {unexpected[:5]}")
            return len(state)
        base = self._peft.get_base_model() if self._peft is not None else self.model
        targets = {name.replace(".base_layer.", "."): t for name, t in base.state_dict(keep_vars=True).items()}
        count = 0
        with torch.no_grad():
            for name, tensor in items:
                target = targets.get(name)
                if target is None:
                    import difflib

                    close = difflib.get_close_matches(name, list(targets), n=3)
                    raise KeyError(f"TorchSampler.update_weights: no parameter {name!r}; close names: {close}")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"TorchSampler.update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                        f"the sampler's has {tuple(target.shape)}"
                    )
                target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
                count += 1
        return count

    # ------------------------------------------------------------------ sampling

    def _stop_ids(self, params: SamplingParams, module: Any) -> list[int]:
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            for source in (getattr(module, "generation_config", None), getattr(module, "config", None)):
                eos = getattr(source, "eos_token_id", None) if source is not None else None
                if eos is not None:
                    ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
            tokenizer = self.tokenizer
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        return sorted(set(int(i) for i in ids))

    def _decode(self, ids: list[int]) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return ""
        return tokenizer.decode(ids, skip_special_tokens=True)

    @remote(dispatch="slice_dp", collect="flatten")
    def sample(
        self,
        prompts: list[dict[str, Any]],
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> list[SampleResponse]:
        """Sample ``num_samples`` completions per prompt; see :meth:`Sampler.sample`.

        Example::

            sampler.sample(prompts, SamplingParams(max_tokens=32, num_samples=4, temperature=1.0, seed=0))
        """
        import torch

        params = as_sampling_params(sampling_params)
        if isinstance(prompts, Mapping):
            prompts = [prompts]
        features: list[Any] = []
        encoded = self._prompt_ids(list(prompts), features)
        jobs = [(p, s) for p in range(len(encoded)) for s in range(params.num_samples)]
        results: dict[tuple[int, int], SampledSequence] = {}
        with self._use(adapter_name) as module, torch.no_grad(), _seeded(params.seed, self.device):
            for start in range(0, len(jobs), self.max_batch_size):
                chunk = jobs[start : start + self.max_batch_size]
                chunk_ids = [encoded[p][0] for p, _ in chunk]
                seqs = self._generate(module, chunk_ids, params, [features[p] for p, _ in chunk])
                for (p, s), (tokens, logprobs, reason, text) in zip(chunk, seqs):
                    ids, user_data, trajectory = encoded[p]
                    seq = sampled_sequence(ids, tokens, logprobs, reason, text, user_data, trajectory)
                    _carry_images(seq.input_feature, features[p], len(tokens))
                    results[(p, s)] = seq
            prompt_lps = None
            if params.prompt_logprobs:
                prompt_lps = self._prompt_logprobs(module, [e[0] for e in encoded], features)
        return [
            SampleResponse(
                sequences=[results[(p, s)] for s in range(params.num_samples)],
                prompt_tokens=list(encoded[p][0]),
                prompt_logprobs=prompt_lps[p] if prompt_lps is not None else None,
            )
            for p in range(len(encoded))
        ]

    @remote(dispatch="slice_dp", collect="flatten")
    def compute_logps(self, rows: list[Mapping[str, Any]], adapter_name: str | None = None) -> list[list[float]]:
        """Log-probabilities of the labelled tokens of ``rows``, forward only, ``max_batch_size`` rows a pass.

        See :meth:`Sampler.compute_logps`. Example::

            teacher_logps = sampler.compute_logps([seq.input_feature for seq in sequences], adapter_name="teacher")
        """
        import torch

        if isinstance(rows, Mapping):
            rows = [rows]
        out: list[list[float]] = []
        with self._use(adapter_name) as module, torch.no_grad():
            pad_id = _pad_id(self.tokenizer, module)
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                width = max(len(r["input_ids"]) for r in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, r in enumerate(chunk):  # right padding: positions start at 0 for every row
                    ids[i, : len(r["input_ids"])] = torch.tensor(list(r["input_ids"]), dtype=torch.long)
                    attention[i, : len(r["input_ids"])] = 1
                ids, attention = ids.to(self.device), attention.to(self.device)
                vision = collate_vision(chunk, width, self.device)  # images of vision-language rows
                logits = module(input_ids=ids, attention_mask=attention, use_cache=False, **vision).logits.float()
                lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1).tolist()
                for r, scores in zip(chunk, lp):
                    labels = r.get("labels") or list(r["input_ids"])
                    out.append(
                        [s if label != -100 and i > 0 else 0.0 for i, (label, s) in enumerate(zip(labels, scores))]
                    )
        return out

    def _generate(
        self, module: Any, prompt_ids: list[list[int]], params: SamplingParams, features: list[Any] | None = None
    ) -> list[tuple[list[int], list[float] | None, str, str]]:
        import torch

        pad_id = _pad_id(self.tokenizer, module)
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):  # left padding
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        stop_ids = self._stop_ids(params, module)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "min_new_tokens": 0,
            "pad_token_id": pad_id,
            "eos_token_id": stop_ids or None,
            "return_dict_in_generate": True,
            "output_logits": True,
            "use_cache": True,
        }
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0,
            )
        if params.stop:
            kwargs["stopping_criteria"] = _stop_criteria(self, params.stop, width)
        if features:  # vision-language prompts: their images (per-token type ids left-padded like the ids)
            kwargs.update(collate_vision(features, width, self.device, left_padding=True))
        out = module.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs)
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float() if params.logprobs and out.logits else None
        stop_set = set(stop_ids)
        results = []
        for i in range(new.shape[0]):
            row = new[i].tolist()
            end, reason = len(row), "length"
            for j, tok in enumerate(row):
                if tok in stop_set:
                    end, reason = j + 1, "stop"
                    break
            text = None
            if params.stop:
                cut = _stop_string_cut(self, row[:end], params.stop)
                if cut is not None:
                    end, text, reason = cut[0], cut[1], "stop"
            tokens = row[:end]
            if text is None:
                text = self._decode(tokens)
            logprobs = None
            if logits is not None:
                lp = torch.log_softmax(logits[i, :end], dim=-1)
                logprobs = lp.gather(-1, torch.tensor(tokens, dtype=torch.long).unsqueeze(-1)).squeeze(-1).tolist()
            results.append((tokens, logprobs, reason, text))
        return results

    def _prompt_logprobs(
        self, module: Any, prompt_ids: list[list[int]], features: list[Any] | None = None
    ) -> list[list[float | None]]:
        import torch

        out: list[list[float | None]] = []
        for k, ids in enumerate(prompt_ids):
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            vision = collate_vision([features[k]], len(ids), self.device) if features else {}
            logits = module(input_ids=x, use_cache=False, **vision).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
            out.append([None, *lp.tolist()])
        return out


def _carry_images(input_feature: dict[str, Any], prompt: Mapping[str, Any], completion_length: int) -> None:
    """Give a sampled row its prompt's images, so training and ``compute_logps`` see what sampling saw."""
    from twinkle.processor.base import VISION_FIELDS, VISION_TOKEN_FIELDS

    for key in VISION_FIELDS:
        if prompt.get(key) is not None:
            input_feature[key] = prompt[key]
    for key in VISION_TOKEN_FIELDS:
        if prompt.get(key) is not None:
            values = prompt[key].tolist() if hasattr(prompt[key], "tolist") else list(prompt[key])
            input_feature[key] = values + [0] * completion_length


def _pad_id(tokenizer: Any, module: Any) -> int:
    for source in (tokenizer, getattr(module, "generation_config", None), getattr(module, "config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return 0


@contextlib.contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Seed torch's RNG for the block (restoring it afterwards) when ``seed`` is given."""
    import torch

    if seed is None:
        yield
        return
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _stop_string_cut(sampler: TorchSampler, tokens: list[int], stops: list[str]) -> tuple[int, str] | None:
    """(tokens to keep, text before the stop string) for the first stop string, or None."""
    full = sampler._decode(tokens)
    if not any(s in full for s in stops):
        return None
    for k in range(1, len(tokens) + 1):
        text = sampler._decode(tokens[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return k, text[: min(hits)]
    return None


def _stop_criteria(sampler: TorchSampler, stops: list[str], prompt_width: int) -> Any:
    """A StoppingCriteria that ends each row once its completion contains a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stops) + 8

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            tail = input_ids[:, max(prompt_width, input_ids.shape[1] - window) :].tolist()
            for i, ids in enumerate(tail):
                text = sampler._decode(ids)
                done[i] = any(s in text for s in stops)
            return done

    return StoppingCriteriaList([StopStrings()])
