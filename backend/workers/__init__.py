"""Training workers: the Celery app, the job task, the trainer child process, GPU picking, the reconciler."""
