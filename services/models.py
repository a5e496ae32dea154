"""Imports every table module so that `Base.metadata` is complete (for Alembic)."""

from services.conversations import models as conversations
from services.db import Base
from services.tenants import models as tenants

metadata = Base.metadata

__all__ = ["conversations", "metadata", "tenants"]
