"""Alembic migrations (shipped inside the package so `outcomeloop db upgrade` finds them)."""
