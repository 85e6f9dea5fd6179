"""``flyer serve``: an OpenAI-compatible HTTP server with continuous batching over a paged latent
KV cache.

    request.py  a request (prompt, sampling options, tokens, cache state), its token events, the
                limits that decide whether it can run, the engine's config: all the HTTP side needs
    paged.py    the paged cache (blocks of latent + rope key per layer, block tables, null block)
                and the block allocator (free list, prefix sharing by chain hash, LRU)
    paged_hybrid.py  DeepSeek-V4's pool: per-request slots (windows, compressor states), entries in blocks
    metrics.py  Prometheus metrics of one server (the engine's and the HTTP side's)
    speculation.py  MTP speculative decoding: the MTP cache's entries kept in step, drafts, acceptance
    disk_tier.py  the on-disk prefix cache under the pool (flyer generate's files; V4: with boundary snapshots)
    engine.py   the scheduler: continuous batching, chunked prefill, preemption, sampling
    link.py     the engine's process and the HTTP process joined by a socket pair (the engine only
                as a type: importing link and api does not import the engine)
    schema.py   the OpenAI request bodies (pydantic) and their field checks
    api.py      the OpenAI routes' logic over the link
    app.py      the FastAPI application of those routes (OpenAI-shaped errors) and its uvicorn server
    cli.py      ``flyer serve``: the engine in its own process, HTTP in a child process

Each module imports only those listed above it.
"""
