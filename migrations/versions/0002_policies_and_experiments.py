"""policies and experiments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "experiments",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "exploration",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'stopped')", name=op.f("ck_experiments_status")),
        sa.CheckConstraint(
            "unit IN ('conversation', 'business')", name=op.f("ck_experiments_unit")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
    )
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.create_index(
            "uq_experiments_running_scope",
            ["scope"],
            unique=True,
            postgresql_where=sa.text("status = 'running'"),
            sqlite_where=sa.text("status = 'running'"),
        )

    op.create_table(
        "policies",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("adapter_uri", sa.String(length=1000), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("iteration_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "config",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('candidate', 'approved', 'serving', 'retired', 'rejected')",
            name=op.f("ck_policies_status"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["policies.id"],
            name=op.f("fk_policies_parent_id_policies"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
    )
    op.create_table(
        "arms",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("experiment_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.CheckConstraint("weight >= 0", name=op.f("ck_arms_weight")),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_arms_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
            name=op.f("fk_arms_policy_id_policies"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_arms")),
        sa.UniqueConstraint("experiment_id", "name", name=op.f("uq_arms_experiment_id_name")),
    )
    with op.batch_alter_table("arms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_arms_experiment_id"), ["experiment_id"], unique=False)

    op.create_table(
        "assignments",
        sa.Column("experiment_id", sa.String(length=32), nullable=False),
        sa.Column("unit_id", sa.String(length=64), nullable=False),
        sa.Column("arm_id", sa.String(length=32), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["arm_id"], ["arms.id"], name=op.f("fk_assignments_arm_id_arms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_assignments_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("experiment_id", "unit_id", name=op.f("pk_assignments")),
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("arm_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_conversations_arm_id"), ["arm_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_conversations_arm_id_arms"),
            "arms",
            ["arm_id"],
            ["id"],
            ondelete="RESTRICT",
        )


def downgrade() -> None:

    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_conversations_arm_id_arms"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_conversations_arm_id"))
        batch_op.drop_column("arm_id")

    op.drop_table("assignments")
    with op.batch_alter_table("arms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_arms_experiment_id"))

    op.drop_table("arms")
    op.drop_table("policies")
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_experiments_running_scope",
            postgresql_where=sa.text("status = 'running'"),
            sqlite_where=sa.text("status = 'running'"),
        )

    op.drop_table("experiments")
