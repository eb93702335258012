"""The bundled tiny tokenizer, model config and data sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from twinkle import assets

REPO = Path(__file__).resolve().parents[3]


def test_tokenizer_loads_and_round_trips_any_utf8(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert 2000 <= len(tok) <= 4096
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ["twinkle大模型", "ModelScope社区", "naïve café ☕ 😀 ∑x²", "日本語のテキスト", "\t\n  spaces  "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


def test_chat_template_is_chatml_with_default_system(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "{% generation %}" in tok.chat_template.replace("{%- generation %}", "{% generation %}")


def test_model_config_matches_tokenizer(tiny_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert config.model_type == "qwen2"
    assert config.vocab_size % 64 == 0 and 0 <= config.vocab_size - len(tok) < 64
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (4, 2, 1024)
    assert config.tie_word_embeddings is True
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    assert not list(Path(tiny_dir).glob("*.safetensors")) and not list(Path(tiny_dir).glob("*.bin"))


def test_build_script_reproduces_the_shipped_tokenizer(tmp_path):
    out = tmp_path / "tok"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_tokenizer.py"), "--out", str(out)], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (assets.path("tiny-qwen2") / name).read_bytes(), name


@pytest.mark.parametrize(
    ("name", "columns", "minimum"),
    [
        ("self_cognition.jsonl", {"query", "response", "tag"}, 100),
        ("alpaca_tiny.jsonl", {"instruction", "input", "output"}, 30),
        ("sharegpt_tiny.jsonl", {"conversations"}, 20),
        ("gsm8k_tiny.jsonl", {"question", "answer"}, 50),
        ("math_tiny.jsonl", {"problem", "solution", "level", "type"}, 30),
        ("dpo_tiny.jsonl", {"prompt", "chosen", "rejected"}, 20),
    ],
)
def test_bundled_datasets(name, columns, minimum):
    rows = [json.loads(line) for line in assets.path(f"datasets/{name}").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= minimum
    assert all(set(row) == columns for row in rows)
    if name == "self_cognition.jsonl":
        assert {row["tag"] for row in rows} == {"en", "zh"}
        assert all("{{NAME}}" in row["response"] for row in rows)
        assert len({row["query"] for row in rows}) >= 40
    if name == "gsm8k_tiny.jsonl":
        assert all(row["answer"].rsplit("#### ", 1)[1].strip().lstrip("-").isdigit() for row in rows)


def test_asset_path_errors_list_what_is_bundled():
    with pytest.raises(FileNotFoundError, match="tiny-qwen2"):
        assets.path("no-such-thing")
    with pytest.raises(FileNotFoundError):
        assets.path("../../../etc/passwd")
