"""Licence policy: which licences allow commercial use, and whether a brief row may use a model.

A brief row whose ``license`` column is ``commercial`` (the default) refuses a model whose commercial use is
forbidden *or unknown*: an asset a company ships must be traceable to a licence that allows it. Upscalers are
held to the same rule as checkpoints. Which file is which model, and its recorded licence, is the registry's
(:mod:`flows.model_registry`); this module only judges.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["KNOWN_LICENSES", "LicenseError", "check_license", "commercial_use_of", "normalize_license"]

# Licence id -> commercial use allowed. Facts from ../shared/DESIGN.md ("Licences to know") and the SPDX list.
KNOWN_LICENSES: dict[str, bool] = {
    "creativeml-openrail-m": True,  # SD 1.x; use-based restrictions travel with the model
    "creativeml-openrail++-m": True,  # SDXL
    "stability-community": True,  # SD 3.x; an enterprise licence is needed above USD 1M yearly revenue
    "apache-2.0": True,
    "mit": True,
    "cc-by-4.0": True,
    "cc-by-sa-4.0": True,
    "cc0-1.0": True,
    "cc-by-nc-4.0": False,
    "cc-by-nc-sa-4.0": False,  # several popular upscalers
    "cc-by-nc-nd-4.0": False,
}


class LicenseError(ValueError):
    pass


# Ids the Hugging Face Hub's model cards use for licences known here under their full names: SD 2.x and SDXL
# cards say ``license: openrail++`` for CreativeML Open RAIL++-M.
ALIASES = {"openrail++": "creativeml-openrail++-m", "openrail++-m": "creativeml-openrail++-m"}


def normalize_license(license_id: str) -> str:
    normal = license_id.strip().lower().replace(" ", "-").replace("_", "-")
    return ALIASES.get(normal, normal)


def commercial_use_of(license_id: str | None) -> bool | None:
    """Whether a (normalised) licence id allows commercial use; None when unknown."""
    return KNOWN_LICENSES.get(license_id) if license_id else None


class LicensedModel(Protocol):
    name: str
    path: str
    short_hash: str
    license: str | None
    commercial_use: bool | None

    @property
    def noun(self) -> str: ...


def check_license(model: LicensedModel, constraint: str) -> str | None:
    """None if a row with licence constraint ``constraint`` (``commercial`` / ``any``) may use ``model``,
    else the reason it may not."""
    if constraint != "commercial" or model.commercial_use is True:
        return None
    what = model.noun
    if model.commercial_use is False:
        return (f"{what} '{model.name}' ({model.short_hash}) is licensed '{model.license}', which forbids commercial use, "
                f"and the row needs commercial use (set its license column to 'any' for non-commercial work)")
    if model.license:  # declared, but not a licence whose commercial terms adforge knows
        return (f"{what} '{model.name}' ({model.short_hash}) is licensed '{model.license}', and whether that allows "
                f"commercial use is unknown; the row needs commercial use; register it: "
                f"adforge models add {model.path} --license {model.license} --commercial yes|no")
    return (f"{what} '{model.name}' ({model.short_hash}) has no licence on record, and the row needs commercial use; "
            f"register it: adforge models add {model.path} --license <id> --commercial yes|no")
