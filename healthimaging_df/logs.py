"""Keep PHI out of logs: botocore's DEBUG lines carry request and response bodies.

At DEBUG, botocore logs the parameters and body of every request (patient IDs, UIDs) and the body of
every response (names, birth dates). ``redact_botocore_logs()`` installs a filter on the botocore
loggers that rewrites those records to say what was withheld. The library's own log lines never
hold values. The filter is installed when ``healthimaging_df`` is imported; call
``redact_botocore_logs(False)`` to see raw botocore bodies while debugging with synthetic data.
"""

from __future__ import annotations

import logging

REDACTED = "<redacted by healthimaging_df: may contain PHI>"

# botocore loggers whose DEBUG records can carry request or response content.
BOTOCORE_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.httpsession",
    "botocore.hooks",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "botocore.retries.adaptive",
    "urllib3.connectionpool",
)

# Templates known to carry no request or response content. Every other record on these loggers is
# rewritten: an allow-list, so a message botocore adds or rewords later is redacted by default.
SAFE_TEMPLATES = frozenset(
    {
        "Event %s: calling handler %s",
        "Changing event name from %s to %s",
        "Calculating signature using v4 auth.",
        "Not retrying request.",
        "Retry needed, retrying request after delay of: %s",
        "Response received to retry, sleeping for %s seconds",
        "Loading JSON file: %s",
        "Setting %s timeout as %s",
        "Starting new HTTP connection (%d): %s:%s",
        "Starting new HTTPS connection (%d): %s:%s",
        "Endpoint provider result: %s",
        "Calling endpoint provider with parameters: %s",
        "Setting config variable for %s to %r",
        "Creating a regex based endpoint for %s, %s",
    }
)


class PHIRedactingFilter(logging.Filter):
    """Rewrite every botocore/urllib3 record whose template is not known to be free of content."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a record in place; always let it through, so its timing stays visible."""
        if isinstance(record.msg, str) and record.msg in SAFE_TEMPLATES:
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        head = template.split("%", 1)[0].split(":", 1)[0].strip()
        record.msg = f"{head}: {REDACTED}"
        record.args = ()
        return True


_FILTER = PHIRedactingFilter()
_enabled = False  # whether the user wants it (redact_botocore_logs(False) turns it off)


def redact_botocore_logs(enabled: bool = True) -> None:
    """Install (or, with ``enabled=False``, remove) the redacting filter on botocore's loggers.

    Covers the loggers named in ``BOTOCORE_LOGGERS`` and every ``botocore.*`` or ``urllib3.*``
    logger that exists when called; the library calls it again each time it makes a client, so
    loggers of botocore modules imported later are covered too.
    """
    existing = [
        name
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith(("botocore.", "urllib3."))
    ]
    for name in {*BOTOCORE_LOGGERS, *existing}:
        logger = logging.getLogger(name)
        if not enabled:
            logger.removeFilter(_FILTER)
        elif _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    global _enabled
    _enabled = enabled


def refresh() -> None:
    """Cover loggers created since the filter was installed, unless the user turned it off."""
    if _enabled:
        redact_botocore_logs(True)
