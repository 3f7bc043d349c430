"""Logic shared by the API and the workers; imports neither FastAPI nor Celery."""
