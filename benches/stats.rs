//! Stats-stage timings: map statistics on a 224×224 map, the 64×64 map PNG, the 7×7 f16 CAM.
//! Run: `cargo bench --bench stats`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use sa::stats::{encode_cam_f16, encode_map_png, map_stats, Region};
use saliency_audit as sa; // in the decode-stats scratch crate: `use decode_stats as sa;`

/// A positive attribution-like map: a smooth blob plus sparse speckle.
fn test_map(h: usize, w: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..h * w)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (x, y) = ((i % w) as f32 / w as f32 - 0.6, (i / w) as f32 / h as f32 - 0.4);
            let blob = (-(x * x + y * y) * 12.0).exp();
            let speckle = ((state >> 40) as f32 / (1u64 << 24) as f32).powi(4);
            blob * 0.01 + speckle * 0.002
        })
        .collect()
}

fn bench_stats(c: &mut Criterion) {
    let (h, w) = (224, 224);
    let map = test_map(h, w);
    let cam = test_map(7, 7);
    let mask: Vec<u8> = (0..h * w).map(|i| u8::from((i % w) > 100 && (i / w) < 150)).collect();
    let regions = [
        Region { name: "top_left".into(), x0: 0.0, y0: 0.0, x1: 0.5, y1: 0.5 },
        Region { name: "centre".into(), x0: 0.25, y0: 0.25, x1: 0.75, y1: 0.75 },
    ];
    c.bench_function("map_stats_224x224", |b| {
        b.iter(|| map_stats(black_box(&map), h, w, &cam, 7, 7, Some([0.1, 0.2, 0.7, 0.9]), Some(&mask), &regions))
    });
    c.bench_function("encode_map_png_224_to_64", |b| b.iter(|| encode_map_png(black_box(&map), h, w, 64)));
    c.bench_function("encode_cam_f16_7x7", |b| b.iter(|| encode_cam_f16(black_box(&cam))));
}

criterion_group!(benches, bench_stats);
criterion_main!(benches);
