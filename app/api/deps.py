"""FastAPI dependencies as ``Annotated`` aliases.

They are ``async def`` on purpose: none of them blocks, and FastAPI would otherwise hop to a worker thread
for each one on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import authenticate
from app.api.services import Services
from app.domain.settings import Settings, get_settings


async def app_settings(request: Request) -> Settings:
    """The settings the app was built with (``create_app(settings)``), else :func:`get_settings`."""
    return getattr(request.app.state, "settings", None) or get_settings()


async def get_services(request: Request) -> Services:
    """The :class:`Services` built by the app's lifespan."""
    return request.app.state.services


SettingsDep = Annotated[Settings, Depends(app_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]


async def get_tenant(request: Request, settings: SettingsDep) -> str:
    """Tenant of the caller (see :mod:`app.api.auth`)."""
    return authenticate(request, settings)


TenantDep = Annotated[str, Depends(get_tenant)]
