"""An app served by uvicorn in a background thread of this process: for notebooks, tests and benchmarks that talk to
the server over real HTTP without starting ``neuraldb serve`` in another process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

__all__ = ["serving"]


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` (from :func:`neuraldb.serve.build_app`) until the block ends; yields ``http://HOST:PORT``.

    ``port=None`` takes a free one. Raises ``RuntimeError`` when uvicorn has not started within ``timeout`` seconds.

    Example::

        >>> with serving(build_app(model, tok, settings)) as url:                  # doctest: +SKIP
        ...     requests.post(url + "/v1/completions", json={"prompt": "The Eiffel Tower is in"})
    """
    import uvicorn

    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    try:
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout} s")
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
