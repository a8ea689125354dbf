"""vace-local HTTP server: hosted-API dialects (WaveSpeed, fal, AI/ML API) over one job store and GPU workers.

Layering: dialect routers (`server.dialects.<name>.router` → `.serving` / `.render`) → `JobSpec` →
`server.core` (submit/get/cancel, auth, input resolution, URLs) → `server.store` (durable job records) →
`server.worker` processes (the only ones that import torch). The API process itself never imports torch.
"""
