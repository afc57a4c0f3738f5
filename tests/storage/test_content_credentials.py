"""C2PA content credentials (storage.content_credentials) against c2pa-python's own reader, with a test CA made here:
signed PNG / JPEG / WebP files validate once the test root is a trust anchor and say what made them; a file whose
pixels changed after signing fails with a hash mismatch; a signer from another CA reads as valid but untrusted; and
a certificate or key that cannot sign fails when it is loaded, with one line naming the file."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import c2pa
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

from storage.content_credentials import (ASSERTION_LABEL, TRAINED_ALGORITHMIC_MEDIA, CredentialsError, Ingredient,
                                         ManifestFacts, ModelFact, SigningIdentity, read_credentials, sign)
from storage.image_metadata import encode_image, read_image_metadata, xmp_packet
from tests.c2pa_test_ca import TestCA

FORMATS = ("png", "jpeg", "webp")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def identity(ca: TestCA) -> SigningIdentity:
    return SigningIdentity.load(*ca.issue())


def _picture(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _file(fmt: str, seed: int = 0) -> bytes:
    return encode_image(_picture(seed), fmt, "a red circle\nSteps: 2, Seed: 42", xmp_packet({"Model": "tiny"}), quality=90)


PACKSHOT = io.BytesIO()
_picture(7, (32, 32)).save(PACKSHOT, "PNG")
FACTS = ManifestFacts(
    "spring/row-1/instagram_square/v0.jpg", ModelFact("campaign-tiny", "a" * 64, "apache-2.0"),
    (ModelFact("brand-style", "b" * 64, "cc-by-4.0", "lora"),),
    (Ingredient("product packshot", "bottle.png", "image/png", hashlib.sha256(PACKSHOT.getvalue()).hexdigest(),
                PACKSHOT.getvalue()),
     Ingredient("control image (canny)", "layout.png", "image/png", "c" * 64)),  # its bytes not at hand: hash-only
    identity="f00d")


def _c2pa_read(data: bytes, fmt: str, anchors: str | None) -> c2pa.Reader:
    settings = {"trust": {"user_anchors": anchors}} if anchors else {}
    return c2pa.Reader(f"image/{fmt}", io.BytesIO(data), None, c2pa.Context.from_dict(settings))


@pytest.mark.parametrize("fmt", FORMATS)
def test_signed_file_validates_and_says_what_made_it(fmt: str, ca: TestCA, identity: SigningIdentity) -> None:
    original = _file(fmt)
    signed, label = sign(original, fmt, FACTS, identity)
    assert signed != original and label.startswith("urn:c2pa:")
    # c2pa-python's own reader, the test root as trust anchor: no failure at all
    reader = _c2pa_read(signed, fmt, ca.root_pem)
    assert reader.get_validation_state() == "Trusted"
    assert reader.get_validation_results()["activeManifest"]["failure"] == []
    manifest = reader.get_active_manifest()
    assert manifest["label"] == label
    assert manifest["claim_generator_info"][0]["name"] == "adforge"
    assert manifest["title"] == FACTS.title
    assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
    (created,) = assertions["c2pa.actions.v2"]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created["softwareAgent"]["name"] == "adforge"
    assert len(created["parameters"]["ingredients"]) == 2  # the created action points at both inputs
    generation = assertions[ASSERTION_LABEL]
    assert generation["model"] == {"kind": "checkpoint", "name": "campaign-tiny", "sha256": "a" * 64, "license": "apache-2.0"}
    assert generation["adapters"] == [{"kind": "lora", "name": "brand-style", "sha256": "b" * 64, "license": "cc-by-4.0"}]
    assert generation["variant_identity"] == "f00d"
    by_title = {i["title"]: i for i in manifest["ingredients"]}
    assert set(by_title) == {"bottle.png", "layout.png"}
    assert all(i["relationship"] == "inputTo" and i["format"] == "image/png" for i in by_title.values())
    assert by_title["layout.png"]["metadata"]["com.adforge.sha256"] == "c" * 64
    assert by_title["bottle.png"]["metadata"]["com.adforge.sha256"] == FACTS.ingredients[0].sha256
    # the infotext and XMP written before signing are still there (and covered by the manifest's hash)
    assert read_image_metadata(signed) == read_image_metadata(original)
    with Image.open(io.BytesIO(signed)) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(Image.open(io.BytesIO(original)).convert("RGB")))
    # ... and our reader says the same
    report = read_credentials(signed, fmt, ca.root_pem)
    assert report is not None and report.valid and report.trusted and report.problems == []
    assert (report.label, report.actions, report.digital_source_type) == (label, ["c2pa.created"], TRAINED_ALGORITHMIC_MEDIA)
    assert report.generator is not None and report.generator.startswith("adforge ")
    assert report.model == generation["model"] and report.adapters == generation["adapters"]
    assert sorted(report.ingredients) == ["bottle.png", "layout.png"]
    assert report.signer == "CN=Adforge Test Signer, O=Adforge Test"
    assert report.issuer == "CN=Adforge Test Intermediate CA, O=Adforge Test"


def _image_data_offset(data: bytes, fmt: str) -> int:
    """An offset in the middle of the compressed pixels (not the manifest, not another metadata block)."""
    if fmt == "png":
        at = data.index(b"IDAT")
        (length,) = struct.unpack(">I", data[at - 4:at])
        return at + 4 + length // 2
    if fmt == "jpeg":
        at = data.rindex(b"\xff\xda")  # start of scan; entropy-coded data follows its header
        (header,) = struct.unpack(">H", data[at + 2:at + 4])
        return at + 2 + header + (len(data) - at - header) // 2
    at = data.index(b"VP8 ")
    (length,) = struct.unpack("<I", data[at + 4:at + 8])
    return at + 8 + length // 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_pixels_changed_after_signing_fail_with_a_hash_mismatch(fmt: str, ca: TestCA, identity: SigningIdentity) -> None:
    signed, _ = sign(_file(fmt), fmt, FACTS, identity)
    tampered = bytearray(signed)
    at = _image_data_offset(signed, fmt)
    for k in range(at, at + 8):
        if tampered[k] not in (0xFE, 0xFF) and tampered[k] ^ 0x01 != 0xFF:  # keep JPEG markers as they were
            tampered[k] ^= 0x01
    assert bytes(tampered) != signed and len(tampered) == len(signed)
    reader = _c2pa_read(bytes(tampered), fmt, ca.root_pem)
    assert reader.get_validation_state() == "Invalid"
    assert "assertion.dataHash.mismatch" in [f["code"] for f in reader.get_validation_results()["activeManifest"]["failure"]]
    report = read_credentials(bytes(tampered), fmt, ca.root_pem)
    assert report is not None and not report.valid and not report.trusted
    assert any(p.startswith("assertion.dataHash.mismatch") for p in report.problems)
    assert report.tampered and report.verdict == "INVALID: the file or its manifest changed after signing"
    # the untouched file still holds, so it is the change that failed
    assert read_credentials(signed, fmt, ca.root_pem).valid  # type: ignore[union-attr]


def test_a_signer_from_another_ca_is_valid_but_untrusted(tmp_path: Path, ca: TestCA) -> None:
    other = TestCA.make(tmp_path / "other", name="Elsewhere")
    stranger = SigningIdentity.load(*other.issue(cn="Someone Else"))
    signed, label = sign(_file("jpeg"), "jpeg", FACTS, stranger)
    for trust in (ca.root_pem, None):  # our CA only, or c2pa's built-in list
        report = read_credentials(signed, "jpeg", trust)
        assert report is not None and report.label == label
        assert report.valid and not report.trusted and not report.tampered
        assert [p.split(":")[0] for p in report.problems] == ["signingCredential.untrusted"]
        assert report.verdict == "signature valid, signer not on the trust list"
        assert report.signer == "CN=Someone Else, O=Adforge Test"
    # with its own root as an anchor, the same file is trusted
    assert read_credentials(signed, "jpeg", other.root_pem).trusted  # type: ignore[union-attr]
    # several anchors in one trust file
    assert read_credentials(signed, "jpeg", ca.root_pem + other.root_pem).trusted  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_without_a_manifest_reads_as_none(fmt: str) -> None:
    assert read_credentials(_file(fmt), fmt) is None
    # bytes that are no such file at all hold no manifest either (not a "damaged" one)
    assert read_credentials(b"not an image", fmt) is None
    assert read_credentials(_file(fmt)[:40], fmt) is None


@pytest.mark.parametrize(("key_type", "alg"), [("p256", "es256"), ("p384", "es384"), ("rsa", "ps256"), ("ed25519", "ed25519")])
def test_the_signing_algorithm_follows_the_key(key_type: str, alg: str, ca: TestCA) -> None:
    signer = SigningIdentity.load(*ca.issue(f"k-{key_type}", key_type=key_type))
    assert signer.alg == alg
    signed, _ = sign(_file("png"), "png", FACTS, signer)
    reader = _c2pa_read(signed, "png", ca.root_pem)
    assert reader.get_validation_state() == "Trusted"
    assert reader.get_active_manifest()["signature_info"]["alg"].lower() == alg


def _load_error(cert: Path, key: Path) -> str:
    with pytest.raises(CredentialsError) as caught:
        SigningIdentity.load(cert, key)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_key_that_is_not_the_certificates_fails_at_load(ca: TestCA) -> None:
    cert, _ = ca.issue("mine")
    _, other_key = ca.issue("theirs")
    message = _load_error(cert, other_key)
    assert message.startswith(str(other_key)) and "does not belong to the signing certificate" in message


def test_an_expired_certificate_fails_at_load(ca: TestCA) -> None:
    cert, key = ca.issue("old", expired=True)
    message = _load_error(cert, key)
    assert message.startswith(str(cert)) and "expired on" in message


def test_a_certificate_without_the_extended_key_usage_fails_at_load(ca: TestCA) -> None:
    cert, key = ca.issue("no-eku", eku=())
    message = _load_error(cert, key)
    assert message.startswith(str(cert)) and "no extended key usage" in message


def test_an_extended_key_usage_c2pa_refuses_fails_at_load(ca: TestCA) -> None:
    # server authentication: a well-formed certificate that c2pa itself will not sign with (its own check, found by
    # the probe signature at load time, not by a list of ours)
    cert, key = ca.issue("tls", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    message = _load_error(cert, key)
    assert message.startswith(str(cert)) and "c2pa refuses this certificate" in message


def test_a_self_signed_certificate_fails_at_load(ca: TestCA) -> None:
    cert, key = ca.issue("selfie", self_signed=True)
    message = _load_error(cert, key)
    assert message.startswith(str(cert)) and "self-signed" in message


def test_a_chain_in_the_wrong_order_fails_at_load(ca: TestCA) -> None:
    cert, key = ca.issue("order")
    blocks = cert.read_text().split("-----END CERTIFICATE-----\n")
    cert.write_text(blocks[1] + "-----END CERTIFICATE-----\n" + blocks[0] + "-----END CERTIFICATE-----\n")
    message = _load_error(cert, key)
    assert message.startswith(str(cert)) and "the signing (end-entity) certificate" in message


def test_unreadable_and_non_pem_files_fail_at_load(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.issue("files")
    missing = tmp_path / "nope.pem"
    assert _load_error(missing, key).startswith(f"{missing}: cannot read the C2PA certificate chain")
    assert _load_error(cert, missing).startswith(f"{missing}: cannot read the C2PA private key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    assert "not a PEM certificate chain" in _load_error(garbage, key)
    assert "not a PEM private key" in _load_error(cert, garbage)
    locked = tmp_path / "locked.pem"
    der = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(der, ec.EllipticCurvePrivateKey)
    locked.write_bytes(der.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    assert "encrypted" in _load_error(cert, locked)


def test_a_damaged_manifest_reads_as_invalid(ca: TestCA, identity: SigningIdentity) -> None:
    signed, label = sign(_file("png"), "png", FACTS, identity)
    at = signed.index(label.encode())  # inside the manifest store itself
    damaged = signed[:at] + bytes(b ^ 0x55 for b in signed[at:at + 4]) + signed[at + 4:]
    report = read_credentials(damaged, "png", ca.root_pem)
    assert report is not None and not report.valid and not report.trusted and report.problems and report.tampered
