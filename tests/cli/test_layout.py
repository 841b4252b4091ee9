"""The command modules are split by concern, and the CLI starts without the heavy libraries."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys


def test_command_helpers_live_in_one_module_per_concern() -> None:
    assert importlib.util.find_spec("healthimaging_df.cli.commands.common") is None
    concerns = {
        "options": ("query_parent", "aws_parent", "common_parent", "UsageError"),
        "building": ("build_query", "read_ids", "typed_value", "parse_where"),
        "connect": ("Target", "aws_client"),
        "output": ("output_format", "write_frame", "read_frame", "status"),
    }
    for name, members in concerns.items():
        module = importlib.import_module(f"healthimaging_df.cli.commands.{name}")
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
        "import healthimaging_df_cli\n"  # what the console script imports first
        "from healthimaging_df.cli import app as cli\n"
        "cli.build_parser().format_help()\n"
        "heavy = ('pandas', 'pyarrow', 'numpy', 'boto3', 'botocore', 'werkzeug', "
        "'importlib.metadata')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert run_python(code) == "[]"


def test_df_ahi_is_registered_on_import_and_pandas_works_in_full() -> None:
    probe = (
        "try:\n    pd.DataFrame({'imageSetId': []}).ahi\n"
        "except AttributeError as e:\n    print('df.ahi needs' in str(e))"
    )
    assert run_python(f"import healthimaging_df\nimport pandas as pd\n{probe}") == "True"
    assert run_python(f"import pandas as pd\nimport healthimaging_df\n{probe}") == "True"
    assert run_python(f"import healthimaging_df.schema\nimport pandas as pd\n{probe}") == "True"
    # pandas is imported in the ordinary way: its JSON writer (a C extension) still works
    writer = (
        "import healthimaging_df\nimport pandas as pd\nprint(pd.DataFrame({'a': [1]}).to_json())"
    )
    assert run_python(writer) == '{"a":{"0":1}}'


def test_the_console_script_writes_json_lines(tmp_path: object) -> None:
    code = (
        "import sys\n"
        "import healthimaging_df_cli\n"
        "from healthimaging_df.local import LocalService\n"
        "from healthimaging_df.cli import app as cli\n"
        "with LocalService.seeded(image_sets=20, seed=1) as s:\n"
        "    import os; os.environ.update(s.env())\n"
        "    sys.exit(cli.main(['search', '--datastore-id', s.datastore_id, '--format', 'jsonl',"
        " '--columns', 'imageSetId', '-q']))\n"
    )
    assert len(run_python(code).splitlines()) == 20


def test_search_explain_imports_none_of_the_heavy_libraries() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import healthimaging_df_cli\n"
        "from healthimaging_df.cli import app as cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = cli.main(['search', '--datastore-id', '0' * 32, '--where', 'PatientID=P1',"
        " '--where', 'Modality=CT', '--between', 'StudyDateTime', '2020', '2021', '--explain'])\n"
        "assert code == 0 and 'SearchImageSets request chains: 1' in out.getvalue()\n"
        "heavy = ('pandas', 'pyarrow', 'numpy', 'boto3', 'botocore', 'werkzeug')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert run_python(code) == "[]"
