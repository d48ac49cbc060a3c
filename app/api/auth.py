"""API keys scoped to tenants.

``Authorization: Bearer <key>`` selects the tenant; every record carries its tenant and lookups across
tenants answer 404. Without configured keys the service runs open, which :class:`~app.domain.settings.Settings`
allows in embedded mode only, and then only for loopback clients.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from app.domain.errors import Forbidden, Unauthorized
from app.domain.settings import Settings

_LOOPBACK_NAMES = {"localhost", "testclient"}


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tenant_for_key(settings: Settings, key: str) -> str | None:
    """Tenant owning ``key`` (constant-time comparison against every configured key)."""
    found = None
    for candidate, tenant in settings.api_keys.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = tenant
    return found


def authenticate(request: Request, settings: Settings) -> str:
    """Returns the tenant of the request.

    Raises:
        Unauthorized: Keys are configured and the request carries none or an unknown one.
        Forbidden: Open mode and the client is not on the loopback interface.
    """
    if settings.open_access:
        client = request.client.host if request.client else None
        if not _is_loopback(client):
            raise Forbidden("this service runs without API keys and only answers local clients")
        return settings.open_tenant
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = tenant_for_key(settings, token.strip())
    if tenant is None:
        raise Unauthorized("unknown API key")
    return tenant


def authorize_metrics(request: Request, settings: Settings) -> None:
    """Lets a Prometheus scrape of ``/metrics`` through.

    Open mode (no API keys, loopback only) needs nothing. With API keys configured, the metrics (which name
    every tenant's models) need ``Authorization: Bearer <KRONLAP_METRICS_TOKEN>``; API keys do not open them.

    Raises:
        Unauthorized: Missing or wrong scrape token.
        Forbidden: Keys are configured but no scrape token is.
    """
    if settings.open_access:
        return
    if settings.metrics_token is None:
        raise Forbidden("/metrics is closed: set KRONLAP_METRICS_TOKEN and scrape with it as a bearer token")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.metrics_token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <KRONLAP_METRICS_TOKEN>'")
