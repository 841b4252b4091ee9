"""Delta and Iceberg snapshots side by side: an export, ten 1% refreshes and a no-op, in one run.

Run: ``.venv/bin/python -m bench table_format_bench`` (``--image-sets``, ``--refreshes``,
``--no-docs``).

The bundled local service holds ``--image-sets`` image sets (default 100,000) with no throttle
(no token bucket, no latency: the quota is lifted on the service) and the client runs with
``max_tps=None``, so fetching is not the bottleneck. For each placement of the changes (uniformly
at random; among the newest 2% by ``createdAt``), one service is seeded and the cohort
``Query(ds).where(isPrimary=True)`` is exported twice: ``to_delta(folder)`` and
``to_iceberg("bench.cohort", catalog="sqlite:///…/catalog.db", warehouse=…)`` (the local SQL
catalog). Then ``--refreshes`` times: 1% of the image sets change in the service (60% a new
version, 20% leave the cohort by ``isPrimary=False``: the refresh deletes them, 20% newly
imported), and ``refresh_snapshot`` runs on the Delta table, then on the Iceberg table. Real
deletions (``DeleteImageSet``) are left out: a plain refresh cannot see them (that is
``reconcile=True`` or sync's job). After the last one, a refresh with nothing changed (the no-op),
then both tables are compared with a fresh query (the same imageSetIds at the same versions).

Bytes written per commit come from each table's own record of the files it added: the ``add``
actions' ``size`` in the new Delta log entries, ``added-files-size`` in the summaries of the new
Iceberg snapshots; the files that appeared on disk are counted too, as a check.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._report import machine, write_section
from healthimaging_df import Query
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import TARGET_FILE_SIZE, read_snapshot

TITLE = "Delta and Iceberg snapshots: export, 1% refreshes, a no-op refresh"
FAST: dict[str, Any] = {"progress": False, "max_tps": None}
PLACEMENTS = ("random", "newest")
TABLE = "bench.cohort"


class Target:
    """One table (Delta folder or Iceberg table in a SQL catalog) and how to count its writes."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.folder = root / "delta"
        self.warehouse = root / "warehouse"
        self.catalog = f"sqlite:///{root / 'catalog.db'}"
        self.warehouse.mkdir(parents=True, exist_ok=True)

    @property
    def where(self) -> dict[str, Any]:
        """The keywords that name the table in ``refresh_snapshot`` and ``read_snapshot``."""
        if self.kind == "delta":
            return {"path": self.folder}
        return {"iceberg_table": TABLE, "catalog": self.catalog, "warehouse": str(self.warehouse)}

    def export(self, query: Query, client: Any) -> Any:
        if self.kind == "delta":
            return query.to_delta(str(self.folder), client=client, **FAST)
        return query.to_iceberg(
            TABLE, catalog=self.catalog, warehouse=str(self.warehouse), client=client, **FAST
        )

    def on_disk(self) -> set[Path]:
        """Data files present (Delta: the folder; Iceberg: the warehouse)."""
        root = self.folder if self.kind == "delta" else self.warehouse
        return {p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}

    def _iceberg(self) -> Any:
        from pyiceberg.catalog import load_catalog

        catalog = load_catalog(
            "healthimaging_df", type="sql", uri=self.catalog, warehouse=self.warehouse.as_uri()
        )
        return catalog.load_table(TABLE)

    def commits(self) -> set[str]:
        """Identifiers of the commits so far (Delta log entries, Iceberg snapshot ids)."""
        if self.kind == "delta":
            return {p.name for p in (self.folder / "_delta_log").glob("*.json")}
        return {str(s.snapshot_id) for s in self._iceberg().metadata.snapshots}

    def written(self, before: set[str]) -> tuple[int, int]:
        """Data files and bytes the commits not in *before* added, as the table records them."""
        files = size = 0
        if self.kind == "delta":
            for name in sorted(self.commits() - before):
                for line in (self.folder / "_delta_log" / name).read_text().splitlines():
                    add = json.loads(line).get("add")
                    if add:
                        files, size = files + 1, size + int(add["size"])
            return files, size
        for snap in self._iceberg().metadata.snapshots:
            if str(snap.snapshot_id) not in before and snap.summary is not None:
                props = snap.summary.additional_properties
                files += int(props.get("added-data-files", 0))
                size += int(props.get("added-files-size", 0))
        return files, size


def _change(service: LocalService, placement: str, rng: random.Random, seed: int) -> int:
    """Change 1% of the datastore's image sets (as delta_bench); return how many changed."""
    datastore = str(service.datastore_id)
    current = sorted(service.backend.image_sets(datastore), key=lambda s: s["createdAt"])
    changed = max(5, len(current) // 100)
    pool = current[-2 * changed :] if placement == "newest" else current
    picked = rng.sample(pool, int(changed * 0.8))
    updated, leavers = picked[: int(changed * 0.6)], picked[int(changed * 0.6) :]
    for item in updated:
        service.backend.update_image_set(
            datastore, item["imageSetId"], is_primary=True, tags={"DICOMSeriesModality": "XA"}
        )
    for item in leavers:
        service.backend.update_image_set(datastore, item["imageSetId"], is_primary=False)
    new = generate_image_sets(changed - len(picked), seed=seed)
    now = datetime.now(timezone.utc)
    for item in new:  # imported now, as the service stamps a new import
        item.update(isPrimary=True, createdAt=now, updatedAt=now)
    service.backend.add_image_sets(datastore, new)
    return changed


def _refresh(target: Target, client: Any) -> dict[str, Any]:
    commits, disk = target.commits(), target.on_disk()
    start = time.perf_counter()
    report = refresh_snapshot(**target.where, client=client, **FAST)
    seconds = time.perf_counter() - start
    files, size = target.written(commits)
    appeared = target.on_disk() - disk
    disk_bytes = sum(p.stat().st_size for p in appeared)
    if (len(appeared), disk_bytes) != (files, size):
        print(
            f"  {target.kind}: log says {files} files {size} B, disk {len(appeared)} {disk_bytes}"
        )
    return {"s": seconds, "files": files, "bytes": size, "report": report}


def _ids_versions(frame: Any) -> set[tuple[str, int]]:
    return set(zip(frame["imageSetId"].astype(str), frame["version"].astype(int), strict=True))


def _one(image_sets: int, placement: str, refreshes: int, seed: int) -> list[dict[str, Any]]:
    with (
        LocalService.seeded(image_sets=image_sets, seed=seed) as service,
        tempfile.TemporaryDirectory() as tmp,
    ):
        client = service.client()
        query = Query(str(service.datastore_id)).where(isPrimary=True)
        targets = [Target(kind, Path(tmp) / kind) for kind in ("delta", "iceberg")]
        results: dict[str, dict[str, Any]] = {}
        for target in targets:
            start = time.perf_counter()
            info = target.export(query, client)
            seconds = time.perf_counter() - start
            results[target.kind] = {
                "format": "Delta" if target.kind == "delta" else "Iceberg",
                "placement": placement,
                "rows": info.rows,
                "export_s": seconds,
                "export_mb": sum(p.stat().st_size for p in target.on_disk()) / 1e6,
                "export_files": len(target.on_disk()),
                "refreshes": [],
            }
            print(f"  {placement} {target.kind}: export {info.rows:,} rows in {seconds:.1f} s")
        rng = random.Random(seed)
        for step in range(refreshes):
            changed = _change(service, placement, rng, seed=10_000 * (seed + 1) + step)
            for target in targets:
                done = _refresh(target, client)
                results[target.kind]["refreshes"].append(done)
                print(
                    f"  {placement} {target.kind} #{step + 1} ({changed} changed): "
                    f"{done['s']:.2f} s, {done['files']} files, {done['bytes'] / 1e6:.3f} MB; "
                    f"{str(done['report']).split(' (')[0]}"
                )
        fresh = _ids_versions(query.to_dataframe(client=client, **FAST))
        for target in targets:
            noop = _refresh(target, client)
            result = results[target.kind]
            result["noop_files"], result["noop_changed"] = noop["files"], noop["report"].changed
            result["equal"] = _ids_versions(read_snapshot(**target.where)) == fresh
            print(
                f"  {placement} {target.kind}: no-op {noop['files']} files, equal {result['equal']}"
            )
        return [results["delta"], results["iceberg"]]


def run(image_sets: int, refreshes: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seed, placement in enumerate(PLACEMENTS):
        rows += _one(image_sets, placement, refreshes, seed)
    return sorted(rows, key=lambda r: (r["format"], r["placement"]))


def markdown(results: list[dict[str, Any]], image_sets: int, refreshes: int, wall: float) -> str:
    lines = [
        f"Command: `python -m bench table_format_bench` ({image_sets:,} image sets in the bundled "
        "local service with no throttle or latency, client `max_tps=None`: the fetch is not the "
        f"bottleneck; {machine()}, shared with other work, so seconds are noisy; {wall / 60:.1f} "
        "minutes in all). The cohort `isPrimary=True` is exported with `to_delta(folder)` and "
        "`to_iceberg('bench.cohort', catalog='sqlite:///…', warehouse=…)` (the local SQL "
        f"catalog), unpartitioned, in `createdAt` order, {TARGET_FILE_SIZE // 1024} KiB target "
        f"files. Then {refreshes} successive `refresh_snapshot` calls per table, each after 1% of "
        "the image sets changed (60% a new version, 20% leave the cohort, 20% newly imported), "
        "placed at random or among the newest 2% by `createdAt`; one seeded service per "
        "placement, both formats refreshed after each change. Written: the data files each "
        "refresh's commit added (Delta log `add` sizes, Iceberg `added-files-size`). Then a "
        "refresh with nothing changed (no-op), and each table compared with a fresh query "
        "(the same imageSetIds at the same versions). One run.",
        "",
        "| format | changes | rows | export (s) | export (MB, files) | refresh median (s) | "
        "refresh max (s) | written per refresh, median (MB) | written, max (MB) | "
        "no-op: data files written | equals a fresh export |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        seconds = [x["s"] for x in r["refreshes"]]
        written = [x["bytes"] / 1e6 for x in r["refreshes"]]
        label = "at random" if r["placement"] == "random" else "among the newest"
        lines.append(
            f"| {r['format']} | {label} | {r['rows']:,} | {r['export_s']:.1f} | "
            f"{r['export_mb']:.2f}, {r['export_files']} | {statistics.median(seconds):.2f} | "
            f"{max(seconds):.2f} | {statistics.median(written):.3f} | {max(written):.3f} | "
            f"{r['noop_files']} | {'yes' if r['equal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-sets", type=int, default=100_000)
    parser.add_argument("--refreshes", type=int, default=10)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.image_sets, args.refreshes)
    section = markdown(results, args.image_sets, args.refreshes, time.perf_counter() - start)
    print(section)
    if not args.no_docs:
        write_section(TITLE, section)


if __name__ == "__main__":
    main()
