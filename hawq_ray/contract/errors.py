"""User-facing errors: one line that names the bad input and what would be valid."""


class HawqError(ValueError):
    """Bad input from the user (a file, a name, a budget). The CLI prints it as one line and exits 2."""


class TableError(HawqError):
    """The layer table is unusable (a missing column, a bad value); the message names the column and the layer."""


class BitConfigError(HawqError):
    """A bit configuration that is not `{layer: bits}` for the model's layers; the message names its source."""
