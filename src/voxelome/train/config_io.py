"""Presets, YAML and dict round trips shared by the frozen config dataclasses (dense2d, superres)."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import yaml

from voxelome.constants import CONFIG_SCHEMA_VERSION
from voxelome.errors import VoxelomeError, check_choice, did_you_mean

#: Keys a YAML file may carry besides the fields (written by the package, ignored when read back).
META_KEYS = ("kind", "data", "voxelome_version")


def from_preset(presets: dict, preset: str, overrides: dict):
    """``presets[preset]`` with ``overrides`` replaced; unknown fields get a "did you mean"."""
    check_choice("preset", preset, presets)
    base = presets[preset]
    names = {f.name for f in fields(base)}
    for key in overrides:
        if key not in names:
            raise VoxelomeError(f"config key {key!r} does not exist.{did_you_mean(key, names)}")
    return dataclasses.replace(base, **overrides)


def to_yaml(config, kind: str, extra: dict | None = None) -> str:
    """Plain YAML of ``config.to_dict()``, schema version and kind first."""
    payload = {"schema_version": CONFIG_SCHEMA_VERSION, "kind": kind, **config.to_dict()}
    payload.update(extra or {})
    return yaml.safe_dump(payload, sort_keys=False, allow_unicode=True)


def fields_of(d: dict) -> tuple[dict, str | None]:
    """A written config dict → ``(field values, preset name or None)``; refuses other schema versions."""
    d = {k: v for k, v in dict(d).items() if k not in META_KEYS}
    version = d.pop("schema_version", CONFIG_SCHEMA_VERSION)
    if version != CONFIG_SCHEMA_VERSION:
        raise VoxelomeError(f"config schema_version={version} is not supported (this voxelome reads "
                            f"{CONFIG_SCHEMA_VERSION}).")
    return d, d.pop("preset", None)
