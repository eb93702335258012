"""Tokenizers of remote-code families, without their remote code: InternLM2, ChatGLM2/3, GLM-4 (old layout).

These checkpoints name a tokenizer class that only exists in their own Python files
(``InternLM2Tokenizer``, ``ChatGLMTokenizer``, ``ChatGLM4Tokenizer``), so
``AutoTokenizer.from_pretrained`` needs ``trust_remote_code``. :func:`load_tokenizer` builds an
equivalent transformers fast tokenizer from the same files instead:

* ``InternLM2Tokenizer``: the SentencePiece ``tokenizer.model`` (a Llama-style BPE; the
  checkpoint's ``added_tokens_decoder`` role tokens are pieces of it), BOS added, no EOS;
* ``ChatGLMTokenizer`` (ChatGLM2, ChatGLM3): the SentencePiece model, no BOS, plus the special
  tokens the original code appends after the SentencePiece vocabulary in this order: ``[MASK]``,
  ``[gMASK]``, ``[sMASK]``, ``sop``, ``eop``, then ChatGLM3's ``<|system|>``, ``<|user|>``,
  ``<|assistant|>``, ``<|observation|>`` (given to ChatGLM2 too: the same class name, and its
  five come first);
* ``ChatGLM4Tokenizer`` (GLM-4 in the ChatGLM layout): the tiktoken BPE ranks file
  ``tokenizer.model`` with GLM-4's split pattern, and its special tokens from ``<|endoftext|>``
  on, numbered after the ranks.

The SentencePiece path needs ``sentencepiece`` and ``protobuf``, the tiktoken path ``tiktoken``:
``pip install twinkle-core[family-tokenizers]``. Any other directory loads with
``AutoTokenizer``.

Example::

    tokenizer = load_tokenizer("/ckpt/chatglm3-6b")   # a PreTrainedTokenizerFast, no remote code
    ChatGLM3Template("/ckpt/chatglm3-6b")              # uses it
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

#: ChatGLM2 / ChatGLM3 special tokens, numbered after the SentencePiece vocabulary in this order.
CHATGLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
#: GLM-4's special tokens, numbered after the tiktoken ranks in this order.
GLM4_SPECIAL = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
#: GLM-4's pre-tokenization pattern (its tokenization code's ``pat_str``).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
REMOTE_TOKENIZERS = ("InternLM2Tokenizer", "ChatGLMTokenizer", "ChatGLM4Tokenizer")


class FamilyTokenizerError(ValueError):
    """A remote-code family tokenizer that cannot be rebuilt; the message names the fix."""


def tokenizer_class_of(model_dir: str) -> str | None:
    """The ``tokenizer_class`` of ``model_dir``'s ``tokenizer_config.json`` (``None`` without one)."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("tokenizer_class")


def load_tokenizer(model_dir: str, **kwargs: Any) -> Any:
    """The tokenizer of ``model_dir``: a rebuilt one for the remote-code families, else ``AutoTokenizer``'s.

    Raises:
        FamilyTokenizerError: a family tokenizer whose library is missing (naming the extra),
            or a SentencePiece model whose normalization the conversion cannot reproduce.
    """
    name = tokenizer_class_of(model_dir)
    if name in REMOTE_TOKENIZERS and not kwargs.get("trust_remote_code"):
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        vocab_file = os.path.join(model_dir, config.get("vocab_file") or "tokenizer.model")
        if not os.path.isfile(vocab_file):
            raise FamilyTokenizerError(f"{model_dir}: {name} needs {os.path.basename(vocab_file)}, which is missing")
        if name == "ChatGLM4Tokenizer":
            return _glm4(vocab_file, config)
        if name == "InternLM2Tokenizer":
            return _sentencepiece(vocab_file, config, add_bos=True, appended=())
        # ChatGLM2 and ChatGLM3 share the class name; ChatGLM3's role tokens come after ChatGLM2's five
        # specials, so adding them gives both families their ids (ChatGLM2 never uses the roles).
        return _sentencepiece(vocab_file, config, add_bos=False, appended=CHATGLM_SPECIAL + CHATGLM3_ROLES)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, **kwargs)


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise FamilyTokenizerError(
            f"this tokenizer needs {module!r}: pip install 'twinkle-core[family-tokenizers]' "
            f"(sentencepiece, protobuf, tiktoken)"
        )


def _sentencepiece(vocab_file: str, config: dict[str, Any], *, add_bos: bool, appended: tuple[str, ...]) -> Any:
    """A Llama-style fast tokenizer from a SentencePiece model; ``appended`` specials follow its vocabulary."""
    _require("sentencepiece")
    _require("google.protobuf")
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    processor = spm.SentencePieceProcessor(model_file=vocab_file)
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    rule = proto.normalizer_spec.name
    if rule not in ("identity", "") or proto.normalizer_spec.remove_extra_whitespaces:
        raise FamilyTokenizerError(
            f"{vocab_file}: SentencePiece normalization {rule!r} (remove_extra_whitespaces="
            f"{proto.normalizer_spec.remove_extra_whitespaces}) has no fast-tokenizer equivalent here; load the "
            f"tokenizer with trust_remote_code=True instead"
        )
    with tempfile.TemporaryDirectory(prefix="twinkle-spm-") as tmp:
        shutil.copyfile(vocab_file, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "add_bos_token": add_bos,
                    "add_eos_token": False,
                    "legacy": True,
                    "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
                    "bos_token": processor.id_to_piece(processor.bos_id()) if processor.bos_id() >= 0 else None,
                    "eos_token": processor.id_to_piece(processor.eos_id()) if processor.eos_id() >= 0 else None,
                    "unk_token": processor.id_to_piece(processor.unk_id()),
                },
                f,
            )
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    # SentencePiece's own rule: every space becomes "▁" and each piece of text between special tokens
    # gets one "▁" in front (add_dummy_prefix), even when it already starts with a space.
    from tokenizers import normalizers

    rules = [normalizers.Replace(" ", "\u2581")]
    if proto.normalizer_spec.add_dummy_prefix:
        rules.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(rules)
    tokenizer.backend_tokenizer.pre_tokenizer = None
    if appended:
        tokenizer.add_special_tokens({"additional_special_tokens": list(appended)}, replace_extra_special_tokens=False)
    specials = [
        entry["content"]
        for entry in (config.get("added_tokens_decoder") or {}).values()
        if isinstance(entry, dict) and entry.get("content") and entry["content"] not in appended
    ]
    known = [t for t in specials if processor.piece_to_id(t) != processor.unk_id()]
    if known:  # role tokens that are pieces of the model (InternLM2's): never split them
        tokenizer.add_special_tokens({"additional_special_tokens": known}, replace_extra_special_tokens=False)
    for k, token in enumerate(appended):
        expected = processor.vocab_size() + k
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise FamilyTokenizerError(
                f"{vocab_file}: {token} got id {tokenizer.convert_tokens_to_ids(token)}, "
                f"the original numbering gives {expected}"
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _glm4(vocab_file: str, config: dict[str, Any]) -> Any:
    """GLM-4's tiktoken BPE as a fast byte-level BPE tokenizer with its special tokens after the ranks."""
    _require("tiktoken")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=vocab_file, pattern=GLM4_PATTERN, extra_special_tokens=list(GLM4_SPECIAL))
    backend = converter.converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    ranks = converter.load_tiktoken_bpe(vocab_file)
    for k, token in enumerate(GLM4_SPECIAL):
        if tokenizer.convert_tokens_to_ids(token) != len(ranks) + k:
            raise FamilyTokenizerError(f"{vocab_file}: {token} did not get the id GLM-4 gives it ({len(ranks) + k})")
    return tokenizer
