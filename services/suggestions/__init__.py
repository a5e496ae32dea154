"""The main job: suggest the business's next message from the conversation's A/B arm."""
