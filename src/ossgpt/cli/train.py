"""`ossgpt train --data DATA_DIR --out RUN_DIR [--preset tiny] ...`: train a model on a prepared data folder.

    ossgpt prepare novels/ --out data/novels          # the default preset's (tiny's) tokenizer
    ossgpt train --data data/novels --out runs/novels --preset tiny --max-minutes 8
    ossgpt train --data data/novels --out runs/novels --resume --max-steps 600
    torchrun --nproc_per_node=2 -m ossgpt train --data data/web --out runs/web --preset mini --distributed fsdp

Every flag is a field of TrainConfig (ossgpt.training.config), generated from it; a flag not given takes the
preset's default. See ossgpt.training.trainer for what RUN_DIR holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ossgpt.presets import DEFAULT_PRESET, PRESETS
from ossgpt.training import TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = (),
                         presets: bool = True, required: bool = True) -> None:  # fmt: skip
    """A flag per field of `config_class` (TrainConfig or a subclass) but `skip`'s; a flag not given is absent from
    the namespace. presets: the help names each preset's default where it differs. required: argparse enforces the
    fields marked required (False: the caller checks them)."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = hints[f.name]
        options = {
            "dest": f.name,
            "default": argparse.SUPPRESS,  # absent from the namespace: the preset's default applies
            "help": f.metadata["help"] + _defaults_text(f, presets),
            "required": required and f.metadata.get("required", False),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options.update(action="append", metavar=f.metadata["metavar"])
        else:
            scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # `float | None` -> float
            options.update(type=scalar, metavar=f.metadata.get("metavar", "N" if scalar is int else "X"))
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def _defaults_text(f: dataclasses.Field, presets: bool) -> str:
    """The help's "(default: 0.0006; tiny: 0.006)": a scalar field's default, and each preset's that differs."""
    if f.metadata.get("required") or f.default in (None, "", dataclasses.MISSING) or isinstance(f.default, bool):
        return ""
    per_preset = "".join(f"; {name}: {p.train[f.name]}" for name, p in PRESETS.items() if f.name in p.train)
    return f" (default: {f.default}{per_preset if presets else ''})"


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    train(TrainConfig.for_preset(given.pop("preset", DEFAULT_PRESET), **given))
    return 0
