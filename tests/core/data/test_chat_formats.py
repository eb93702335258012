"""Chat formats of the remote-code families as Templates (issue 35.1): ChatGLM2/3, GLM-4, InternLM2.

The bundled tiny tokenizer gets each family's role tokens added as special tokens (the families'
own tokenizers are remote code); the rendered text is compared with the family's published
format and the labels must cover exactly the answer and its end token.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer
from twinkle.template import ChatGLM2Template, ChatGLM3Template, GLM4Template, InternLM2Template, TemplateError

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
}
NO_SYSTEM = {"messages": CONVERSATION["messages"][1:]}


def tokenizer_with(tiny_dir: str, tokens: list[str], eos: str | None = None, bos: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if eos:
        tokenizer.add_special_tokens({"eos_token": eos})
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    return tokenizer


def _text_and_labels(template, trajectory, **kwargs):
    feature = template.encode(trajectory, **kwargs)
    text = template.decode(feature["input_ids"], skip_special_tokens=False)
    spans, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(template.decode(current, skip_special_tokens=False))
            current = []
    if current:
        spans.append(template.decode(current, skip_special_tokens=False))
    return text, spans


def test_chatglm3_format_and_labels(tiny_dir):
    roles = ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    template = ChatGLM3Template(tiny_dir, tokenizer=tokenizer_with(tiny_dir, roles, eos="</s>"))
    text, spans = _text_and_labels(template, CONVERSATION)
    assert text == (
        "[gMASK]sop<|system|>\nBe brief.<|user|>\nhi<|assistant|>\nhello<|user|>\nand?<|assistant|>\nbye</s>"
    )
    assert spans == ["\nhello", "\nbye</s>"]  # the answer (after the metadata line) and the final EOS
    prompt, labels = _text_and_labels(template, {"messages": CONVERSATION["messages"][:2]}, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nhi<|assistant|>") and labels == []
    tool = {"messages": [*NO_SYSTEM["messages"][:1], {"role": "tool", "content": "42"}]}
    assert "<|observation|>\n42" in _text_and_labels(template, tool)[0]


def test_glm4_format_uses_its_prefix_and_eos(tiny_dir):
    roles = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]
    template = GLM4Template(tiny_dir, tokenizer=tokenizer_with(tiny_dir, roles))
    text, spans = _text_and_labels(template, NO_SYSTEM)
    assert text == "[gMASK]<sop><|user|>\nhi<|assistant|>\nhello<|user|>\nand?<|assistant|>\nbye<|endoftext|>"
    assert spans == ["\nhello", "\nbye<|endoftext|>"]


def test_chatglm2_rounds(tiny_dir):
    template = ChatGLM2Template(tiny_dir, tokenizer=tokenizer_with(tiny_dir, ["[gMASK]", "sop"], eos="</s>"))
    text, spans = _text_and_labels(template, NO_SYSTEM)
    assert text == "[gMASK]sop[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：and?\n\n答：bye</s>\n\n"
    assert spans == ["hello", "bye</s>"]
    with pytest.raises(TemplateError, match="no system role"):
        template.encode(CONVERSATION)


def test_internlm2_format_and_labels(tiny_dir):
    tokenizer = tokenizer_with(tiny_dir, ["<|im_start|>", "<|im_end|>"], bos="<s>")
    own_format = tokenizer.chat_template
    template = InternLM2Template(tiny_dir, tokenizer=tokenizer)
    text, spans = _text_and_labels(template, CONVERSATION)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\nbye<|im_end|>\n"
    )
    assert spans == ["hello<|im_end|>", "bye<|im_end|>"]
    assert tokenizer.chat_template == own_format != template.tokenizer.chat_template  # the caller's is not changed


def test_a_tokenizer_without_the_role_tokens_is_refused(tiny_dir):
    template = ChatGLM3Template(tiny_dir)
    with pytest.raises(TemplateError, match=r"lacks the role tokens \['\[gMASK\]', 'sop', '<\|system\|>'"):
        template.encode(NO_SYSTEM)
    with pytest.raises(TemplateError, match="bos_token"):
        InternLM2Template(tiny_dir, tokenizer=tokenizer_with(tiny_dir, ["<|im_start|>", "<|im_end|>"])).encode(
            NO_SYSTEM
        )
