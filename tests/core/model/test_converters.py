"""Remote-code families load natively through converters (issue 35.1): InternLM2 -> Llama, ChatGLM -> glm.

Each test writes a tiny random checkpoint in the family's ORIGINAL layout (tensor names, fused
projections, config fields), loads it with ``TransformersModel`` (no ``trust_remote_code``, no
original code) and compares the logits with a reference forward pass written here from the
published architecture, independent of transformers: explicit per-head attention loops, the
fused-QKV split order of the original, InternLM2's rotate-half RoPE and ChatGLM's RoPE on
interleaved pairs of the first half of each head. Saving with ``original_layout=True`` must give
back the very same tensors, bit for bit.

Tolerance: float32 throughout; the model and the reference sum the same products in different
orders (matmul blocking, SDPA vs. explicit softmax), so each logit differs by a few float32
rounding steps of intermediate values of size ~1: far below 1e-4, while a wrong layout (a
head or rotary pair in the wrong place) moves logits by ~1e-1 (checked below).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import twinkle
from model_test_utils import make_rows
from peft import LoraConfig
from safetensors.torch import save_file
from twinkle.convert import CheckpointConverter, find_converter, read_state_dict
from twinkle.model.transformers_model import CheckpointError, TransformersModel
from twinkle.testing import registered_plugin

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 128, 64, 96, 2, 4, 2, 16
ATOL = 1e-4

# ----------------------------------------------------------------------------- checkpoints


def _randn(gen: torch.Generator, *shape: int, scale: float = 0.08) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(HIDDEN, generator=gen)


def internlm2_checkpoint(bias: bool = False, rope_theta: float = 10000.0) -> tuple[dict, dict]:
    """(config.json, tensors) in InternLM2's layout."""
    config = {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "bias": bias,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    gen = torch.Generator().manual_seed(1)
    qkv_rows = KV_HEADS * (HEADS // KV_HEADS + 2) * HEAD_DIM
    sd = {"model.tok_embeddings.weight": _randn(gen, VOCAB, HIDDEN, scale=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = _randn(gen, qkv_rows, HIDDEN)
        sd[p + "attention.wo.weight"] = _randn(gen, HIDDEN, HEADS * HEAD_DIM)
        sd[p + "feed_forward.w1.weight"] = _randn(gen, FFN, HIDDEN)
        sd[p + "feed_forward.w3.weight"] = _randn(gen, FFN, HIDDEN)
        sd[p + "feed_forward.w2.weight"] = _randn(gen, HIDDEN, FFN)
        if bias:
            sd[p + "attention.wqkv.bias"] = _randn(gen, qkv_rows)
            sd[p + "attention.wo.bias"] = _randn(gen, HIDDEN)
            sd[p + "feed_forward.w1.bias"] = _randn(gen, FFN)
            sd[p + "feed_forward.w3.bias"] = _randn(gen, FFN)
            sd[p + "feed_forward.w2.bias"] = _randn(gen, HIDDEN)
        sd[p + "attention_norm.weight"] = _norm(gen)
        sd[p + "ffn_norm.weight"] = _norm(gen)
    sd["model.norm.weight"] = _norm(gen)
    sd["output.weight"] = _randn(gen, VOCAB, HIDDEN)
    return config, sd


def chatglm_checkpoint(rope_ratio: float = 1.0, multi_query: bool = True) -> tuple[dict, dict]:
    """(config.json, tensors) in ChatGLM2/3's layout (GLM-4's old layout with rope_ratio=500)."""
    groups = KV_HEADS if multi_query else HEADS
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "num_layers": LAYERS,
        "padded_vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN,
        "kv_channels": HEAD_DIM,
        "num_attention_heads": HEADS,
        "seq_length": 128,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "bias_dropout_fusion": True,
        "multi_query_attention": multi_query,
        "multi_query_group_num": KV_HEADS,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False,
        "quantization_bit": 0,
        "pre_seq_len": None,
        "prefix_projection": False,
        "original_rope": True,
        "rope_ratio": rope_ratio,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    gen = torch.Generator().manual_seed(2)
    qkv_rows = (HEADS + 2 * groups) * HEAD_DIM
    rotary = HEAD_DIM // 2
    sd = {
        "transformer.embedding.word_embeddings.weight": _randn(gen, VOCAB, HIDDEN, scale=1.0),
        # the original saves this buffer: 1 / 10000 ** (arange(0, rotary, 2) / rotary)
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary)),
    }
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = _norm(gen)
        sd[p + "self_attention.query_key_value.weight"] = _randn(gen, qkv_rows, HIDDEN)
        sd[p + "self_attention.query_key_value.bias"] = _randn(gen, qkv_rows)
        sd[p + "self_attention.dense.weight"] = _randn(gen, HIDDEN, HEADS * HEAD_DIM)
        sd[p + "post_attention_layernorm.weight"] = _norm(gen)
        sd[p + "mlp.dense_h_to_4h.weight"] = _randn(gen, 2 * FFN, HIDDEN)
        sd[p + "mlp.dense_4h_to_h.weight"] = _randn(gen, HIDDEN, FFN)
    sd["transformer.encoder.final_layernorm.weight"] = _norm(gen)
    sd["transformer.output_layer.weight"] = _randn(gen, VOCAB, HIDDEN)
    return config, sd


def write_checkpoint(directory, config: dict, sd: dict, shards: int = 2) -> str:
    """config.json, the tensors in ``shards`` safetensors files, and a stand-in for the remote code."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / f"modeling_{config['model_type']}.py").write_text("# the original modeling code\n")
    names = sorted(sd)
    for k in range(shards):
        part = {n: sd[n].contiguous() for n in names[k::shards]}
        save_file(part, str(directory / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    return str(directory)


# ----------------------------------------------------------------------------- reference math


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _attend(q: list, k: list, v: list, kv_of_head) -> torch.Tensor:
    """Causal softmax attention head by head; ``q[h]`` [T, d]; head h reads ``k/v[kv_of_head(h)]``."""
    outs = []
    for h, qh in enumerate(q):
        kh, vh = k[kv_of_head(h)], v[kv_of_head(h)]
        scores = qh @ kh.T / math.sqrt(qh.shape[-1])
        t = scores.shape[0]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(outs, dim=-1)


def _rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """InternLM2 / Llama: dimension j pairs with j + d/2, frequency theta ** (-2j / d)."""
    t, d = x.shape
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = angle.cos().float(), angle.sin().float()
    a, b = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _chatglm_rope(x: torch.Tensor, base: float, interleaved: bool = True) -> torch.Tensor:
    """ChatGLM: the first d/2 dimensions rotate as pairs (2i, 2i+1), frequency base ** (-2i / (d/2))."""
    t, d = x.shape
    rot = d // 2
    freq = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = angle.cos().float(), angle.sin().float()
    head, tail = x[:, :rot], x[:, rot:]
    if not interleaved:  # the wrong layout, for the negative check
        a, b = head[:, : rot // 2], head[:, rot // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, tail], dim=-1)
    even, odd = head[:, 0::2], head[:, 1::2]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(1)
    return torch.cat([rotated, tail], dim=-1)


def internlm2_reference(config: dict, sd: dict, ids: list[int], grouped_split: bool = True) -> torch.Tensor:
    """InternLM2's forward pass from its published architecture; [T, vocab] logits."""
    kv, d = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    per_kv = config["num_attention_heads"] // kv
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    x = sd["model.tok_embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], eps)
        qkv = _linear(h, sd, p + "attention.wqkv")  # [T, kv * (per_kv + 2) * d]
        q, k, v = [], [], []
        if grouped_split:  # per kv group: its per_kv query heads, its key head, its value head
            for g in range(kv):
                block = qkv[:, g * (per_kv + 2) * d : (g + 1) * (per_kv + 2) * d]
                q += [block[:, j * d : (j + 1) * d] for j in range(per_kv)]
                k.append(block[:, per_kv * d : (per_kv + 1) * d])
                v.append(block[:, (per_kv + 1) * d :])
        else:  # the naive [all q | all k | all v] reading, for the negative check
            nq = kv * per_kv * d
            q = [qkv[:, j * d : (j + 1) * d] for j in range(kv * per_kv)]
            k = [qkv[:, nq + g * d : nq + (g + 1) * d] for g in range(kv)]
            v = [qkv[:, nq + kv * d + g * d : nq + kv * d + (g + 1) * d] for g in range(kv)]
        q = [_rotate_half_rope(t, theta) for t in q]
        k = [_rotate_half_rope(t, theta) for t in k]
        attn = _attend(q, k, v, lambda head: head // per_kv)
        x = x + _linear(attn, sd, p + "attention.wo")
        h = _rms(x, sd[p + "ffn_norm.weight"], eps)
        gate, up = _linear(h, sd, p + "feed_forward.w1"), _linear(h, sd, p + "feed_forward.w3")
        x = x + _linear(torch.nn.functional.silu(gate) * up, sd, p + "feed_forward.w2")
    return _rms(x, sd["model.norm.weight"], eps) @ sd["output.weight"].T


def chatglm_reference(config: dict, sd: dict, ids: list[int], interleaved: bool = True) -> torch.Tensor:
    """ChatGLM2/3's forward pass from its published architecture; [T, vocab] logits."""
    heads, d = config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    eps, base = config["layernorm_epsilon"], 10000.0 * config.get("rope_ratio", 1)
    x = sd["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = _linear(h, sd, p + "self_attention.query_key_value")  # [q heads | k groups | v groups]
        nq, nk = heads * d, groups * d
        q = [_chatglm_rope(qkv[:, j * d : (j + 1) * d], base, interleaved) for j in range(heads)]
        k = [_chatglm_rope(qkv[:, nq + g * d : nq + (g + 1) * d], base, interleaved) for g in range(groups)]
        v = [qkv[:, nq + nk + g * d : nq + nk + (g + 1) * d] for g in range(groups)]
        attn = _attend(q, k, v, lambda head: head // (heads // groups))
        x = x + _linear(attn, sd, p + "self_attention.dense")
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = _linear(h, sd, p + "mlp.dense_h_to_4h").chunk(2, dim=-1)
        x = x + _linear(torch.nn.functional.silu(gate) * up, sd, p + "mlp.dense_4h_to_h")
    return _rms(x, sd["transformer.encoder.final_layernorm.weight"], eps) @ sd["transformer.output_layer.weight"].T


# ----------------------------------------------------------------------------- tests

IDS = [5, 17, 3, 99, 42, 8, 64, 120, 7, 31, 77, 12]

CASES = {
    "internlm2": (lambda: internlm2_checkpoint(), internlm2_reference, "llama"),
    "internlm2-bias-theta1e6": (lambda: internlm2_checkpoint(bias=True, rope_theta=1e6), internlm2_reference, "llama"),
    "chatglm2/3": (lambda: chatglm_checkpoint(), chatglm_reference, "glm"),
    "glm4-chatglm-layout": (lambda: chatglm_checkpoint(rope_ratio=500.0), chatglm_reference, "glm"),
    "chatglm-multihead": (lambda: chatglm_checkpoint(multi_query=False), chatglm_reference, "glm"),
}


def _logits(model: TransformersModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_equal_the_reference_and_round_trip(case, tmp_path):
    make, reference, target = CASES[case]
    config, sd = make()
    source = write_checkpoint(tmp_path / "original", config, sd)
    model = TransformersModel(model_id=source, seed=0)
    assert model.model.config.model_type == target
    expected = reference(config, sd, IDS)
    got = _logits(model, IDS)
    assert expected.abs().max() > 0.5  # logits of size ~1: the tolerance below is relative to them
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    saved = model.save(tmp_path / "saved", save_optimizer=False, original_layout=True)
    back = read_state_dict(saved)
    assert sorted(back) == sorted(sd)
    for name, tensor in sd.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    assert (tmp_path / "saved" / f"modeling_{config['model_type']}.py").is_file()  # loads where the original did


def test_a_wrong_layout_is_caught_by_the_reference(tmp_path):
    """The comparison can fail: reading the fused tensors or the rotary pairs the wrong way moves logits far."""
    config, sd = internlm2_checkpoint()
    model = TransformersModel(model_id=write_checkpoint(tmp_path / "i", config, sd), seed=0)
    wrong = internlm2_reference(config, sd, IDS, grouped_split=False)
    assert (_logits(model, IDS) - wrong).abs().max() > 100 * ATOL
    config, sd = chatglm_checkpoint()
    model = TransformersModel(model_id=write_checkpoint(tmp_path / "c", config, sd), seed=0)
    wrong = chatglm_reference(config, sd, IDS, interleaved=False)
    assert (_logits(model, IDS) - wrong).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", ["internlm2", "chatglm"])
def test_converted_family_trains_lora_and_saves_in_both_layouts(family, tmp_path):
    config, sd = internlm2_checkpoint() if family == "internlm2" else chatglm_checkpoint()
    source = write_checkpoint(tmp_path / "original", config, sd, shards=1)
    model = TransformersModel(model_id=source, seed=0)
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    rows = make_rows(4, seed=11, vocab=VOCAB)
    losses = []
    for _ in range(4):
        losses.append(model.forward_backward(inputs=rows).loss)
        model.clip_grad_and_step()
    assert losses[-1] < losses[0]
    with pytest.raises(CheckpointError, match="original_layout"):
        model.save(tmp_path / "nope", original_layout=True)
    before = model.forward_only(rows)
    adapter = model.save(tmp_path / "adapter", save_optimizer=False)
    fresh = TransformersModel(model_id=source, seed=0)
    fresh.load(adapter)
    assert fresh.forward_only(rows).loss == pytest.approx(before.loss, rel=1e-5)


def test_full_training_saves_the_original_layout_that_loads_again(tmp_path):
    """A trained model written in ChatGLM's layout reloads (through the converter) to the same logits."""
    config, sd = chatglm_checkpoint(rope_ratio=500.0)
    model = TransformersModel(model_id=write_checkpoint(tmp_path / "original", config, sd), seed=0)
    model.set_optimizer("AdamW", lr=1e-3)
    model.forward_backward(inputs=make_rows(2, seed=3, vocab=VOCAB))
    model.clip_grad_and_step()
    trained = _logits(model, IDS)
    saved = model.save(tmp_path / "trained", save_optimizer=False, original_layout=True)
    weights = read_state_dict(saved)
    assert not torch.equal(
        weights["transformer.output_layer.weight"], sd["transformer.output_layer.weight"]
    )  # it trained
    assert torch.equal(weights["transformer.rotary_pos_emb.inv_freq"], sd["transformer.rotary_pos_emb.inv_freq"])
    torch.testing.assert_close(chatglm_reference(config, weights, IDS), trained, atol=ATOL, rtol=0)
    again = TransformersModel(model_id=saved, seed=0)
    assert torch.equal(_logits(again, IDS), trained)
    # the transformers layout of the same model loads with plain transformers (no converter, no remote code)
    from transformers import AutoModelForCausalLM

    native = model.save(tmp_path / "native", save_optimizer=False)
    plain = AutoModelForCausalLM.from_pretrained(native)
    assert plain.config.model_type == "glm"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=torch.tensor([IDS])).logits[0], trained, atol=ATOL, rtol=0)


class ToyLlamaConverter(CheckpointConverter):
    """A plugin's family: Llama's tensors under a ``toy.`` prefix, ``model_type: toy_llama``."""

    name = "ToyLlama"
    source_model_types = ("toy_llama",)
    target_model_type = "llama"

    def target_config(self, config):
        return {k: v for k, v in config.items() if k not in ("model_type", "architectures")}

    def to_target(self, state_dict, config):
        return {k.removeprefix("toy."): v for k, v in state_dict.items()}

    def to_original(self, state_dict, config):
        return {"toy." + k: v for k, v in state_dict.items()}


class ToyFamilyPlugin:
    @twinkle.hookimpl
    def twinkle_register_components(self, register):
        register("converter", "ToyLlamaConverter", ToyLlamaConverter)


def test_a_plugin_adds_a_family_through_the_converter_kind(tmp_path):
    config = {
        "model_type": "toy_llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
    }
    native = TransformersModel(config={**config, "model_type": "llama"}, seed=5)
    sd = {"toy." + k: v for k, v in native.model.state_dict().items()}
    source = write_checkpoint(tmp_path / "toy", config, sd)
    with pytest.raises(ValueError):  # transformers alone does not know the family
        TransformersModel(model_id=source)
    with registered_plugin(ToyFamilyPlugin(), name="toy-family"):
        assert isinstance(find_converter(config), ToyLlamaConverter)
        model = TransformersModel(model_id=source)
        assert torch.equal(_logits(model, IDS), _logits(native, IDS))
        saved = model.save(tmp_path / "back", save_optimizer=False, original_layout=True)
        back = read_state_dict(saved)
        assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert find_converter(config) is None


def test_bf16_bin_shards_load_with_their_dtype_and_round_trip(tmp_path):
    """Older checkpoints come as ``pytorch_model-*.bin`` shards in bfloat16; ``torch_dtype='auto'`` keeps it."""
    config, sd = internlm2_checkpoint()
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    source = tmp_path / "bin"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    names = sorted(sd)
    torch.save({n: sd[n] for n in names[::2]}, source / "pytorch_model-00001-of-00002.bin")
    torch.save({n: sd[n] for n in names[1::2]}, source / "pytorch_model-00002-of-00002.bin")
    model = TransformersModel(model_id=str(source), torch_dtype="auto", seed=0)
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    saved = read_state_dict(model.save(tmp_path / "saved", save_optimizer=False, original_layout=True))
    assert sorted(saved) == names and all(
        saved[n].dtype == torch.bfloat16 and torch.equal(saved[n], sd[n]) for n in names
    )


def test_an_unsupported_chatglm_variant_is_refused(tmp_path):
    from twinkle.convert import ConversionError

    config, sd = chatglm_checkpoint()
    config["pre_seq_len"] = 16  # P-tuning v2 prefixes: not part of transformers' glm
    with pytest.raises(ConversionError, match="pre_seq_len=16"):
        TransformersModel(model_id=write_checkpoint(tmp_path / "p", config, sd))
    config, sd = chatglm_checkpoint()
    sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 4)
    with pytest.raises(ConversionError, match="unexpected tensor 'transformer.prefix_encoder"):
        TransformersModel(model_id=write_checkpoint(tmp_path / "t", config, sd))
