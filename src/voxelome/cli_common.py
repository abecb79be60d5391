"""Pieces shared by the CLI modules: user errors as one line + exit code 2, ``--set key=value`` and number lists."""

from __future__ import annotations

import functools

import typer
import yaml

from voxelome.errors import VoxelomeError

EXIT_USAGE = 2


def friendly(fn):
    """Turn VoxelomeError into a one-line message and exit code 2 (no traceback for user errors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VoxelomeError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def parse_sets(items, example: str = "epochs=20") -> dict:
    """``["key=value", ...]`` → ``{key: value}`` with values read as YAML scalars (numbers, booleans, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise VoxelomeError(f"--set {item!r} must look like key=value, e.g. --set {example}.")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_numbers(text, name: str, counts=(1, 3), example: str | None = None) -> list[float] | None:
    """``"a,b,c"`` → ``[a, b, c]`` (``None`` stays ``None``); the count must be one of ``counts``."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        eg = f", e.g. {example}" if example else ""
        raise VoxelomeError(f"--{name}={text!r} must be numbers separated by commas{eg}.") from None
    if len(vals) not in counts:
        raise VoxelomeError(f"--{name}={text!r} must hold {' or '.join(map(str, counts))} numbers.")
    return vals


def parse_names(text) -> list[str] | None:
    """``"A, B,,C"`` → ``["A", "B", "C"]`` (gene or channel names); ``None`` or empty → ``None`` (all)."""
    return None if not text else [g.strip() for g in str(text).split(",") if g.strip()]
