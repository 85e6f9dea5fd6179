"""``flyer serve``: an OpenAI-compatible HTTP server with continuous batching over a paged latent
KV cache.

    paged.py    the paged cache (blocks of latent + rope key per layer, block tables, null block)
                and the block allocator (free list, prefix sharing by chain hash, LRU)
    metrics.py  Prometheus metrics of one server
    engine.py   the scheduler thread: continuous batching, chunked prefill, preemption, sampling
    api.py      the OpenAI routes (FastAPI) over an engine
    cli.py      ``flyer serve``

Each module imports only those listed above it.
"""
