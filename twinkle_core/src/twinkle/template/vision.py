"""Images in conversations: :class:`VisionTemplate` encodes them with the model's own processor.

A row holds images in one of two ways (both may be mixed in a data set):

* ``{"messages": [{"role": "user", "content": "<image>What colour is the square?"}, ...],
  "images": [image, ...]}``: each ``<image>`` in a message's text takes the next image; images
  without a placeholder go in front of the first user message;
* content parts: ``{"role": "user", "content": [{"type": "image", "image": image},
  {"type": "text", "text": "What colour?"}]}`` (also ``{"type": "image_url", "image_url":
  {"url": ...}}``).

An image is a local file path (or ``file://`` URI), a ``PIL.Image``, an ``H x W x C`` uint8
array, raw encoded bytes, or a ``{"path": ..., "bytes": ...}`` dict (how ``datasets`` stores
images). ``http(s)://`` URLs are refused with :class:`ImageLoadError`: training reads no network;
download the images first and point the rows at the files.

:class:`VisionTemplate` renders the conversation with the tokenizer's chat template (labels as
:class:`~twinkle.template.Template`) with one image token per image, runs the family's image
processor (``pixel_values``, ``image_grid_thw``), and expands each image token to as many as
the processor says (``processor.replace_image_token``), so ``input_ids`` equal what the model's
processor makes from the same text and images. The encoded row carries the processor's image
fields and ``mm_token_type_ids`` (1 on image tokens); the
:class:`~twinkle.processor.InputProcessor` concatenates them per batch.

Example::

    template = VisionTemplate(model_dir)  # a Qwen2.5-VL / Qwen3-VL / GLM-4V / DeepSeek-VL directory
    row = template.encode({"messages": [{"role": "user", "content": "<image>colour?"},
                                        {"role": "assistant", "content": "red"}],
                           "images": ["square.png"]})
    row["pixel_values"].shape, row["image_grid_thw"]
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

from twinkle.data_format.features import IGNORE_INDEX, InputFeature
from twinkle.processor.base import VISION_FIELDS
from twinkle.template.base import Template, TemplateError

#: The placeholder users write in message text.
IMAGE_PLACEHOLDER = "<image>"


class ImageLoadError(TemplateError):
    """An image in a row that cannot be read (a URL offline, a missing file, an unknown type)."""


@dataclass(frozen=True)
class VisionFamily:
    """How one family marks an image in text and which transformers classes process it.

    Attributes:
        model_type: the transformers ``model_type``.
        image_text: what one image becomes in the rendered text before expansion.
        image_token: the token the processor repeats per image patch group.
        special_tokens: every token the family's tokenizer must have.
        processor: the transformers processor class name.
        image_processor: the PIL-backend image processor class name (no torchvision needed).
        processor_kwargs: config fields passed to the processor (``num_image_tokens``).
        token_types: the model takes ``mm_token_type_ids`` (its multimodal RoPE needs them).
    """

    model_type: str
    image_text: str
    image_token: str
    special_tokens: tuple[str, ...]
    processor: str
    image_processor: str
    processor_kwargs: tuple[str, ...] = ()
    token_types: bool = True


_QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_GLM4V_TOKENS = (
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)
FAMILIES: dict[str, VisionFamily] = {
    "qwen2_vl": VisionFamily(
        "qwen2_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|image_pad|>",
        _QWEN_TOKENS,
        "Qwen2VLProcessor",
        "Qwen2VLImageProcessorPil",
    ),
    "qwen2_5_vl": VisionFamily(
        "qwen2_5_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|image_pad|>",
        _QWEN_TOKENS,
        "Qwen2_5_VLProcessor",
        "Qwen2VLImageProcessorPil",
    ),
    "qwen3_vl": VisionFamily(
        "qwen3_vl",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|image_pad|>",
        _QWEN_TOKENS,
        "Qwen3VLProcessor",
        "Qwen2VLImageProcessorPil",
    ),
    "glm4v": VisionFamily(
        "glm4v",
        "<|begin_of_image|><|image|><|end_of_image|>",
        "<|image|>",
        _GLM4V_TOKENS,
        "Glm4vProcessor",
        "Glm4vImageProcessorPil",
    ),
    "deepseek_vl": VisionFamily(
        "deepseek_vl",
        "<image_placeholder>",
        "<image_placeholder>",
        ("<image_placeholder>",),
        "DeepseekVLProcessor",
        "DeepseekVLImageProcessorPil",
        ("num_image_tokens",),
        False,
    ),
    "deepseek_vl_hybrid": VisionFamily(
        "deepseek_vl_hybrid",
        "<image_placeholder>",
        "<image_placeholder>",
        ("<image_placeholder>",),
        "DeepseekVLHybridProcessor",
        "DeepseekVLHybridImageProcessorPil",
        ("num_image_tokens",),
        False,
    ),
}


def vision_family(model_type: str) -> VisionFamily:
    """The :class:`VisionFamily` of a transformers ``model_type``.

    Raises:
        TemplateError: a model type without a vision path (the message lists the supported ones).
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise TemplateError(
            f"no vision path for model_type {model_type!r}; VisionTemplate supports {', '.join(FAMILIES)}. "
            f"Text-only models use Template."
        ) from None


# ---------------------------------------------------------------------------- images
def load_image(image: Any, *, where: str = "image") -> Any:
    """An RGB ``PIL.Image`` from a path, ``file://`` URI, bytes, array, PIL image or ``{"path"/"bytes"}`` dict.

    Raises:
        ImageLoadError: an ``http(s)://`` URL (offline: download it first and give the local
            path), a missing file, or a value of another type.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, dict):
        if image.get("bytes"):
            return load_image(image["bytes"], where=where)
        if image.get("path"):
            return load_image(image["path"], where=where)
        if image.get("url"):
            return load_image(image["url"], where=where)
        raise ImageLoadError(f"{where}: a dict image needs 'path' or 'bytes' (keys: {sorted(image)})")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        lowered = text.lower()
        if lowered.startswith(("http://", "https://", "ftp://")):
            raise ImageLoadError(
                f"{where} is a URL ({text[:120]}); twinkle does not download while encoding (training runs "
                f"offline). Download the images first (e.g. `huggingface-cli download` / `wget` into a folder) "
                f"and put the local file paths in the rows' 'images'."
            )
        if lowered.startswith("data:"):
            raise ImageLoadError(f"{where}: data: URIs are not read; decode them to bytes or files first")
        path = text[len("file://") :] if lowered.startswith("file://") else text
        if not os.path.isfile(path):
            raise ImageLoadError(f"{where}: no image file {path!r}; check the path (relative to {os.getcwd()!r})")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    if hasattr(image, "__array__") or isinstance(image, (list, tuple)):
        import numpy as np

        array = np.asarray(image)
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ImageLoadError(f"{where}: an image array must be H x W x C (C = 1, 3 or 4), got {array.shape}")
        if array.dtype != np.uint8:
            if array.size and float(array.max()) <= 1.0:
                array = array * 255.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        return Image.fromarray(array).convert("RGB")
    raise ImageLoadError(
        f"{where}: cannot read an image from {type(image).__name__}; give a file path, a PIL.Image, "
        f"an H x W x C array, bytes or {{'path': ...}}"
    )


def split_images(trajectory: dict[str, Any], index: int | None = None) -> tuple[dict[str, Any], list[Any]]:
    """The trajectory with every image as ``<image>`` in plain-text messages, and its images in order.

    Content-part lists become text (images as ``<image>``); a row's ``images`` fill the
    ``<image>`` placeholders in order; images without a placeholder go in front of the first user
    message.

    Raises:
        TemplateError: more placeholders than images.
    """
    images: list[Any] = list(trajectory.get("images") or [])
    messages = []
    part_images: list[tuple[int, Any]] = []  # (placeholder number, image) for images given as parts
    count = 0
    for message in trajectory.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text") or "")
                elif kind in ("image", "image_url"):
                    value = part.get("image") if kind == "image" else part.get("image_url")
                    if isinstance(value, dict) and "url" in value:
                        value = value["url"]
                    if value is None:
                        value = part.get("path") or part.get("url")
                    part_images.append((count, value))
                    count += 1
                    texts.append(IMAGE_PLACEHOLDER)
                else:
                    raise TemplateError(f"a content part of type {kind!r}; use 'text', 'image' or 'image_url'", index)
            message = {**message, "content": "".join(texts)}
        elif isinstance(content, str):
            count += content.count(IMAGE_PLACEHOLDER)
        messages.append(message)
    if part_images:  # interleave: part images at their places, row images fill the rest in order
        ordered: list[Any] = []
        row_images = iter(images)
        by_number = dict(part_images)
        for number in range(count):
            if number in by_number:
                ordered.append(by_number[number])
            else:
                ordered.append(next(row_images, None))
        if any(image is None for image in ordered):
            raise TemplateError(f"{count} <image> placeholders but fewer images", index)
        ordered.extend(row_images)
        images = ordered
    if count > len(images):
        raise TemplateError(
            f"{count} '{IMAGE_PLACEHOLDER}' placeholders but {len(images)} images in the row's 'images'", index
        )
    if len(images) > count:  # images without a placeholder: in front of the first user message
        extra = IMAGE_PLACEHOLDER * (len(images) - count)
        for k, message in enumerate(messages):
            if message.get("role") == "user":
                messages[k] = {**message, "content": extra + (message.get("content") or "")}
                break
        else:
            raise TemplateError(f"{len(images)} images but no user message to put them in", index)
    return {**trajectory, "messages": messages}, images


# ---------------------------------------------------------------------------- the template
class VisionTemplate(Template):
    """A :class:`Template` for vision-language models: images in rows -> tokens + pixel values.

    Args:
        model_id: a model directory (``config.json`` names the family; the tokenizer and
            ``preprocessor_config.json`` build the processor), or ``ms://`` / ``hf://`` ids.
        max_length, truncation_strategy, default_system: as :class:`Template`. Truncation
            never cuts through an image: a row whose cut would is refused (``'left'``/``'right'``)
            or dropped (``'delete'``).
        processor: an already built transformers processor (with ``image_processor``,
            ``tokenizer`` and ``replace_image_token``) instead of building the family's one.
        model_type: the family when ``model_id`` has no ``config.json`` (with ``processor``).
        **tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained``.

    The processor is built offline from the directory: the family's PIL image processor from
    ``preprocessor_config.json`` and its processor class around the tokenizer (no video
    processor, so torchvision is not needed).

    Example::

        template = VisionTemplate(model_dir, max_length=1024)
        dataset.set_template(template)
    """

    def __init__(
        self,
        model_id: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str = "raise",
        default_system: str | None = None,
        *,
        processor: Any = None,
        model_type: str | None = None,
        tokenizer: Any = None,
        **tokenizer_kwargs: Any,
    ) -> None:
        if processor is not None and tokenizer is None:
            tokenizer = processor.tokenizer
        super().__init__(
            model_id, max_length, truncation_strategy, default_system, tokenizer=tokenizer, **tokenizer_kwargs
        )
        self._processor = processor
        self._model_type = model_type
        self._family: VisionFamily | None = None
        self._model_dir: str | None = None

    # -- the processor -------------------------------------------------------
    def _dir(self) -> str | None:
        if self._model_dir is None and self.model_id is not None:
            from twinkle.hub import resolve_model_dir

            self._model_dir = resolve_model_dir(self.model_id)
        return self._model_dir

    @property
    def family(self) -> VisionFamily:
        """The model family's :class:`VisionFamily` (from ``config.json``'s ``model_type``)."""
        if self._family is None:
            model_type = self._model_type
            if model_type is None:
                import json

                directory = self._dir()
                config_path = os.path.join(directory or "", "config.json")
                if not os.path.isfile(config_path):
                    raise TemplateError(
                        f"VisionTemplate: {self.model_id!r} has no config.json; pass model_type='qwen2_5_vl' "
                        f"(or another of {', '.join(FAMILIES)}) with processor=..."
                    )
                with open(config_path) as f:
                    model_type = json.load(f).get("model_type")
            self._family = vision_family(str(model_type))
        return self._family

    @property
    def processor(self) -> Any:
        """The family's transformers processor (built from the model directory on first use)."""
        if self._processor is None:
            self._processor = self._build_processor()
        return self._processor

    def _build_processor(self) -> Any:
        import json

        import transformers

        family = self.family
        tokenizer = self.tokenizer
        missing = [
            t for t in family.special_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
        ]
        if missing:
            raise TemplateError(
                f"VisionTemplate: the tokenizer of {self.model_id!r} lacks the {family.model_type} image tokens "
                f"{missing}; use the model's own tokenizer (or add them: tokenizer.add_special_tokens(...))"
            )
        if family.image_token == "<image_placeholder>" and not getattr(tokenizer, "image_token", None):
            tokenizer.image_token = family.image_token  # DeepSeek-VL's processor reads it from the tokenizer
        directory = self._dir()
        image_processor_class = getattr(transformers, family.image_processor)
        if directory and os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
            image_processor = image_processor_class.from_pretrained(directory)
        else:
            image_processor = image_processor_class()
        kwargs: dict[str, Any] = {}
        if family.processor_kwargs and directory and os.path.isfile(os.path.join(directory, "config.json")):
            with open(os.path.join(directory, "config.json")) as f:
                config = json.load(f)
            if "num_image_tokens" in family.processor_kwargs:
                kwargs["num_image_tokens"] = _deepseek_image_tokens(config)
        processor_class = _without_video(getattr(transformers, family.processor))
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    # -- encoding ------------------------------------------------------------
    def _encode_untruncated(self, trajectories: Sequence[Any], add_generation_prompt: bool) -> list[InputFeature]:
        family = self.family
        rows: list[Any] = []
        images_per_row: list[list[Any]] = []
        for i, trajectory in enumerate(trajectories):
            if not isinstance(trajectory, dict):
                rows.append(trajectory)  # the base class says what is wrong
                images_per_row.append([])
                continue
            row, images = split_images(trajectory, i)
            rows.append(_with_image_text(row, family.image_text))
            images_per_row.append(
                [load_image(image, where=f"trajectory {i}: images[{k}]") for k, image in enumerate(images)]
            )
        features = super()._encode_untruncated(rows, add_generation_prompt)
        for i, (feature, images) in enumerate(zip(features, images_per_row)):
            self._add_images(feature, images, i)
        return features

    def _add_images(self, feature: InputFeature, images: list[Any], index: int) -> None:
        processor = self.processor
        tokenizer = self.tokenizer
        image_id = tokenizer.convert_tokens_to_ids(self.family.image_token)
        ids, labels = list(feature["input_ids"]), list(feature["labels"])
        positions = [t for t, token in enumerate(ids) if token == image_id]
        if len(positions) != len(images):
            raise TemplateError(
                f"{len(images)} images but {len(positions)} {self.family.image_token} tokens after rendering; "
                f"do not write {self.family.image_token} in message text (write {IMAGE_PLACEHOLDER})",
                index,
            )
        if not images:
            if self.family.token_types:
                feature["mm_token_type_ids"] = [0] * len(ids)  # type: ignore[typeddict-unknown-key]
            return
        image_inputs = processor.image_processor(images, return_tensors="np")
        new_ids: list[int] = []
        new_labels: list[int] = []
        start = 0
        for k, position in enumerate(positions):
            new_ids += ids[start:position]
            new_labels += labels[start:position]
            expansion = tokenizer.encode(processor.replace_image_token(image_inputs, k), add_special_tokens=False)
            new_ids += expansion
            new_labels += [IGNORE_INDEX] * len(expansion)
            start = position + 1
        new_ids += ids[start:]
        new_labels += labels[start:]
        feature["input_ids"] = new_ids
        feature["labels"] = new_labels
        feature["length"] = len(new_ids)
        if self.family.token_types:
            feature["mm_token_type_ids"] = [1 if t == image_id else 0 for t in new_ids]  # type: ignore[typeddict-unknown-key]
        for key in VISION_FIELDS:
            if key in image_inputs:
                feature[key] = image_inputs[key]  # type: ignore[literal-required]

    def _truncate(self, feature: InputFeature, index: int) -> None:
        limit = self.max_length
        if limit is None or feature["length"] <= limit or "pixel_values" not in feature:
            super()._truncate(feature, index)
            if "mm_token_type_ids" in feature and limit is not None and len(feature["mm_token_type_ids"]) > limit:
                cut = (
                    slice(len(feature["mm_token_type_ids"]) - limit, None)
                    if self.truncation_strategy == "left"
                    else slice(0, limit)
                )
                feature["mm_token_type_ids"] = feature["mm_token_type_ids"][cut]  # type: ignore[typeddict-item]
            return
        from twinkle.template.base import SequenceTooLongError

        raise SequenceTooLongError(
            f"{feature['length']} tokens (with its image tokens) is longer than max_length={limit}, and a cut "
            f"would split an image from its pixels. Raise max_length, use smaller images (the image processor's "
            f"max_pixels), or truncation_strategy='delete' (drop such rows).",
            int(feature["length"]),
            limit,
            index,
        )

    def __repr__(self) -> str:
        return f"VisionTemplate(model_id={self.model_id!r}, max_length={self.max_length})"


def _with_image_text(trajectory: dict[str, Any], image_text: str) -> dict[str, Any]:
    messages = []
    for message in trajectory["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            message = {**message, "content": content.replace(IMAGE_PLACEHOLDER, image_text)}
        messages.append(message)
    out = {**trajectory, "messages": messages}
    out.pop("images", None)
    return out


def _without_video(processor_class: Any) -> Any:
    """``processor_class`` accepting ``video_processor=None``: images only, so torchvision is not needed.

    transformers checks each processor attribute's class, and the video processor classes need
    torchvision; a ``None`` attribute skips that check (the processor's text and image paths
    never touch it).
    """
    if "video_processor" not in getattr(processor_class, "get_attributes", lambda: [])():
        return processor_class

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name == "video_processor":
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__module__": processor_class.__module__,
        },
    )


def _deepseek_image_tokens(config: dict[str, Any]) -> int:
    """DeepSeek-VL's image tokens per image: the SigLIP grid, ``(image_size / patch_size) ** 2``."""
    vision = config.get("vision_config") or {}
    image_size = int(vision.get("image_size", 384))
    patch_size = int(vision.get("patch_size", 16))
    return (image_size // patch_size) ** 2
