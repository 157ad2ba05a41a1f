"""``arc``: the command line for people and CI.

Each subcommand lives in its own module under :mod:`arc.cli` and registers
itself in :data:`COMMANDS` (name → module path, imported on use so that
``arc token``, which kubectl runs before every request, starts fast).
A failing command prints one line naming the cause and the fix, and exits 1.
"""

import argparse
import importlib
import sys

from arc.errors import ConfigError

# name -> (module, one-line help).  Each module defines add_arguments(parser) and run(args).
COMMANDS = {
    "login": ("arc.cli.login", "log in to an OIDC identity provider (device code or browser)"),
    "logout": ("arc.cli.login", "forget the cached tokens"),
    "token": ("arc.cli.token", "print an ExecCredential for kubectl (refreshing the token)"),
    "connect": ("arc.cli.connect", "reach a cluster: start (or reuse) the client daemon, "
                                   "write its kubeconfig context"),
    "disconnect": ("arc.cli.connect", "stop serving a cluster; the last one stops the daemon"),
    "status": ("arc.cli.connect", "list connected clusters and their health"),
    "proxy": ("arc.cli.connect", "run the client proxy in the foreground"),
    "hash-token": ("arc.cli.tokens", "print the SHA-256 the relay stores for a token"),
    "cluster": ("arc.cli.cluster", "register clusters at the relay (add, list, remove, "
                                   "rotate-token); run on the relay's host"),
    "agent": ("arc.cli.agent", "print the Kubernetes manifests that run a cluster's agent"),
}


class CommandError(Exception):
    """A failure the user can act on: one line, cause and fix."""


def build_parser(chosen=None):
    """The parser; only ``chosen``'s module is imported (``arc token`` must start fast)."""
    parser = argparse.ArgumentParser(prog="arc", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=text, description=text)
        sub_parser.set_defaults(_module=module)
        if name != chosen:
            continue
        mod = importlib.import_module(module)
        adder = getattr(mod, "add_arguments_" + name.replace("-", "_"), None) \
            or getattr(mod, "add_arguments", None)
        if adder is not None:
            adder(sub_parser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    runner = getattr(module, "run_" + args.command.replace("-", "_"), None) \
        or getattr(module, "run")
    try:
        return runner(args) or 0
    except (CommandError, ConfigError) as e:
        print("arc %s: %s" % (args.command, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so that the
    # CommandError the subcommands raise is the one caught here.
    from arc.cli import main as _cli
    sys.exit(_cli.main())
