"""The one exception type for bad user input.

Anything the user can fix (a wrong path, an unknown config key, a shape mismatch) raises
`UserError` with one sentence that names the file or field and what was expected. The CLI prints
it without a traceback and exits with code 2.
"""


class UserError(ValueError):
    """Bad input from the user: one clear sentence, exit code 2 from the CLI.

    A ValueError, so library callers below the CLI catch it as the bad value it is; only
    `jaxem.cli.main` turns it into the one-line message and exit code 2."""
