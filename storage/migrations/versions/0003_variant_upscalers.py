"""upscale chains: which upscaler models each variant's chain uses

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:00:00.000000

A variant's chain itself is its ``postprocess`` text (canonical, model files pinned by sha256); this table links
the variant to the ``models`` rows of those files (kind ``upscaler``), in chain order, so an auditor can go from an
upscaler and its licence to every asset it touched with one join.
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('variant_upscalers',
    sa.Column('variant_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_variant_upscalers_model_id_models')),
    sa.ForeignKeyConstraint(['variant_id'], ['variants.id'], name=op.f('fk_variant_upscalers_variant_id_variants')),
    sa.PrimaryKeyConstraint('variant_id', 'position', name=op.f('pk_variant_upscalers'))
    )
    with op.batch_alter_table('variant_upscalers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_variant_upscalers_model_id'), ['model_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('variant_upscalers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_variant_upscalers_model_id'))

    op.drop_table('variant_upscalers')
