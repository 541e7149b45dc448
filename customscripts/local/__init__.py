"""Local-only machinery: what runs the platform on one machine and that no image needs.

`stack.py` (PostgreSQL, Redis, NATS, S3, the provider and the scheduler as local processes) and
`status.py` behind `customscripts up | down | status`; the local OpenFaaS provider (`provider.py` over
`openfaas_api.py`, `deployments.py`, `processes.py`, `containers.py`, `venvs.py`); the demos
(`demo.py`, `realtime_demo.py`). Nothing outside this folder imports it except the CLI's local commands
(lazily), so a build context leaves it out (faas/build.py LOCAL_ONLY, templates/python3-http/.dockerignore)
and so does the scheduler image (scheduler/Dockerfile.dockerignore).
"""
