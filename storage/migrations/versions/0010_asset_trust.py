"""asset trust: image filter flags and releases, watermark payloads, content credentials, queue wait

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 10:00:00

``assets.flagged``: what the image filter decided (true: flagged, false: passed, null: not checked, which every
earlier asset gets); ``assets.flags``: the detector's findings as JSON (detector, concepts, scores);
``assets.released_by`` / ``released_at``: the admin who released a flagged asset for export and the API.
``assets.watermark``: the invisible watermark's payload in the delivered file, as hex (indexed: ``adforge verify``
looks files up by it); null: no mark. ``assets.credentials``: the C2PA manifest's label when the file carries a
signed manifest; null: unsigned. ``assets.queue_seconds``: the time from the run's start to this image's render.
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flagged', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('flags', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('released_by', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('released_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('watermark', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('credentials', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('queue_seconds', sa.Float(), nullable=True))
        batch_op.create_index('ix_assets_watermark', ['watermark'])
        batch_op.create_index('ix_assets_flagged', ['flagged'])


def downgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_index('ix_assets_flagged')
        batch_op.drop_index('ix_assets_watermark')
        for column in ('queue_seconds', 'credentials', 'watermark', 'released_at', 'released_by', 'flags', 'flagged'):
            batch_op.drop_column(column)
