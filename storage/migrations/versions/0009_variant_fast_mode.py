"""variant fast mode

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 10:00:00

``variants.fast``: the opt-in fast mode a variant renders with (feature caching, token merging; engine.fast_modes),
as its canonical text ("cache:3", "cache:3,tome:0.5"); "" = exact, which every earlier variant gets.
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('variants', sa.Column('fast', sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table('variants', schema=None) as batch_op:
        batch_op.drop_column('fast')
