"""brand overlays

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 01:20:00

``variants.overlay``: the brand kit (by name and content sha256) and the copy (headline, body, CTA) a variant's
delivered file carries, as canonical JSON ("" = none, which every earlier variant gets).
``assets.clean_key``: where the same picture without the overlay is stored; ``assets.overlay``: what was drawn
where (boxes, fitted sizes, colours, measured contrast, scrims), as JSON. Both None for an asset without a brand.
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('variants', sa.Column('overlay', sa.Text(), nullable=False, server_default=sa.text("''")))
    op.add_column('assets', sa.Column('clean_key', sa.Text(), nullable=True))
    op.add_column('assets', sa.Column('overlay', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_column('overlay')
        batch_op.drop_column('clean_key')
    with op.batch_alter_table('variants', schema=None) as batch_op:
        batch_op.drop_column('overlay')
