"""C2PA content credentials: a signed manifest embedded in a delivered PNG / JPEG / WebP, and reading one back.

The manifest says how the file came to be: a ``c2pa.created`` action whose ``digitalSourceType`` is IPTC's
``trainedAlgorithmicMedia`` (the machine-readable "AI-generated" that EU AI Act Art. 50(2) and California SB 942
ask for), adforge as the claim generator, an ``com.adforge.generation`` assertion with the model file (name,
sha256, licence) and the adapters it rendered with, and the brief's input images (packshot, its mask, a ControlNet
layout) as ``inputTo`` ingredients. The manifest's data hash covers every byte of the file outside the manifest
itself (pixels, infotext, XMP), so any later change shows as ``assertion.dataHash.mismatch``.

No thumbnails: c2pa-python's default embeds a JPEG thumbnail of the file and of each ingredient, which added
0.5-2 MB to a 512 px noisy test image; without them a manifest is about 3-5 KB (it counts against a channel's
size cap). No timestamp authority (runs are offline): a reader checks the certificate's validity at reading time.

Signing identities are checked when they are loaded (:meth:`SigningIdentity.load`), ending with a real signature
of a tiny PNG, so that a certificate c2pa refuses fails at settings time with one line naming the file, never at
the first image of a run.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ASSERTION_LABEL", "TRAINED_ALGORITHMIC_MEDIA", "CredentialsError", "CredentialsReport", "Ingredient",
           "ManifestFacts", "ModelFact", "SigningIdentity", "mime_type", "read_credentials", "sign"]

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ASSERTION_LABEL = "com.adforge.generation"
GENERATOR = "adforge"
_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
# What a reader reports when the signature and hashes are sound but no trust anchor vouches for the signer.
_TRUST_CODES = {"signingCredential.untrusted"}
_SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}},
                  "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}


class CredentialsError(ValueError):
    """A signing certificate or key that cannot be used; the message names the file and says why."""


def mime_type(fmt: str) -> str | None:
    """``png`` / ``.jpg`` / ``image/webp`` -> the MIME type c2pa wants; None for anything else."""
    text = fmt.strip().lower()
    if "/" in text:
        return text if text in _MIME.values() else None
    return _MIME.get(text.lstrip("."))


def _version() -> str:
    try:
        return metadata.version("adforge")
    except metadata.PackageNotFoundError:
        return "0"


# ----------------------------------------------------------------------------------------------- what is signed


@dataclass(frozen=True)
class ModelFact:
    """A model file the image was rendered with: the checkpoint, or an adapter (LoRA, embedding, refiner,
    ControlNet, upscaler: ``kind``)."""

    name: str
    sha256: str
    license: str | None = None
    kind: str = "checkpoint"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "license": self.license}


@dataclass(frozen=True)
class Ingredient:
    """An input image: its role, the name the brief gave it, its MIME type and sha256, and its bytes when they
    could be read (c2pa then looks inside, and carries over a manifest the input has of its own)."""

    role: str
    title: str
    format: str
    sha256: str
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ManifestFacts:
    title: str  # the storage key, or a title given
    model: ModelFact
    adapters: tuple[ModelFact, ...] = ()
    ingredients: tuple[Ingredient, ...] = ()
    identity: str | None = None  # the variant's identity hash: the database row this file is

    def definition(self, mime: str) -> dict[str, Any]:
        ids = [f"input{k}" for k in range(len(self.ingredients))]
        created: dict[str, Any] = {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                                   "softwareAgent": {"name": GENERATOR, "version": _version()}}
        if ids:
            created["parameters"] = {"ingredientIds": ids}
        generation: dict[str, Any] = {"model": self.model.as_dict(), "adapters": [a.as_dict() for a in self.adapters],
                                      "inputs": [{"role": i.role, "title": i.title, "sha256": i.sha256}
                                                 for i in self.ingredients]}
        if self.identity:
            generation["variant_identity"] = self.identity
        return {
            "label": f"urn:c2pa:{uuid.uuid4()}",
            "claim_generator_info": [{"name": GENERATOR, "version": _version()}],
            "title": self.title, "format": mime,
            # hash-only ingredients: what the brief named, by sha256, when its bytes are not at hand
            "ingredients": [spec for spec, i in self.ingredient_specs() if i.data is None],
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [created]}},
                           {"label": ASSERTION_LABEL, "data": generation}],
        }

    def ingredient_specs(self) -> list[tuple[dict[str, Any], Ingredient]]:
        """Each ingredient's definition (its ``label`` ties it to the created action) and the ingredient."""
        return [({"title": i.title, "format": i.format, "relationship": "inputTo", "label": f"input{k}",
                  "instance_id": f"adforge:sha256:{i.sha256}",
                  "metadata": {"com.adforge.role": i.role, "com.adforge.sha256": i.sha256}}, i)
                for k, i in enumerate(self.ingredients)]


# ---------------------------------------------------------------------------------------------- the signing key


def _dn(name: x509.Name) -> str:
    """``CN=..., O=...`` in the certificate's own order (RFC 4514 strings run backwards)."""
    return ", ".join(f"{a.rfc4514_attribute_name}={a.value}" for a in name) or "(empty name)"


def _short(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={cn[0].value}" if cn else _dn(cert.subject)


def _algorithm(key: Any, path: str) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in algs:
            raise CredentialsError(f"{path}: EC key on curve {key.curve.name}; C2PA signs with P-256, P-384 or P-521")
        return algs[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CredentialsError(f"{path}: RSA key of {key.key_size} bits; C2PA needs at least 2048")
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise CredentialsError(f"{path}: a {type(key).__name__.lstrip('_')}; C2PA signs with EC (P-256/384/521), RSA "
                           f"(PS256) or Ed25519 keys")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the C2PA {what}: {exc.strerror or exc}") from None


def _check_chain(chain: list[x509.Certificate], path: str, now: dt.datetime) -> None:
    leaf = chain[0]
    for cert in chain:
        if now < cert.not_valid_before_utc:
            raise CredentialsError(f"{path}: certificate {_short(cert)} is not valid before "
                                   f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > cert.not_valid_after_utc:
            raise CredentialsError(f"{path}: certificate {_short(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC")
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise CredentialsError(f"{path}: the first certificate ({_short(leaf)}) is a CA certificate; the file must "
                                   f"start with the signing (end-entity) certificate, then its intermediates")
    except x509.ExtensionNotFound:
        pass
    if leaf.issuer == leaf.subject:
        raise CredentialsError(f"{path}: the signing certificate ({_short(leaf)}) is self-signed; C2PA needs one issued "
                               f"by a CA (your own CA is fine: put its root in the c2pa_trust file)")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise CredentialsError(f"{path}: the signing certificate ({_short(leaf)}) lacks the digitalSignature key usage")
    except x509.ExtensionNotFound:
        pass
    try:
        ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CredentialsError(f"{path}: the signing certificate ({_short(leaf)}) has no extended key usage; C2PA "
                               f"needs one, e.g. emailProtection (1.3.6.1.5.5.7.3.4)") from None
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in ekus:
        raise CredentialsError(f"{path}: the signing certificate ({_short(leaf)}) has anyExtendedKeyUsage, which C2PA "
                               f"refuses; use a specific one such as emailProtection (1.3.6.1.5.5.7.3.4)")
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialsError(f"{path}: certificate {_short(parent)} did not issue {_short(child)}: the file must "
                                   f"hold the signing certificate first, then each issuer in order") from None


_NATIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class SigningIdentity:
    """A checked certificate chain (PEM, signing certificate first) and its private key (re-encoded as PKCS#8,
    which c2pa reads), with the signing algorithm its key implies."""

    cert_path: str
    key_path: str
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    alg: str
    subject: str
    issuer: str
    not_after: dt.datetime
    _native: dict = field(default_factory=dict, repr=False, compare=False)  # pid -> c2pa.Signer

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> SigningIdentity:
        """Read and check the pair; :class:`CredentialsError` (one line naming the file) when it cannot sign."""
        cert_file, key_file = Path(cert_path), Path(key_path)
        raw_chain, raw_key = _read(cert_file, "certificate chain"), _read(key_file, "private key")
        try:
            chain = x509.load_pem_x509_certificates(raw_chain)
        except ValueError:
            raise CredentialsError(f"{cert_file}: not a PEM certificate chain (expected -----BEGIN CERTIFICATE----- "
                                   f"blocks, the signing certificate first)") from None
        try:
            key = serialization.load_pem_private_key(raw_key, password=None)
        except TypeError:
            raise CredentialsError(f"{key_file}: the private key is encrypted; adforge needs it unencrypted (PEM), "
                                   f"readable only by the account that renders") from None
        except (ValueError, UnsupportedAlgorithm):
            raise CredentialsError(f"{key_file}: not a PEM private key (expected -----BEGIN PRIVATE KEY-----)") from None
        alg = _algorithm(key, os.fspath(key_file))
        def spki(k: Any) -> bytes:
            return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

        mine = spki(key.public_key())
        if mine != spki(chain[0].public_key()):
            owner = next((c for c in chain[1:] if spki(c.public_key()) == mine), None)
            if owner is not None:
                raise CredentialsError(f"{cert_file}: the file must start with the signing (end-entity) certificate "
                                       f"{_short(owner)}, then its intermediates")
            raise CredentialsError(f"{key_file}: this key does not belong to the signing certificate {_short(chain[0])} "
                                   f"in {cert_file}")
        _check_chain(chain, os.fspath(cert_file), dt.datetime.now(dt.timezone.utc))
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        identity = cls(os.fspath(cert_file), os.fspath(key_file),
                       b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain), pkcs8, alg,
                       _dn(chain[0].subject), _dn(chain[0].issuer), chain[0].not_valid_after_utc)
        identity._probe()
        return identity

    def signer(self) -> c2pa.Signer:
        """This process's native signer (a forked child makes its own)."""
        pid = os.getpid()
        with _NATIVE_LOCK:
            native = self._native.get(pid)
            if native is None:
                native = self._native[pid] = c2pa.Signer.from_info(
                    c2pa.C2paSignerInfo(self.alg, self.chain_pem, self.key_pem, None))
            return native

    def _probe(self) -> None:
        """Sign a tiny PNG, so that what c2pa itself refuses is found now (c2pa verifies after signing)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG")
        probe = ManifestFacts("probe.png", ModelFact("probe", "0" * 64))
        try:
            sign(buf.getvalue(), "png", probe, self)
        except c2pa.C2paError as exc:
            reason = " ".join(str(exc).split())
            raise CredentialsError(f"{self.cert_path}: c2pa refuses this certificate and key: {reason} (a C2PA signing "
                                   f"certificate is issued by a CA, not a CA itself, with the digitalSignature key "
                                   f"usage and the emailProtection extended key usage)") from None


# ------------------------------------------------------------------------------------------------------ signing


def sign(data: bytes, fmt: str, manifest: ManifestFacts, signer: SigningIdentity) -> tuple[bytes, str]:
    """``data`` (a PNG, JPEG or WebP file's bytes) with a signed manifest embedded, and the manifest's label."""
    mime = mime_type(fmt)
    if mime is None:
        raise ValueError(f"content credentials: cannot sign {fmt!r} files (png, jpeg, webp)")
    definition = manifest.definition(mime)
    with c2pa.Context.from_dict(_SIGN_SETTINGS) as context, c2pa.Builder(definition, context=context) as builder:
        for spec, ingredient in manifest.ingredient_specs():
            if ingredient.data is not None:
                builder.add_ingredient(spec, ingredient.format, io.BytesIO(ingredient.data))
        out = io.BytesIO()
        native = signer.signer()
        with _NATIVE_LOCK:  # one native signer per process, used by one thread at a time
            builder.sign(native, mime, io.BytesIO(data), out)
    return out.getvalue(), definition["label"]


# ------------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class CredentialsReport:
    """What a file's active manifest says and whether it holds.

    ``valid``: the signature verifies and every hash matches (the file is as signed); ``trusted``: besides, the
    signing certificate chains to a trust anchor (c2pa's built-in list, or the ``trust_pem`` given). ``problems``:
    c2pa's failure codes with its explanation (``assertion.dataHash.mismatch: ...``), trust problems included."""

    valid: bool
    trusted: bool
    state: str  # c2pa's validation_state: Trusted | Valid | Invalid
    label: str | None
    generator: str | None
    actions: list[str]
    digital_source_type: str | None
    model: dict[str, Any] | None
    adapters: list[dict[str, Any]]
    ingredients: list[str]
    signer: str | None  # the signing certificate's subject / issuer (RFC 4514)
    issuer: str | None
    problems: list[str]

    @property
    def codes(self) -> list[str]:
        return [p.split(": ", 1)[0] for p in self.problems]

    @property
    def tampered(self) -> bool:
        """The file or its manifest changed after signing (a hash or the signature does not match, or the manifest
        store is damaged), as opposed to a signer problem (expired, revoked, untrusted)."""
        return any(c.endswith("mismatch") or c.startswith(("manifest.", "claim.", "claimSignature.missing"))
                   for c in self.codes)

    @property
    def verdict(self) -> str:
        if not self.valid:
            if self.tampered:
                return "INVALID: the file or its manifest changed after signing"
            return "INVALID: " + ", ".join(c for c in self.codes if c not in _TRUST_CODES or len(self.codes) == 1)
        if not self.trusted:
            return "signature valid, signer not on the trust list"
        return "valid and trusted"


def _generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info") or []
    if info and isinstance(info, list):
        first = info[0]
        return " ".join(str(p) for p in (first.get("name"), first.get("version")) if p)
    return manifest.get("claim_generator")


def _certificate_names(reader: c2pa.Reader, label: str | None) -> tuple[str | None, str | None]:
    """The signing certificate's full subject and issuer (crJSON has them; the plain JSON only a CN)."""
    def name(parts: dict[str, Any] | None) -> str | None:
        return ", ".join(f"{k}={v}" for k, v in parts.items()) if parts else None

    try:
        for m in json.loads(reader.crjson()).get("manifests", []):
            if m.get("label") == label:
                info = (m.get("signature") or {}).get("certificateInfo") or {}
                return name(info.get("subject")), name(info.get("issuer"))
    except (c2pa.C2paError, ValueError):
        pass
    return None, None


def read_credentials(data: bytes, fmt: str, trust_pem: str | None = None) -> CredentialsReport | None:
    """The file's content credentials, validated; None when it has no manifest. ``trust_pem``: extra trust anchors
    (PEM, e.g. a company's own CA) besides c2pa's own list."""
    settings: dict[str, Any] = {**_READ_SETTINGS}
    if trust_pem:
        settings["trust"] = {"user_anchors": trust_pem}
    mime = mime_type(fmt) if fmt else None
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            if reader is None:
                return None
            with reader:
                return _report(reader)
    except c2pa.C2paError.NotSupported:
        return None
    except c2pa.C2paError as exc:
        if b"jumb" not in data or b"c2pa" not in data:
            return None  # bytes c2pa cannot parse and no manifest store (JUMBF) in them: nothing to report
        # a manifest store is there but cannot be parsed: damaged or tampered with
        reason = " ".join(str(exc).split())
        return CredentialsReport(False, False, "Invalid", None, None, [], None, None, [], [], None, None,
                                 [f"manifest.unreadable: {reason}"])


def _report(reader: c2pa.Reader) -> CredentialsReport:
    manifest = reader.get_active_manifest() or {}
    state = reader.get_validation_state() or "Invalid"
    results = reader.get_validation_results() or {}
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    for delta in results.get("ingredientDeltas") or []:
        for item in ((delta.get("validationDeltas") or {}).get("failure") or []):
            failures.append({**item, "explanation": f"ingredient {delta.get('ingredientAssertionURI', '?')}: "
                                                    f"{item.get('explanation')}"})
    codes = [str(f.get("code")) for f in failures]
    problems = [f"{f.get('code')}: {f.get('explanation')}" if f.get("explanation") else str(f.get("code")) for f in failures]
    valid = state != "Invalid" and all(c in _TRUST_CODES for c in codes)
    actions, source_type = [], None
    generation: dict[str, Any] = {}
    for assertion in manifest.get("assertions") or []:
        label, body = assertion.get("label", ""), assertion.get("data") or {}
        if label.startswith("c2pa.actions"):
            for action in body.get("actions") or []:
                actions.append(action.get("action"))
                if action.get("action") == "c2pa.created":
                    source_type = action.get("digitalSourceType") or source_type
        elif label == ASSERTION_LABEL:
            generation = body
    label = manifest.get("label")
    subject, issuer = _certificate_names(reader, label)
    info = manifest.get("signature_info") or {}
    return CredentialsReport(
        valid=valid, trusted=valid and state == "Trusted", state=state, label=label, generator=_generator(manifest),
        actions=[a for a in actions if a], digital_source_type=source_type, model=generation.get("model"),
        adapters=list(generation.get("adapters") or []),
        ingredients=[i.get("title") for i in manifest.get("ingredients") or [] if i.get("title")],
        signer=subject or (f"CN={info['common_name']}" if info.get("common_name") else None),
        issuer=issuer or info.get("issuer"), problems=problems)
