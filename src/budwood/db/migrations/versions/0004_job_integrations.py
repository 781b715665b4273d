"""fine-tuning service: jobs' integrations (OpenAI's `integrations`: the W&B run a job logs its metrics to)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('ft_jobs', sa.Column('integrations', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('ft_jobs', 'integrations')
