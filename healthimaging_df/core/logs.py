"""Keep PHI out of logs: the AWS SDK's DEBUG lines carry request bodies, responses and object keys.

At DEBUG, botocore logs the parameters and body of every request (patient IDs, UIDs) and the body of
every response (names, birth dates); botocore's endpoint resolution, boto3's and s3transfer's
managed transfers and urllib3 log S3 object keys and URLs, and the keys of a snapshot partitioned
by ``PatientID`` hold patient IDs. ``redact_botocore_logs()`` installs one allow-list filter on
every logger of those packages (``COVERED_PACKAGES``): a record whose template is known to carry no
content passes, a few known templates pass with their content-bearing arguments masked, every other
record is rewritten to say what was withheld, its traceback dropped. The library's own log lines
never hold values. The filter is installed when ``healthimaging_df`` is imported; call
``redact_botocore_logs(False)`` to see raw botocore bodies while debugging with synthetic data.

Python's logging applies a logger's filters only to records created on that logger, not to records
of its children, so the filter sits on each logger. Loggers are created by name before their
modules are imported (one per module file of each covered package, found without importing it), so
a module imported later logs through a logger that already has the filter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

REDACTED = "<redacted by healthimaging_df: may contain PHI>"
MASKED = "<redacted>"

# Packages whose loggers can see request or response content, object keys or URLs. pyarrow and
# delta-rs log from C++/Rust (not through Python logging); only deltalake's Python part is here.
COVERED_PACKAGES = ("botocore", "boto3", "s3transfer", "urllib3", "deltalake")

# botocore loggers whose DEBUG records can carry request or response content (kept for reference:
# every logger of COVERED_PACKAGES is covered).
BOTOCORE_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.httpsession",
    "botocore.hooks",
    "botocore.regions",
    "botocore.handlers",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "botocore.retries.adaptive",
    "urllib3.connectionpool",
    "s3transfer.tasks",
    "s3transfer.futures",
    "s3transfer.utils",
    "boto3.s3.transfer",
)

# Templates known to carry no request or response content. Every other record on these loggers is
# rewritten: an allow-list, so a message a library adds or rewords later is redacted by default.
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
        "Setting config variable for %s to %r",
        "Creating a regex based endpoint for %s, %s",
    }
)

# Endpoint rule-set parameters that describe the endpoint, not the request. S3's rule set also takes
# ``Key``, ``Prefix`` and ``CopySource`` (object keys: a partition folder is ``PatientID=<id>``).
SAFE_ENDPOINT_PARAMETERS = frozenset(
    {
        "Region",
        "UseFIPS",
        "UseDualStack",
        "Endpoint",
        "Bucket",
        "ForcePathStyle",
        "Accelerate",
        "UseGlobalEndpoint",
        "UseArnRegion",
        "DisableAccessPoints",
        "DisableMultiRegionAccessPoints",
        "UseObjectLambdaEndpoint",
        "UseS3ExpressControlEndpoint",
        "DisableS3ExpressSessionAuth",
        "AccountId",
        "AccountIdEndpointMode",
    }
)


def _mask_endpoint_parameters(args: Any) -> Any:
    """The endpoint parameters with every value outside the allow-list masked (None: redact all).

    A lone dict argument is the record's ``args`` itself (``logging`` unwraps it).
    """
    if isinstance(args, tuple) and len(args) == 1:
        args = args[0]
    if not isinstance(args, Mapping):
        return None
    return {
        str(name): value if name in SAFE_ENDPOINT_PARAMETERS else MASKED
        for name, value in args.items()
    }


# Templates that pass with some arguments masked: the masking function gets the record's args and
# returns the args to show, or None to redact the whole record.
MASKED_TEMPLATES: dict[str, Callable[[Any], Any]] = {
    "Calling endpoint provider with parameters: %s": _mask_endpoint_parameters,
}

# What survives of a rewritten record: its leading words, two or more, in lower case but for a
# first capital ("Making request for", "Executing task"). No ID, UID, date, path or upper-case
# name (DICOM writes names "DOE^JOHN") can match, even from a message formatted before logging.
_HEAD = re.compile(r"[A-Z]?[a-z]+(?: [a-z]+)+")


class PHIRedactingFilter(logging.Filter):
    """Rewrite every record of the covered loggers whose template is not known to be free of content."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a record in place; always let it through, so its timing stays visible."""
        template = record.msg if isinstance(record.msg, str) else None
        if template in SAFE_TEMPLATES:
            return True
        mask = MASKED_TEMPLATES.get(template) if template is not None else None
        if mask is not None:
            shown = mask(record.args)
            if shown is not None:
                record.args = shown
                return True
        text = template if template is not None else type(record.msg).__name__
        # A template's text before its first placeholder is the library's own words, but a message
        # formatted before logging (an f-string) can begin with anything: hence the strict head.
        found = _HEAD.match(text.split("%", 1)[0].split(":", 1)[0].strip())
        head = found.group(0)[:60] if found else "record"
        exc = record.exc_info[1] if record.exc_info else None
        kind = f" ({type(exc).__name__})" if exc is not None else ""
        record.msg = f"{head}{kind}: {REDACTED}"
        record.args = ()
        # a traceback quotes the exception's message: an SDK error can hold the request's URL
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


_FILTER = PHIRedactingFilter()
_enabled = False  # whether the user wants it (redact_botocore_logs(False) turns it off)
_module_names: list[str] | None = None
# Folders of service models and documentation generators: many files, no request-time logging.
_SKIPPED = frozenset({"data", "docs", "examples", "tests"})


def module_logger_names() -> list[str]:
    """The logger name of every module of the covered packages installed (found, not imported).

    Each package is located with ``importlib.util.find_spec`` (which does not import it) and its
    folders are listed once per process (model and documentation folders skipped). A package that
    is not installed is skipped.
    """
    global _module_names
    if _module_names is not None:
        return _module_names
    names: list[str] = []
    for package in COVERED_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        names.append(package)
        for base in spec.submodule_search_locations or []:
            for folder, subfolders, files in os.walk(base):
                subfolders[:] = [s for s in subfolders if s.isidentifier() and s not in _SKIPPED]
                relative = os.path.relpath(folder, base)
                parts = [] if relative == "." else relative.split(os.sep)
                for file in files:
                    if file.endswith(".py"):
                        module = file[:-3]
                        tail = [] if module == "__init__" else [module]
                        names.append(".".join([package, *parts, *tail]))
    _module_names = names
    return names


def _covered(name: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in COVERED_PACKAGES)


def redact_botocore_logs(enabled: bool = True) -> None:
    """Install (or, with ``enabled=False``, remove) the redacting filter on the covered loggers.

    Covers every logger of ``COVERED_PACKAGES`` (botocore, boto3, s3transfer, urllib3,
    deltalake): one per module file of each installed package, created now if need be, and any
    other logger of theirs that exists when called. The library calls it again each time it makes
    a client, so a logger created under another name since then is covered too.
    """
    existing = [name for name in list(logging.Logger.manager.loggerDict) if _covered(name)]
    for name in {*BOTOCORE_LOGGERS, *module_logger_names(), *existing}:
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


def engine_error_text(
    engine: str, kind: str, message: str, shown: tuple[str, ...], quoted: re.Pattern[str]
) -> str:
    """An SQL engine's error as a text without values, for an error that users see.

    A syntax or column error names columns and syntax: its first line is shown, each match of
    *quoted* (a literal) masked as ``'…'``. Any other error can quote a cell (PHI): only its
    class is named. *engine* is ``"A/B"`` when a shown error names A and another B
    (``"Polars SQL/Polars"``).
    """
    shown_as, _, withheld_as = engine.partition("/")
    if kind in shown:
        first = message.strip().splitlines()[0] if message.strip() else kind
        return f"{shown_as} raised {kind}: {quoted.sub(chr(39) + '…' + chr(39), first)}"
    return (
        f"{withheld_as or shown_as} raised {kind}; its message, which may quote values, is "
        "withheld from this text: see the error's engine_message"
    )
