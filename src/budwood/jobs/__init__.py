"""The hosted fine-tuning service: OpenAI's /v1/files and /v1/fine_tuning API on open models.

service.py reads the config and opens `Service` (database, registry, queue, tenants, storage);
states.py has the words (JobStatus and its sets, ...); protocol.py the API's request and response
shapes; queue.py the job queue in the database (leases, heartbeats, fencing); tenants.py tenants and
API keys; storage.py the tenants' files and the jobs' checkpoints; serving_files.py and
serving_jobs.py what the routes do, without HTTP; routes/ the HTTP routes themselves; resolver.py the
tenants' `ft:` models for inference; worker.py runs a job (heartbeat.py keeps its lease): validate ->
budwood.pipeline's train -> evaluate -> card -> sign -> publish. The whole server app is assembled
above this package, in budwood.service_app, with the dashboard (budwood.web).
"""
