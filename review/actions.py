"""Review actions: status, star, A/B group, re-render requests, a campaign's review settings.

Each action is one transaction that changes the state *and* appends its audit entry (who, what, when, before,
after), so there is never a decision without its record or a record without its decision. An action that changes
nothing (approving an approved variant) writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from review.queries import ReviewConfig, review_state_dict
from storage.database import Database, audit
from storage.review_schema import REVIEW_STATUSES, RerenderRequest, ReviewSettings, ReviewState
from storage.schema import Asset, BriefRowRecord, Campaign, PromptRecord, Variant, utcnow
from storage.variants import load_variants

__all__ = ["ActionError", "GROUPS", "ReviewChange", "SamplerNames", "apply_review", "queue_rerender", "set_review_settings"]

# Keys 1..9 in the gallery pick groups A..I: nine arms is already more than any A/B test has traffic for.
GROUPS = tuple("ABCDEFGHI")
_UNSET: Any = object()


class ActionError(ValueError):
    """A request that cannot be carried out as asked (the web layer answers 400 / 404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReviewChange:
    status: str | None = None  # None = leave as is
    starred: bool | None = None
    group: Any = _UNSET  # _UNSET = leave as is, None = no group, "A".."I"

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in REVIEW_STATUSES:
            raise ActionError(f"unknown status {self.status!r} (known: {', '.join(REVIEW_STATUSES)})")
        if self.group is not _UNSET and self.group is not None and self.group not in GROUPS:
            raise ActionError(f"unknown A/B group {self.group!r} (known: {', '.join(GROUPS)})")

    @property
    def empty(self) -> bool:
        return self.status is None and self.starred is None and self.group is _UNSET


def _state(state: ReviewState | None) -> dict[str, Any]:
    full = review_state_dict(state)
    return {"status": full["status"], "starred": full["starred"], "group": full["group"]}


def _action_name(before: dict[str, Any], after: dict[str, Any]) -> str:
    changed = [k for k in before if before[k] != after[k]]
    if len(changed) > 1:
        return "review.updated"
    what = changed[0]
    if what == "status":
        return {"approved": "review.approved", "rejected": "review.rejected", "pending": "review.reset"}[after["status"]]
    if what == "starred":
        return "review.starred" if after["starred"] else "review.unstarred"
    return "review.grouped" if after["group"] else "review.ungrouped"


def apply_review(db: Database, variant_id: int, change: ReviewChange, *, actor: str) -> tuple[dict[str, Any], bool]:
    """Apply ``change`` to a variant's review state; returns (the state after, whether anything changed)."""
    if change.empty:
        raise ActionError("nothing to change: give status, starred or group")
    with db.session() as s:
        variant = s.get(Variant, variant_id)
        if variant is None or s.scalar(select(Asset.id).where(Asset.variant_id == variant_id)) is None:
            raise ActionError(f"no reviewable variant {variant_id}", status=404)
        # Lock the state row on PostgreSQL, so two reviewers' changes to one variant apply one after the other
        # and each audit entry's "before" is what that change really replaced.
        state = s.scalar(select(ReviewState).where(ReviewState.variant_id == variant_id).with_for_update())
        before = _state(state)
        after = dict(before)
        if change.status is not None:
            after["status"] = change.status
        if change.starred is not None:
            after["starred"] = change.starred
        if change.group is not _UNSET:
            after["group"] = change.group
        if after == before:
            return before, False
        if state is None:
            state = ReviewState(variant_id=variant_id)
            s.add(state)
        state.status, state.starred, state.ab_group = after["status"], after["starred"], after["group"]
        state.updated_at, state.updated_by = utcnow(), actor
        row = s.get(BriefRowRecord, variant.row_id)
        audit(s, actor=actor, action=_action_name(before, after), entity="variant", entity_id=variant_id,
              before=before, after={**after, "campaign_id": row.campaign_id if row else None, "row_id": variant.row_id,
                                    "channel": variant.channel})
        return after, True


# ------------------------------------------------------------------------------------------------ re-render

_OVERRIDABLE = {"seed": int, "steps": int, "cfg_scale": float, "sampler": str}


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


class SamplerNames:
    """The samplers a re-render may ask for: each accepted spelling -> its display name. This package must not
    import the engine, so whoever builds the gallery hands them over (``adforge gallery`` takes them from
    ``engine.samplers``); a name is resolved to its display name when the request is queued, so a request the
    worker could not render never enters the queue. Case, spaces, ``_`` and ``-`` do not matter."""

    def __init__(self, names: Mapping[str, str]):
        self._lookup = {_fold(k): v for k, v in names.items()} | {_fold(v): v for v in names.values()}
        self.display = tuple(dict.fromkeys(names.values()))

    def resolve(self, name: str) -> str:
        if not self.display:
            raise ActionError("this gallery was started without the list of samplers, so a re-render cannot change "
                              "the sampler")
        found = self._lookup.get(_fold(name))
        if found is None:
            shown = name if len(name) <= 64 else name[:64] + "…"
            raise ActionError(f"unknown sampler {shown!r} (known: {', '.join(self.display)})")
        return found


def _check_overrides(overrides: dict[str, Any], samplers: SamplerNames | None, current_sampler: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None or value == "":
            continue
        if name not in _OVERRIDABLE:
            raise ActionError(f"cannot change {name!r} in a re-render (allowed: {', '.join(_OVERRIDABLE)})")
        kind = _OVERRIDABLE[name]
        try:
            if isinstance(value, bool):
                raise ValueError
            value = kind(value)
        except (TypeError, ValueError):
            shown = repr(value)
            raise ActionError(f"{name} must be a {kind.__name__}, got {shown if len(shown) <= 40 else shown[:40] + '…'}") from None
        if name == "seed" and not 0 <= value < 2**63:
            raise ActionError("seed must lie in 0 .. 2^63-1")
        if name == "steps" and not 1 <= value <= 500:
            raise ActionError("steps must lie in 1 .. 500")
        if name == "cfg_scale" and not 0 <= value <= 50:
            raise ActionError("cfg_scale must lie in 0 .. 50")
        if name == "sampler":
            # The variant's own sampler needs no list: the page's form always sends it back.
            value = current_sampler if value.strip() == current_sampler else (samplers or SamplerNames({})).resolve(value)
        out[name] = value
    return out


def queue_rerender(db: Database, variant_id: int, *, actor: str, overrides: dict[str, Any] | None = None,
                   samplers: SamplerNames | None = None) -> tuple[int, bool]:
    """Queue one variant for rendering again with its recorded settings (optionally a new seed, steps, CFG or
    sampler, one of ``samplers``). Returns (request id, whether it is new): the same request already waiting is not
    queued twice."""
    with db.session() as s:
        found = load_variants(s, [variant_id]).get(variant_id)
        if found is None:
            raise ActionError(f"no variant {variant_id}", status=404)
        changes = _check_overrides(overrides or {}, samplers, found.spec.sampler)
        variation_index = s.scalar(select(PromptRecord.variation_index).where(PromptRecord.id == found.prompt_id))
        # A copy of everything that determines the image: the worker must not depend on rows that may change.
        settings = {
            "source_variant_id": found.id, "source_identity": found.identity, "row_id": found.row_id,
            "variation_index": variation_index, "model_id": found.model.id, "model_path": found.model.path,
            **found.spec.as_dict(),
        }
        settings.update(changes)
        settings["changed"] = sorted(changes)
        for waiting in s.scalars(select(RerenderRequest).where(RerenderRequest.variant_id == variant_id,
                                                               RerenderRequest.status == "queued")):
            if waiting.settings == settings:
                return waiting.id, False
        request = RerenderRequest(variant_id=variant_id, status="queued", settings=settings, requested_by=actor)
        s.add(request)
        s.flush()
        audit(s, actor=actor, action="variant.rerender_requested", entity="variant", entity_id=variant_id,
              before=None, after={"request_id": request.id, "status": "queued", "changed": changes})
        return request.id, True


# ------------------------------------------------------------------------------------------------ settings


def set_review_settings(db: Database, campaign_id: int, *, approvals_needed: int, confidence: float, actor: str,
                        defaults: ReviewConfig) -> ReviewConfig:
    if not 1 <= approvals_needed <= 100:
        raise ActionError("approvals needed must lie in 1 .. 100")
    if not 0.5 <= confidence < 1:
        raise ActionError("confidence must lie in 0.5 .. 0.999")
    with db.session() as s:
        if s.get(Campaign, campaign_id) is None:
            raise ActionError(f"no campaign {campaign_id}", status=404)
        row = s.get(ReviewSettings, campaign_id)
        before = {"approvals_needed": row.approvals_needed, "confidence": row.confidence} if row else \
            {"approvals_needed": defaults.approvals_needed, "confidence": defaults.confidence, "default": True}
        after = {"approvals_needed": approvals_needed, "confidence": confidence}
        if row is None:
            row = ReviewSettings(campaign_id=campaign_id)
            s.add(row)
        elif before == after:
            return ReviewConfig(approvals_needed, confidence)
        row.approvals_needed, row.confidence, row.updated_at, row.updated_by = approvals_needed, confidence, utcnow(), actor
        audit(s, actor=actor, action="campaign.review_settings", entity="campaign", entity_id=campaign_id,
              before=before, after=after)
        return ReviewConfig(approvals_needed, confidence)
