"""``healthimaging-df demo``: a real cohort query against the bundled local HealthImaging service."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def run_demo(image_sets: int = 5_000, seed: int = 42, latency_ms: float = 20.0) -> pd.DataFrame:
    """Start a local service, run a cohort query through boto3, print the plan and the result."""
    import pandas as pd

    from healthimaging_df import schema
    from healthimaging_df.local import LocalService
    from healthimaging_df.query import Query

    print(f"Starting the local HealthImaging service with {image_sets} synthetic image sets...")
    with LocalService.seeded(image_sets=image_sets, seed=seed, latency_ms=latency_ms) as service:
        datastore_id = service.datastore_id
        assert datastore_id is not None
        print(f"  endpoint {service.endpoint_url}, datastore {datastore_id}\n")
        query = (
            Query(datastore_id)
            .where(Modality=["CT", "MR"], isPrimary=True)
            .between("StudyDateTime", "2021-01-01", "2023-12-31")
            .sort_by("StudyDateTime", ascending=True)
        )
        print("Query: CT and MR primary image sets with studies in 2021-2023\n")
        print(query.explain(), "\n")
        frame = query.to_dataframe(client=service.client(), progress=False)
        requests = service.stats.by_operation.get("SearchImageSets", 0)
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        print(f"{len(frame)} image sets from {requests} SearchImageSets requests; the first rows:")
        shown = list(schema.DISPLAY_COLUMNS)  # the schema's default display columns
        print(frame[shown].head(8).to_string(index=False), "\n")
        print("Image sets by modality:")
        print(frame["Modality"].value_counts().to_string(), "\n")
    return frame


def register(commands: Any) -> None:
    """Add the ``demo`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="run a cohort query against the bundled local service",
        description="Start the local HealthImaging service, run a cohort query through boto3, "
        "print its plan, the first rows and counts by modality.",
    )
    parser.add_argument("--image-sets", type=int, default=5_000, help="synthetic image sets")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added latency per request")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    run_demo(args.image_sets, args.seed, args.latency_ms)
    return 0
