"""``python -m torch_matgrad <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module; each module defines ``configure(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "check": "torch_matgrad.check",
    "jacobian": "torch_matgrad.jacobian_cli",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_matgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.configure(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
