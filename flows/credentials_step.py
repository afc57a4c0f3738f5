"""The content-credentials step of a delivery: every encoding of a file signed with the configured C2PA identity.

A run signs when its settings name both ``c2pa_cert`` and ``c2pa_key`` (checked by :func:`check_settings` when
the settings are loaded, so a bad pair stops the run before anything renders). The identity is loaded once per
process and pair of files. The manifest's facts come from the render job: the checkpoint (name, sha256, licence
as its ``models`` row records it), the adapters, ControlNet and upscalers it pins, and the brief's input images as
ingredients, their bytes read from the asset store where the run keeps them (``inputs/<sha256><suffix>``) and
checked against the sha256 the variant pins (a missing or changed file: a hash-only ingredient).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.input_images import MAX_INPUT_BYTES, SUFFIXES, input_key
from flows.trust import Signer
from storage.content_credentials import (CredentialsError, Ingredient, ManifestFacts, ModelFact, SigningIdentity,
                                         sign)
from storage.variants import parse_adapters, parse_inputs

if TYPE_CHECKING:
    from flows.rendering import RenderJob
    from flows.settings import Settings
    from storage.assets import AssetStore

__all__ = ["CredentialsStep", "check_settings", "facts_for", "identity_for", "signer_from_settings", "summary_line"]

log = logging.getLogger(__name__)
OFF = "off (no c2pa_cert / c2pa_key configured)"
_LOCK = threading.Lock()
_IDENTITIES: dict[tuple[str, str], SigningIdentity] = {}
_INPUT_CACHE_BYTES = 64 * 1024 * 1024  # input images kept in memory per process for the ingredients


def identity_for(cert: str, key: str) -> SigningIdentity:
    """The identity of a pair of files, loaded and checked once per process."""
    with _LOCK:
        identity = _IDENTITIES.get((cert, key))
        if identity is None:
            identity = _IDENTITIES[(cert, key)] = SigningIdentity.load(cert, key)
        return identity


class _Inputs:
    """Input images' bytes by store key, checked against their sha256, a bounded number of bytes kept."""

    def __init__(self, store: AssetStore | None):
        self.store = store
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def read(self, sha256: str, suffix: str) -> bytes | None:
        if self.store is None:
            return None
        key = input_key(sha256, suffix)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            data = self.store.get(key, MAX_INPUT_BYTES)
        except KeyError:
            log.warning("content credentials: input %s is not in the asset store; its ingredient is hash-only", key)
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("content credentials: the stored %s does not have its pinned sha256; hash-only ingredient", key)
            return None
        with self._lock:
            while self._cache and sum(map(len, self._cache.values())) + len(data) > _INPUT_CACHE_BYTES:
                self._cache.pop(next(iter(self._cache)))
            if len(data) <= _INPUT_CACHE_BYTES:
                self._cache[key] = data
        return data


def _mime(suffix: str) -> str:
    return SUFFIXES.get(suffix.lower(), "application/octet-stream")


def facts_for(job: RenderJob, inputs: _Inputs | None = None) -> ManifestFacts:
    """What the manifest of ``job``'s file says: its model files and input images."""
    model = ModelFact(job.model.name, job.model.sha256, job.model.license)
    refs = {r.sha256: r for r in (*job.adapters, *job.upscalers, *([job.controlnet] if job.controlnet else []))}
    adapters = [ModelFact(p.name, p.sha256, refs[p.sha256].license if p.sha256 in refs else None, p.kind)
                for p in parse_adapters(job.spec.adapters)]
    adapters += [ModelFact(u.name, u.sha256, u.license, "upscaler") for u in job.upscalers]
    pins = parse_inputs(job.spec.inputs)
    if job.controlnet is not None:
        adapters.append(ModelFact(job.controlnet.name, job.controlnet.sha256, job.controlnet.license, "controlnet"))
    wanted: list[tuple[str, str, str, str]] = []  # role, title, sha256, suffix
    if pins.product is not None:
        wanted.append(("product packshot", pins.product.file, pins.product.image, pins.product.suffix))
        if pins.product.mask:
            wanted.append(("product mask", f"{pins.product.file} (mask)", pins.product.mask,
                           pins.product.mask_suffix or ".png"))
    if pins.control is not None:
        wanted.append((f"control image ({pins.control.type})", pins.control.file, pins.control.image, pins.control.suffix))
    ingredients = tuple(Ingredient(role, title, _mime(suffix), sha, inputs.read(sha, suffix) if inputs else None)
                        for role, title, sha, suffix in wanted)
    return ManifestFacts(job.storage_key, model, tuple(adapters), ingredients, job.identity)


class CredentialsStep:
    """:class:`flows.trust.Signer`: signs each encoding of a job's file."""

    def __init__(self, identity: SigningIdentity, store: AssetStore | None = None):
        self.identity = identity
        self.inputs = _Inputs(store)

    def sign(self, data: bytes, fmt: str, job: RenderJob) -> tuple[bytes, str]:
        return sign(data, fmt, facts_for(job, self.inputs), self.identity)


def signer_from_settings(settings: Mapping[str, Any]) -> Signer | None:
    """None without both ``c2pa_cert`` and ``c2pa_key``; else the step that signs with them."""
    cert, key = settings.get("c2pa_cert"), settings.get("c2pa_key")
    if not cert or not key:
        return None
    store = None
    if settings.get("store_url"):
        from storage.assets import open_store

        store = open_store(settings["store_url"])
    return CredentialsStep(identity_for(cert, key), store)


def summary_line(settings: Settings) -> str:
    """The run summary's ``content credentials:`` value."""
    if not settings.c2pa_cert or not settings.c2pa_key:
        return OFF
    return f"signed by {identity_for(settings.c2pa_cert, settings.c2pa_key).subject}"


def check_settings(settings: Settings, sources: Mapping[str, str], base: Path) -> Settings:
    """``c2pa_cert`` / ``c2pa_key`` / ``c2pa_trust`` resolved against ``base`` (where adforge runs) and checked:
    both or neither of cert and key, a pair that can sign, a trust file of PEM certificates."""
    from cryptography import x509

    from flows.settings import SettingsError

    def where(name: str) -> str:
        return sources.get(name, "default")

    def resolved(value: str | None) -> str | None:
        return (base / value).resolve().as_posix() if value else None

    cert, key, trust = resolved(settings.c2pa_cert), resolved(settings.c2pa_key), resolved(settings.c2pa_trust)
    if bool(cert) != bool(key):
        given, missing = ("c2pa_cert", "c2pa_key") if cert else ("c2pa_key", "c2pa_cert")
        raise SettingsError(f"{where(given)}: '{given}' is set but '{missing}' is not: content credentials need both "
                            f"the certificate chain and its private key")
    if cert and key:
        try:
            identity_for(cert, key)
        except CredentialsError as exc:
            name = "c2pa_key" if str(exc).startswith(key) else "c2pa_cert"
            raise SettingsError(f"{where(name)}: '{name}': {exc}") from None
    if trust:
        try:
            x509.load_pem_x509_certificates(Path(trust).read_bytes())
        except OSError as exc:
            raise SettingsError(f"{where('c2pa_trust')}: 'c2pa_trust': {trust}: cannot read: {exc.strerror or exc}") from None
        except ValueError:
            raise SettingsError(f"{where('c2pa_trust')}: 'c2pa_trust': {trust}: not a PEM file of trust anchor "
                                f"certificates (-----BEGIN CERTIFICATE----- blocks)") from None
    return replace(settings, c2pa_cert=cert, c2pa_key=key, c2pa_trust=trust)
