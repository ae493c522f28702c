"""The one exception type refattn raises for bad input."""


class RefattnError(ValueError):
    """Invalid input to refattn.

    A subclass of :class:`ValueError` so that callers that already catch
    ``ValueError`` keep working. Every message names the offending argument
    and states what was expected.
    """
