"""fine-tuning service: files' expires_at, jobs' assistant tokens and model deletion, checkpoint permissions,
uploads and their parts (OpenAI's Uploads API)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('ft_files', sa.Column('expires_at', sa.Float(), nullable=True))
    op.add_column('ft_jobs', sa.Column('trained_assistant_tokens', sa.BigInteger(), nullable=True))
    op.add_column('ft_jobs', sa.Column('model_deleted_at', sa.Float(), nullable=True))
    op.create_table('ft_checkpoint_permissions',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['ft_jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('job_id', 'step', 'project_id', name='uq_checkpoint_permission')
    )
    op.create_index('ix_ft_checkpoint_permissions_job_id', 'ft_checkpoint_permissions', ['job_id'])
    op.create_index('ix_ft_checkpoint_permissions_project_id', 'ft_checkpoint_permissions', ['project_id'])
    op.create_table('ft_uploads',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('mime_type', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('file_id', sa.String(length=64), nullable=True),
    sa.Column('file_expires_after', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['tenant'], ['tenants.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_ft_uploads_tenant', 'ft_uploads', ['tenant'])
    op.create_table('ft_upload_parts',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('upload_id', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['upload_id'], ['ft_uploads.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_ft_upload_parts_upload_id', 'ft_upload_parts', ['upload_id'])


def downgrade() -> None:
    for table in ('ft_upload_parts', 'ft_uploads', 'ft_checkpoint_permissions'):
        op.drop_table(table)
    op.drop_column('ft_jobs', 'model_deleted_at')
    op.drop_column('ft_jobs', 'trained_assistant_tokens')
    op.drop_column('ft_files', 'expires_at')
