"""A development certificate authority and server certificate for the broker's TLS listener.

``fedhive broker init --tls`` calls :func:`create_dev_pki`: it makes a self-signed CA and a server
certificate signed by it, valid for ``localhost`` and ``127.0.0.1`` (plus any names given), so
clients can verify the broker with ``tls.ca_file`` pointing at the CA. It is meant for
development and closed networks; a deployment reachable from outside should use certificates from
the organisation's CA, dropped in at the same paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker._files import write_private
from common.errors import ConfigError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "DevPKI",
    "check_hostnames",
    "create_dev_pki",
]

CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"
SERVER_CERT_FILE: Final = "server.crt"
SERVER_KEY_FILE: Final = "server.key"

DEFAULT_HOSTNAMES: Final = ("localhost", "127.0.0.1")
# A DNS name as it goes into a certificate: ASCII labels (punycode for others), a leading "*."
# wildcard is not offered on purpose.
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_CA_DAYS: Final = 3650
# 825 days: the longest server certificate lifetime clients such as Apple's accept.
_SERVER_DAYS: Final = 825


@dataclass(frozen=True, slots=True)
class DevPKI:
    """Where :func:`create_dev_pki` put its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def at(cls, directory: Path) -> DevPKI:
        """The paths :func:`create_dev_pki` uses in ``directory``."""
        return cls(
            ca_cert=directory / CA_CERT_FILE,
            ca_key=directory / CA_KEY_FILE,
            server_cert=directory / SERVER_CERT_FILE,
            server_key=directory / SERVER_KEY_FILE,
        )


def check_hostnames(hostnames: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless every entry is an IP address or a DNS name.

    Raises:
        ConfigError: an entry is neither, or there is none.
    """
    names = list(hostnames)
    if not names:
        raise ConfigError("the server certificate needs at least one host name or address")
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not _DNS_NAME.fullmatch(name):
                raise ConfigError(
                    f"{name!r} is neither an IP address nor a DNS name (ASCII letters, digits, "
                    "'-' and '.')"
                ) from None


def create_dev_pki(
    directory: Path, *, project: str, hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES
) -> DevPKI:
    """Create a development CA and a server certificate for the broker in ``directory``.

    Keys are EC P-256 and written with mode 0600; certificates are PEM and world-readable.

    Args:
        directory: where to write ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key``.
        project: named in the certificates' subjects, so one can tell dev CAs apart.
        hostnames: DNS names and IP addresses clients use to reach the broker (subject
            alternative names of the server certificate).

    Returns:
        The paths written.

    Raises:
        ConfigError: no host name was given, or the ``cryptography`` package is missing.
    """
    try:
        # Imported here: only `fedhive broker init --tls` needs the package.
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ConfigError(
            "creating a development CA needs the 'cryptography' package: pip install cryptography"
        ) from exc

    def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    names = tuple(dict.fromkeys(hostnames))
    check_hostnames(names)
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhive development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedhive dev CA ({project})"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhive development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"fedhive broker ({project})"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pki = DevPKI.at(directory)
    for path, key in ((pki.ca_key, ca_key), (pki.server_key, server_key)):
        data = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(path, data)
    pki.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    pki.server_cert.write_bytes(server_cert.public_bytes(pem))
    return pki
