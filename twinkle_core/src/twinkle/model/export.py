"""Export a trained model as a plain Hugging Face checkpoint, and push checkpoints to a hub.

``model.export(path)`` (``TransformersModel.export``) / ``twinkle export``:

* a LoRA adapter with ``merge=True`` (default): ``W + scaling * B @ A`` folded into every
  adapted base weight (computed in float64, then cast), LoRA keys dropped, peft's
  ``base_layer`` / ``modules_to_save`` names mapped back to the transformers names. The result
  is ``config.json`` + ``model.safetensors`` (sharded with an index above ``max_shard_size``)
  + tokenizer: ``AutoModelForCausalLM.from_pretrained(path)`` and vLLM load it as they load
  any HF checkpoint. The live model is not changed (training can go on).
* ``merge=False``: the adapter alone in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``), cast to ``dtype``.
* full-parameter training: the weights, cast to ``dtype``.

``push_to_hub(path, "hf://org/name")`` / ``"ms://org/name"`` uploads a directory (an export
or a ``model.save`` checkpoint) with ``huggingface_hub.HfApi.upload_folder`` or
``modelscope.hub.api.HubApi.upload_folder``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinkle.model.files import untie

if TYPE_CHECKING:  # pragma: no cover
    from twinkle.model.transformers_model import TransformersModel

DTYPES = ("bfloat16", "float16", "float32")
_PEFT_PREFIX = "base_model.model."
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


class ExportError(ValueError):
    """An export that cannot be done as asked, with the reason and what to do instead."""


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ExportError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


def merged_state_dict(peft_model: Any, state_dict: dict[str, Any], adapter_name: str, dtype: Any) -> dict[str, Any]:
    """The transformers state dict of ``peft_model``'s base with ``adapter_name`` merged in.

    Args:
        peft_model: the ``peft.PeftModel`` (for each LoRA layer's ``scaling`` and ``fan_in_fan_out``).
        state_dict: its full state dict (``base_model.model.`` names; gathered under FSDP).
        adapter_name: the adapter to merge; other adapters' weights are dropped.
        dtype: the dtype of the result.

    Raises:
        ExportError: a DoRA adapter (its magnitude vector does not fold into a plain weight here).
    """

    if any(f".lora_magnitude_vector.{adapter_name}" in key for key in state_dict):
        raise ExportError(
            f"adapter {adapter_name!r} uses DoRA, which this export does not merge; export it with merge=False"
        )
    out: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        if any(part in name for part in _LORA_PARTS):
            continue
        if ".modules_to_save." in name:
            marker = f".modules_to_save.{adapter_name}."
            if marker in name:
                overrides[name.replace(f".modules_to_save.{adapter_name}", "")] = value
            continue
        if ".original_module." in name:
            out[name.replace(".original_module", "")] = value
            continue
        if ".base_layer." not in name:
            out[name] = value
            continue
        module = name[: name.index(".base_layer.")]
        plain = name.replace(".base_layer", "")
        merged = _merge_lora(peft_model, state_dict, key, module, adapter_name, value, name.endswith(".weight"))
        out[plain] = merged if merged is not None else value
    out.update(overrides)
    return {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}


def _merge_lora(
    peft_model: Any, state_dict: dict[str, Any], key: str, module: str, adapter: str, weight: Any, is_weight: bool
) -> Any:
    """``weight + scaling * delta`` of the LoRA layer at ``module`` for ``adapter``, or None when it has none."""
    import torch

    if not is_weight:
        return None
    stem = key[: key.index(".base_layer.")]
    a, b = state_dict.get(f"{stem}.lora_A.{adapter}.weight"), state_dict.get(f"{stem}.lora_B.{adapter}.weight")
    embedding = False
    if a is None or b is None:
        a = state_dict.get(f"{stem}.lora_embedding_A.{adapter}")
        b = state_dict.get(f"{stem}.lora_embedding_B.{adapter}")
        embedding = True
    if a is None or b is None:
        return None
    layer = peft_model.base_model.model.get_submodule(module)
    scaling = float(layer.scaling[adapter])
    if a.dim() != 2 or b.dim() != 2:
        raise ExportError(f"{module}: only linear and embedding LoRA layers merge here, not {a.dim()}-d ones")
    delta = b.detach().to("cpu", torch.float64) @ a.detach().to("cpu", torch.float64)
    if embedding or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (weight.detach().to("cpu", torch.float64) + scaling * delta).to(weight.dtype)


def export_model(
    model: TransformersModel,
    output_dir: str | os.PathLike,
    *,
    dtype: Any = "bfloat16",
    merge: bool = True,
    adapter_name: str | None = None,
    save_tokenizer: bool = True,
    max_shard_size: str | int = "5GB",
    overwrite: bool = True,
) -> str:
    """Write ``model`` as a Hugging Face checkpoint (see the module docstring). Returns the path.

    Args:
        model: a TransformersModel (LoRA adapters or full-parameter).
        output_dir: the directory to create (replaced if it exists and ``overwrite``).
        dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``; also written to ``config.json``.
        merge: fold the adapter into the base (a plain model); False writes the adapter alone.
        adapter_name: which adapter (default: the current one).
        save_tokenizer: also write the tokenizer files.
        max_shard_size: shard the weights above this size (``"5GB"``, bytes).
        overwrite: replace an existing directory (otherwise raise).

    Raises:
        ExportError: an unknown dtype, an existing ``output_dir`` without ``overwrite``, a DoRA merge.
    """
    torch_dtype = _torch_dtype(dtype)
    target = Path(output_dir).resolve()
    if target.exists() and not overwrite:
        raise ExportError(f"export: {target} already exists; pass overwrite=True or choose a new directory")
    if target.exists() and not target.is_dir():
        raise ExportError(f"export: {target} exists and is a file; choose a directory path")
    state = model.state_of(adapter_name)
    is_adapter = model._peft is not None and state.name in getattr(model._peft, "peft_config", {})
    if is_adapter and not merge:
        return _export_adapter(model, state.name, target, torch_dtype, save_tokenizer)
    if is_adapter:
        weights = merged_state_dict(model._peft, model._gathered_state_dict(), state.name, torch_dtype)
    else:
        full = model._full_state_dict()
        weights = {k: v.to(dtype=torch_dtype) if v.is_floating_point() else v for k, v in full.items()}
    if model.rank != 0:
        model._barrier()
        return str(target)
    tmp = _tmp_dir(target)
    try:
        config = copy.deepcopy(model._hf_model().config)
        weights = _drop_tied_head(config, weights)
        config.save_pretrained(tmp)
        _set_config_dtype(tmp / "config.json", str(torch_dtype).replace("torch.", ""))
        generation = getattr(model._hf_model(), "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        _write_shards(tmp, weights, max_shard_size)
        if save_tokenizer:
            model._write_tokenizer(tmp)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model._barrier()
    return str(target)


def _export_adapter(model: TransformersModel, adapter: str, target: Path, dtype: Any, save_tokenizer: bool) -> str:
    from safetensors.torch import load_file, save_file

    path = Path(model.save(target, adapter_name=adapter, save_optimizer=False, save_tokenizer=save_tokenizer))
    if model.rank == 0:
        file = path / "adapter_model.safetensors"
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(weights, str(file), metadata={"format": "pt"})
    return str(path)


def _drop_tied_head(config: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """With tied embeddings, transformers stores the embedding only; keep it so unless the merge untied them."""
    import torch

    head, embed = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
        return weights
    if head.shape == embed.shape and torch.equal(head, embed):
        return {k: v for k, v in weights.items() if k != "lm_head.weight"}
    config.tie_word_embeddings = False  # a LoRA on one of them made them differ: store both
    return weights


def _set_config_dtype(path: Path, dtype: str) -> None:
    data = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
    for key in keys:
        data[key] = dtype
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_shards(directory: Path, weights: dict[str, Any], max_shard_size: str | int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from twinkle.progress import progress

    split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
    total = sum(v.numel() * v.element_size() for v in weights.values())
    with progress(total=total, desc="export", unit="B", unit_scale=True) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {name: weights[name].contiguous() for name in names}
            save_file(untie(shard), str(directory / filename), metadata={"format": "pt"})
            bar.update(sum(v.numel() * v.element_size() for v in shard.values()))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _tmp_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


# ---------------------------------------------------------------------------------- hubs
def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str = "Upload with twinkle",
    revision: str | None = None,
) -> Any:
    """Upload a checkpoint or adapter directory to Hugging Face (``hf://org/name``) or ModelScope
    (``ms://org/name``; a bare ``org/name`` means ModelScope, as for model ids).

    Creates the repository if needed (private by default). Returns the hub's commit info.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ImportError: the hub's client is missing (``pip install 'twinkle-core[hub]'``).
    """
    from twinkle.hub import split_hub_id

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"push_to_hub: {folder} is not a directory; export or save a checkpoint there first")
    hub, repo = split_hub_id(repo_id)
    if hub == "hf":
        try:
            from huggingface_hub import HfApi
        except ImportError as exc:
            raise ImportError("push_to_hub to hf:// needs huggingface_hub: pip install 'twinkle-core[hub]'") from exc
        api = HfApi(token=token)
        api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message=commit_message, revision=revision, repo_type="model"
        )
    try:
        from modelscope.hub.api import HubApi
    except ImportError as exc:
        raise ImportError("push_to_hub to ms:// needs modelscope: pip install 'twinkle-core[hub]'") from exc
    api = HubApi()
    if token:
        api.login(token)
    api.create_repo(repo, visibility="private" if private else "public", exist_ok=True, token=token)
    kwargs: dict[str, Any] = {"commit_message": commit_message}
    if revision:
        kwargs["revision"] = revision
    return api.upload_folder(repo_id=repo, folder_path=str(folder), **kwargs)


# ---------------------------------------------------------------------------------- CLI
def export_checkpoint(
    model_id: str,
    output_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: Any = "bfloat16",
    merge: bool = True,
    seed: int | None = None,
    push: str | None = None,
    token: str | None = None,
    private: bool = True,
) -> str:
    """``twinkle export``: load ``model_id`` (and the adapter checkpoint ``adapter``, a
    ``model.save`` directory), export it, optionally push it. Returns the exported path.

    ``seed`` matters only for a base without weight files (the bundled tiny model), which is
    initialized randomly from that seed: pass the training run's seed.
    """
    import twinkle
    from twinkle.model.transformers_model import TransformersModel

    runtime = twinkle.initialize(mode="local", seed=seed, trackers=[])
    try:
        model = TransformersModel(model_id=model_id)
        if adapter is not None:
            from peft import PeftConfig

            config = PeftConfig.from_pretrained(str(adapter))
            config.inference_mode = False
            model.add_adapter_to_model("default", config)
            model.load(adapter, adapter_name="default")
        path = model.export(output_dir, dtype=dtype, merge=merge)
    finally:
        runtime.shutdown()
    if push:
        push_to_hub(path, push, token=token, private=private)
    return path


def configure_parser(p: Any) -> None:
    """The ``twinkle export`` command's options (registered by core's ``twinkle_register_commands``)."""
    p.description = (
        "Load MODEL_ID and an adapter checkpoint (a model.save directory), merge, and write a checkpoint "
        "that plain transformers and vLLM load. --no-merge writes the adapter alone."
    )
    p.add_argument("--model-id", required=True, help="the base: a local directory, ms://org/name or hf://org/name")
    p.add_argument("--adapter", help="the adapter checkpoint directory (model.save output); omit for a full model")
    p.add_argument("--output", "-o", required=True, help="the directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weight dtype (default bfloat16)")
    p.add_argument("--no-merge", dest="merge", action="store_false", help="write the adapter alone (PEFT format)")
    p.add_argument("--seed", type=int, help="seed of a randomly initialized base (a config without weights)")
    p.add_argument("--push", metavar="REPO", help="then upload it: hf://org/name or ms://org/name")
    p.add_argument("--token", help="hub token (default: the hub client's login)")
    p.add_argument("--public", action="store_true", help="create the hub repository public (default private)")
    p.set_defaults(func=_export_command)


def _export_command(args: Any) -> int:
    import sys

    try:
        path = export_checkpoint(
            args.model_id,
            args.output,
            adapter=args.adapter,
            dtype=args.dtype,
            merge=args.merge,
            seed=args.seed,
            push=args.push,
            token=args.token,
            private=not args.public,
        )
    except (ExportError, FileNotFoundError, ImportError) as exc:
        print(f"twinkle export: {exc}", file=sys.stderr)
        return 1
    print(f"exported {path}" + (f" and pushed it to {args.push}" if args.push else ""))
    return 0
