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

# Message starts of records that quote parameters, bodies, canonical requests or responses.
_LEAKY_PREFIXES = (
    "Making request for",
    "Sending http request",
    "Response body",
    "Response headers",
    "CanonicalRequest",
    "StringToSign",
    "Event request-created",
    "Event before-parameter-build",
    "Event before-call",
    "Event provide-client-params",
    "Event before-sign",
    "Event after-call",
    "Event needs-retry",
    "Event before-send",
    "Retry needed",
    "Not retrying request",
)


class PHIRedactingFilter(logging.Filter):
    """Replace the arguments of botocore records that may quote request or response content."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a leaky record in place; always let it through so its timing stays visible."""
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith(_LEAKY_PREFIXES) or "body" in message.lower():
            record.msg = f"{message.split(':', 1)[0].split('%', 1)[0].strip()}: {REDACTED}"
            record.args = ()
        return True


_FILTER = PHIRedactingFilter()


def redact_botocore_logs(enabled: bool = True) -> None:
    """Install (or, with ``enabled=False``, remove) the redacting filter on botocore's loggers."""
    for name in BOTOCORE_LOGGERS:
        logger = logging.getLogger(name)
        if enabled:
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
        else:
            logger.removeFilter(_FILTER)
