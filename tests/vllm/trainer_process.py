"""The trainer side of test_weight_sync.test_distributed_sync_from_another_process (run as a subprocess).

argv: port, output dir, model dir. Sends perturbed full weights, then a random LoRA adapter named
"remote", over DistributedCheckpointEngine (rank 0, 256 KiB buckets), and writes what it sent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from twinkle_vllm.distributed import DistributedCheckpointEngine


def main(port: int, out: Path, model_dir: str) -> None:
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name:
                param.add_(torch.randn_like(param) * 0.05)
    engine = DistributedCheckpointEngine(f"tcp://127.0.0.1:{port}", rank=0, world_size=2, bucket_bytes=256 << 10)
    full = engine.sync(model, None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, out / "full.safetensors"
    )
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="remote")
    lora = engine.sync(peft_model, None, adapter_name="remote")
    peft_model.save_pretrained(out / "adapter", selected_adapters=["remote"])
    saved = out / "adapter" / "remote"  # peft nests non-default adapters in a subdirectory
    if saved.is_dir():
        for item in saved.iterdir():
            item.rename(out / "adapter" / item.name)
    (out / "metrics.json").write_text(json.dumps({"full": full, "lora": lora}))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
