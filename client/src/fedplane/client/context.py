"""The client's context file: where the hub is and how to prove who you are, like a kubeconfig.

A YAML mapping:

    hub: 127.0.0.1:50051
    ca_file: ca.pem            # TLS, trusting this CA (relative paths: from the file's directory)
    tls: true                  # TLS with the system's CAs (implied by ca_file or cert_file)
    cert_file: alice.pem       # mutual TLS
    key_file: alice.key
    token: fpt_...             # or token_file: a file holding the token

The CLI reads it from --context, else FEDPLANE_CONTEXT, else ~/.config/fedplane/context.yaml
when that exists; a flag or environment variable given explicitly wins over the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

FIELDS = ("hub", "ca_file", "cert_file", "key_file", "token", "token_file", "tls")


class ContextError(ValueError):
    """A context file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Context:
    hub: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = ""
    token_file: str = ""
    tls: bool = False


def default_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "fedplane" / "context.yaml"


def load(path: Path) -> Context:
    """A context file, its relative paths made absolute from the file's own directory."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ContextError(f"context {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ContextError(f"context {path}: invalid YAML: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ContextError(f"context {path}: expected a mapping of {', '.join(FIELDS)}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise ContextError(f"context {path}: unknown key {unknown[0]!r} (known: {', '.join(FIELDS)})")
    values: dict[str, str | bool] = {}
    for key, value in data.items():
        if key == "tls":
            if not isinstance(value, bool):
                raise ContextError(f"context {path}: tls: expected true or false")
            values[key] = value
            continue
        if value is None:
            continue
        if not isinstance(value, str):
            raise ContextError(f"context {path}: {key}: expected a string")
        if key.endswith("_file") and value and not Path(value).expanduser().is_absolute():
            value = str(path.parent / value)
        values[key] = str(Path(value).expanduser()) if key.endswith("_file") and value else value
    if values.get("token") and values.get("token_file"):
        raise ContextError(f"context {path}: give token or token_file, not both")
    if bool(values.get("cert_file")) != bool(values.get("key_file")):
        raise ContextError(f"context {path}: cert_file and key_file go together")
    return Context(**values)  # type: ignore[arg-type]


def write(
    path: str | os.PathLike[str],
    hub: str,
    *,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    token: str = "",
    token_file: str = "",
    tls: bool = False,
) -> Path:
    """Write a context file (readable by its owner only: it may hold a token), making its
    directory; empty settings are left out."""
    context = Context(hub, ca_file, cert_file, key_file, token, token_file, tls)
    data = {k: v for k, v in dataclasses.asdict(context).items() if v}
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(yaml.safe_dump(data, sort_keys=False))
    os.chmod(file, 0o600)  # an existing file keeps its mode through O_CREAT
    return file
