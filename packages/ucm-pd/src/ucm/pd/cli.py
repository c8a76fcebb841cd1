"""``ucm-pd``: command line of UCM's prefill/decode disaggregation."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ucm-pd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser(
        "proxy",
        help="serve an OpenAI-compatible API that prefills on one server and decodes on another",
        description="Each request is prefilled (one token) on a prefill server (kv_role kv_producer), then "
        "decoded on a decode server (kv_role kv_consumer) that loads the prompt's KV from the shared UCM store.",
    )
    proxy.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill servers (http://host:port)")
    proxy.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode servers (http://host:port)")
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    proxy.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    proxy.add_argument(
        "--health-interval", type=float, default=5.0, help="seconds between health checks (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ucm.pd.proxy import serve

    try:
        logging.getLogger("ucm.pd").info(
            "proxy on %s:%d: prefill %s, decode %s", args.host, args.port, args.prefill, args.decode
        )
        serve(args.prefill, args.decode, args.host, args.port, args.health_interval)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
