"""The conversation log: conversations, messages, suggestions, outcomes and how they ended."""
