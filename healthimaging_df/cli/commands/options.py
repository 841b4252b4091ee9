"""The command-line options the service commands share, and the usage errors they raise.

Nothing here imports pandas, pyarrow or boto3: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from healthimaging_df.aws.quotas import SEARCH_TPS

_Number = TypeVar("_Number", int, float)

LOCAL_IMAGE_SETS = 5_000  # the synthetic datastore behind --local: the demo's data
LOCAL_SEED = 42

EXIT_STATUS = """\
exit status:
  0  success
  1  service error (HTTP error from HealthImaging, throttled, unreachable endpoint, unknown
     datastore), or a file that could not be written
  2  usage or configuration error (bad option or value, unknown column, unreadable --ids-from
     file, no region or credentials); nothing was sent
  3  search --fail-if-empty, and nothing matched
  130  interrupted (Ctrl-C or SIGTERM); an export writes its checkpoint first

Errors are one line on stderr naming the problem, never a DICOM value. Progress goes to stderr
when it is a terminal; results go to stdout or the --out file."""

# the option groups' introductions, laid out as --help prints them
AWS_INTRO = """\
Credentials, region and endpoint come from the usual places unless given here:
AWS_PROFILE, AWS_DEFAULT_REGION (what botocore reads), AWS_ENDPOINT_URL_MEDICAL_IMAGING,
AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING, ~/.aws/config, instance roles..."""

QUERY_INTRO = """\
COL is a column name as in the frame (docs/schema.md): PatientID, Modality,
StudyDateTime, createdAt... Every condition must hold (AND), except that each --any
group is one alternative: a row is kept when it meets one group (OR) and the rest."""


class UsageError(Exception):
    """A command line or input file the command cannot use (exit code 2); no PHI in the message."""


class ConfigError(UsageError):
    """AWS configuration missing or wrong: profile, region or credentials (exit code 2)."""


def common_parent() -> argparse.ArgumentParser:
    """Options every service command takes: ``-v`` and ``-q``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log what happens on stderr (no PHI); -vv adds botocore's log, bodies redacted",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bar and no summary line on stderr",
    )
    return parent


def aws_parent() -> argparse.ArgumentParser:
    """The AWS options, spelled as the AWS CLI spells them, and the fetch options."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("AWS", AWS_INTRO)
    group.add_argument("--profile", help="named profile from ~/.aws/config")
    group.add_argument("--region", help="AWS region, e.g. us-east-1")
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="send requests to URL (e.g. a local service); host-prefix injection is turned off",
    )
    group.add_argument(
        "--dicomweb-endpoint-url",
        metavar="URL",
        help="where DICOMweb (QIDO-RS) lives, for a custom --endpoint-url (a VPC endpoint's own "
        "DNS name, a proxy); else AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING, else "
        "dicom-medical-imaging.REGION.amazonaws.com for AWS's own endpoint. Unknown: queries "
        "run on SearchImageSets alone",
    )
    group.add_argument(
        "--local",
        action="store_true",
        help=f"ignore AWS: run against the bundled local service, started for this command and "
        f"seeded with the demo's {LOCAL_IMAGE_SETS} synthetic image sets; --datastore-id may be "
        "left out",
    )
    group.add_argument(
        "--max-tps",
        type=_positive_float,
        default=SEARCH_TPS,
        metavar="N",
        help="requests per second, all threads together (default: %(default)s, the service quota)",
    )
    group.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="request chains in flight at once (default: enough to keep the rate busy, from the "
        "measured round trip, at most 64)",
    )
    return parent


def pace(args: argparse.Namespace) -> dict[str, Any]:
    """The fetch keywords ``--max-tps`` and ``--max-concurrency`` set (see :func:`aws_parent`)."""
    return {"max_tps": args.max_tps, "max_concurrency": args.max_concurrency}


def query_parent() -> argparse.ArgumentParser:
    """The options that state a cohort; ``build_query`` turns them into a ``Query``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("query", QUERY_INTRO)
    group.add_argument(
        "--datastore-id",
        metavar="ID",
        required=False,
        help="the datastore (32 characters); required unless --local",
    )
    group.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="COL=VALUE equals (repeat a column for any of several values: IN); "
        "COL!=VALUE differs (rows missing COL are kept); COL~TEXT contains TEXT",
    )
    group.add_argument(
        "--any",
        action="append",
        nargs="+",
        default=[],
        metavar="COND",
        help="one alternative of an OR: COND... in the --where forms, all of which must hold "
        "(AND); repeat --any for each alternative. --any Modality=CT --any PatientID=P1 keeps "
        "CT image sets and all of P1's (Query.union in Python)",
    )
    group.add_argument(
        "--between",
        action="append",
        nargs=3,
        default=[],
        metavar=("COL", "LOW", "HIGH"),
        help="LOW <= COL <= HIGH, inclusive; dates like 2021-01-01 or 2021 cover the whole day/year",
    )
    group.add_argument("--null", action="append", default=[], metavar="COL", help="COL is missing")
    group.add_argument(
        "--not-null", action="append", default=[], metavar="COL", help="COL is present"
    )
    group.add_argument(
        "--ignore-case",
        action="store_true",
        help="COL~TEXT conditions, and COL=VALUE on the code-string columns (Modality, "
        "BodyPartExamined, PatientSex), ignore case; IDs always match exactly",
    )
    group.add_argument(
        "--ids-from",
        metavar="FILE",
        help="IDs to match, one chain per ID: a .csv/.tsv file (the column named by --csv-column, "
        "else --column) or plain text, one ID per line (blank lines and # comments skipped); "
        "- reads stdin",
    )
    group.add_argument(
        "--column",
        metavar="COL",
        default="PatientID",
        help="the column the --ids-from IDs are matched against (default: %(default)s)",
    )
    group.add_argument(
        "--csv-column",
        metavar="NAME",
        help="header of the ID column in a --ids-from CSV file, when it is not COL",
    )
    group.add_argument(
        "--sort",
        metavar="COL[:desc]",
        help="order by COL, ascending unless :desc (default: updatedAt, newest first)",
    )
    group.add_argument("--limit", type=_positive_int, metavar="N", help="at most N rows")
    group.add_argument(
        "--assume-consistent-studies",
        action="store_true",
        help="assert that a study's image sets agree on PatientName, StudyDescription, "
        "PatientBirthDate and StudyDate (AWS does not guarantee it), so QIDO-RS may match them "
        "per study; without it QIDO-RS matches Modality and SeriesNumber only",
    )
    return parent


def _positive(convert: Callable[[str], _Number], expects: str) -> Callable[[str], _Number]:
    """An argparse type: the text as *convert* reads it, which must be above zero."""

    def positive(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {expects}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expects {expects}")
        return value

    return positive


_positive_int = _positive(int, "a positive integer")
_positive_float = _positive(float, "a positive number")


def add_command(
    commands: Any,
    name: str,
    page: str,
    run: Callable[[argparse.Namespace], int],
    *,
    parents: list[argparse.ArgumentParser] | None = None,
    exit_status: str | None = EXIT_STATUS,
) -> argparse.ArgumentParser:
    """A verb's parser, from its help *page*, handled by *run*.

    The page is written as ``--help`` shows it: the one-line summary the verb list shows, a
    blank line, the description (one paragraph, printed as one line), a blank line, and the
    examples, printed after the options with the *exit_status* (None: the page has its own).
    *parents* default to a query verb's: the query, AWS and common options.
    """
    summary, description, examples = page.split("\n\n", 2)
    if parents is None:
        parents = [query_parent(), aws_parent(), common_parent()]
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        parents=parents,
        help=summary,
        description=description.replace("\n", " "),
        epilog=examples if exit_status is None else f"{examples}\n{exit_status}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=run)
    return parser


def add_enrichment(
    commands: Any, name: str, page: str, run: Callable[[argparse.Namespace], int], needs: str
) -> tuple[argparse.ArgumentParser, Any]:
    """A verb that adds columns to a cohort: the parser, and its own group holding ``--from``.

    The cohort is ``--from FILE`` (a file with the columns *needs* names) or, without it, the
    query the query options state.
    """
    parser = add_command(commands, name, page, run)
    group = parser.add_argument_group(name.replace("-", " "))
    group.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help=f"image sets to read: a .parquet, .csv or .jsonl file {needs}; the query options "
        "are not used then",
    )
    return parser, group


def add_explain(group: Any, help_: str) -> None:
    """``--explain``: print what the verb would do and send nothing (search, sql)."""
    group.add_argument("--explain", action="store_true", help=help_)
