"""Shared checks for the deployment files: r2ec invocations, the Dockerfile, .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("sh", "bash", "/bin/sh", "/bin/bash")
OPERATORS = {"&&", "||", ";", "|", "(", ")"}
KEYWORDS = {"then", "do", "else", "!", "exec"}  # may precede a command in a segment


def r2ec_invocations(command: str | list[str]) -> list[list[str]]:
    """Every `r2ec ...` argv in a container command: exec form, or a `sh -c` script."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command and command[0] in SHELLS:
        script = command[-1]
        found = []
        for line in script.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token in OPERATORS:
                    if segment and segment[0] == "r2ec":
                        found.append(segment)
                    segment = []
                elif token in KEYWORDS and not segment:
                    continue
                else:
                    segment.append(token)
        return found
    return [list(command)] if command and command[0] == "r2ec" else []


def check_r2ec(argv: list[str]) -> tuple[str, ...]:
    """Resolve `r2ec <sub> [<subsub>]` in the real typer app and let click parse the rest,
    so an unknown command, an unknown option, a bad value or a missing required option fails.
    Returns the command path, e.g. ("data", "prepare", "ml-100k")."""
    import typer

    from cli import app

    assert argv[0] == "r2ec", argv
    cmd = typer.main.get_command(app)  # typer's own (vendored) click objects: duck-typed below
    rest = argv[1:]
    path = ["r2ec"]
    while hasattr(cmd, "commands"):  # a group
        assert rest, f"{' '.join(argv)}: `{' '.join(path)}` needs a subcommand"
        assert rest[0] in cmd.commands, (
            f"`{' '.join(path)} {rest[0]}` is not a command ({sorted(cmd.commands)})"
        )
        path.append(rest[0])
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    try:
        cmd.make_context(" ".join(path), list(rest))
    except Exception as exc:  # click's UsageError / BadParameter
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        raise AssertionError(f"{' '.join(argv)}: {message}") from exc
    return tuple(path[1:])


def option_value(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name:
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerignored(path: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    """Whether a context path (or a folder above it) matches a .dockerignore pattern."""
    patterns = [
        p.strip().lstrip("/")
        for p in ignore_file.read_text().splitlines()
        if p.strip() and not p.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(prefix, pat[3:]))
        for pat in patterns
        if not pat.startswith("!")
        for prefix in prefixes
    )
