//! Stats-stage timings: map statistics on a 224×224 map, the 64×64 map PNG, the 7×7 f16 CAM;
//! and a batch of 32 maps reduced two ways, in the same run: on the host (statistics' sums and
//! resize per map, as the pipeline's pool does) and by libtorch on the CPU (the engine's device
//! reduction, `runtime.stats_on_device`; on CUDA the same code runs on the GPU).
//! Run: `cargo bench --bench stats`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use sa::engine::reduce::{reduce, Reduction};
use sa::stats::{encode_cam_f16, encode_map_png, map_stats, map_sums, resize_map, Region};
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

    // A batch of 32 maps: the host's reduction, one thread, vs libtorch's on the CPU.
    let n = 32;
    let maps: Vec<f32> = (0..n).flat_map(|_| map.iter().copied()).collect();
    let boxes = vec![Some([0.1f32, 0.2, 0.7, 0.9]); n];
    let masks = vec![Some(mask.clone()); n];
    c.bench_function("reduce_32x224x224_host_1_thread", |b| {
        b.iter(|| {
            for (m, (bx, mk)) in maps.chunks_exact(h * w).zip(boxes.iter().zip(&masks)) {
                black_box(map_sums(m, h, w, *bx, mk.as_deref(), &regions));
                black_box(resize_map(m, h, w, 64));
            }
        })
    });
    let t = tch::Tensor::from_slice(&maps).view([n as i64, h as i64, w as i64]);
    let red = Reduction { map_size: 64, regions: regions.to_vec() };
    c.bench_function(&format!("reduce_32x224x224_libtorch_cpu_{}_threads", tch::get_num_threads()), |b| {
        b.iter(|| {
            let r = reduce(black_box(&t), &red, &boxes, &masks).unwrap();
            black_box(r.sums_per_sample().unwrap());
        })
    });
}

criterion_group!(benches, bench_stats);
/// The binary's allocator (src/main.rs), so that the times are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_main!(benches);
