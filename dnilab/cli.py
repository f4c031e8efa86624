"""Command lines built from config dataclasses, so every default is defined once.

Each dataclass field becomes a flag `--name`; its metadata may carry `help`,
`choices` (a registry: its keys are what the flag accepts) and `positive` (the
value must be > 0). Booleans take True/False in any case (`--conditioned True`,
as the seed's users type it), and a bare flag means True (`--conditioned`). Any bad flag or value ends the program with one
line on stderr and exit code 2.
"""
import argparse
import dataclasses
import sys
import typing

from dni.errors import DNIError

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def parse_bool(text):
    """'True'/'false'/'1'/'no'... -> bool; anything else is refused."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not 0 < value < float("inf"):  # nan and inf too: a learning rate of inf is no run at all
            raise argparse.ArgumentTypeError(f"must be > 0{' and finite' if kind is float else ''}, got {text!r}")
        return value
    return parse


def _strict(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
    return parse


def build_parser(config_cls, *, prog=None, description=None, defaults=None):
    """An argparse parser with one flag per field of `config_cls`.

    `defaults` overrides field defaults for this program (e.g. method='backprop' for mlp.py).
    """
    parser = OneLineParser(prog=prog, description=description)
    hints = typing.get_type_hints(config_cls)
    defaults = defaults or {}
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]: default None means "not given"
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = defaults.get(f.name, f.default)
        meta = f.metadata
        kwargs = dict(default=default, help=meta.get("help", ""))
        if kind is bool:  # a bare switch means True: --pipeline, --conditioned
            kwargs.update(type=parse_bool, metavar="True|False", nargs="?", const=True)
        elif meta.get("positive"):
            kwargs.update(type=_positive(kind))
        else:
            kwargs.update(type=_strict(kind))
        if "choices" in meta:
            kwargs.update(choices=list(meta["choices"]))
        if kwargs["help"] and default not in (None, ""):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(config_cls, argv=None, **parser_kwargs):
    """Parse argv into a `config_cls` instance; exits 2 with one line on bad input."""
    parser = build_parser(config_cls, **parser_kwargs)
    args = parser.parse_args(argv)
    try:
        return config_cls(**vars(args))
    except DNIError as e:  # cross-field checks in __post_init__
        parser.error(str(e))


def main_guard(fn, *args, **kwargs):
    """Run fn; a DNIError becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except DNIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
