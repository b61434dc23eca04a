"""User-facing errors: one line that names the bad input and what would be valid."""


class HawqError(ValueError):
    """Bad input from the user (a file, a name, a budget). The CLI prints it as one line and exits 2."""
