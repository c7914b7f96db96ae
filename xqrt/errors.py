"""The one exception type the command lines turn into a single error line."""
from __future__ import annotations

import sys
from typing import Callable


class XQError(Exception):
    """Bad input or an unsupported request: the message is meant for the user as it is."""


def cli_exit_code(body: Callable[[], int], prog: str = "xqrt") -> int:
    """Run a command line's body; bad input becomes one `PROG: error:` line and exit 1."""
    try:
        return body()
    except XQError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}", file=sys.stderr)
        return 1
    except MemoryError as e:  # an allocation no check foresaw: still one line
        print(f"{prog}: error: out of memory ({e or 'no detail'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
