"""How a daemon's command line starts it: `--config FILE`, and every expected failure (a bad
config, an unreachable dependency, a taken port) as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from fedplane.runtime.config import ConfigError, StartupError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# What a daemon reports in one line rather than a traceback.
EXPECTED = (ConfigError, StartupError, OSError)


def run_daemon(prog: str, main: Callable[[str | None], None], *, config_required: bool) -> NoReturn:
    parser = argparse.ArgumentParser(prog=prog, description=f"Run {prog} until Ctrl-C or SIGTERM.")
    parser.add_argument("--config", "-c", required=config_required, help="YAML config file.")
    args = parser.parse_args()
    try:
        main(args.config)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except EXPECTED as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(0)
