use crate::store::Loc;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::array::{Array, BinaryArray, Float32Array, Int64Array, StringArray, UInt32Array, UInt64Array};
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::*;

fn regions() -> Vec<String> {
    vec!["top".into(), "center".into()]
}

fn cfg(dir: &Path, shard: u32, num_shards: u32, total_rows: u64, rows_per_part: u64) -> SinkConfig {
    SinkConfig {
        dir: Loc::from(dir),
        shard,
        num_shards,
        total_rows,
        rows_per_part,
        regions: regions(),
        metadata: vec![
            ("saliency_audit.schema_version".into(), SCHEMA_VERSION.to_string()),
            ("saliency_audit.model_sha256".into(), "abc123".into()),
        ],
        job_id: "job".into(),
        retry_statuses: Default::default(),
    }
}

fn row(index: u64) -> Row {
    let status = if index % 5 == 4 { Status::DecodeError } else { Status::Ok };
    let ok = status == Status::Ok;
    Row {
        sample: Sample {
            index,
            id: format!("img-{index}"),
            path: format!("images/{index}.jpg"),
            location: Loc::from(PathBuf::from(format!("/data/images/{index}.jpg"))),
            label: Some(index as i64 % 3),
            label_error: None,
            bbox: None,
            box_error: None,
            mask: None,
        },
        status,
        error: (!ok).then(|| format!("images/{index}.jpg: not an image")),
        target: ok.then_some(1),
        predicted: ok.then_some(2),
        predicted_prob: ok.then_some(0.75),
        target_prob: ok.then_some(0.125),
        stats: ok.then(|| MapStats {
            attr_total: index as f32,
            attr_max: 1.0,
            attr_entropy: Some(0.5),
            attr_com_x: Some(0.25),
            bbox_mass_share: None,
            region_shares: vec![Some(0.1), None],
            ..MapStats::default()
        }),
        cam: ok.then(|| CamMap { f16_le: vec![0x00, 0x3c, 0x00, 0x38], h: 1, w: 2 }),
        map: ok.then(|| EncodedMap { png: vec![0x89, b'P', b'N', b'G', index as u8], scale: 2.0, size: 4 }),
    }
}

/// 0..n in a scrambled but deterministic order: odd indices up, then even indices down.
fn shuffled(n: u64) -> Vec<u64> {
    (0..n).filter(|i| i % 2 == 1).chain((0..n).rev().filter(|i| i % 2 == 0)).collect()
}

fn names(dir: &Path) -> Vec<String> {
    files::list_names(&Loc::from(dir)).unwrap()
}

fn indices_of(path: &Path) -> Vec<u64> {
    let loc = Loc::from(path);
    read::read_part_contents(read::open_part(&loc).unwrap(), &loc, &schema(&regions()), None).unwrap().indices
}

#[test]
fn shuffled_rows_become_sorted_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let (mut w, resume) = PartWriter::open(cfg(&dir, 2, 8, 10, 4), "job-a").unwrap();
    assert!(resume.done_chunks.is_empty());
    for i in shuffled(10) {
        w.push(row(i)).unwrap();
    }
    let summary = w.finish().unwrap();
    assert_eq!((summary.rows, summary.parts), (10, 3));
    assert_eq!(summary.status_counts["ok"], 8);
    assert_eq!(summary.status_counts["decode_error"], 2);
    assert_eq!(summary.status_counts["missing"], 0);

    let all = names(&dir);
    let parts: Vec<_> = all.iter().filter(|n| n.starts_with("part-")).cloned().collect();
    assert_eq!(
        parts,
        [
            "part-00002-of-00008-000000.parquet",
            "part-00002-of-00008-000001.parquet",
            "part-00002-of-00008-000002.parquet"
        ]
    );
    assert!(all.contains(&"_SUCCESS-00002-of-00008.json".to_string()));
    assert!(all.contains(&"_job-00002-of-00008.json".to_string()));
    assert!(!all.contains(&"_SUCCESS".to_string()), "a shard of 8 does not finalize the dataset");
    assert!(!all.iter().any(|n| n.starts_with(".tmp-")));
    assert_eq!(indices_of(&dir.join(&parts[0])), [0, 1, 2, 3]);
    assert_eq!(indices_of(&dir.join(&parts[1])), [4, 5, 6, 7]);
    assert_eq!(indices_of(&dir.join(&parts[2])), [8, 9]);

    // Footer: schema, metadata, compression per column.
    let reader = SerializedFileReader::new(File::open(dir.join(&parts[0])).unwrap()).unwrap();
    let meta = reader.metadata();
    let kv = meta.file_metadata().key_value_metadata().unwrap();
    assert!(kv.iter().any(|k| k.key == "saliency_audit.model_sha256" && k.value.as_deref() == Some("abc123")));
    assert_eq!(meta.num_row_groups(), 1);
    let rg = meta.row_group(0);
    let chunk = |name: &str| {
        (0..rg.num_columns())
            .map(|i| rg.column(i))
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    let compression = |name: &str| chunk(name).compression();
    let stats = chunk("attr_total").statistics().expect("statistics on");
    assert_eq!(stats.null_count_opt(), Some(0));
    assert!(stats.min_bytes_opt().is_some());
    assert_eq!(chunk("map_png").statistics().and_then(|s| s.null_count_opt()), Some(0));
    for col in ["attr_total", "attr_entropy", "mask_mass_share", "region_top_share", "status", "id"] {
        assert!(matches!(compression(col), Compression::ZSTD(_)), "{col}");
    }
    assert_eq!(compression("map_png"), Compression::UNCOMPRESSED);
    assert_eq!(compression("cam"), Compression::SNAPPY);

    // Values round-trip.
    let batches = read_rows(&dir).unwrap();
    let b = &batches[0];
    let names: Vec<_> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, schema(&regions()).fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>());
    for col in ["region_top_share", "region_center_share", "cam", "cam_h", "cam_w", "map_png", "map_scale"] {
        assert!(names.iter().any(|n| n == col), "{col}");
    }
    let col = |n: &str| b.column_by_name(n).unwrap().clone();
    let index = col("index");
    let index = index.as_any().downcast_ref::<UInt64Array>().unwrap();
    assert_eq!(index.values().to_vec(), [0, 1, 2, 3]);
    let status = col("status");
    let status = status.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(status.value(0), "ok");
    assert_eq!(status.value(3), "ok");
    let id = col("id");
    assert_eq!(id.as_any().downcast_ref::<StringArray>().unwrap().value(2), "img-2");
    let label = col("label");
    assert_eq!(label.as_any().downcast_ref::<Int64Array>().unwrap().value(2), 2);
    let total = col("attr_total");
    assert_eq!(total.as_any().downcast_ref::<Float32Array>().unwrap().value(3), 3.0);
    let gini = col("attr_gini");
    assert_eq!(gini.null_count(), 4, "None stats are null");
    let top = col("region_top_share");
    assert_eq!(top.as_any().downcast_ref::<Float32Array>().unwrap().value(0), 0.1);
    assert_eq!(col("region_center_share").null_count(), 4);
    let cam = col("cam");
    assert_eq!(cam.as_any().downcast_ref::<BinaryArray>().unwrap().value(1), [0x00, 0x3c, 0x00, 0x38]);
    let cam_w = col("cam_w");
    assert_eq!(cam_w.as_any().downcast_ref::<UInt32Array>().unwrap().value(1), 2);
    // Row 4 is a decode error: no stats, no maps, an error message.
    let b1 = &batches[1];
    let err = b1.column_by_name("error").unwrap();
    assert_eq!(err.as_any().downcast_ref::<StringArray>().unwrap().value(0), "images/4.jpg: not an image");
    assert!(b1.column_by_name("attr_total").unwrap().is_null(0));
    assert!(b1.column_by_name("map_png").unwrap().is_null(0));
    assert!(b1.column_by_name("target").unwrap().is_null(0));
}

#[test]
fn single_shard_finish_marks_dataset_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartWriter::open(cfg(tmp.path(), 0, 1, 5, 2), "job").unwrap();
    for i in shuffled(5) {
        w.push(row(i)).unwrap();
    }
    w.finish().unwrap();
    let total: DatasetSummary = files::read_json(&Loc::from(tmp.path().join("_SUCCESS"))).unwrap();
    assert_eq!((total.num_shards, total.parts, total.rows), (1, 3, 5));
    assert_eq!(total.status_counts["ok"], 4);
}

#[test]
fn empty_shard_finishes_with_no_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, _) = PartWriter::open(cfg(tmp.path(), 0, 1, 0, 100), "job").unwrap();
    let s = w.finish().unwrap();
    assert_eq!((s.rows, s.parts), (0, 0));
    assert!(tmp.path().join("_SUCCESS").exists());
}

#[test]
fn bad_rows_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut w, _) = PartWriter::open(cfg(dir, 0, 2, 6, 3), "job").unwrap();
    w.push(row(1)).unwrap();
    let e = w.push(row(1)).unwrap_err().to_string();
    assert!(e.contains("row index 1 was pushed twice"), "{e}");
    let e = w.push(row(6)).unwrap_err().to_string();
    assert!(e.contains("row index 6") && e.contains("past the 6 rows"), "{e}");

    let mut r = row(0);
    r.stats.as_mut().unwrap().region_shares.pop();
    let e = w.push(r).unwrap_err().to_string();
    assert!(e.contains("1 region shares") && e.contains("2 regions"), "{e}");
    let mut r = row(0);
    r.cam.as_mut().unwrap().h = 3;
    let e = w.push(r).unwrap_err().to_string();
    assert!(e.contains("CAM of 3×2 needs 12 bytes, got 4"), "{e}");

    w.push(row(0)).unwrap();
    w.push(row(2)).unwrap(); // completes chunk 0
    let e = w.push(row(2)).unwrap_err().to_string();
    assert!(e.contains("already written") && e.contains("part-00000-of-00002-000000.parquet"), "{e}");
    assert_eq!(indices_of(&dir.join("part-00000-of-00002-000000.parquet")), [0, 1, 2]);
}

#[test]
fn finish_with_missing_rows_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartWriter::open(cfg(tmp.path(), 0, 1, 30, 4), "job").unwrap();
    for i in (0..30).filter(|i| ![5, 9, 10].contains(i)) {
        w.push(row(i)).unwrap();
    }
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("3 of 30 rows") && e.contains("indices 5, 9, 10"), "{e}");
    let all = names(tmp.path());
    assert!(!all.iter().any(|n| n.starts_with("_SUCCESS")), "{all:?}");
    assert_eq!(all.iter().filter(|n| n.starts_with("part-")).count(), 6, "complete chunks are kept");

    // Many missing: the first ten, then an ellipsis.
    let tmp = tempfile::tempdir().unwrap();
    let (w, _) = PartWriter::open(cfg(tmp.path(), 0, 1, 30, 4), "job").unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("30 of 30 rows") && e.contains("indices 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, …"), "{e}");
}

#[test]
fn resume_after_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let c = cfg(&dir, 1, 3, 10, 4); // chunks [0,4) [4,8) [8,10)
    let (mut w, _) = PartWriter::open(c.clone(), "job").unwrap();
    for i in [9, 0, 8, 3, 2, 1, 4, 6] {
        w.push(row(i)).unwrap();
    }
    drop(w); // crash: chunk 1 is half-buffered
    assert_eq!(names(&dir).iter().filter(|n| n.starts_with("part-")).count(), 2, "chunks 0 and 2 are committed");
    // A temporary file of a write that never finished, and a second copy of chunk 0 truncated
    // as if the disk had lost its tail.
    fs::write(dir.join(".tmp-part-00001-of-00003-000001.parquet-99999"), b"PAR1 half").unwrap();
    let other_shard_tmp = ".tmp-part-00000-of-00003-000000.parquet-99999";
    fs::write(dir.join(other_shard_tmp), b"PAR1").unwrap();
    let part0 = dir.join("part-00001-of-00003-000000.parquet");
    let bytes = fs::read(&part0).unwrap();
    fs::write(&part0, &bytes[..bytes.len() / 2]).unwrap();

    let (mut w, resume) = PartWriter::open(c.clone(), "job").unwrap();
    assert_eq!(resume.done_chunks.iter().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(resume.done_rows, 2);
    assert_eq!(resume.done_status_counts["decode_error"], 1); // index 9
    assert_eq!(resume.done_status_counts["ok"], 1);
    assert!(resume.is_done(8) && resume.is_done(9));
    assert!(!resume.is_done(0) && !resume.is_done(4) && !resume.is_done(10));
    let all = names(&dir);
    assert!(!all.iter().any(|n| n.starts_with(".tmp-part-00001")), "{all:?}");
    assert!(all.iter().any(|n| n == other_shard_tmp), "another shard's files are left alone");
    assert!(all.iter().any(|n| n.starts_with(".part-00001-of-00003-000000.parquet.corrupt-")), "{all:?}");
    assert!(!part0.exists());

    // Redo the rest, skipping done samples as the pipeline does.
    for i in shuffled(10).into_iter().filter(|i| !resume.is_done(*i)) {
        w.push(row(i)).unwrap();
    }
    let e = w.push(row(8)).unwrap_err().to_string();
    assert!(e.contains("already written"), "{e}");
    let s = w.finish().unwrap();
    assert_eq!((s.rows, s.parts), (10, 3));
    assert_eq!(s.status_counts["decode_error"], 2);
    assert_eq!(indices_of(&part0), [0, 1, 2, 3]);

    // Reopening a finished shard: everything is done and the marker stays.
    let (w, resume) = PartWriter::open(c, "job").unwrap();
    assert_eq!(resume.done_chunks.len(), 3);
    assert!(dir.join("_SUCCESS-00001-of-00003.json").exists());
    w.abort().unwrap();
}

/// Writes shard 0 of 1 (4 rows, parts of 2) into `dir`, finished; returns its config.
fn finished_shard_of_two_parts(dir: &Path) -> SinkConfig {
    let c = cfg(dir, 0, 1, 4, 2);
    let (mut w, _) = PartWriter::open(c.clone(), "job").unwrap();
    (0..4).for_each(|i| w.push(row(i)).unwrap());
    w.finish().unwrap();
    c
}

/// A committed part that cannot be read (here: a dangling link; on a store, a time-out) stops
/// the open with an error naming it, and is neither moved aside nor redone.
#[test]
fn an_unreadable_part_stops_the_open_and_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let c = finished_shard_of_two_parts(dir);
    let part = dir.join("part-00000-of-00001-000001.parquet");
    fs::remove_file(&part).unwrap();
    std::os::unix::fs::symlink(dir.join("gone"), &part).unwrap();
    let e = format!("{:#}", PartWriter::open(c, "job").err().expect("an unreadable part is an error"));
    assert!(e.contains("cannot read committed part") && e.contains("part-00000-of-00001-000001.parquet"), "{e}");
    assert!(fs::symlink_metadata(&part).is_ok(), "the part was moved");
    assert!(!names(dir).iter().any(|n| n.contains("corrupt")), "{:?}", names(dir));
    assert!(dir.join("_SUCCESS").exists(), "an I/O error does not unmark a finished output");
}

#[test]
fn reopening_an_incomplete_shard_removes_stale_markers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let c = finished_shard_of_two_parts(dir);
    fs::remove_file(dir.join("part-00000-of-00001-000001.parquet")).unwrap();
    let (_w, resume) = PartWriter::open(c, "job").unwrap();
    assert_eq!(resume.done_chunks.len(), 1);
    assert!(!dir.join("_SUCCESS").exists());
    assert!(!dir.join("_SUCCESS-00000-of-00001.json").exists());
}

#[test]
fn abort_keeps_committed_parts_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut w, _) = PartWriter::open(cfg(dir, 0, 1, 10, 4), "job").unwrap();
    for i in [0, 1, 2, 3, 5] {
        w.push(row(i)).unwrap();
    }
    fs::write(dir.join(files::tmp_name("part-00000-of-00001-000001.parquet")), b"x").unwrap();
    let s = w.abort().unwrap();
    assert_eq!((s.rows, s.parts), (4, 1));
    let all = names(dir);
    assert_eq!(all, [".lock-00000-of-00001", "_job-00000-of-00001.json", "part-00000-of-00001-000000.parquet"]);
}

#[test]
fn a_second_writer_of_a_shard_waits_for_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let c = cfg(&dir, 0, 2, 4, 2);
    let (mut first, _) = PartWriter::open(c.clone(), "job").unwrap();
    first.push(row(0)).unwrap(); // half of chunk 0 buffered
                                 // The first writer's temporary file, which a second writer must not take for a leftover.
    let live_tmp = dir.join(files::tmp_name("part-00000-of-00002-000001.parquet"));
    fs::write(&live_tmp, b"in flight").unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let second = std::thread::spawn(move || {
        let r = PartWriter::open(c, "job");
        tx.send(()).unwrap();
        r
    });
    // Another shard opens at once; the same shard does not.
    let (other, _) = PartWriter::open(cfg(&dir, 1, 2, 4, 2), "job").unwrap();
    other.abort().unwrap();
    assert!(rx.recv_timeout(std::time::Duration::from_millis(500)).is_err(), "the second writer did not wait");
    assert!(live_tmp.exists(), "the second writer removed the first's temporary file");

    // A third that waits gives up once its stop flag is set, and touches nothing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, c3) = (stop.clone(), cfg(&dir, 0, 2, 4, 2));
    let third = std::thread::spawn(move || PartWriter::open_or_stop(c3, "job", &stop2).map(|_| ()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!third.is_finished(), "the third writer did not wait");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::Instant::now();
    while !third.is_finished() {
        assert!(t.elapsed().as_secs() < 30, "the third writer still waits 30 s after its stop");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = third.join().unwrap().expect_err("a stopped wait opens nothing");
    assert!(e.downcast_ref::<LockWaitInterrupted>().is_some(), "{e:#}");
    assert!(e.to_string().contains(&files::shard_lock_name(0, 2)), "{e}");
    assert!(live_tmp.exists(), "the stopped writer removed the first's temporary file");

    // Committing chunk 1 writes and renames that very temporary file.
    (1..4).for_each(|i| first.push(row(i)).unwrap());
    assert!(!live_tmp.exists());
    first.finish().unwrap();
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the second writer still waits after the first finished");
    let (w, resume) = second.join().unwrap().unwrap();
    assert_eq!(resume.done_rows, 4, "the second writer resumes from the first's parts");
    w.abort().unwrap();
    assert!(names(&dir).contains(&files::shard_lock_name(0, 2)));
}

#[test]
fn another_jobs_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, _) = PartWriter::open(cfg(tmp.path(), 0, 1, 4, 2), "job-a").unwrap();
    w.abort().unwrap();
    let e = PartWriter::open(cfg(tmp.path(), 0, 1, 4, 2), "job-b").err().unwrap().to_string();
    assert!(e.contains("holds another job's output") && e.contains(&tmp.path().display().to_string()), "{e}");
    // Another layout is named as such, although it changes the fingerprint too.
    for job in ["job-a", "job-b"] {
        let e = PartWriter::open(cfg(tmp.path(), 0, 1, 4, 3), job).err().unwrap().to_string();
        assert!(e.contains("written with another layout (4 rows in parts of 2 rows"), "{e}");
    }
}

#[test]
fn bad_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(PartWriter::open(cfg(tmp.path(), 3, 3, 4, 2), "j").is_err());
    assert!(PartWriter::open(cfg(tmp.path(), 0, 1, 4, 0), "j").is_err());
    let mut c = cfg(tmp.path(), 0, 1, 4, 2);
    c.regions = vec!["a".into(), "a".into()];
    let e = PartWriter::open(c, "j").err().unwrap().to_string();
    assert!(e.contains("named twice"), "{e}");
}

fn write_shard(dir: &Path, shard: u32, num_shards: u32, n: u64) -> ShardSummary {
    let (mut w, _) = PartWriter::open(cfg(dir, shard, num_shards, n, 3), &format!("job-{shard}")).unwrap();
    for i in shuffled(n) {
        w.push(row(i)).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn finalize_names_missing_shards() {
    let tmp = tempfile::tempdir().unwrap();
    write_shard(tmp.path(), 0, 4, 5);
    write_shard(tmp.path(), 2, 4, 5);
    let e = finalize(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("shard(s) 1, 3 of 4 have not finished"), "{e}");
    assert!(!tmp.path().join("_SUCCESS").exists());

    let empty = tempfile::tempdir().unwrap();
    let e = finalize(empty.path()).unwrap_err().to_string();
    assert!(e.contains("holds no saliency-audit output"), "{e}");
}

#[test]
fn finalize_counts_all_shards() {
    let tmp = tempfile::tempdir().unwrap();
    write_shard(tmp.path(), 1, 2, 7);
    write_shard(tmp.path(), 0, 2, 10);
    let total = finalize(tmp.path()).unwrap();
    assert_eq!((total.num_shards, total.parts, total.rows), (2, 7, 17));
    assert_eq!(total.status_counts["ok"], 8 + 6);
    assert_eq!(total.status_counts["decode_error"], 2 + 1);
    let on_disk: DatasetSummary = files::read_json(&Loc::from(tmp.path().join("_SUCCESS"))).unwrap();
    assert_eq!(on_disk, total);
    let rows: usize = read_rows(tmp.path()).unwrap().iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 17);

    // A part lost after the shard finished is caught.
    fs::remove_file(tmp.path().join("part-00001-of-00002-000002.parquet")).unwrap();
    let e = finalize(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("says 3 parts, the folder has 2"), "{e}");
}

#[test]
fn finalize_refuses_mixed_shard_counts() {
    let tmp = tempfile::tempdir().unwrap();
    write_shard(tmp.path(), 0, 1, 2);
    // A shard of another count is refused at open, before any work...
    let e = PartWriter::open(cfg(tmp.path(), 0, 2, 2, 3), "job-0").err().unwrap();
    assert_eq!(crate::exit::code(&e), crate::exit::CANNOT_RUN, "{e}");
    let e = e.to_string();
    assert!(e.contains("holds shard 0 of 1") && e.contains("-00000-of-00001"), "{e}");
    assert!(e.contains("shard 0 of 2") && e.contains("NUM_SHARDS"), "{e}");
    // ...as is a part of another count without its job file (copied in by hand).
    let lone = tempfile::tempdir().unwrap();
    fs::copy(
        tmp.path().join("part-00000-of-00001-000000.parquet"),
        lone.path().join("part-00000-of-00001-000000.parquet"),
    )
    .unwrap();
    let e = PartWriter::open(cfg(lone.path(), 1, 2, 2, 3), "job-1").err().unwrap();
    assert!(e.is::<OutputConflict>() && e.to_string().contains("part-00000-of-00001-000000.parquet"), "{e}");
    // ...and a folder mixed by other means is refused by finalize, also with exit 2: a
    // single-shard run that finalizes at its end is not retried for it.
    let other = tempfile::tempdir().unwrap();
    write_shard(other.path(), 0, 2, 2);
    for name in names(other.path()) {
        fs::copy(other.path().join(&name), tmp.path().join(&name)).unwrap();
    }
    let e = finalize(tmp.path()).unwrap_err();
    assert_eq!(crate::exit::code(&e), crate::exit::CANNOT_RUN, "{e}");
    assert!(e.to_string().contains("different shard counts (1, 2)"), "{e}");
}

/// Shards of one folder share a job id (model, settings, the whole dataset): a shard of another
/// job, or of this one after its dataset changed, is refused at open and by finalize.
#[test]
fn shards_of_another_job_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_shard(tmp.path(), 0, 2, 2);
    let mut c = cfg(tmp.path(), 1, 2, 2, 3);
    c.job_id = "other".into();
    let e = PartWriter::open(c.clone(), "job-1").err().unwrap().to_string();
    assert!(e.contains("holds shard 0 of 2 of another job") && e.contains("_job-00000-of-00002.json"), "{e}");
    assert!(e.contains("records job job") && e.contains("this run is job other"), "{e}");
    // The same shard again after its dataset changed (same shard fingerprint, new job id).
    c.shard = 0;
    let e = PartWriter::open(c, "job-0").err().unwrap().to_string();
    assert!(e.contains("sample list has changed"), "{e}");
    // finalize reads every shard's job id.
    let other = tempfile::tempdir().unwrap();
    let mut c = cfg(other.path(), 1, 2, 2, 3);
    c.job_id = "other".into();
    let (mut w, _) = PartWriter::open(c, "job-1").unwrap();
    (0..2).for_each(|i| w.push(row(i)).unwrap());
    w.finish().unwrap();
    for name in names(other.path()).into_iter().filter(|n| !n.starts_with('.') && n != "_SUCCESS") {
        fs::copy(other.path().join(&name), tmp.path().join(&name)).unwrap();
    }
    let e = finalize(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("mixes shards of different jobs") && e.contains("records job other"), "{e}");
    // Copied without its `_job` file, the other job's shard is still told apart by its marker,
    // by finalize and by the report's reading of the folder.
    fs::remove_file(tmp.path().join("_job-00001-of-00002.json")).unwrap();
    let e = finalize(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("mixes shards of different jobs") && e.contains("_SUCCESS-00001-of-00002.json records job other"),
        "{e}"
    );
    let e = summary::coverage_of(&Loc::from(tmp.path()), &names(tmp.path())).unwrap_err().to_string();
    assert!(e.contains("mixes shards of different jobs"), "{e}");
}

#[test]
fn file_names_parse() {
    assert_eq!(part_name(2, 8, 13), "part-00002-of-00008-000013.parquet");
    assert_eq!(files::parse_part_name("part-00002-of-00008-000013.parquet"), Some((2, 8, 13)));
    assert_eq!(files::parse_part_name("part-00002-of-00008-000013.parquet.corrupt-1"), None);
    assert_eq!(files::parse_part_name(".part-00002-of-00008-000013.parquet.corrupt-1"), None);
    assert_eq!(files::parse_part_name(".tmp-part-00002-of-00008-000013.parquet-7"), None);
    assert_eq!(files::parse_part_name("part-2-of-8-13.parquet"), None);
    assert_eq!(files::parse_shard_success_name("_SUCCESS-00003-of-00004.json"), Some((3, 4)));
    assert_eq!(files::parse_shard_success_name("_SUCCESS"), None);
    assert!(files::is_shard_tmp(".tmp-_SUCCESS-00003-of-00004.json-12", 3, 4));
    assert!(!files::is_shard_tmp(".tmp-_SUCCESS-00003-of-00004.json-12", 2, 4));
    // What folder readers would take for data that the sink did not write.
    let listed = [
        "part-00000-of-00001-000000.parquet",
        "_SUCCESS",
        "_job-00000-of-00001.json",
        ".lock-00000-of-00001",
        ".tmp-part-00000-of-00001-000001.parquet-7",
        "_report",
        "part-foreign.parquet",
        "notes.txt",
    ];
    let listed: Vec<String> = listed.iter().map(|n| n.to_string()).collect();
    assert_eq!(files::foreign_names(&listed), ["part-foreign.parquet", "notes.txt"]);
}

#[test]
fn run_summary_is_written_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serde_json::json!({"processed": 3, "interrupted": false});
    let path = write_summary(&Loc::from(tmp.path()), 1, 4, &v).unwrap();
    assert_eq!(path, Loc::from(tmp.path().join("_run-00001-of-00004.json")));
    let back: serde_json::Value = files::read_json(&path).unwrap();
    assert_eq!(back, v);
    assert_eq!(names(tmp.path()), ["_run-00001-of-00004.json"]);
    let e = write_summary(&Loc::from(tmp.path().join("nope")), 1, 4, &v).unwrap_err();
    assert!(format!("{e:#}").contains("nope"), "{e:#}");
}

/// Row `index` as a success, recognisable by its `attr_total` (100 + index).
fn ok_row(index: u64) -> Row {
    let mut r = row(if index % 5 == 4 { index - 1 } else { index });
    r.sample = row(index).sample;
    r.stats.as_mut().unwrap().attr_total = 100.0 + index as f32;
    r
}

/// With `retry_statuses`, the samples of failed rows are redone: a part holding one is written
/// again once they are in, its other rows kept as they were and the new ones merged in index
/// order; a part without one is not touched. A stop before that leaves the old part, and a
/// plain reopen keeps failed rows.
#[test]
fn failed_rows_are_redone_and_their_parts_written_again_with_the_rest_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let c = cfg(&dir, 0, 1, 10, 4); // chunks [0,4) [4,8) [8,10); rows 4 and 9 failed
    let (mut w, _) = PartWriter::open(c.clone(), "job").unwrap();
    (0..10).for_each(|i| w.push(row(i)).unwrap());
    w.finish().unwrap();
    let part = |k: u64| dir.join(part_name(0, 1, k));
    let before: Vec<Vec<u8>> = (0..3).map(|k| fs::read(part(k)).unwrap()).collect();
    let read = |k: u64| read::read_part(&Loc::from(part(k)), &schema(&regions())).unwrap();
    let (old1, old2) = (read(1), read(2));

    let (w, resume) = PartWriter::open(c.clone(), "job").unwrap();
    assert_eq!((resume.done_chunks.len(), resume.redone_rows), (3, 0), "a plain reopen keeps failed rows");
    w.abort().unwrap();

    let mut retry = c.clone();
    retry.retry_statuses = [Status::DecodeError, Status::Missing].into();
    let (w, resume) = PartWriter::open(retry.clone(), "job").unwrap();
    assert_eq!(resume.done_chunks.iter().copied().collect::<Vec<_>>(), [0]);
    assert_eq!((resume.done_rows, resume.redone_rows), (8, 2));
    assert_eq!((resume.done_status_counts["ok"], resume.done_status_counts["decode_error"]), (8, 0));
    assert_eq!((0..11).filter(|&i| !resume.is_done(i)).collect::<Vec<_>>(), [4, 9, 10]);
    assert!(!dir.join("_SUCCESS").exists(), "not complete while failed rows are redone");
    let s = w.abort().unwrap();
    assert_eq!((s.rows, s.parts, s.status_counts["decode_error"]), (10, 3, 2), "the old parts stay committed");
    for k in 0..3 {
        assert_eq!(fs::read(part(k)).unwrap(), before[k as usize], "a stopped retry leaves part {k}");
    }

    let (mut w, _) = PartWriter::open(retry, "job").unwrap();
    let e = w.push(ok_row(5)).unwrap_err().to_string();
    assert!(e.contains("already written") && e.contains("kept"), "{e}");
    w.push(ok_row(4)).unwrap(); // part 1 complete: written again
    w.push(row(9)).unwrap(); // fails again
    let s = w.finish().unwrap();
    assert_eq!((s.rows, s.parts, s.status_counts["ok"], s.status_counts["decode_error"]), (10, 3, 9, 1));
    assert!(dir.join("_SUCCESS").exists());
    assert_eq!(fs::read(part(0)).unwrap(), before[0], "a part without failed rows is not written again");
    let (new1, new2) = (read(1), read(2));
    assert_eq!(indices_of(&part(1)), [4, 5, 6, 7]);
    assert_eq!(new1.slice(1, 3), old1.slice(1, 3), "rows 5..8 kept as they were");
    let total = new1.column_by_name("attr_total").unwrap().as_any().downcast_ref::<Float32Array>().unwrap();
    let status = new1.column_by_name("status").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!((status.value(0), total.value(0)), ("ok", 104.0));
    assert_eq!(new2, old2, "row 9 failed the same way again; row 8 kept");
}

/// Every file of `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    names(dir)
        .into_iter()
        .map(|n| {
            let p = dir.join(&n);
            let bytes = fs::read(&p).unwrap();
            (n, bytes, fs::metadata(&p).unwrap().modified().unwrap())
        })
        .collect()
}

/// `shard_state` (what `validate` says) reads committed parts (the short last one included), a
/// torn one and the job files, and refuses what `open` refuses, without creating, locking,
/// changing or removing anything (a stale temporary file and the shard's marker stay).
#[test]
fn shard_state_reads_the_folder_without_changing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let c = cfg(&dir, 0, 2, 10, 4); // chunks [0,4) [4,8) [8,10); rows 4 and 9 failed
    assert_eq!(shard_state(&c, "job").unwrap(), ShardState { num_parts: 3, ..Default::default() });
    assert!(!dir.exists(), "no folder made");
    let (mut w, _) = PartWriter::open(c.clone(), "job").unwrap();
    (0..10).for_each(|i| w.push(row(i)).unwrap());
    w.finish().unwrap();
    fs::remove_file(dir.join(".lock-00000-of-00002")).unwrap();
    fs::write(dir.join(".tmp-part-00000-of-00002-000001.parquet-99999"), b"PAR1 half").unwrap();

    let before = snapshot(&dir);
    let st = shard_state(&c, "job").unwrap();
    assert_eq!((st.parts, st.num_parts, st.rows, st.refused.as_deref()), (3, 3, 10, None));
    assert_eq!((st.status_counts[&Status::Ok], st.status_counts[&Status::DecodeError]), (8, 2));
    assert!(st.invalid.is_empty(), "{:?}", st.invalid);

    fs::write(dir.join(part_name(0, 2, 1)), b"PAR1 torn").unwrap();
    let st = shard_state(&c, "job").unwrap();
    assert_eq!((st.parts, st.rows, st.status_counts[&Status::DecodeError]), (2, 6, 1));
    assert!(
        st.invalid.len() == 1 && st.invalid[0].starts_with("part-00000-of-00002-000001.parquet"),
        "{:?}",
        st.invalid
    );

    // What open refuses: another job's fingerprint for this shard, this shard's output of a
    // dataset that changed since (its job id), another shard count.
    let refused = |c: &SinkConfig, fingerprint: &str| shard_state(c, fingerprint).unwrap().refused.unwrap_or_default();
    assert!(refused(&c, "another-job").contains("another job's output for shard 0 of 2"));
    let changed = SinkConfig { job_id: "changed".into(), ..c.clone() };
    assert!(refused(&changed, "job").contains("sample list has changed"));
    assert!(refused(&cfg(&dir, 0, 3, 10, 4), "job").contains("share one shard count"));
    let mut after = snapshot(&dir);
    after.retain(|f| f.0 != part_name(0, 2, 1));
    let mut expected = before.clone();
    expected.retain(|f| f.0 != part_name(0, 2, 1));
    assert_eq!(after, expected, "nothing made, locked, changed or removed");

    // Another job's shard 1 in the folder (written elsewhere: open refuses to write it here).
    let elsewhere = tmp.path().join("elsewhere");
    let other = SinkConfig { job_id: "other".into(), ..cfg(&elsewhere, 1, 2, 10, 4) };
    PartWriter::open(other, "job-1").unwrap().0.abort().unwrap();
    fs::copy(elsewhere.join("_job-00001-of-00002.json"), dir.join("_job-00001-of-00002.json")).unwrap();
    assert!(refused(&c, "job").contains("holds shard 1 of 2 of another job"));
    assert!(PartWriter::open(c, "job").is_err(), "and open refuses it too");
}
