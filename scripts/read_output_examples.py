#!/usr/bin/env python3
"""Examples of reading a saliency-audit output folder: pyarrow always, DuckDB and polars when
they are installed. Prints the schema, a per-class summary and one row's decoded maps.

An output folder holds one row per input image in `part-<shard>-of-<count>-<chunk>.parquet`
files, plus `_SUCCESS`/`_job-*`/`_run-*` JSON files (names starting with `_` or `.`, which
pyarrow's dataset reader skips; in-progress parts are `.tmp-*`). Every part's Parquet key-value
metadata carries `saliency_audit.class_names` (JSON list, index = class id), the job spec and
the model's sha256.

Usage: python scripts/read_output_examples.py OUTPUT_DIR
"""
import argparse
import glob
import io
import json
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def class_names(out_dir):
    """Class names from the first part's key-value metadata, or None."""
    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))
    if not parts:
        return None
    raw = (pq.read_metadata(parts[0]).metadata or {}).get(b"saliency_audit.class_names")
    return (json.loads(raw) if raw else None) or None


def decode_cam(row):
    """The stored Grad-CAM: float16 little-endian, cam_h x cam_w, row-major."""
    return np.frombuffer(row["cam"], dtype="<f2").astype(np.float32).reshape(row["cam_h"], row["cam_w"])


def decode_map(row):
    """The stored attribution map: an 8-bit grayscale PNG; value = pixel / 255 * map_scale."""
    from PIL import Image

    q = np.asarray(Image.open(io.BytesIO(row["map_png"])), dtype=np.float32)
    return q / 255.0 * row["map_scale"]


def with_pyarrow(out_dir, names):
    print("== pyarrow")
    dataset = ds.dataset(out_dir, format="parquet")  # every part-*.parquet in the folder
    print(dataset.schema)
    # Scalar columns only: the map columns (cam, map_png) are the bulk of the bytes.
    # `region_<name>_share` columns exist only for the job's [[regions]].
    regions = [n for n in dataset.schema.names if n.startswith("region_") and n.endswith("_share")]
    cols = ["id", "label", "target", "predicted", "predicted_prob", "status", "attr_entropy", "bbox_mass_share"]
    table = dataset.to_table(columns=cols + regions, filter=pc.field("status") == "ok")
    summary = table.group_by("predicted").aggregate([
        ("id", "count"), ("predicted_prob", "mean"), ("attr_entropy", "mean"), ("bbox_mass_share", "mean"),
    ] + [(r, "mean") for r in regions]).sort_by([("id_count", "descending"), ("predicted", "ascending")])
    print("per predicted class (status ok):")
    def f3(v):
        # Null: no row of the group has the statistic (no box; a map that is zero everywhere).
        return "-" if v is None else f"{v:.3f}"

    for r in summary.to_pylist():
        name = names[r["predicted"]] if names else r["predicted"]
        print(f"  {r['predicted']:>5} {name!s:24.24} n={r['id_count']:<4} prob {f3(r['predicted_prob_mean'])}  "
              f"entropy {f3(r['attr_entropy_mean'])}  box share {f3(r['bbox_mass_share_mean'])}"
              + "".join(f"  {g[7:-6]} share {f3(r[g + '_mean'])}" for g in regions))
    failed = dataset.to_table(columns=["id", "status", "error"], filter=pc.field("status") != "ok")
    print(f"rows {dataset.count_rows()}, not ok {failed.num_rows}")
    for r in failed.to_pylist()[:10]:
        print(f"  {r['id']}: {r['status']}: {r['error']}")
    # One row's maps, decoded: the first ok row (a failed row has no maps).
    one = dataset.head(1, columns=["id", "cam", "cam_h", "cam_w", "map_png", "map_scale"],
                       filter=pc.field("status") == "ok").to_pylist()
    if one:
        cam, amap = decode_cam(one[0]), decode_map(one[0])
        print(f"row {one[0]['id']}: cam {cam.shape} max {cam.max():.4g}, map {amap.shape} max {amap.max():.4g}")


def with_duckdb(out_dir):
    try:
        import duckdb
    except ImportError:
        print("== duckdb: not installed, skipped")
        return
    print("== duckdb")
    glob_pat = os.path.join(out_dir, "part-*.parquet").replace("'", "''")
    con = duckdb.connect()
    print(con.sql(f"DESCRIBE SELECT * FROM read_parquet('{glob_pat}')").fetchall()[:6], "...")
    print(con.sql(f"""
        SELECT predicted, count(*) AS n, round(avg(predicted_prob), 3) AS prob,
               round(avg(attr_entropy), 3) AS entropy
        FROM read_parquet('{glob_pat}')
        WHERE status = 'ok'
        GROUP BY predicted ORDER BY n DESC, predicted
    """))


def with_polars(out_dir):
    try:
        import polars as pl
    except ImportError:
        print("== polars: not installed, skipped")
        return
    print("== polars")
    lf = pl.scan_parquet(os.path.join(out_dir, "part-*.parquet"))
    print(lf.collect_schema())
    print(lf.filter(pl.col("status") == "ok")
            .group_by("predicted")
            .agg(pl.len().alias("n"), pl.col("predicted_prob").mean().round(3).alias("prob"),
                 pl.col("attr_entropy").mean().round(3).alias("entropy"))
            .sort(["n", "predicted"], descending=[True, False])
            .collect())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    out_dir = ap.parse_args().out_dir
    if not glob.glob(os.path.join(out_dir, "part-*.parquet")):
        raise SystemExit(f"error: no part-*.parquet files in {out_dir}")
    names = class_names(out_dir)
    with_pyarrow(out_dir, names)
    with_duckdb(out_dir)
    with_polars(out_dir)


if __name__ == "__main__":
    main()
