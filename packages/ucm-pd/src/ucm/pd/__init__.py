"""UCM prefill/decode disaggregation: a proxy in front of prefill and decode vLLM servers that share a store."""

from ucm.pd.proxy import PDProxy, Router, prefill_request, serve

__all__ = ["PDProxy", "Router", "prefill_request", "serve"]
