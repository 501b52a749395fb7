"""The one exception type for bad user input.

Anything the user can fix (a wrong path, an unknown config key, a shape mismatch) raises
`UserError` with one sentence that names the file or field and what was expected. The CLI prints
it without a traceback and exits with code 2.
"""


class UserError(Exception):
    """Bad input from the user: one clear sentence, exit code 2 from the CLI."""
