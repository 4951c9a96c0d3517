"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): SSL contexts and the TLS listener.

Both sides use TLS 1.2 or later (BCP 195) and certificates from one site PKI:

- the SCP presents ``[tls] certificate``/``private_key`` and, with ``require_client_certificate``,
  accepts only peers whose client certificate chains to ``ca_certificates``;
- the outbox's SCU presents the same certificate as its client certificate and accepts a PACS only
  when the PACS's server certificate chains to ``ca_certificates`` and names the destination's host.

The listener does the TLS handshake on the association's own thread with a timeout: a peer that
connects and says nothing (or speaks plain DICOM) cannot hold up the accept loop; each failed
handshake is one log line naming the host and the reason.
"""

from __future__ import annotations

import logging
import socket
import ssl

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0


class TlsSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; ``key`` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _no_password() -> bytes:
    # An encrypted key would make OpenSSL prompt on the terminal: a service must never wait there.
    return b""


def _pem_text(path: str, key: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20).decode("ascii", errors="replace")
    except OSError as exc:
        raise TlsSetupError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _load_chain(ctx: ssl.SSLContext, certificate: str, private_key: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in _pem_text(certificate, "tls.certificate"):
        raise TlsSetupError("tls.certificate", f"{certificate} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    key_text = _pem_text(private_key, "tls.private_key")
    if "ENCRYPTED" in key_text:
        raise TlsSetupError("tls.private_key", f"{private_key} is an encrypted private key; give an unencrypted "
                            "key file readable only by the node's user (openssl pkey -in KEY -out KEY.plain)")
    if "PRIVATE KEY-----" not in key_text:
        raise TlsSetupError("tls.private_key", f"{private_key} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    try:
        ctx.load_cert_chain(certificate, private_key, password=_no_password)
    except ssl.SSLError as exc:
        why = str(exc.reason or exc)
        if "KEY_VALUES_MISMATCH" in why.upper():
            why = "the private key does not belong to the certificate"
        raise TlsSetupError("tls.private_key", f"cannot load the certificate and private key: {why}") from None


def _load_ca(ctx: ssl.SSLContext, ca_certificates: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in _pem_text(ca_certificates, "tls.ca_certificates"):
        raise TlsSetupError("tls.ca_certificates", f"{ca_certificates} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        ctx.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise TlsSetupError("tls.ca_certificates", f"cannot load the CA certificates: {exc.reason or exc}") from None


def server_context(certificate: str, private_key: str, ca_certificates: str,
                   require_client_certificate: bool = True) -> ssl.SSLContext:
    """The SCP's context: our certificate; client certificates verified against the CA file
    (required, or verified only when presented)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, certificate, private_key)
    _load_ca(ctx, ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(certificate: str, private_key: str, ca_certificates: str) -> ssl.SSLContext:
    """The outbox SCU's context: our certificate as client certificate; the PACS's certificate
    verified against the CA file, host name included."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, certificate, private_key)
    _load_ca(ctx, ca_certificates)
    return ctx


def describe_tls_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the peer sent no client certificate"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            return "not a TLS connection (plain DICOM on the TLS port?)"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR"):
            return f"the peer refused our certificate ({reason})"
        return reason
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:.0f} s"
    return str(exc) or type(exc).__name__


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop.

    pynetdicom wraps each accepted socket with ``do_handshake_on_connect=True`` inside
    ``get_request``, i.e. on the one thread that accepts connections, without a timeout: one idle
    TCP connection would stop every later peer. Here the handshake runs in the connection's own
    thread with ``HANDSHAKE_TIMEOUT_S``; a failure is logged once and the connection closed."""

    def get_request(self):
        sock, address = self.socket.accept()
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request, client_address) -> None:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS connection from %s refused: %s", host, describe_tls_error(exc))
            self.shutdown_request(request)
            return
        log.debug("TLS connection from %s: %s, client certificate %s", host, request.version(),
                  "verified" if request.getpeercert() else "none")
        super().process_request_thread(request, client_address)
