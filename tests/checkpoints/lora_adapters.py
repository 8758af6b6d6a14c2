"""Real LoRA adapter folders for the tests: peft adapters over a tiny base, with random B matrices."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers


def save_random_lora(base_dir: Path, folder: Path, r: int, alpha: int, targets: list[str], seed: int) -> Path:
    """A peft LoRA adapter of `base_dir` saved in `folder`, its config naming the base by path."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the merge a no-op
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    return folder
