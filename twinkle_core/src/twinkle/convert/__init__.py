"""Checkpoint converters: families whose checkpoints need remote code load into a transformers model.

A ``converter`` component reads a checkpoint written in its family's original layout (InternLM2's
fused ``wqkv``, ChatGLM's ``query_key_value``) and maps it onto a transformers-native model
(Llama, ``glm``) at load time, so no ``trust_remote_code`` is needed; it also writes the original
layout back (``TransformersModel.save(dir, original_layout=True)``). ``TransformersModel`` asks
the registered converters about every checkpoint it loads (:func:`find_converter`); a plugin
adds a family with ``register("converter", "MyFamily", "pkg.mod:MyConverter")``.
"""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "converter": {
        "InternLM2Converter": "twinkle.convert.internlm2:InternLM2Converter",
        "ChatGLMConverter": "twinkle.convert.chatglm:ChatGLMConverter",
        "DeepseekVLHybridConverter": "twinkle.convert.deepseek_vl:DeepseekVLHybridConverter",
        "DeepseekVLConverter": "twinkle.convert.deepseek_vl:DeepseekVLConverter",
    },
}

_EXPORTS = {
    "ConversionError": "twinkle.convert.base:ConversionError",
    "find_converter": "twinkle.convert.base:find_converter",
    "load_converted": "twinkle.convert.base:load_converted",
    "save_original": "twinkle.convert.base:save_original",
    "read_state_dict": "twinkle.convert.base:read_state_dict",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.convert.base import CheckpointConverter as CheckpointConverter
    from twinkle.convert.base import ConversionError as ConversionError
    from twinkle.convert.base import find_converter as find_converter
    from twinkle.convert.base import load_converted as load_converted
    from twinkle.convert.base import read_state_dict as read_state_dict
    from twinkle.convert.base import save_original as save_original
    from twinkle.convert.chatglm import ChatGLMConverter as ChatGLMConverter
    from twinkle.convert.deepseek_vl import DeepseekVLConverter as DeepseekVLConverter
    from twinkle.convert.deepseek_vl import DeepseekVLHybridConverter as DeepseekVLHybridConverter
    from twinkle.convert.internlm2 import InternLM2Converter as InternLM2Converter
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
