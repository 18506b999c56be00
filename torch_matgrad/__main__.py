"""python -m torch_matgrad <command>: check the op, its Jacobians, or benchmark it.
Each command's --help lists its options."""

from __future__ import annotations

import argparse
import importlib
import sys

from .cli import plain

# command -> module; each module defines ``configure(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "bench": "torch_matgrad.bench",
    "check": "torch_matgrad.check",
    "jacobian": "torch_matgrad.jacobian_cli",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_matgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        doc = plain(module.__doc__.strip())
        module.configure(sub.add_parser(
            name, help=doc.splitlines()[0], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        ))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; bench reports what finished before it returns
        print(f"\n{args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
