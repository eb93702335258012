"""Tokenizers of the remote-code families rebuilt without their code, against references written from
the original tokenizers' rules on the libraries they use (sentencepiece, tiktoken).

Tiny tokenizer files are made here: a SentencePiece BPE trained in-process (identity normalization
with a dummy prefix and byte fallback, as InternLM2's and ChatGLM's) and a tiktoken ranks file.
"""

from __future__ import annotations

import base64
import io
import json

import pytest

spm = pytest.importorskip("sentencepiece")
tiktoken = pytest.importorskip("tiktoken")
pytest.importorskip("google.protobuf")

from twinkle.template.family_tokenizers import (  # noqa: E402
    CHATGLM3_ROLES,
    CHATGLM_SPECIAL,
    GLM4_PATTERN,
    GLM4_SPECIAL,
    FamilyTokenizerError,
    load_tokenizer,
)

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "你好，世界！这是一个小语料。我们训练一个分词器。",
    "Numbers 12345 and 67890, punctuation: (a) [b] {c}!",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system observation hello hi",
]
TEXTS = [
    "Hello world",
    " leading space",
    "你好 世界",
    "two  spaces and\ttab\nnewline",
    "12345 digits",
    "emoji 😀 and ß (byte fallback)",
    "",
]


def train_sentencepiece(user_defined=()):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=model,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        user_defined_symbols=list(user_defined),
        minloglevel=2,
    )
    return model.getvalue()


def write_dir(path, vocab, tokenizer_class, added=()):
    path.mkdir()
    (path / "tokenizer.model").write_bytes(vocab)
    config = {
        "tokenizer_class": tokenizer_class,
        "auto_map": {"AutoTokenizer": [f"tokenization.{tokenizer_class}", None]},
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in added},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_internlm2_tokenizer_equals_sentencepiece_with_bos(tmp_path):
    """InternLM2Tokenizer: BOS + sp.encode(text); its role tokens (pieces of the model) never split."""
    roles = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>")
    vocab = train_sentencepiece(user_defined=roles)
    sp = spm.SentencePieceProcessor(model_proto=vocab)
    added = [(sp.piece_to_id(t), t) for t in roles]
    tokenizer = load_tokenizer(write_dir(tmp_path / "internlm2", vocab, "InternLM2Tokenizer", added))
    for text in TEXTS:
        assert tokenizer.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    # special tokens split the text first; each piece is encoded on its own (the slow tokenizer's rule)
    text = "<|im_start|>user\nhi there<|im_end|>\n"
    reference = [
        sp.bos_id(),
        sp.piece_to_id("<|im_start|>"),
        *sp.encode("user\nhi there"),
        sp.piece_to_id("<|im_end|>"),
        *sp.encode("\n"),
    ]
    assert tokenizer.encode(text) == reference


def test_chatglm_tokenizer_numbers_its_specials_after_the_vocabulary(tmp_path):
    """ChatGLMTokenizer: no BOS, sp.encode(text), [MASK] [gMASK] [sMASK] sop eop and ChatGLM3's roles at
    vocab_size + 0, 1, 2...; ChatGLM3Template renders with it straight from the directory."""
    vocab = train_sentencepiece()
    sp = spm.SentencePieceProcessor(model_proto=vocab)
    directory = write_dir(tmp_path / "chatglm3", vocab, "ChatGLMTokenizer")
    tokenizer = load_tokenizer(directory)
    for k, token in enumerate(CHATGLM_SPECIAL + CHATGLM3_ROLES):
        assert tokenizer.convert_tokens_to_ids(token) == sp.vocab_size() + k
    for text in TEXTS:
        assert tokenizer.encode(text) == sp.encode(text), text
    from twinkle.template import ChatGLM3Template

    feature = ChatGLM3Template(directory).encode(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    ids = feature["input_ids"]
    gmask, sop = (sp.vocab_size() + CHATGLM_SPECIAL.index(t) for t in ("[gMASK]", "sop"))
    user, assistant = (
        sp.vocab_size() + len(CHATGLM_SPECIAL) + CHATGLM3_ROLES.index(t) for t in ("<|user|>", "<|assistant|>")
    )
    assert ids[:3] == [gmask, sop, user] and assistant in ids


def write_tiktoken(path):
    """A byte-level BPE ranks file: the 256 bytes, then merges learned greedily from the corpus."""
    data = [text.encode("utf-8") for text in CORPUS]
    ranks = {bytes([b]): b for b in range(256)}
    pieces = [[bytes([b]) for b in text] for text in data]
    while len(ranks) < 400:
        counts = {}
        for seq in pieces:
            for a, b in zip(seq, seq[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda k: (counts[k], k))
        ranks[best] = len(ranks)
        merged = []
        for seq in pieces:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] + seq[i + 1] == best:
                    out.append(best)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged.append(out)
        pieces = merged
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
    return ranks


def test_glm4_tokenizer_equals_tiktoken(tmp_path):
    """ChatGLM4Tokenizer: tiktoken.Encoding(pat_str, ranks).encode(text); specials after the ranks."""
    directory = tmp_path / "glm4"
    directory.mkdir()
    ranks = write_tiktoken(directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    tokenizer = load_tokenizer(str(directory))
    specials = {t: len(ranks) + k for k, t in enumerate(GLM4_SPECIAL)}
    reference = tiktoken.Encoding("glm4-tiny", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), text
        assert tokenizer.decode(reference.encode(text)) == text
    text = "[gMASK]<sop><|user|>\nhi<|assistant|>\nhello"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, allowed_special="all")


def test_normalizing_sentencepiece_models_are_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
        character_coverage=1.0,
    )  # the default nmt_nfkc normalization
    with pytest.raises(FamilyTokenizerError, match="normalization 'nmt_nfkc'.*trust_remote_code=True"):
        load_tokenizer(write_dir(tmp_path / "nfkc", model.getvalue(), "InternLM2Tokenizer"))
