"""`squall admin ...`: users, their tokens, the audit log and the secrets key; and
`squall login`, which keeps a user's token in a context."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .output import Format, die, err, escape, out, print_json
from .workflow_ops import CONTEXT, OUTPUT, _backend, _guard

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from api.squall.v1 import control_pb2 as pb

__all__ = ["app", "login"]

app = typer.Typer(
    help=(
        "Administer a Squall server: its users and their tokens, the audit log of every "
        "call, and the key its secrets are encrypted with. Against a server (the current "
        "context) these calls take the `admin` permission, except a user's own tokens; "
        "with no context they act on this machine's store."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
user_app = typer.Typer(help="Add, list, disable and enable users.", no_args_is_help=True)
token_app = typer.Typer(
    help="Make, list and revoke API tokens (your own; anyone's as an admin).",
    no_args_is_help=True,
)
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")

EXPIRES = typer.Option(
    None,
    "--expires",
    help="How long the token works: 12h, 30d, 52w, or `never` (default: 90 days).",
)


def seconds(text: str, option: str) -> float:
    """`12h`, `90m`, `30d`, `2w` (and Go durations) in seconds."""
    from orchestrator.errors import Category
    from orchestrator.fuzzfile.units import UnitError, parse_duration

    days = {"d": 86400, "w": 604800}
    if text[-1:] in days and text[:-1].isdigit():
        return int(text[:-1]) * days[text[-1]]
    try:
        return parse_duration(text)
    except (UnitError, ValueError):
        die(f"{option} {text!r} is not a duration: write e.g. 90m, 12h, 30d or 2w", Category.USAGE)


def _lifetime(expires: str | None) -> float | None:
    if expires is None:
        return None
    if expires == "never":
        return 0.0
    value = seconds(expires, "--expires")
    if value <= 0:
        die("--expires must be longer than 0 (or `never`)")
    return value


def _dict(message: Message) -> dict[str, object]:
    """A message as `-o json` prints it: every field, false and empty ones too."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _show_token(new: pb.NewToken, output: Format) -> None:
    """A token made now: its text goes to stdout once (and nowhere else)."""
    if output is Format.json:
        print_json(_dict(new))
        return
    t = new.token
    expires = f"expires {t.expires_at}" if t.expires_at else "never expires"
    err.print(
        f"token {escape(t.id)} for {escape(t.user)} ({expires}); it is shown once, here: "
        "keep it, e.g. `squall login` with it on stdin"
    )
    print(new.text, flush=True)


# ---- users -------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="The user's name (lower case, digits, . _ -)."),
    group: list[str] = typer.Option([], "--group", "-g", help="A group it is in (repeatable)."),
    admin: bool = typer.Option(False, "--admin", help="May do everything, to everyone's runs."),
    expires: str | None = EXPIRES,
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Add a user and make its first token (printed once on stdout).

    **Examples**

        squall admin user add alice --group chem
        squall admin user add ops --admin --expires 30d -o json
    """
    backend = _backend(context)
    new = _guard(lambda: backend.add_user(name, group, admin, _lifetime(expires)))
    _show_token(new, output)


@user_app.command("list")
def user_list(output: Format = OUTPUT, context: str | None = CONTEXT) -> None:
    """List users, their groups and whether they are admins or disabled."""
    backend = _backend(context)
    users = _guard(backend.users)
    if output is Format.json:
        print_json([_dict(u) for u in users])
        return
    out.print(f"{'USER':<20} {'GROUPS':<30} ROLE")
    for u in users:
        role = "disabled" if u.disabled else "admin" if u.admin else "user"
        out.print(f"{escape(u.name):<20} {escape(','.join(u.groups)) or '-':<30} {role}")


def _set_disabled(name: str, disabled: bool, output: Format, context: str | None) -> None:
    backend = _backend(context)
    user = _guard(lambda: backend.disable_user(name, disabled))
    if output is Format.json:
        print_json(_dict(user))
    else:
        out.print(f"{escape(user.name)}: {'disabled' if user.disabled else 'enabled'}")


@user_app.command("disable")
def user_disable(
    name: str = typer.Argument(..., help="The user."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Disable a user: its tokens stop working at once, streams open with them are cut off
    (its runs go on; cancel them apart)."""
    _set_disabled(name, True, output, context)


@user_app.command("enable")
def user_enable(
    name: str = typer.Argument(..., help="The user."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Enable a disabled user again (its tokens that have not expired work again)."""
    _set_disabled(name, False, output, context)


# ---- tokens ------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    user: str = typer.Option("", "--user", help="Whose (default: yours; another's: admin)."),
    expires: str | None = EXPIRES,
    note: str = typer.Option("", "--note", help="What the token is for."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Make a token (printed once on stdout).

    **Examples**

        squall admin token create --note laptop --expires 30d
        squall admin token create --user ci-bot --expires never
    """
    backend = _backend(context)
    new = _guard(lambda: backend.create_token(user, _lifetime(expires), note))
    _show_token(new, output)


@token_app.command("list")
def token_list(
    user: str = typer.Option("", "--user", help="Whose (default: yours; `*`: everyone's)."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """List tokens: id, user, state, when they expire and were last used (never the token)."""
    backend = _backend(context)
    tokens = _guard(lambda: backend.tokens(user))
    if output is Format.json:
        print_json([_dict(t) for t in tokens])
        return
    out.print(f"{'ID':<10} {'USER':<16} {'STATE':<8} {'EXPIRES':<26} {'USED':<26} NOTE")
    for t in tokens:
        out.print(
            f"{t.id:<10} {escape(t.user):<16} {t.state:<8} {t.expires_at or 'never':<26} "
            f"{t.used_at or '-':<26} {escape(t.note)}"
        )


@token_app.command("revoke")
def token_revoke(
    token_id: str = typer.Argument(..., help="The token's id (`squall admin token list`)."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Revoke a token: it stops working at once, and streams open with it are cut off."""
    backend = _backend(context)
    token = _guard(lambda: backend.revoke_token(token_id))
    if output is Format.json:
        print_json(_dict(token))
        return
    out.print(f"revoked {escape(token.id)} of {escape(token.user)}")


# ---- audit and key -----------------------------------------------------------------------


@app.command()
def audit(
    user: str = typer.Option("", "--user", help="Only this user's calls."),
    since: str = typer.Option(
        "", "--since", help="From a time (2026-12-01T09:00, UTC) or this long ago (30m, 7d)."
    ),
    limit: int = typer.Option(200, "--limit", min=1, max=1000, help="The newest N calls."),
    denied: bool = typer.Option(False, "--denied", help="Only the calls that were denied."),
    output: Format = OUTPUT,
    context: str | None = CONTEXT,
) -> None:
    """Read the audit log: every call, who made it, the verb and target, allowed or denied,
    and how an allowed call ended (ok, the kind of error it failed with, or `running`).

    **Examples**

        squall admin audit --since 1h
        squall admin audit --user alice --denied -o json
    """
    at = None
    if since:
        try:
            at = datetime.fromisoformat(since)
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        except ValueError:
            at = datetime.fromtimestamp(
                datetime.now(UTC).timestamp() - seconds(since, "--since"), UTC
            )
    backend = _backend(context)
    entries = _guard(lambda: backend.audit(user, at, limit, denied))
    if output is Format.json:
        print_json([_dict(e) for e in entries])
        return
    if not entries:
        err.print("no calls" + (" of " + escape(user) if user else "") + " in the audit log")
    for e in entries:
        verdict = "[green]allowed[/]" if e.allowed else "[red]denied[/]"
        target = f" {_shown(e.target)}" if e.target else ""
        ended = f" -> {_shown(e.outcome)}" if e.allowed and e.outcome else ""
        ended = ended or (" -> [yellow]running[/]" if e.allowed and not e.outcome else "")
        detail = f"  [dim]{_shown(e.detail)}[/]" if e.detail else ""
        out.print(
            f"{e.at}  {_shown(e.user) or '-'}  {_shown(e.method)} ({_shown(e.verb)}){target}  "
            f"{verdict}{ended}{detail}"
        )


def _shown(text: str) -> str:
    """Text a caller chose (a run name, a detail quoting it) as one line of plain text:
    newlines and terminal escapes written out, Rich markup escaped, so that no entry can
    pass for another."""
    plain = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escape(plain)


@app.command("rotate-key")
def rotate_key(output: Format = OUTPUT, context: str | None = CONTEXT) -> None:
    """Encrypt every secret with a new key and forget the old one (crash-safe: the key file
    keeps both until every secret is encrypted with the new one)."""
    backend = _backend(context)
    count = _guard(backend.rotate_key)
    if output is Format.json:
        print_json({"reencrypted": count})
        return
    out.print(f"a new key; {count} secret(s) encrypted with it, the old key forgotten")


# ---- login -------------------------------------------------------------------------------


def login(
    server: str = typer.Option(..., "--server", help="HOST:PORT of the server."),
    name: str = typer.Option("", "--context", help="The context's name (default: the server)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File with your token (default: read stdin)."
    ),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", help="CA certificate (PEM) of a TLS server; without it: plaintext."
    ),
) -> None:
    """Check your token with the server and keep it in a context (0600), the current one.

    The token is never taken from the command line (it would be in your shell's history and
    in the process list): pipe it, or name a file.

    **Examples**

        squall admin token create --note laptop | squall login --server squall.lab:7433 \\
            --ca-file ca.pem
        squall login --server 127.0.0.1:7433 --token-file ~/.squall-token
    """
    from orchestrator.errors import Category, SquallError

    from .backends import RemoteBackend
    from .contexts import Context, ContextFile

    if token_file is None and sys.stdin.isatty():
        die("pipe your token on stdin, or give --token-file")
    try:
        token = (token_file.read_text() if token_file else sys.stdin.read()).strip()
    except OSError as exc:
        die(f"cannot read the token: {exc}", Category.USAGE)
    if not token:
        die("no token given (pipe it on stdin, or give --token-file)")
    context = Context(
        name=name or server,
        server=server,
        token=token,
        ca_file=str(ca_file.resolve()) if ca_file else "",
    )
    try:
        who = RemoteBackend(context).whoami()
        contexts = ContextFile()
        contexts.add(context)
        contexts.use(context.name)
    except SquallError as exc:
        die(str(exc), exc.category)
    contexts.save()
    groups = f" (groups: {', '.join(who.groups)})" if who.groups else ""
    role = " (an admin)" if who.admin else ""
    out.print(
        f"logged in to {escape(server)} as {escape(who.name)}{escape(groups)}{role}; "
        f"context {escape(context.name)} is the current one"
    )
