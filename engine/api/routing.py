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
        """Add ``pattern`` (a regular expression on the path, in which "."
        also matches a newline) with handlers
        keyed by HTTP method, for example ``GET=get_blob``. A path with a GET handler
        also serves HEAD, with the same headers and no body."""
        handlers = {m.upper(): h for m, h in methods.items()}
        if "GET" in handlers:
            handlers.setdefault("HEAD", handlers["GET"])
        # DOTALL lets "." match a decoded %0A, so that a name containing a
        # newline reaches its handler and is rejected as an invalid name.
        self._routes.append(Route(re.compile(pattern, re.DOTALL), handlers))

    def resolve(self, request: Request) -> Handler:
        """Return the handler for ``request`` and set its path parameters.

        Raises HTTPError 404 for an unknown path and 405 for a method the
        path does not support.
        """
        raw_path: bytes = request.scope.get("raw_path") or b""
        if b"%2f" in raw_path.lower() and request.path.startswith("/v2/"):
            # The server decodes %2F to "/", which would make an encoded
            # slash inside one name component look like a separator.
            raise HTTPError(
                ErrorCode.NAME_INVALID,
                400,
                "a /v2/ path cannot contain an encoded slash (%2F): no repository "
                "name component, tag, digest or upload id has one",
                {"path": raw_path.decode("latin-1")},
            )
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
