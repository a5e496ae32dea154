"""Policy iterations: the operator jobs API and the step state machine (returns -> Q -> improve)."""
