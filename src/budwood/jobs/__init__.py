"""The hosted fine-tuning service: OpenAI's /v1/files and /v1/fine_tuning API on open models.

service.py builds the app and reads the config; api.py holds the routes; queue.py the job queue in
the database (leases, heartbeats, fencing); worker.py runs a job: validate -> train -> evaluate ->
card -> sign -> publish; tenants.py owns tenants and API keys; storage.py the tenants' files and
the jobs' checkpoints.
"""
