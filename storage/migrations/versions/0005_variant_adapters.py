"""variant adapters

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:00:00

``variants.adapters``: the LoRAs (with strengths) and textual-inversion embeddings a variant renders with, each
pinned by its file's sha256, as canonical JSON ("" = none, which every earlier variant gets).
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no batch copy of the table): SQLite and PostgreSQL both add a NOT NULL column with a
    # constant default in place, and offline SQL (``alembic upgrade --sql``) needs no live table to reflect.
    op.add_column('variants', sa.Column('adapters', sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table('variants', schema=None) as batch_op:
        batch_op.drop_column('adapters')
