"""``healthimaging-df demo``: a real cohort query against the bundled local HealthImaging service."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def run_demo(
    image_sets: int = 5_000, seed: int = 42, latency_ms: float = 20.0, explain: bool = False
) -> pd.DataFrame:
    """Start a local service, run a cohort query through boto3, print the cohort (and the plan).

    The cohort and its numbers come first, then one line on how they were fetched; the plan only
    with *explain*.
    """
    import time

    import pandas as pd

    from healthimaging_df import schema
    from healthimaging_df.local import LocalService
    from healthimaging_df.query import Query

    with LocalService.seeded(image_sets=image_sets, seed=seed, latency_ms=latency_ms) as service:
        service.export_dicomweb_endpoint()  # QIDO-RS is served on its own address
        datastore_id = service.datastore_id
        assert datastore_id is not None
        query = (
            Query(datastore_id)
            .where(Modality=["CT", "MR"], isPrimary=True)
            .between("StudyDateTime", "2021-01-01", "2023-12-31")
            .sort_by("StudyDateTime", ascending=True)
        )
        started = time.perf_counter()
        frame = query.to_dataframe(client=service.client(), progress=False)
        seconds = time.perf_counter() - started
        searches = service.stats.by_operation.get("SearchImageSets", 0)
        qido = sum(count for name, count in service.stats.by_operation.items() if "DICOM" in name)
        endpoint = service.endpoint_url
    studies = frame["StudyInstanceUID"].nunique()
    patients = frame["PatientID"].nunique()
    modalities = ", ".join(f"{m} {n}" for m, n in frame["Modality"].value_counts().items())
    print(
        "Cohort: CT and MR primary image sets with studies in 2021-2023, from "
        f"{image_sets:,} synthetic image sets"
    )
    print(f"  {len(frame):,} image sets, {studies:,} studies, {patients:,} patients ({modalities})")
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        shown = list(schema.DISPLAY_COLUMNS)  # the schema's default display columns
        print(frame[shown].head(5).to_string(index=False))
    plural = "" if searches == 1 else "s"
    through = f" after {qido} QIDO-RS search{'es' if qido != 1 else ''}" if qido else ""
    print(
        f"Fetched with {searches} SearchImageSets request{plural}{through} in {seconds:.1f} s "
        f"through boto3 from the bundled local service ({endpoint})"
        + ("" if explain else "; --explain shows the plan")
    )
    if explain:
        print()
        print(query.explain())
    return frame


def register(commands: Any) -> None:
    """Add the ``demo`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="run a cohort query against the bundled local service",
        description="Start the local HealthImaging service, run a cohort query through boto3, "
        "and print the cohort: its counts, its first rows and how it was fetched.",
    )
    parser.add_argument("--image-sets", type=int, default=5_000, help="synthetic image sets")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added latency per request")
    parser.add_argument("--explain", action="store_true", help="print the query's plan too")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    run_demo(args.image_sets, args.seed, args.latency_ms, explain=args.explain)
    return 0
