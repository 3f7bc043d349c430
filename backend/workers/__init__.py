"""Workers: the Celery app, and for each kind of leased work its path (jobs/, evaluations/); beside them the
pieces every kind shares: the dispatcher, the child supervisor and entry point, the reconciler."""
