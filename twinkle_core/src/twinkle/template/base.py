"""The Template: Trajectory -> tokens, with labels only on what the assistant says.

:class:`Template` renders a :class:`~twinkle.data_format.Trajectory` with the tokenizer's
own chat template (``tokenizer.apply_chat_template``), so one class serves every model
family whose tokenizer ships a chat template. Labels (``-100`` elsewhere) cover exactly
the assistant's tokens: its content and the end-of-turn token that closes it.

* If the chat template marks assistant text with ``{% generation %}`` the labels come from
  ``return_assistant_tokens_mask``.
* Otherwise the conversation is rendered round by round: the text the template adds for
  assistant message ``i`` (rendering ``messages[:i+1]`` after ``messages[:i]`` with the
  generation prompt) is the trained span, minus trailing whitespace.

Example::

    template = Template(str(twinkle.assets.path("tiny-qwen2")), max_length=512)
    feature = template.encode({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]})
    template.decode([t for t, l in zip(feature["input_ids"], feature["labels"]) if l != -100])
    # 'hello'
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from typing import Any, Sequence

from twinkle.data_format.features import IGNORE_INDEX, InputFeature
from twinkle.data_format.messages import Trajectory

TRUNCATION_STRATEGIES: tuple[str, ...] = ("raise", "left", "right", "delete")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """A template that cannot encode this input; the message says why and how to fix it.

    Attributes:
        index: the position of the offending trajectory in the batch, when known.
        detail: the message without the ``trajectory N:`` prefix.
    """

    def __init__(self, detail: str, index: int | None = None) -> None:
        self.detail = detail
        self.index = index
        super().__init__(f"trajectory {index}: {detail}" if index is not None else detail)

    def __reduce__(self) -> tuple:
        return (type(self), (self.detail, self.index))


class SequenceTooLongError(TemplateError):
    """An encoded sequence is longer than ``max_length`` and the strategy is ``'raise'`` or ``'delete'``.

    ``Dataset.encode`` drops the row (counted, logged) when the strategy is ``'delete'``.
    """

    def __init__(self, detail: str, length: int, max_length: int, index: int | None = None) -> None:
        super().__init__(detail, index)
        self.length = length
        self.max_length = max_length

    def __reduce__(self) -> tuple:
        return (type(self), (self.detail, self.length, self.max_length, self.index))


class Template:
    """Encodes Trajectories with a tokenizer's chat template; labels only on assistant tokens.

    Args:
        model_id: a local model or tokenizer directory, ``ms://org/name`` or
            ``hf://org/name`` (see :func:`twinkle.hub.resolve_model_dir`).
        max_length: the longest encoded sequence; ``None``: no limit.
        truncation_strategy: what to do with longer sequences: ``'raise'`` (an error),
            ``'left'`` (keep the last ``max_length`` tokens), ``'right'`` (keep the first),
            ``'delete'`` (raise :class:`SequenceTooLongError`, which ``Dataset.encode``
            turns into a counted drop).
        default_system: a system prompt added to conversations that have none; ``None``
            keeps the chat template's own default (Qwen's "You are a helpful assistant.").
        tokenizer: an already loaded tokenizer to use instead of loading ``model_id``'s.
        **tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained``.

    Raises:
        TemplateError: an unknown truncation strategy or a bad ``max_length``; a
            tokenizer without a chat template (on first use).

    Example::

        template = Template("ms://Qwen/Qwen2.5-0.5B-Instruct", max_length=2048, truncation_strategy="left")
        template.encode(trajectory)["labels"]
    """

    def __init__(
        self,
        model_id: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str = "raise",
        default_system: str | None = None,
        *,
        tokenizer: Any = None,
        **tokenizer_kwargs: Any,
    ) -> None:
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise TemplateError(
                f"truncation_strategy={truncation_strategy!r} is not one of {', '.join(TRUNCATION_STRATEGIES)}"
            )
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TemplateError(f"max_length must be a positive integer or None, got {max_length!r}")
        if max_length is not None and max_length < 1:
            raise TemplateError(f"max_length must be a positive integer or None, got {max_length!r}")
        if model_id is None and tokenizer is None:
            raise TemplateError("Template needs a model_id (a local dir, 'ms://org/name' or 'hf://org/name')")
        self.model_id = model_id
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.default_system = default_system
        self._tokenizer_kwargs = tokenizer_kwargs
        self._tokenizer = tokenizer
        self._uses_generation_tags: bool | None = None

    # -- the tokenizer -----------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from twinkle.hub import resolve_model_dir
            from twinkle.template.family_tokenizers import load_tokenizer  # remote-code families: rebuilt

            self._tokenizer = load_tokenizer(resolve_model_dir(self.model_id), **self._tokenizer_kwargs)
        if self._uses_generation_tags is None:
            chat_template = getattr(self._tokenizer, "chat_template", None)
            if not chat_template:
                raise TemplateError(
                    f"the tokenizer of {self.model_id!r} has no chat template, so Template cannot tell user from "
                    f"assistant turns. Use the chat/-Instruct variant of the model, or give the tokenizer one: "
                    f"tokenizer.chat_template = '...jinja...' (then Template(model_id, tokenizer=tokenizer)), or "
                    f"add 'chat_template' to its tokenizer_config.json."
                )
            if isinstance(chat_template, dict):  # named templates: use the default one
                chat_template = chat_template.get("default") or next(iter(chat_template.values()))
            self._uses_generation_tags = bool(_GENERATION_TAG.search(chat_template))
        return self._tokenizer

    @property
    def uses_generation_tags(self) -> bool:
        """True when labels come from the chat template's ``{% generation %}`` markers."""
        _ = self.tokenizer
        return bool(self._uses_generation_tags)

    # -- encoding ----------------------------------------------------------------
    def encode(self, trajectory: Trajectory, add_generation_prompt: bool = False) -> InputFeature:
        """Encode one trajectory.

        Args:
            trajectory: ``{'messages': [...], 'tools'?: [...], ...}``.
            add_generation_prompt: end with the assistant header so a model continues
                from there (sampling prompts); labels are then all ``-100``.

        Returns:
            An :class:`InputFeature` with ``input_ids``, ``labels`` and ``length`` (plus
            ``rejected_*`` when the trajectory has ``rejected_messages``).

        Raises:
            TemplateError: no messages, a bad message, or a template that does not render.
            SequenceTooLongError: longer than ``max_length`` with strategy ``'raise'`` /
                ``'delete'``.

        Example::

            template.encode({"messages": [{"role": "user", "content": "hi"}]}, add_generation_prompt=True)
        """
        return self.batch_encode([trajectory], add_generation_prompt=add_generation_prompt)[0]

    def batch_encode(
        self, trajectories: Sequence[Trajectory], add_generation_prompt: bool = False
    ) -> list[InputFeature]:
        """Encode many trajectories; faster than calling :meth:`encode` in a loop.

        Conversations that share the same tools are rendered with transformers' chat
        template renderer and tokenized in one batched call of the Rust tokenizer; the
        result equals ``apply_chat_template(..., return_assistant_tokens_mask=True)``.

        Args:
            trajectories: the trajectories.
            add_generation_prompt: see :meth:`encode`.

        Returns:
            One :class:`InputFeature` per trajectory, in order.

        Raises:
            TemplateError, SequenceTooLongError: as :meth:`encode`; the message names the
                position of the offending trajectory in the batch.
        """
        features = self._encode_untruncated(trajectories, add_generation_prompt)
        for i, feature in enumerate(features):
            self._truncate(feature, i)
        return features

    def _encode_untruncated(
        self, trajectories: Sequence[Trajectory], add_generation_prompt: bool
    ) -> list[InputFeature]:
        conversations: list[list[dict[str, Any]]] = []
        tools_list: list[list[dict[str, Any]] | None] = []
        rejected_at: list[int] = []
        for i, trajectory in enumerate(trajectories):
            messages, tools = self._prepare(trajectory, i, "messages")
            conversations.append(messages)
            tools_list.append(tools)
            if isinstance(trajectory, dict) and trajectory.get("rejected_messages"):
                rejected_at.append(i)
        features = self._encode_conversations(conversations, tools_list, add_generation_prompt)
        if rejected_at:
            rejected_convs = []
            rejected_tools = []
            for i in rejected_at:
                messages, tools = self._prepare(trajectories[i], i, "rejected_messages")
                rejected_convs.append(messages)
                rejected_tools.append(tools)
            rejected = self._encode_conversations(rejected_convs, rejected_tools, add_generation_prompt)
            for i, feature in zip(rejected_at, rejected):
                features[i]["rejected_input_ids"] = feature["input_ids"]
                features[i]["rejected_labels"] = feature["labels"]
                features[i]["rejected_length"] = feature["length"]
        return features

    def encode_rows(
        self, trajectories: Sequence[Trajectory], add_generation_prompt: bool = False
    ) -> list[InputFeature | None]:
        """Like :meth:`batch_encode`, but with ``truncation_strategy='delete'`` a too-long row becomes ``None``.

        ``Dataset.encode`` uses it to drop (and count) such rows.
        """
        if self.truncation_strategy != "delete" or self.max_length is None:
            return list(self.batch_encode(trajectories, add_generation_prompt))
        limit = self.max_length
        return [
            None if f["length"] > limit or f.get("rejected_length", 0) > limit else f  # type: ignore[operator]
            for f in self._encode_untruncated(trajectories, add_generation_prompt)
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text.

        Args:
            ids: token ids (``-100`` entries, e.g. from labels, are skipped).
            skip_special_tokens: drop ``<|im_start|>``-like tokens.

        Example::

            template.decode(feature["input_ids"], skip_special_tokens=False)
        """
        return self.tokenizer.decode(
            [int(i) for i in ids if i != IGNORE_INDEX], skip_special_tokens=skip_special_tokens
        )

    # -- internals ---------------------------------------------------------------
    def _prepare(
        self, trajectory: Any, index: int, field: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        if not isinstance(trajectory, dict):
            raise TemplateError(
                f"expected a dict with 'messages', got {type(trajectory).__name__}; "
                f"map the data set with a Preprocessor first",
                index,
            )
        raw = trajectory.get(field)
        if not raw:
            raise TemplateError(
                f"field {field!r} is missing or empty (keys: {sorted(trajectory)}); map the data "
                f"set with a Preprocessor (e.g. dataset.map('MessagesProcessor')) so rows hold 'messages'",
                index,
            )
        messages = []
        for j, message in enumerate(raw):
            if not isinstance(message, dict) or "role" not in message:
                raise TemplateError(f"{field}[{j}] must be a dict with 'role', got {message!r:.80}", index)
            # Arrow stores absent fields as None; templates test `is defined`, so drop them.
            clean = {k: v for k, v in message.items() if v is not None}
            if clean.get("tool_calls"):
                clean["tool_calls"] = [_tool_call(call) for call in clean["tool_calls"]]
            messages.append(clean)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system})
        tools = trajectory.get("tools")
        if isinstance(tools, str):
            try:
                tools = json.loads(tools) if tools.strip() else None
            except json.JSONDecodeError as exc:
                raise TemplateError(f"field 'tools' is not valid JSON ({exc})", index) from None
        return messages, (tools or None)

    def _encode_conversations(
        self,
        conversations: list[list[dict[str, Any]]],
        tools_list: list[list[dict[str, Any]] | None],
        add_generation_prompt: bool,
    ) -> list[InputFeature]:
        tokenizer = self.tokenizer
        out: list[InputFeature | None] = [None] * len(conversations)
        groups: dict[str, list[int]] = {}
        for i, tools in enumerate(tools_list):
            groups.setdefault(json.dumps(tools, sort_keys=True) if tools else "", []).append(i)
        for key, positions in groups.items():
            tools = tools_list[positions[0]] if key else None
            convs = [conversations[i] for i in positions]
            if self._uses_generation_tags:
                encoded = self._encode_with_masks(tokenizer, convs, tools, add_generation_prompt, positions)
            else:
                encoded = self._encode_round_by_round(tokenizer, convs, tools, add_generation_prompt, positions)
            for i, feature in zip(positions, encoded):
                out[i] = feature
        return out  # type: ignore[return-value]

    def _apply(self, tokenizer: Any, positions: list[int], **kwargs: Any) -> Any:
        try:
            return tokenizer.apply_chat_template(**kwargs)
        except Exception as exc:  # jinja errors, missing fields...
            raise TemplateError(
                f"the chat template of {self.model_id!r} failed to render it: {exc}. Check the message "
                f"roles/fields (validate with twinkle.data_format.validate_trajectory).",
                positions[0] if len(positions) == 1 else None,
            ) from exc

    def _encode_with_masks(
        self, tokenizer: Any, convs: list, tools: Any, add_generation_prompt: bool, positions: list[int]
    ) -> list[InputFeature]:
        try:
            if _renderer() is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
                return self._encode_rendered(tokenizer, convs, tools, add_generation_prompt, positions)
            encoded = self._apply(
                tokenizer,
                positions,
                conversation=convs,
                tools=tools,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError:
            if len(convs) == 1:
                raise
            # find which conversation fails, and say so
            return [
                self._encode_with_masks(tokenizer, [conv], tools, add_generation_prompt, [position])[0]
                for conv, position in zip(convs, positions)
            ]
        features: list[InputFeature] = []
        for ids, mask in zip(encoded["input_ids"], encoded["assistant_masks"]):
            ids = list(ids)
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            features.append({"input_ids": ids, "labels": labels, "length": len(ids)})
        return features

    def _encode_rendered(
        self, tokenizer: Any, convs: list, tools: Any, add_generation_prompt: bool, positions: list[int]
    ) -> list[InputFeature]:
        """The fast path of ``apply_chat_template(..., return_assistant_tokens_mask=True)``, same result.

        Renders with transformers' own ``render_jinja_template`` (text + the character spans
        of ``{% generation %}`` blocks) and tokenizes with the Rust backend directly, which
        skips building the per-token Python dicts the public call makes.
        """
        try:
            texts, spans = _renderer()(
                conversations=convs,
                tools=tools,
                chat_template=tokenizer.get_chat_template(None, tools),
                return_assistant_tokens_mask=True,
                add_generation_prompt=add_generation_prompt,
                **tokenizer.special_tokens_map,
            )
        except Exception as exc:  # jinja errors, missing fields...
            raise TemplateError(
                f"the chat template of {self.model_id!r} failed to render it: {exc}. Check the message "
                f"roles/fields (validate with twinkle.data_format.validate_trajectory).",
                positions[0] if len(positions) == 1 else None,
            ) from exc
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        features: list[InputFeature] = []
        for encoding, generation_spans in zip(encodings, spans):
            ids = encoding.ids
            labels = [IGNORE_INDEX] * len(ids)
            for start_char, end_char in generation_spans:
                start = encoding.char_to_token(start_char)
                if start is None:
                    break
                end = encoding.char_to_token(end_char - 1)
                stop = end + 1 if end is not None else len(ids)
                labels[start:stop] = ids[start:stop]
            features.append({"input_ids": ids, "labels": labels, "length": len(ids)})
        return features

    def _encode_round_by_round(
        self, tokenizer: Any, convs: list, tools: Any, add_generation_prompt: bool, positions: list[int]
    ) -> list[InputFeature]:
        features: list[InputFeature] = []
        for position, messages in zip(positions, convs):
            text = self._apply(
                tokenizer,
                [position],
                conversation=messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            spans: list[tuple[int, int]] = []
            for k, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = (
                    self._apply(
                        tokenizer,
                        [position],
                        conversation=messages[:k],
                        tools=tools,
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                    if k
                    else ""
                )
                upto = self._apply(tokenizer, [position], conversation=messages[: k + 1], tools=tools, tokenize=False)
                if not (text.startswith(upto) and upto.startswith(before)):
                    raise TemplateError(
                        f"the chat template of {self.model_id!r} renders earlier turns "
                        f"differently once later turns exist (e.g. it drops past reasoning), so labels cannot be "
                        f"found round by round. Add {{% generation %}}...{{% endgeneration %}} around the assistant "
                        f"content in the chat template.",
                        position,
                    )
                end = len(upto.rstrip())
                if end > len(before):
                    spans.append((len(before), end))
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [IGNORE_INDEX] * len(ids)
            starts = [s for s, _ in spans]
            for t, (start, stop) in enumerate(enc["offset_mapping"]):
                if stop <= start:
                    continue
                k = bisect_right(starts, start) - 1
                if k >= 0 and start < spans[k][1]:
                    labels[t] = ids[t]
            features.append({"input_ids": ids, "labels": labels, "length": len(ids)})
        return features

    def _truncate(self, feature: InputFeature, index: int) -> None:
        limit = self.max_length
        if limit is None:
            return
        for prefix in ("", "rejected_"):
            ids_key = f"{prefix}input_ids"
            if ids_key not in feature:
                continue
            length = len(feature[ids_key])  # type: ignore[literal-required]
            if length <= limit:
                continue
            if self.truncation_strategy in ("raise", "delete"):
                raise SequenceTooLongError(
                    f"{length} tokens is longer than max_length={limit}. Raise max_length, or "
                    f"set truncation_strategy='left' / 'right' (cut) or 'delete' (drop such rows).",
                    length,
                    limit,
                    index,
                )
            cut = slice(length - limit, None) if self.truncation_strategy == "left" else slice(0, limit)
            feature[ids_key] = feature[ids_key][cut]  # type: ignore[literal-required]
            feature[f"{prefix}labels"] = feature[f"{prefix}labels"][cut]  # type: ignore[literal-required]
            feature[f"{prefix}length"] = limit  # type: ignore[literal-required]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, max_length={self.max_length}, "
            f"truncation_strategy={self.truncation_strategy!r})"
        )


def _renderer() -> Any:
    """transformers' ``render_jinja_template`` (what ``apply_chat_template`` renders with), or ``None``."""
    global _RENDERER
    if _RENDERER is False:
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # other transformers versions: use the public apply_chat_template
            render_jinja_template = None
        _RENDERER = render_jinja_template
    return _RENDERER


_RENDERER: Any = False


def _tool_call(call: Any) -> Any:
    """A tool call with its Arrow ``None`` fields dropped and JSON ``arguments`` kept as text."""
    if not isinstance(call, dict):
        return call
    clean = {k: v for k, v in call.items() if v is not None}
    function = clean.get("function")
    if isinstance(function, dict):
        clean["function"] = {k: v for k, v in function.items() if v is not None}
    return clean
