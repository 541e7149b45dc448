"""Helpers for the registry tests: a served registry handler and callers with their own tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests

from customscripts.auth import issue_user_token
from customscripts.client import Client
from customscripts.registry.namespace import qualify

RUN_OK = "def run(ctx):\n    return 1.0\n"
LISTS = ("marketplace_publish",)  # the feature a caller needs to list scripts on the marketplace


@dataclass
class Caller:
    """A user with a bearer token, talking to a served registry over real HTTP."""

    base: str
    user_id: str
    tenant: str
    tier: str = "pro"
    teams: tuple[str, ...] = ()
    orgs: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.token:
            self.token = issue_user_token(self.user_id, self.tenant, self.tier, teams=self.teams,
                                          orgs=self.orgs, features=self.features)

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        if token == "":
            headers = {}
        kwargs: dict[str, Any] = {"headers": headers, "timeout": 30}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        return requests.request(method, self.base + path, **kwargs)

    @property
    def client(self) -> Client:
        """The typed client (customscripts.client) for this caller."""
        return Client(self.base, self.token, timeout=30)

    def sid(self, chosen: str) -> str:
        """The platform-wide id of a script id this caller chooses (registry/namespace.py)."""
        return qualify(chosen, self.tenant)

    def create(self, script_id: str, source: str = RUN_OK, **fields: Any) -> requests.Response:
        return self.call("POST", "/scripts", {"name": f"script {script_id}", "script_id": script_id,
                                              "source": source, **fields})

    def publish(self, script_id: str) -> requests.Response:
        return self.call("POST", f"/scripts/{script_id}/publish")

    def create_published(self, script_id: str, source: str = RUN_OK, **fields: Any) -> dict:
        """Create and publish a new script; an API error raises (customscripts.client.ClientError)."""
        self.client.create_script(script_id, source, name=f"script {script_id}", **fields)
        published = self.client.publish(script_id)
        assert not published["unchanged"], published
        return published


def error_code(resp: requests.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]["code"]
