"""The one exception type for bad user input.

Anything the user can fix (a wrong path, an unknown config key, a shape mismatch) raises
`UserError` with one sentence that names the file or field and what was expected. The CLI prints
it without a traceback and exits with code 2; scripts (benchmarks/) do the same with `run_script`.
"""

import sys
from typing import Callable


class UserError(ValueError):
    """Bad input from the user: one clear sentence, exit code 2 from the CLI.

    A ValueError, so library callers below the CLI catch it as the bad value it is; only
    `jaxem.cli.main` turns it into the one-line message and exit code 2."""


def run_script(main: Callable[[], object]) -> None:
    """Runs a script's `main()`; a UserError prints "SCRIPT: error: <sentence>" on stderr (SCRIPT:
    the script's path as run) and exits with code 2, as the CLI does."""
    try:
        main()
    except UserError as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)
