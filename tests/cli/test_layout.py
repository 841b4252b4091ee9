"""The command modules are split by concern, and the CLI starts without the heavy libraries."""

from __future__ import annotations

import importlib
import importlib.util


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
