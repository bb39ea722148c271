"""gunicorn's celery_alternative example on greenqueue: four stateful worker pools with SSE progress."""
