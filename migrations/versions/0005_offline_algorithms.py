"""iterations may run DMPO and DPO

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "algorithm IN ('ppo', 'rloo', 'grpo')"
NEW = "algorithm IN ('ppo', 'rloo', 'grpo', 'dmpo', 'dpo')"


def _replace(condition: str) -> None:
    # batch mode: SQLite rebuilds the table to change a CHECK constraint
    with op.batch_alter_table("iterations", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_iterations_algorithm"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_iterations_algorithm"), condition)


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    # the old constraint cannot hold DMPO and DPO iterations: they go, with their steps/events
    offline = "SELECT id FROM iterations WHERE algorithm IN ('dmpo', 'dpo')"
    for table in ("iteration_events", "iteration_steps"):
        op.execute(f"DELETE FROM {table} WHERE iteration_id IN ({offline})")
    op.execute("DELETE FROM iterations WHERE algorithm IN ('dmpo', 'dpo')")
    _replace(OLD)
