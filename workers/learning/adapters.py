"""LoRA adapters on the one base model: the zero-initialised pi_0 adapter, and helpers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Shape of every adapter in a lineage (stacking updates needs one shape)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)

    def to_peft(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def create_zero_adapter(
    base_model_path: str | Path, output_dir: str | Path, spec: LoraSpec | None = None
) -> Path:
    """Write a LoRA adapter whose B matrices are zero: the policy equals the base model.

    pi_0 is served through such an adapter so that every arm, the control included, is an
    adapter on one base (the vLLM CPU server mixes up adapter and no-adapter requests).
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    spec = spec or LoraSpec()
    output = Path(output_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    model = get_peft_model(base, spec.to_peft())
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(parameter) == 0, f"{name} is not zero-initialised"
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    return output


def perturb_adapter(
    adapter_dir: str | Path, output_dir: str | Path, *, scale: float, seed: int
) -> Path:
    """A copy of an adapter with random noise added to its B matrices (tests, exploration)."""
    import torch
    from safetensors.torch import load_file, save_file

    source, output = Path(adapter_dir), Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(source / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if "lora_B" in name:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * scale
            weights[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(weights, str(output / "adapter_model.safetensors"))
    (output / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return output
