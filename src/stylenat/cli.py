"""The `stylenat` command: one entry point, one sub-command per job.

Each sub-command parses its arguments and calls one library function; errors a user can cause
surface as one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from stylenat import __version__
    from stylenat.nn.attention import available_backends

    print(f"stylenat {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: cuda ({torch.cuda.device_count()}x {names})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    print("attention backends:")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"  {dev}: {', '.join(available_backends(dev))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylenat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print the version, the device and the usable attention backends")
    p.set_defaults(func=_cmd_info)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"stylenat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stylenat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
