"""The hub's API-level refusals, shared by the drivers that answer API calls."""

from __future__ import annotations


class HubError(Exception):
    """An API-level refusal; `code` names the gRPC status the service maps it to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
