"""The flowc runtime: executes compiled plans (engine, scheduler, KV cache, kernels)."""
