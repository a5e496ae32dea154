"""Pure learning code: no web framework, no database. Heavy imports stay inside functions."""
