"""The engine: loading a Wan VACE pipeline (`models`, `checkpoints`, `tiny`), fitting it in memory (`memory`,
`fastpath`), the per-job call (`engine`: samplers, step cache, LoRA adapters, live previews) and the optional
helper models (`interpolate`, `safety_check`, `prompt_expand`). Imported only by worker and CLI processes."""
