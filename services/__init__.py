"""outcomeloop: everything the API process runs (it never imports torch at module level)."""
