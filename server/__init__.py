"""vace-local HTTP server: hosted-API dialects (WaveSpeed, fal, AI/ML API) over one job store and GPU workers.

Layering: dialect routers (`server.dialects.<name>.router` → `.serving` / `.render`) → `JobSpec` →
the services (`server.jobs` submit/get/cancel/delete, `server.auth`, `server.files` URLs, `server.uploads`,
`server.submit_inputs`; handlers reach the store only through their async methods, `server.offload`) →
`server.store` (durable job records) →
`server.worker` processes (the only ones that import torch). The API process itself never imports torch.
"""
