"""Chat formats of families whose tokenizers ship their format as remote code: ChatGLM2/3, GLM-4, InternLM2.

Each class is a :class:`~twinkle.template.base.Template` that puts its family's chat format on the
tokenizer (as a Jinja chat template with ``{% generation %}`` marks, so labels cover exactly what
the assistant says plus the token that ends the answer) and checks that the tokenizer has the
family's role tokens as single tokens. (transformers renders chat templates with ``trim_blocks``:
a newline right after a ``{% ... %}`` tag is dropped, so such newlines are written ``{{ '\\n' }}``.)

* ``ChatGLM2Template``: ``[gMASK]sop`` then ``[Round n]\\n\\n问：{user}\\n\\n答：{assistant}\\n\\n``;
  the last answer ends with the EOS token. No system role.
* ``ChatGLM3Template``: ``[gMASK]sop`` then ``<|role|>\\n{content}`` per message, roles
  ``system``/``user``/``assistant``/``observation`` (``tool`` messages become observations); the
  model writes ``\\n{answer}`` after ``<|assistant|>``, the last answer ends with EOS.
* ``GLM4Template``: GLM-4 chat checkpoints (also in the ChatGLM layout), ChatGLM3's format with
  GLM-4's ``[gMASK]<sop>`` prefix and ``<|endoftext|>`` EOS.
* ``InternLM2Template``: ``<s><|im_start|>{role}\\n{content}<|im_end|>\\n``; the answer ends with
  ``<|im_end|>``.

Example::

    template = ChatGLM3Template("/ckpt/chatglm3-6b", tokenizer=tokenizer_with_role_tokens)
    template.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
"""

from __future__ import annotations

import copy
from typing import Any

from twinkle.template.base import Template, TemplateError

_GLM_BODY = (
    "{% for message in messages %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "{% if role == 'assistant' %}<|assistant|>{% generation %}{{ '\n' + message['content'] }}"
    "{% if loop.last %}{{ eos_token }}{% endif %}{% endgeneration %}"
    "{% else %}<|{{ role }}|>\n{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatFormatTemplate(Template):
    """A Template with a fixed chat format (:attr:`chat_template`) and required role tokens (:attr:`role_tokens`).

    Args: as :class:`Template`. A ``tokenizer`` passed in is copied, not changed.

    Raises:
        TemplateError: on first use, when the tokenizer lacks one of :attr:`role_tokens`.
    """

    #: The family's format, a Jinja chat template with ``{% generation %}`` marks.
    chat_template: str = ""
    #: Tokens the format needs as single tokens of the vocabulary.
    role_tokens: tuple[str, ...] = ()
    #: The token that ends an answer, when the tokenizer's own EOS is another one.
    eos_token: str | None = None
    #: Whether the format starts with the tokenizer's BOS token.
    needs_bos: bool = False

    def __init__(self, model_id: str | None = None, *args: Any, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(
            model_id, *args, tokenizer=copy.deepcopy(tokenizer) if tokenizer is not None else None, **kwargs
        )
        self._formatted = False

    @property
    def tokenizer(self) -> Any:
        if not self._formatted:
            if self._tokenizer is None:
                from twinkle.hub import resolve_model_dir
                from twinkle.template.family_tokenizers import load_tokenizer  # no remote code

                self._tokenizer = load_tokenizer(resolve_model_dir(self.model_id), **self._tokenizer_kwargs)
            vocab = self._tokenizer.get_vocab()
            needed = (*self.role_tokens, *([self.eos_token] if self.eos_token else []))
            missing = [t for t in needed if t not in vocab]
            if self.needs_bos and getattr(self._tokenizer, "bos_token", None) is None:
                missing.append("a bos_token")
            if missing:
                raise TemplateError(
                    f"{type(self).__name__}: the tokenizer of {self.model_id!r} lacks the role tokens {missing}; use "
                    f"the family's tokenizer (or add them: tokenizer.add_special_tokens("
                    f"{{'additional_special_tokens': {missing}}}))"
                )
            if self.eos_token:
                self._tokenizer.eos_token = self.eos_token
            self._tokenizer.chat_template = self.chat_template
            self._uses_generation_tags = None
            self._formatted = True
        return super().tokenizer


class ChatGLM2Template(ChatFormatTemplate):
    """ChatGLM2's format: ``[Round n]\\n\\n问：...\\n\\n答：...``."""

    chat_template = (
        "[gMASK]sop{% set ns = namespace(round=0) %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
        "[Round {{ ns.round }}]\n\n问：{{ message['content'] }}\n\n答："
        "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
        "{% if loop.last %}{{ eos_token }}{% endif %}{% endgeneration %}{{ '\n\n' }}"
        "{% else %}{{ raise_exception('ChatGLM2 has no ' + message['role'] + ' role; use user and assistant') }}"
        "{% endif %}{% endfor %}"
    )
    role_tokens = ("[gMASK]", "sop")


class ChatGLM3Template(ChatFormatTemplate):
    """ChatGLM3's format: ``[gMASK]sop<|user|>\\n...<|assistant|>\\n...``."""

    chat_template = "[gMASK]sop" + _GLM_BODY
    role_tokens = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class GLM4Template(ChatFormatTemplate):
    """GLM-4 chat (ChatGLM layout): ``[gMASK]<sop><|user|>\\n...<|assistant|>\\n...<|endoftext|>``."""

    chat_template = "[gMASK]<sop>" + _GLM_BODY
    role_tokens = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    eos_token = "<|endoftext|>"


class InternLM2Template(ChatFormatTemplate):
    """InternLM2's format: ``<s><|im_start|>role\\n...<|im_end|>\\n``."""

    chat_template = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
        "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{{ '\n' }}"
        "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    role_tokens = ("<|im_start|>", "<|im_end|>")
    needs_bos = True
