"""The one base class of errors that are the user's to fix (bad config, data, model, paths).

The CLI prints these as a single ``error: ...`` line with exit code 2 and no traceback (the
message already names the field or file and what was expected); ``--debug`` or
``LANCET_DEBUG=1`` shows the traceback. Every other exception is a bug and keeps its traceback.
Each project error type subclasses this beside its historical base (ValueError, RuntimeError,
OSError), so existing ``except ValueError`` handlers keep working.
"""

from __future__ import annotations


class LancetUserError(Exception):
    """An error the user fixes by changing an input; its message is the whole explanation."""
