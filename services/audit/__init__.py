"""The audit trail: every operator decision, who made it and when."""
