"""review gallery: users, review states, settings, re-render queue, exports, A/B results

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 07:32:27.187471

The gallery's tables (models in ``storage/review_schema.py``). Review *history* is not here: every review action
is an ``audit_log`` entry (append-only since 0001); ``review_states`` holds only the latest decision per variant.
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('exports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=False),
    sa.Column('approved_only', sa.Boolean(), nullable=False),
    sa.Column('file_count', sa.Integer(), nullable=False),
    sa.Column('zip_sha256', sa.String(length=64), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_exports_campaign_id_campaigns')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_exports'))
    )
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exports_campaign_id'), ['campaign_id'], unique=False)

    op.create_table('review_settings',
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('approvals_needed', sa.Integer(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_review_settings_campaign_id_campaigns')),
    sa.PrimaryKeyConstraint('campaign_id', name=op.f('pk_review_settings'))
    )
    op.create_table('rerender_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('variant_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('requested_by', sa.String(length=255), nullable=False),
    sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('result_variant_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['result_variant_id'], ['variants.id'], name=op.f('fk_rerender_queue_result_variant_id_variants')),
    sa.ForeignKeyConstraint(['variant_id'], ['variants.id'], name=op.f('fk_rerender_queue_variant_id_variants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rerender_queue'))
    )
    with op.batch_alter_table('rerender_queue', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rerender_queue_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_rerender_queue_variant_id'), ['variant_id'], unique=False)

    op.create_table('review_states',
    sa.Column('variant_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('starred', sa.Boolean(), nullable=False),
    sa.Column('ab_group', sa.String(length=16), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['variant_id'], ['variants.id'], name=op.f('fk_review_states_variant_id_variants')),
    sa.PrimaryKeyConstraint('variant_id', name=op.f('pk_review_states'))
    )
    with op.batch_alter_table('review_states', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_review_states_status'), ['status'], unique=False)

    op.create_table('ab_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('asset_id', sa.Integer(), nullable=False),
    sa.Column('impressions', sa.BigInteger(), nullable=False),
    sa.Column('clicks', sa.BigInteger(), nullable=False),
    sa.Column('conversions', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('imported_by', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['asset_id'], ['assets.id'], name=op.f('fk_ab_results_asset_id_assets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ab_results')),
    sa.UniqueConstraint('asset_id', name=op.f('uq_ab_results_asset_id'))
    )


def downgrade() -> None:
    op.drop_table('ab_results')
    with op.batch_alter_table('review_states', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_review_states_status'))

    op.drop_table('review_states')
    with op.batch_alter_table('rerender_queue', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rerender_queue_variant_id'))
        batch_op.drop_index(batch_op.f('ix_rerender_queue_status'))

    op.drop_table('rerender_queue')
    op.drop_table('review_settings')
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exports_campaign_id'))

    op.drop_table('exports')
    op.drop_table('users')
