"""Options every management command accepts (before the noun or after the verb), and the
helpers that turn them into an API client and an output format."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from .. import config as configmod
from ..errors import UsageError
from .client import Api, ApiClient
from .render import render

FALLBACK_SOCKET = "/run/replicad/replicad.sock"


def _store(ctx: click.Context, param: click.Parameter, value):
    src = ctx.get_parameter_source(param.name)
    meta = ctx.find_root().meta
    if src is not None and src != click.core.ParameterSource.DEFAULT:
        meta[f"replicad.{param.name}"] = value
    return value


def global_options(f):
    opts = [
        click.option("--config", "config", type=click.Path(dir_okay=False), expose_value=False, callback=_store,
                     help="Talk to the daemon this config file describes (its management socket)."),
        click.option("--socket", "socket", type=click.Path(), expose_value=False, callback=_store,
                     help="Talk to the daemon on this local socket."),
        click.option("-C", "--computer-name", "computer_name", expose_value=False, callback=_store,
                     metavar="HOST[:PORT]", help="Manage a remote host (must list you in management.admins)."),
        click.option("--remote-auth", "remote_auth", type=click.Choice(["token", "kerberos", "certificate"]),
                     expose_value=False, callback=_store,
                     help="With -C: how to authenticate (default: certificate when the config has one, else token "
                          "when it has a realm credential, else kerberos). Never changed behind your back."),
        click.option("-o", "--output", "output", type=click.Choice(["table", "list", "json"]), expose_value=False,
                     callback=_store, help="Output format: table (default), list (every field) or json."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _meta(key: str):
    return click.get_current_context().find_root().meta.get(f"replicad.{key}")


def output_format() -> str:
    return _meta("output") or "table"


def remote_target() -> str | None:
    """The -C HOST[:PORT] given, if any."""
    return _meta("computer_name")


def api() -> Api:  # an ApiClient, or a RemoteClient (-C), imported only then
    if _meta("computer_name"):
        path = _meta("config") or os.environ.get("REPLICAD_CONFIG") or configmod.DEFAULT_PATH
        from .remote import RemoteClient  # lazy: TLS and token machinery only for -C
        return RemoteClient(_meta("computer_name"), configmod.load(path), _meta("remote_auth"))
    if _meta("remote_auth"):
        raise UsageError("--remote-auth applies to -C HOST[:PORT] only")
    if _meta("socket"):
        return ApiClient(_meta("socket"))
    path = _meta("config") or os.environ.get("REPLICAD_CONFIG")
    if path or Path(configmod.DEFAULT_PATH).exists():
        cfg = configmod.load(path, check_files=False)
        return ApiClient(str(cfg.management.socket))
    return ApiClient(FALLBACK_SOCKET)


def show(data, columns=()) -> None:
    render(data, output_format(), columns)


def abs_path(p: str | None) -> str | None:
    return str(Path(p).expanduser().resolve()) if p else None


def bool_text(value: str | None, flag: str):
    if value is None:
        return None
    v = value.lower()
    if v not in ("true", "false"):
        raise UsageError(f"{flag} expects true or false, got {value!r}")
    return v == "true"


def managed(f):
    """A management command: global options, and a clean one-line error on failure."""
    @global_options
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper
