"""The one error type the CLI turns into a one-line message."""


class EvalError(Exception):
    """Bad input to an evaluation (missing model, empty data, bad option...)."""
