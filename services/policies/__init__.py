"""Policy registry (base model + LoRA adapter, lineage, status) and the state -> prompt builder."""
