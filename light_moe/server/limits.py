"""The server's default limits, shared by the app (server/app.py) and the flags of `light-moe serve`
(server/serve.py). A module of their own, importable without fastapi (the CLI builds every subcommand's
parser, also on machines without the server extra), so app.py and serve.py need not import each other."""
from __future__ import annotations

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_WAITING = 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_TEMPLATE_WORKERS = 2
DEFAULT_TEMPLATE_TIME_LIMIT_S = 5.0
DEFAULT_TEMPLATE_MEMORY_BYTES = 1 << 30
