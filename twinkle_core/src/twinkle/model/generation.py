"""Generation: greedy completions of chat prompts, for quick checks of a model being trained.

One job: prompts in, decoded completions out. The prompt is encoded with the adapter's
Template (or the tokenizer's chat template); the backend's ``generate_ids`` hook produces
the new token ids (the default runs ``run_forward`` greedily without a KV cache;
TransformersModel uses ``transformers``' ``generate``). RL rollouts use a Sampler, not this.
Mixed into :class:`~twinkle.model.backend.BackendModel`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class GenerationMixin:
    """``generate`` and its default ``generate_ids`` hook."""

    def generate(
        self, prompts: Sequence[Any], *, max_new_tokens: int = 64, adapter_name: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Greedy generation (for quick checks; use a Sampler for RL rollouts).

        Args:
            prompts: strings (user messages) or lists of chat messages.
            max_new_tokens: tokens to generate per prompt.
            adapter_name: which adapter (default: the current one).
            **kwargs: passed to the backend's ``generate_ids`` hook.

        Returns:
            The decoded completions.

        Raises:
            ValueError: no tokenizer (set a template, or use a model directory with one).

        Example::

            model.generate(["who are you?"], max_new_tokens=32)
        """
        import torch

        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("generate: no tokenizer; call model.set_template('Template') first")
        state = self._state(adapter_name)
        template = state.template
        self._activate(state)
        answers: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                if template is not None:
                    ids = template.encode({"messages": messages}, add_generation_prompt=True)["input_ids"]
                else:
                    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                    if isinstance(ids, Mapping):
                        ids = ids["input_ids"]
                with torch.no_grad():
                    new_ids = self.generate_ids(list(ids), max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
                answers.append(tokenizer.decode(list(new_ids), skip_special_tokens=True))
        finally:
            self.model.train(was_training)
        return answers

    def generate_ids(self, input_ids: list[int], *, max_new_tokens: int, tokenizer: Any, **kwargs: Any) -> list[int]:
        """Hook: the greedily generated token ids after ``input_ids`` (without them), up to an end token.

        The default runs :meth:`run_forward` on the whole sequence once per new token (no KV
        cache) and stops at the tokenizer's or the generation config's end token.
        """
        import torch

        eos: set[int] = {tokenizer.eos_token_id} - {None}
        generation_config = self.generation_config()
        configured = getattr(generation_config, "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} - {None})
        tokens = list(input_ids)
        start = len(tokens)
        for _ in range(max_new_tokens):
            batch = {"input_ids": torch.tensor([tokens], device=self.device)}
            next_id = int(self.run_forward(batch)["logits"][0, -1].argmax())
            tokens.append(next_id)
            if next_id in eos:
                break
        return tokens[start:]
