"""Generation backends behind one interface: embedded (transformers + peft) and vLLM (HTTP)."""
