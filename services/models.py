"""Imports every table module so that `Base.metadata` is complete (for Alembic)."""

from services.audit import models as audit
from services.conversations import models as conversations
from services.db import Base
from services.experiments import models as experiments
from services.iterations import models as iterations
from services.policies import models as policies
from services.tenants import models as tenants

metadata = Base.metadata

__all__ = ["audit", "conversations", "experiments", "iterations", "metadata", "policies", "tenants"]
