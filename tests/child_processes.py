"""What the tests that start the CLI or a driver as a child process share (no tests here)."""
import signal


def as_from_a_terminal():
    """Ctrl-C's default action in the child, whatever this process inherited: a shell that starts a job in the
    background makes it (and so its children) ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
