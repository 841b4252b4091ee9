"""The command modules are split by concern, and the CLI starts without the heavy libraries."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys


def test_command_helpers_live_in_one_module_per_concern() -> None:
    assert importlib.util.find_spec("healthimaging_df.commands.common") is None
    concerns = {
        "options": ("query_parent", "aws_parent", "common_parent", "UsageError"),
        "building": ("build_query", "read_ids", "typed_value", "parse_where"),
        "connect": ("Target", "aws_client"),
        "output": ("output_format", "write_frame", "read_frame", "status"),
    }
    for name, members in concerns.items():
        module = importlib.import_module(f"healthimaging_df.commands.{name}")
        for member in members:
            assert hasattr(module, member), (name, member)


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_help_imports_none_of_the_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from healthimaging_df import cli\n"
        "cli.build_parser().format_help()\n"
        "heavy = ('pandas', 'pyarrow', 'numpy', 'boto3', 'botocore', 'werkzeug', "
        "'importlib.metadata')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert run_python(code) == "[]"


def test_df_ahi_is_registered_whichever_is_imported_first() -> None:
    probe = (
        "try:\n    pd.DataFrame({'imageSetId': []}).ahi\n"
        "except AttributeError as e:\n    print('df.ahi needs' in str(e))"
    )
    assert run_python(f"import healthimaging_df\nimport pandas as pd\n{probe}") == "True"
    assert run_python(f"import pandas as pd\nimport healthimaging_df\n{probe}") == "True"
    assert run_python(f"import healthimaging_df.schema\nimport pandas as pd\n{probe}") == "True"
