"""The trainer's user-facing error: the CLI prints its message (which names the file and row) and exits 2."""


class DataError(Exception):
    """Training or evaluation data that cannot be used as given; the message says where and why."""
