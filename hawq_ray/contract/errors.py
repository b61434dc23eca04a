"""User-facing errors: one line that names the bad input and what would be valid."""
import reprlib


class HawqError(ValueError):
    """Bad input from the user (a file, a name, a budget). The CLI prints it as one line and exits 2."""


class TableError(HawqError):
    """The layer table is unusable (a missing column, a bad value); the message names the column and the layer."""


class BitConfigError(HawqError):
    """A bit configuration that is not `{layer: bits}` for the model's layers; the message names its source."""


BRIEF_CHARS = 80                  # the most of a bad value an error shows


class _Brief(reprlib.Repr):
    """reprlib's bounded repr, and an integer too long to print (over 4300 digits raises) by its size."""
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 8

    def repr_int(self, x, level):
        if x.bit_length() > 200:
            return f"<an integer of {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)


def brief(value, limit: int = BRIEF_CHARS) -> str:
    """repr of `value` for an error message: at most about `limit` characters, in time and memory that do not
    grow with the value (a huge list, a deep or self-referencing structure, a 10000-digit integer)."""
    try:
        text = _Brief().repr(value)
    except Exception:  # noqa: BLE001 - a value whose own repr fails
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
