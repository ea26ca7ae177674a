"""Path routing: one table of URL patterns and the handler for each method.

Repository names contain slashes, so each pattern anchors on the fixed
suffix (``/manifests/<reference>``, ``/blobs/<digest>``, ...) and takes the
rest as the name. The first matching pattern wins, which is why the upload
routes come before the blob route.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.api.errors import ErrorCode, HTTPError
from engine.api.http import Request, Response

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    methods: dict[str, Handler]


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, pattern: str, **methods: Handler) -> None:
        """Add ``pattern`` (a regular expression on the path) with handlers
        keyed by HTTP method, for example ``GET=get_blob``."""
        self._routes.append(
            Route(re.compile(pattern), {m.upper(): h for m, h in methods.items()})
        )

    def resolve(self, request: Request) -> Handler:
        """Return the handler for ``request`` and set its path parameters.

        Raises HTTPError 404 for an unknown path and 405 for a method the
        path does not support.
        """
        for route in self._routes:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = route.methods.get(request.method)
            if handler is None:
                allowed = sorted(route.methods)
                raise HTTPError(
                    ErrorCode.UNSUPPORTED,
                    405,
                    f"method {request.method} is not allowed on this path",
                    {"method": request.method, "allowed": allowed},
                    [("Allow", ", ".join(allowed))],
                )
            request.path_params = match.groupdict()
            return handler
        raise HTTPError(
            ErrorCode.UNSUPPORTED,
            404,
            "no such endpoint",
            {"method": request.method, "path": request.path},
        )
