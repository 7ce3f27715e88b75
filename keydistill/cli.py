"""What the five commands (train, glue, ablation, predict, export) share: the argument parser and the runner.

One convention for all of them:

- flags take their spelled-out form (--output-dir), the underscore spelling (--output_dir), and for the
  common settings transformers' names (--learning_rate for --lr): `Parser(aliases=...)`;
- a command line that cannot be read is one line, `error: ...; see --help`, and exit status 2;
- a setting or input that cannot work is one `error:` line and exit status 2, found before any work;
- a failure inside the work (a failed collective, a task of the GLUE table) is exit status 1;
- Ctrl-C is exit status 130.

docs/cli.md holds the table of exit statuses.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from typing import Callable, Iterable

from keydistill.errors import ConfigError, DataError, KeydistillError, RunError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SEE_HELP = "see --help"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions kept as written (keydistill.cli.paragraphs fills them), each flag's default shown."""


class Parser(argparse.ArgumentParser):
    """argparse with the commands' conventions: errors raise UsageError (the runner prints one line, not the
    usage block), no abbreviated flags (--task must never be taken for --tasks), underscore spellings and
    aliases normalised to the flags' own names before parsing."""

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        self.aliases = dict(aliases or {})  # "--learning-rate" -> "--lr" (both sides in the dashed spelling)
        self.flags: list[str] = []  # every option string, for "did you mean"
        self.dests: list[str] = []  # every destination, for explicit_flags
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags += [a for a in action.option_strings if a.startswith("--")]
        if action.dest != "help":
            self.dests.append(action.dest)
        return action

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.normalise(args), namespace)

    def normalise(self, argv: Iterable[str]) -> list[str]:
        """--output_dir -> --output-dir, --learning_rate=3e-4 -> --lr=3e-4; nothing after a bare --."""
        out, rest = [], list(argv)
        while rest:
            token = rest.pop(0)
            if token == "--":
                return out + [token] + rest
            if token.startswith("--"):
                name, eq, value = token.partition("=")
                name = "--" + name[2:].replace("_", "-")
                token = self.aliases.get(name, name) + eq + value
            out.append(token)
        return out

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            guesses = [g for u in unknown for g in difflib.get_close_matches(u.split("=")[0], self.flags, n=1)]
            if guesses:
                message += f" (did you mean {', '.join(guesses)}?)"
        raise UsageError(message)


def explicit_flags(parser: Parser, argv: list[str] | None) -> dict:
    """Only the settings given on the command line: argv parsed again with a sentinel as every default."""
    import copy

    unset = object()  # not a string: argparse passes it through untouched
    quiet = copy.deepcopy(parser)
    quiet.set_defaults(**dict.fromkeys(quiet.dests, unset))
    return {k: v for k, v in vars(quiet.parse_known_args(argv)[0]).items() if v is not unset}


def run_command(work: Callable[[], int | None], *, interrupted: str = "") -> int:
    """Run a command's work and turn what it raises into one stderr line and the exit status of the table in
    this module's docstring. An exception that is none of keydistill's (a bug) keeps its traceback."""
    try:
        status = work()
    except (UsageError, ConfigError) as e:
        print(f"error: {e}; {SEE_HELP}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:  # found once the work had started
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeydistillError as e:  # e.g. a backend asked for that this machine lacks
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted{': ' + interrupted if interrupted else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status


def paragraphs(*texts: str, width: int = 100) -> str:
    """Help text in paragraphs, each filled to `width` (the parser keeps line breaks as written)."""
    return "\n\n".join(textwrap.fill(" ".join(t.split()), width) for t in texts if t)


def wrote(folder, names: Iterable[str]) -> str:
    """The line every command ends with: what it wrote, and where."""
    names = list(names)
    return f"wrote {folder}" + (f" ({', '.join(names)})" if names else "")
