//! Output throughput: 10 000 rows with realistic content (full stats, a ~1.5 KB map PNG, a 7×7
//! float16 CAM) pushed out of order through `PartWriter` into a temporary folder, parts of 1000
//! rows, each committed with fsync. Reports rows/s and the bytes written per row.

use saliency_audit::store::Loc;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

// The crate under test, under a short name.
use saliency_audit as sa;

use sa::sample::{Sample, Status};
use sa::sink::{CamMap, PartWriter, Row, SinkConfig};
use sa::stats::{EncodedMap, MapStats};

const ROWS: u64 = 10_000;
const ROWS_PER_PART: u64 = 1_000;
const REGIONS: [&str; 4] = ["top_left", "top_right", "bottom_left", "bottom_right"];

/// Deterministic pseudo-random numbers in 0..1 (xorshift).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A 56×56 attribution-like map (a blob plus speckle) as an 8-bit grayscale PNG, ~1.5 KB.
fn map_png(noise: &mut Noise) -> Vec<u8> {
    let size = 56u32;
    let (cx, cy) = (20.0 + 16.0 * noise.next(), 20.0 + 16.0 * noise.next());
    let mut px = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        for x in 0..size {
            let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
            let blob = (-d2 / 120.0).exp();
            let speckle = if noise.next() < 0.06 { noise.next() * 0.2 } else { 0.0 };
            px.push(((blob * 0.8 + speckle).min(1.0) * 255.0) as u8);
        }
    }
    let img = image::GrayImage::from_raw(size, size, px).expect("buffer matches size");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encodes");
    out.into_inner()
}

/// A 7×7 Grad-CAM: a ReLU'd blob, so some cells are exactly zero.
fn cam(noise: &mut Noise) -> CamMap {
    let (cx, cy) = (1.0 + 5.0 * noise.next(), 1.0 + 5.0 * noise.next());
    let f16_le = (0..49)
        .flat_map(|i| {
            let d2 = ((i % 7) as f32 - cx).powi(2) + ((i / 7) as f32 - cy).powi(2);
            let v = ((-d2 / 4.0).exp() - 0.15 + 0.1 * noise.next()).max(0.0);
            half::f16::from_f32(v).to_le_bytes()
        })
        .collect();
    CamMap { f16_le, h: 7, w: 7 }
}

fn row(index: u64, noise: &mut Noise) -> Row {
    let ok = index % 50 != 7;
    let stats = MapStats {
        attr_total: 100.0 * noise.next(),
        attr_max: noise.next(),
        attr_entropy: Some(noise.next()),
        attr_gini: Some(noise.next()),
        attr_top5_share: Some(noise.next()),
        attr_com_x: Some(noise.next()),
        attr_com_y: Some(noise.next()),
        attr_peak_x: Some(noise.next()),
        attr_peak_y: Some(noise.next()),
        cam_max: noise.next(),
        cam_com_x: Some(noise.next()),
        cam_com_y: Some(noise.next()),
        bbox_mass_share: Some(noise.next()),
        mask_mass_share: None,
        region_shares: REGIONS.iter().map(|_| Some(noise.next())).collect(),
    };
    Row {
        sample: Sample {
            index,
            id: format!("n01440764/ILSVRC2012_val_{index:08}"),
            path: format!("val/n01440764/ILSVRC2012_val_{index:08}.JPEG"),
            location: Loc::from(PathBuf::from(format!("/data/imagenet/val/n01440764/ILSVRC2012_val_{index:08}.JPEG"))),
            label: Some((index % 1000) as i64),
            label_error: None,
            bbox: None,
            box_error: None,
            mask: None,
        },
        status: if ok { Status::Ok } else { Status::DecodeError },
        error: (!ok).then(|| format!("val/n01440764/ILSVRC2012_val_{index:08}.JPEG: truncated JPEG")),
        target: ok.then_some((index % 1000) as i64),
        predicted: ok.then_some(((index * 7) % 1000) as i64),
        predicted_prob: ok.then(|| noise.next()),
        target_prob: ok.then(|| noise.next()),
        stats: ok.then_some(stats),
        cam: ok.then(|| cam(noise)),
        map: ok.then(|| EncodedMap { png: map_png(noise), scale: noise.next(), size: 56 }),
    }
}

/// The rows in the order several workers might deliver them: blocks of 64 interleaved.
fn rows() -> Vec<Row> {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let mut rows: Vec<Row> = (0..ROWS).map(|i| row(i, &mut noise)).collect();
    rows.sort_by_key(|r| (r.sample.index / 64 % 4, r.sample.index));
    rows
}

fn config(dir: PathBuf) -> SinkConfig {
    SinkConfig {
        dir: Loc::from(dir),
        shard: 0,
        num_shards: 1,
        total_rows: ROWS,
        rows_per_part: ROWS_PER_PART,
        regions: REGIONS.iter().map(|r| r.to_string()).collect(),
        metadata: vec![("saliency_audit.schema_version".into(), sa::sink::SCHEMA_VERSION.to_string())],
        job_id: "job".into(),
        retry_statuses: Default::default(),
    }
}

fn write_all(dir: PathBuf, rows: Vec<Row>) -> PathBuf {
    let (mut w, _) = PartWriter::open(config(dir.clone()), "bench").expect("open output");
    for r in rows {
        w.push(r).expect("push row");
    }
    w.finish().expect("finish shard");
    dir
}

fn bench(c: &mut Criterion) {
    let rows = rows();
    let png: usize = rows.iter().filter_map(|r| r.map.as_ref()).map(|m| m.png.len()).sum();
    let with_map = rows.iter().filter(|r| r.map.is_some()).count();
    // One run outside the timer to report sizes.
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = write_all(tmp.path().join("out"), rows.clone());
    let bytes: u64 =
        std::fs::read_dir(&dir).expect("list output").filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    eprintln!(
        "{ROWS} rows: mean PNG {} B, output {} B in all, {} B per row",
        png / with_map.max(1),
        bytes,
        bytes / ROWS
    );

    let mut g = c.benchmark_group("sink");
    g.throughput(Throughput::Elements(ROWS));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("push_10k_rows", |b| {
        b.iter_batched(
            || (tempfile::tempdir().expect("temporary folder"), rows.clone()),
            |(tmp, rows)| {
                write_all(tmp.path().join("out"), rows);
                tmp
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
/// The binary's allocator (src/main.rs), so that the times are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_main!(benches);
