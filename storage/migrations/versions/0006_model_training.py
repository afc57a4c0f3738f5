"""model training records

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 19:40:00

``models.training``: the training record of a model file adforge trained itself (``adforge train lora``), as
canonical JSON; NULL for every file that was registered or discovered, which every earlier row is.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, as 0005: a nullable column is added in place on SQLite and PostgreSQL, and offline SQL
    # (``alembic upgrade --sql``) needs no live table to reflect.
    op.add_column('models', sa.Column('training', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('training')
