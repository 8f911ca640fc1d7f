"""The flowc runtime: executes compiled plans (engine, scheduler, KV cache, kernels).

`from flowc.runtime import Engine, Request, SamplingParams` (`open_plan` for any plan: an `Engine`,
a `DisaggregatedEngine` for prefill and decode instances, or a `ReplicatedEngine` for several
colocated ones); torch is imported on first use, so `import flowc.runtime` alone stays cheap.
"""

_EXPORTS = {"Engine": "engine", "EngineError": "engine", "Request": "engine", "RequestOutput": "engine",
            "TokenEvent": "engine", "SamplingParams": "sequence", "RequestError": "sequence",
            "DisaggregatedEngine": "disagg", "open_plan": "disagg", "KVTransport": "kv_transport",
            "InProcessTransport": "kv_transport", "TorchDistributedTransport": "kv_transport",
            "ReplicatedEngine": "replicas"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowc.runtime' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
