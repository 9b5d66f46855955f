//! Decode-stage throughput: 500×375 and 4000×3000 JPEGs (quality 90) → Resize(256) →
//! CenterCrop(224), with the full decode and with DCT-domain scaling; a 500×375 PNG decode. Peers: the image crate's
//! decode alone, and the image crate's decode followed by fast_image_resize's resize of the
//! crop's source box (the anchor's way of doing the same). Run: `cargo bench --bench decode`; `DECODE_BENCH_FILE=F.jpg` adds that file
//! (see benches/decode_vs_pil.py).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fast_image_resize as fir;
use std::hint::black_box;

use sa::decode::{decode_bytes, Preprocess, Resize};
use saliency_audit as sa; // in the decode-stats scratch crate: `use decode_stats as sa;`

/// A `w × h` photo-like test image: smooth colour gradients plus mild pixel noise.
fn test_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (state % 17) as f32 - 8.0;
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let r = 128.0 + 100.0 * (fx * 6.0).sin() * (fy * 3.0).cos() + n;
        let g = 128.0 + 90.0 * ((fx + fy) * 4.0).cos() + n;
        let b = 60.0 + 150.0 * fy * fx + n;
        image::Rgb([r.clamp(0.0, 255.0) as u8, g.clamp(0.0, 255.0) as u8, b.clamp(0.0, 255.0) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    out
}

/// The kind of file the end-to-end anchor's script makes and most photo datasets hold: a
/// `w × h` pattern of sines with Gaussian-like noise (σ ≈ 12), saved as PIL saves a JPEG at
/// quality 90 (libjpeg-turbo's defaults: baseline, 4:2:0 chroma, no optimised Huffman tables).
fn pil_like_jpeg(w: usize, h: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        // The sum of four uniforms in ±0.5 has σ = 1/√3; scaled to σ ≈ 12.
        (0..4)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
            })
            .sum::<f32>()
            * 12.0
            * 3f32.sqrt()
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = ((x as f32) / (7.0 + c as f32) + 1.3).sin() * 60.0
                    + ((y as f32) / (11.0 + c as f32)).cos() * 50.0
                    + 128.0
                    + noise();
                rgb.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    comp.set_fastest_defaults();
    comp.set_size(w, h);
    comp.set_quality(90.0);
    comp.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
    let mut started = comp.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&rgb).unwrap();
    started.finish().unwrap()
}

/// The peer for decode + Resize(256) + CenterCrop(224): the image crate's decode, then
/// fast_image_resize's bilinear convolution (antialiased, as torchvision's Resize) of the
/// source box under the centre crop straight into 224×224, so no pixel outside the crop is
/// resized. Not Pillow's bytes (its rounding differs), and without this project's checks.
fn image_fir_peer(bytes: &[u8], resizer: &mut fir::Resizer) -> fir::images::Image<'static> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).unwrap().into_rgb8();
    let (w, h) = img.dimensions();
    // torchvision's sizes: the longer side int(256 · long / short), the crop's offset
    // round((resized − 224) / 2) (half to even), mapped back to source pixels.
    let (short, long) = (w.min(h) as f64, w.max(h) as f64);
    let resized_long = (256.0 * long / short).floor();
    let (rw, rh) = if w >= h { (resized_long, 256.0) } else { (256.0, resized_long) };
    let (sx, sy) = (w as f64 / rw, h as f64 / rh);
    let (left, top) = (((rw - 224.0) / 2.0).round_ties_even(), ((rh - 224.0) / 2.0).round_ties_even());
    let options = fir::ResizeOptions::new().resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear)).crop(
        left * sx,
        top * sy,
        224.0 * sx,
        224.0 * sy,
    );
    let mut out = fir::images::Image::new(224, 224, fir::PixelType::U8x3);
    resizer.resize(&img, &mut out, &options).unwrap();
    out
}

/// The peer does the same work: its crop is much closer to this project's (which equals
/// PIL's) than that crop is to itself moved by one pixel, right or down.
fn check_peer(bytes: &[u8], pre: &Preprocess, resizer: &mut fir::Resizer) {
    let ours = decode_bytes(bytes, "bench.jpg", pre).unwrap().rgb;
    let peer = image_fir_peer(bytes, resizer).into_vec();
    assert_eq!(ours.len(), peer.len());
    let mean_diff =
        |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y) as f64).sum::<f64>() / a.len() as f64;
    let (pixel, row) = (3, 224 * 3);
    let moved =
        mean_diff(&ours[pixel..], &ours[..ours.len() - pixel]).min(mean_diff(&ours[row..], &ours[..ours.len() - row]));
    let mean = mean_diff(&ours, &peer);
    eprintln!("peer vs this project: mean absolute difference {mean:.3} levels (moved by a pixel: {moved:.3})");
    assert!(mean < moved / 4.0, "the peer's crop differs from ours by {mean} levels on average");
}

fn bench_decode(c: &mut Criterion) {
    let jpeg = test_jpeg(500, 375);
    eprintln!("test JPEG: 500x375, quality 90, 4:4:4, {} bytes", jpeg.len());
    let mut g = c.benchmark_group("decode");
    let mut resizer = fir::Resizer::new();
    g.throughput(Throughput::Elements(1));
    let imagenet = Preprocess {
        resize: Resize::ShorterSide(256),
        crop: Some((224, 224)),
        max_pixels: 89_478_485,
        jpeg_dct_scaling: false,
    };
    g.bench_function("jpeg_500x375_resize256_crop224", |b| {
        b.iter(|| decode_bytes(black_box(&jpeg), "bench.jpg", &imagenet).unwrap())
    });
    // The JPEG decode alone (no resample: exact resize to the stored size, no crop).
    let decode_only = Preprocess {
        resize: Resize::Exact { h: 375, w: 500 },
        crop: None,
        max_pixels: 89_478_485,
        jpeg_dct_scaling: false,
    };
    g.bench_function("jpeg_500x375_decode_only", |b| {
        b.iter(|| decode_bytes(black_box(&jpeg), "bench.jpg", &decode_only).unwrap())
    });
    // Peers: the image crate's own decode of the same files (what decode_bytes used before
    // libjpeg), without this project's checks (header, end marker, EXIF orientation, pixel limit).
    g.bench_function("jpeg_500x375_image_crate_peer", |b| {
        b.iter(|| image::load_from_memory_with_format(black_box(&jpeg), image::ImageFormat::Jpeg).unwrap().into_rgb8())
    });
    check_peer(&jpeg, &imagenet, &mut resizer);
    g.bench_function("jpeg_500x375_image_fir_peer", |b| b.iter(|| image_fir_peer(black_box(&jpeg), &mut resizer)));
    let pil = pil_like_jpeg(500, 375);
    eprintln!("test JPEG: 500x375, quality 90, 4:2:0 baseline (as PIL saves), {} bytes", pil.len());
    g.bench_function("jpeg_500x375_420_resize256_crop224", |b| {
        b.iter(|| decode_bytes(black_box(&pil), "bench.jpg", &imagenet).unwrap())
    });
    g.bench_function("jpeg_500x375_420_decode_only", |b| {
        b.iter(|| decode_bytes(black_box(&pil), "bench.jpg", &decode_only).unwrap())
    });
    g.bench_function("jpeg_500x375_420_image_crate_peer", |b| {
        b.iter(|| image::load_from_memory_with_format(black_box(&pil), image::ImageFormat::Jpeg).unwrap().into_rgb8())
    });
    check_peer(&pil, &imagenet, &mut resizer);
    g.bench_function("jpeg_500x375_420_image_fir_peer", |b| b.iter(|| image_fir_peer(black_box(&pil), &mut resizer)));
    // Portrait: the centre crop cuts rows, so the decode skips the rows above and stops before
    // the rows below.
    let portrait = pil_like_jpeg(375, 500);
    g.bench_function("jpeg_375x500_420_resize256_crop224", |b| {
        b.iter(|| decode_bytes(black_box(&portrait), "bench.jpg", &imagenet).unwrap())
    });
    g.bench_function("jpeg_375x500_420_image_crate_peer", |b| {
        b.iter(|| {
            image::load_from_memory_with_format(black_box(&portrait), image::ImageFormat::Jpeg).unwrap().into_rgb8()
        })
    });
    check_peer(&portrait, &imagenet, &mut resizer);
    g.bench_function("jpeg_375x500_420_image_fir_peer", |b| {
        b.iter(|| image_fir_peer(black_box(&portrait), &mut resizer))
    });
    let dct = Preprocess { jpeg_dct_scaling: true, ..imagenet };
    g.bench_function("jpeg_500x375_resize256_crop224_dct_scaling", |b| {
        b.iter(|| decode_bytes(black_box(&jpeg), "bench.jpg", &dct).unwrap())
    });
    // A 12-megapixel photo: the full decode, and libjpeg decoding at 1/8 scale (500×375).
    let large = test_jpeg(4000, 3000);
    eprintln!("test JPEG: 4000x3000, quality 90, 4:4:4, {} bytes", large.len());
    g.sample_size(10);
    g.bench_function("jpeg_4000x3000_resize256_crop224", |b| {
        b.iter(|| decode_bytes(black_box(&large), "large.jpg", &imagenet).unwrap())
    });
    g.bench_function("jpeg_4000x3000_resize256_crop224_dct_scaling", |b| {
        b.iter(|| decode_bytes(black_box(&large), "large.jpg", &dct).unwrap())
    });
    g.bench_function("jpeg_4000x3000_image_crate_peer", |b| {
        b.iter(|| image::load_from_memory_with_format(black_box(&large), image::ImageFormat::Jpeg).unwrap().into_rgb8())
    });
    check_peer(&large, &imagenet, &mut resizer);
    g.bench_function("jpeg_4000x3000_image_fir_peer", |b| b.iter(|| image_fir_peer(black_box(&large), &mut resizer)));
    // A PNG of the same photo: decode_bytes walks its chunks (colour profile, checksums of the
    // image data, the places PIL finds an orientation) before the image crate decodes it.
    let png = {
        let img = image::load_from_memory(&jpeg).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    eprintln!("test PNG: 500x375 RGB, the 4:4:4 JPEG's pixels, {} bytes", png.len());
    g.bench_function("png_500x375_decode_only", |b| {
        b.iter(|| decode_bytes(black_box(&png), "bench.png", &decode_only).unwrap())
    });
    g.bench_function("png_500x375_image_crate_peer", |b| {
        b.iter(|| image::load_from_memory_with_format(black_box(&png), image::ImageFormat::Png).unwrap().into_rgb8())
    });
    // A file of the caller's (benches/decode_vs_pil.py times PIL on the same one).
    if let Some(path) = std::env::var_os("DECODE_BENCH_FILE") {
        let file = std::fs::read(&path).expect("DECODE_BENCH_FILE is readable");
        g.sample_size(100);
        g.bench_function("file_resize256_crop224", |b| {
            b.iter(|| decode_bytes(black_box(&file), "bench.jpg", &imagenet).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_decode);
/// The binary's allocator (src/main.rs), so that the times are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_main!(benches);
