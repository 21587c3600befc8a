"""The service's Celery workers: they run each job's stages with the tvkd library and record
state, progress, metrics and artifacts in the database (the source of truth).

celery_app (app, queues, routes, broker) · dispatch (enqueue, queue inspection) · tasks (lease,
run, complete/fail) · stages (the work of each stage) · reporting (callbacks → database,
heartbeat) · reconciler (re-enqueues jobs of dead workers and lost messages). Started by
`tvkd worker`.
"""
