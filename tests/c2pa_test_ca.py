"""A test certificate authority for C2PA signing, made with ``cryptography``: a root CA, an intermediate CA and a
signing (end-entity) certificate with what C2PA requires (digitalSignature key usage, the emailProtection extended
key usage, not a CA, issued by a CA), written as PEM files. Variants (an expired leaf, one without the extended key
usage, a self-signed one, other key types) test what :meth:`storage.content_credentials.SigningIdentity.load`
refuses."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Adforge Test")])


def _cert(subject: str, issuer: str, public, signing_key, issuer_public, *, ca: bool, eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,),
          not_before: dt.datetime | None = None, days: int = 30) -> x509.Certificate:
    start = not_before or NOW - dt.timedelta(days=1)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(public)
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False))
    if not ca and eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signing_key, algorithm)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class TestCA:
    """A root and an intermediate; :meth:`issue` writes a signing certificate chain and key under ``folder``."""

    __test__ = False  # not a test class, whatever pytest thinks of the name
    name: str
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    inter: x509.Certificate
    folder: Path

    @classmethod
    def make(cls, folder: Path, name: str = "Adforge Test") -> "TestCA":
        folder.mkdir(parents=True, exist_ok=True)
        root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        root = _cert(f"{name} Root CA", f"{name} Root CA", root_key.public_key(), root_key, root_key.public_key(),
                     ca=True, days=3650)
        inter = _cert(f"{name} Intermediate CA", f"{name} Root CA", inter_key.public_key(), root_key,
                      root_key.public_key(), ca=True, days=3650)
        ca = cls(name, root_key, root, inter_key, inter, folder)
        ca.root_path.write_bytes(_pem(root))
        return ca

    @property
    def root_path(self) -> Path:
        return self.folder / "root-ca.pem"

    @property
    def root_pem(self) -> str:
        return self.root_path.read_text()

    def issue(self, stem: str = "signer", *, key_type: str = "p256", eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,),
              expired: bool = False, self_signed: bool = False, cn: str = "Adforge Test Signer") -> tuple[Path, Path]:
        """(chain.pem, key.pem): the signing certificate then the intermediate, and its PKCS#8 key."""
        key = {"p256": lambda: ec.generate_private_key(ec.SECP256R1()),
               "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
               "rsa": lambda: rsa.generate_private_key(65537, 2048),
               "ed25519": ed25519.Ed25519PrivateKey.generate}[key_type]()
        start = NOW - dt.timedelta(days=100) if expired else None
        if self_signed:
            leaf = _cert(cn, cn, key.public_key(), key, key.public_key(), ca=False, eku=eku)
            chain = _pem(leaf)
        else:
            leaf = _cert(cn, f"{self.name} Intermediate CA", key.public_key(), self.inter_key, self.inter.public_key(),
                         ca=False, eku=eku, not_before=start, days=10 if expired else 30)
            chain = _pem(leaf, self.inter)
        cert_path, key_path = self.folder / f"{stem}-chain.pem", self.folder / f"{stem}-key.pem"
        cert_path.write_bytes(chain)
        key_path.write_bytes(_key_pem(key))
        return cert_path, key_path
