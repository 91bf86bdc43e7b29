"""`ossgpt serve`: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

Read in this order:
    worker.py         the engine thread (ossgpt.inference.engine) and the bridge from it to asyncio
    reply.py          a reply as it is generated: tokens -> pieces of reasoning, answer and tool calls; stop strings
    openai_schema.py  OpenAI's request and reply shapes, its error body
    served.py         the model served: prompts, sampling, limits (400, 404, 429), a request's pieces
    app.py            the FastAPI app: chat completions, completions, models, health, the page
    responses.py      the Responses API subset of gpt-oss's reference server
    static/index.html the web chat page

Needs the `serve` extra (FastAPI, uvicorn): `pip install 'ossgpt[serve]'`. Only app.py imports FastAPI, so the
rest of ossgpt works without it.
"""
