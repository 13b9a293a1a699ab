"""OpenAI-compatible API server (FastAPI + uvicorn), installed with the `server` extra.

Nothing outside this package imports it, so the engine runs without fastapi installed.
Entry points: serve.main(argv), serve.add_serve_args(parser) + serve.serve(args),
serve.run_server(engine, host, port, ...) and app.build_app(engine, ...).
"""
