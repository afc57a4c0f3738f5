"""variant inputs

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 22:30:00

``variants.inputs``: the images a brief hands the engine (product packshot, its mask and placement; ControlNet layout
and model), pinned by sha256, as canonical JSON ("" = none, which every earlier variant gets).
``assets.product_error`` / ``product_changed``: the mean difference of a delivered file's product pixels from the
packshot's, whether it is more than the file's encoder explains, and the product's outline as SVG path data (None:
no packshot).
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('variants', sa.Column('inputs', sa.Text(), nullable=False, server_default=sa.text("''")))
    op.add_column('assets', sa.Column('product_error', sa.Float(), nullable=True))
    op.add_column('assets', sa.Column('product_changed', sa.Boolean(), nullable=True))
    op.add_column('assets', sa.Column('product_outline', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_column('product_outline')
        batch_op.drop_column('product_changed')
        batch_op.drop_column('product_error')
    with op.batch_alter_table('variants', schema=None) as batch_op:
        batch_op.drop_column('inputs')
