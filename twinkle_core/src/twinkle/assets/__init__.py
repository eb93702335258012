"""Files shipped with twinkle-core: the tiny Qwen2-style tokenizer/config and small data sets.

``twinkle/assets/tiny-qwen2``: a byte-level BPE tokenizer (about 3k tokens, any UTF-8),
a ChatML chat template with ``{% generation %}`` markers, and a ``config.json`` for a
tiny ``Qwen2ForCausalLM`` without weights (models build seeded random weights from it).
``twinkle/assets/datasets``: ``self_cognition.jsonl``, ``alpaca_tiny.jsonl``,
``sharegpt_tiny.jsonl``, ``gsm8k_tiny.jsonl``, ``math_tiny.jsonl``, ``dpo_tiny.jsonl``.

Both are rebuilt by ``scripts/build_tiny_tokenizer.py`` and ``scripts/build_tiny_datasets.py``.

Example::

    from twinkle import assets
    Dataset(dataset_meta=DatasetMeta(str(assets.path("datasets/self_cognition.jsonl"))))
    dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The absolute path of a bundled asset.

    Args:
        name: a path relative to the assets folder, e.g. ``'tiny-qwen2'`` or
            ``'datasets/gsm8k_tiny.jsonl'``.

    Returns:
        The path (it exists).

    Raises:
        FileNotFoundError: no such asset; the message lists what is bundled.

    Example::

        assets.path("tiny-qwen2")  # .../twinkle/assets/tiny-qwen2
    """
    target = (_ROOT / name).resolve()
    if _ROOT not in target.parents and target != _ROOT or not target.exists():
        bundled = sorted(
            str(p.relative_to(_ROOT))
            for p in _ROOT.rglob("*")
            if p.name != "__init__.py" and "__pycache__" not in p.parts
        )
        raise FileNotFoundError(f"no bundled asset {name!r}; twinkle ships: {', '.join(bundled)}")
    return target
