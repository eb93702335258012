"""The Sampler protocol: generate completions (with log-probabilities) from the policy.

Every sampler (core's :class:`~twinkle.sampler.torch_sampler.TorchSampler`, twinkle-vllm's
``VLLMSampler``) implements the same methods with the same semantics:

* :meth:`Sampler.sample` ``(prompts, sampling_params=None, adapter_name=None) -> list[SampleResponse]``:
  one :class:`~twinkle.data_format.sampling.SampleResponse` per prompt, in prompt order,
  each with ``num_samples`` sequences. A prompt is a Trajectory (``{"messages": [...],
  "user_data": {...}}``; rendered with the sampler's template, generation prompt added)
  or an InputFeature (``{"input_ids": [...]}``; used as is).
* :meth:`Sampler.set_template`: the Template that renders Trajectory prompts and decodes.
* :meth:`Sampler.add_adapter` / :meth:`Sampler.remove_adapter` / :meth:`Sampler.adapter_names`:
  named LoRA adapters sampled with ``adapter_name=``.
* :meth:`Sampler.update_weights`: receive weights from a trained model (what a
  :class:`~twinkle.checkpoint_engine.base.CheckpointEngine` calls). Without ``adapter_name``
  the tensors are base-model weights in Hugging Face names (``model.layers.0.mlp.up_proj.weight``);
  with it, they are LoRA tensors in PEFT's saved format
  (``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight``) and ``peft_config``
  creates the adapter when the sampler does not have it yet.

Example::

    from twinkle.data_format import SamplingParams
    from twinkle.sampler import TorchSampler

    sampler = TorchSampler(model_id="path/to/model")
    responses = sampler.sample([{"messages": [{"role": "user", "content": "1+1="}]}],
                               SamplingParams(max_tokens=8, num_samples=4, seed=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from twinkle.component import Component
from twinkle.dispatch import remote

if TYPE_CHECKING:
    from twinkle.data_format.sampling import SampleResponse, SamplingParams


class Sampler(Component):
    """Base of samplers (TorchSampler in core, VLLMSampler in twinkle-vllm).

    Subclasses override every method below (``compute_logps`` has a default built on
    ``sample``); the base implementations raise ``TypeError`` naming the missing method, so a
    half-written sampler fails loudly and clearly.
    """

    @remote(dispatch="slice_dp", collect="flatten")
    def sample(
        self,
        prompts: list[dict[str, Any]],
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> list[SampleResponse]:
        """Sample completions for ``prompts``.

        Args:
            prompts: Trajectories (``messages`` [+ ``user_data``]) or InputFeatures (``input_ids``).
            sampling_params: a :class:`SamplingParams`, a dict of its fields, or ``None`` (defaults).
            adapter_name: the LoRA adapter to sample with; ``None`` samples the base weights.

        Returns:
            One SampleResponse per prompt, in prompt order; the ``num_samples`` sequences of
            a prompt are contiguous.

        Raises:
            ValueError: a prompt has neither ``messages`` nor ``input_ids``, or a Trajectory is
                given but no template is set; KeyError: unknown ``adapter_name``.
        """
        raise TypeError(f"{type(self).__name__} must implement Sampler.sample")

    @remote(dispatch="slice_dp", collect="flatten")
    def compute_logps(self, rows: list[Mapping[str, Any]], adapter_name: str | None = None) -> list[list[float]]:
        """This sampler's log-probability of each labelled token of ``rows`` (a teacher's view of them).

        What on-policy distillation needs: the teacher (another model, or another adapter of
        this sampler) scores the tokens the student sampled. The default implementation asks
        :meth:`sample` for ``prompt_logprobs`` of each whole row (one extra greedy token is
        generated and dropped); samplers may override it with a forward-only pass.

        Args:
            rows: training rows with ``input_ids`` and ``labels`` (``SampledSequence.input_feature``).
            adapter_name: the adapter to score with; ``None``: the base weights.

        Returns:
            Per row, a list as long as its ``input_ids``: the log-probability of the token at each
            position whose label is not -100, 0.0 elsewhere (aligned like ``old_logps``).

        Example::

            teacher = teacher_sampler.compute_logps([seq.input_feature for seq in sequences])
            rows = [dict(seq.input_feature, teacher_logps=t) for seq, t in zip(sequences, teacher)]
        """
        from twinkle.data_format.sampling import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=False, prompt_logprobs=True)
        responses = self.sample([{"input_ids": list(row["input_ids"])} for row in rows], params, adapter_name)
        out = []
        for row, response in zip(rows, responses):
            labels = row.get("labels") or list(row["input_ids"])
            scores = response.prompt_logprobs or []
            out.append([float(s) if label != -100 and s is not None else 0.0 for label, s in zip(labels, scores)])
        return out

    @remote(dispatch="all", collect="first")
    def set_template(self, template: Any, **kwargs: Any) -> None:
        """Use ``template``: an instance, or a registered name (or class) built with ``kwargs``.

        A name built without ``model_id=`` gets the sampler's own model directory
        (``self.model_dir``), so ``sampler.set_template('Template')`` is enough.
        """
        if isinstance(template, (str, type)):
            from twinkle.runtime import get_registry

            model_dir = getattr(self, "model_dir", None)
            if isinstance(template, str) and "model_id" not in kwargs and model_dir is not None:
                kwargs["model_id"] = model_dir
            template = get_registry().resolve("template", template)(**kwargs)
        self._template = template

    @property
    def template(self) -> Any:
        """The Template that renders prompts (``None`` if unset)."""
        return getattr(self, "_template", None)

    def _prompt_ids(
        self, prompts: list[Any], features: list[Any] | None = None
    ) -> list[tuple[list[int], dict[str, Any], dict[str, Any] | None]]:
        """(token ids, user_data, trajectory or None) of each prompt, for subclasses' ``sample``.

        Trajectory prompts are rendered with the sampler's template (``self._template``) and a
        generation prompt; InputFeature prompts give their ``input_ids`` as they are. When
        ``features`` is a list, each prompt's encoded feature (or the InputFeature prompt) is
        appended to it: a vision template's rows carry ``pixel_values`` and image grids there.

        Raises:
            ValueError: a prompt that is not a dict, has neither ``messages`` nor ``input_ids``,
                or is a Trajectory while no template is set.
        """
        name = type(self).__name__
        template = getattr(self, "_template", None)
        out = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, Mapping):
                raise ValueError(f"{name}.sample: prompt {i} is a {type(prompt).__name__}; give dicts")
            user_data = dict(prompt.get("user_data") or {})
            if prompt.get("input_ids") is not None:
                ids = prompt["input_ids"]
                ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
                out.append(([int(t) for t in ids], user_data, None))
                if features is not None:
                    features.append(prompt)
            elif prompt.get("messages") is not None:
                if template is None:
                    raise ValueError(
                        f"{name}.sample: Trajectory prompts need a template; call "
                        "sampler.set_template('Template', model_id=...) or give InputFeature prompts with input_ids"
                    )
                feature = template.encode(prompt, add_generation_prompt=True)
                out.append((list(feature["input_ids"]), user_data, dict(prompt)))
                if features is not None:
                    features.append(feature)
            else:
                raise ValueError(
                    f"{name}.sample: prompt {i} has neither 'messages' (a Trajectory) nor 'input_ids' "
                    f"(an InputFeature); its fields: {sorted(prompt)}"
                )
        return out

    @remote(dispatch="all", collect="first")
    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Add an (untrained, or later filled by :meth:`update_weights`) LoRA adapter named ``adapter_name``.

        Args:
            adapter_name: the name passed later as ``adapter_name=``.
            config: a ``peft.LoraConfig`` or a dict of its fields, or a directory holding a saved
                PEFT adapter (``adapter_config.json`` + weights) to load.
        """
        raise TypeError(f"{type(self).__name__} must implement Sampler.add_adapter")

    @remote(dispatch="all", collect="first")
    def remove_adapter(self, adapter_name: str) -> None:
        """Forget the adapter ``adapter_name``. Raises KeyError when it does not exist."""
        raise TypeError(f"{type(self).__name__} must implement Sampler.remove_adapter")

    @remote(dispatch="all", collect="first")
    def adapter_names(self) -> list[str]:
        """Names of the adapters this sampler holds."""
        raise TypeError(f"{type(self).__name__} must implement Sampler.adapter_names")

    @remote(dispatch="all", collect="first")
    def update_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        adapter_name: str | None = None,
        peft_config: Any = None,
    ) -> int:
        """Load ``weights`` (name -> tensor) into the base model, or into adapter ``adapter_name``.

        Args:
            weights: a mapping or an iterable of ``(name, tensor)`` (streamed; need not fit twice in memory).
            adapter_name: ``None``: base weights in Hugging Face names. A name: LoRA tensors in
                PEFT's saved format, loaded into that adapter.
            peft_config: the adapter's ``LoraConfig`` (or dict), needed when the adapter is new.

        Returns:
            The number of tensors loaded.

        Raises:
            KeyError: a name matches no parameter (the message lists close names).
            ValueError: a tensor's shape differs from the parameter's.
        """
        raise TypeError(f"{type(self).__name__} must implement Sampler.update_weights")
