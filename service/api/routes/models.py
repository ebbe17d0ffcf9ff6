"""``/models``: the registry's versions, their serving state, and activation (rollback / roll forward)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from service.announce import announce_active
from service.api.deps import ApiKeyDep, ModelServerDep, RegistryDep, SettingsDep
from service.api.schemas import Activation, ErrorBody, ModelList, ModelSummary
from service.model_server import ModelServerStatus
from service.registry import ActivationConflict, Registry, VersionInfo

router = APIRouter(prefix="/models", tags=["models"])

VERSION_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No version of this name in the registry."}
}


def _summary(info: VersionInfo, active: str | None, serving: ModelServerStatus) -> ModelSummary:
    serves = info.name == serving.serving_version
    return ModelSummary(
        **info.model_dump(),
        active=info.name == active,
        serving=serves,
        load_failure=serving.failures.get(info.name),
        serving_precision=serving.serving_precision if serves else None,
        precision_fallback=serving.precision_fallback if serves else None,
    )


def _version(registry: Registry, version: str) -> VersionInfo:
    try:
        return registry.get(version)
    except KeyError as err:
        known = ", ".join(info.name for info in registry.versions()) or "none yet"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no model version {version!r}; versions: {known}"
        ) from err


@router.get("", summary="List model versions")
def list_models(registry: RegistryDep, server: ModelServerDep) -> ModelList:
    """Every version, oldest first, with which one is active, which one serves, and load failures."""
    serving = server.status()
    active = registry.active()
    return ModelList(
        active=active,
        serving=serving.serving_version,
        loading=serving.loading,
        swaps=serving.swaps,
        swap_failures=serving.swap_failures,
        retry=serving.retry,
        load_retries=serving.load_retries,
        last_swap=serving.last_swap,
        versions=[_summary(info, active, serving) for info in registry.versions()],
    )


@router.get("/{version}", summary="One model version", responses=VERSION_NOT_FOUND)
def get_model(version: str, registry: RegistryDep, server: ModelServerDep) -> ModelSummary:
    """Classes, step history, metrics, files, parity figures, and this process's load failure if any."""
    return _summary(_version(registry, version), registry.active(), server.status())


@router.post(
    "/{version}/activate",
    summary="Activate a version (rollback or roll forward)",
    dependencies=[ApiKeyDep],
    responses={
        **VERSION_NOT_FOUND,
        401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key."},
        403: {"model": ErrorBody, "description": "Read-only key, or a cross-site request from a browser."},
        409: {
            "model": ErrorBody,
            "description": "The version did not pass the parity gate, or another activation came first.",
        },
    },
)
def activate_model(
    version: str, settings: SettingsDep, registry: RegistryDep, server: ModelServerDep
) -> Activation:
    """Points the registry at ``version``; each API process then loads, warms up and swaps to it."""
    _version(registry, version)
    previous = registry.active()
    try:
        registry.activate(version, expected=previous)
    except ValueError as err:  # the parity gate did not pass
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"{err}; activate another version") from err
    except ActivationConflict as err:  # a worker or another client activated a version meanwhile
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"{err}; read GET /models and activate again if still wanted"
        ) from err
    announce_active(settings, version)
    server.request_version(version)
    return Activation(active=version, previous=previous, serving=server.status().serving_version)
