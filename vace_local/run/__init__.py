"""The run path on top of the engine: one job from spec to files (`job.run_job`), the timing plan it follows
(`plan`), sliding windows for long video (`long_video`) and multi-GPU groups (`parallel`)."""
