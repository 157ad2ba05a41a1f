"""``arc hash-token``: the registry form of a token."""

import getpass
import sys

from arc.relay.registry import token_digest


def add_arguments(parser):
    parser.add_argument("token", nargs="?", help="the token (default: read from standard input)")


def run(args):
    token = args.token
    if token is None:
        token = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass(
            "token: ")
    print(token_digest(token.strip()))
