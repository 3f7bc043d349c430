"""GET /v1/models: the base models this deployment trains, and the project's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.deps import BEARER, ProjectDep, SessionDep, SettingsDep, release_connection
from backend.api.schemas import ModelList, ModelObject, error_responses
from backend.services import jobs as job_service
from backend.services.base_models import list_base_models
from backend.services.errors import NotFound

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[BEARER], responses=error_responses(400, 401, 404, 503)
)


def _all_models(session: SessionDep, settings: SettingsDep, project: ProjectDep) -> list[ModelObject]:
    base = [
        ModelObject(id=name, created=created, owned_by="safetrain")
        for name, created in list_base_models(settings=settings)
    ]
    tuned = [
        ModelObject(id=job.fine_tuned_model or job.id, created=job.finished_at or job.created_at, owned_by=project.id)
        for job in job_service.fine_tuned_models(session=session, project=project)
    ]
    release_connection(session)
    return base + tuned


@router.get("", response_model=ModelList, summary="List models")
def list_models(session: SessionDep, settings: SettingsDep, project: ProjectDep) -> ModelList:
    """Base model folders under the models directory, then the project's fine-tuned models."""
    return ModelList(data=_all_models(session, settings, project))


@router.get("/{model_id:path}", response_model=ModelObject, summary="Retrieve a model")
def retrieve_model(model_id: str, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> ModelObject:
    """One model this project may use."""
    for model in _all_models(session, settings, project):
        if model.id == model_id:
            return model
    raise NotFound(f"No such model: {model_id}", param="model")
