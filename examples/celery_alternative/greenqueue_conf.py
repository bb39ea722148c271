# greenqueue configuration for the celery_alternative example (names match the CLI options).
bind = ["127.0.0.1:8002"]
dirty_apps = [
    "examples.celery_alternative.workers:EmailWorker",
    "examples.celery_alternative.workers:ImageWorker",
    "examples.celery_alternative.workers:DataWorker",
    "examples.celery_alternative.workers:ScheduledWorker",
]
graceful_timeout = 30
