"""The contract and the media: what a job is (`spec`), how it fails (`errors`), what it reports (`events`,
`timing`, `windows`), and how its inputs are fetched, vetted and decoded (`inputs`, `http_guard`, `media*`,
`sandbox`). No torch at import time: the API process uses this layer."""
