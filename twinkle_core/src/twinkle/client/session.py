"""The HTTP session of http mode: base URL, API key, JSON calls and readable errors."""

from __future__ import annotations

from typing import Any


class ServerError(RuntimeError):
    """The server refused or failed a call; the message is the server's (never a traceback)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"twinkle server answered {status}: {detail}")


class ClientSession:
    """One connection pool to ``base_url`` authenticated with ``api_key``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: the tenant's key (``twinkle serve --add-tenant NAME`` prints one).
        timeout: seconds one call may take (training calls wait for the result).

    Raises:
        ValueError: no base_url or api_key.
        MissingExtraError: httpx is not installed (the message names the install command).
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0) -> None:
        from twinkle._kinds import require_extra

        require_extra("http", "httpx", feature="initialize(mode='http')")  # not a bare ModuleNotFoundError
        import httpx

        if not base_url:
            raise ValueError("http mode needs base_url='http://host:port' of a `twinkle serve` server")
        if not api_key:
            raise ValueError("http mode needs api_key=...; `twinkle serve --add-tenant NAME` prints one")
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers={"X-API-Key": api_key}, timeout=timeout)

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request; returns the decoded JSON body.

        Raises:
            ServerError: a non-2xx answer.
        """
        response = self._client.request(method, path, json=json)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServerError(response.status_code, detail)
        return response.json() if response.content else None

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
