"""Serving: `lmstack serve`, an OpenAI-compatible HTTP server with continuous batching and a chat page.

Layout: protocol (request bodies, OpenAI errors), config, metrics, prefix (the prefix cache), scheduler
(one thread driving a ContinuousBatch), responses (OpenAI bodies and stream chunks), routes, app (FastAPI).
FastAPI and uvicorn are the `serve` extra: importing this package does not need them; `lmstack.serve.app` does.
"""
