use super::geometry::center_offset;
use super::*;
use image::{ImageFormat, Rgb, RgbImage};
use std::io::Write;

fn pre(resize: Resize, crop: Option<(u32, u32)>) -> Preprocess {
    Preprocess { resize, crop, max_pixels: 100_000_000, jpeg_dct_scaling: false }
}

/// Identity preprocessing for a `w × h` image (no resample, no crop).
fn identity(w: u32, h: u32) -> Preprocess {
    pre(Resize::Exact { h, w }, None)
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
    out
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn every_format_decodes() {
    let img = gradient(40, 30);
    let dynimg = DynamicImage::ImageRgb8(img.clone());
    // Every extension an image folder lists (torchvision's IMG_EXTENSIONS and .gif) decodes.
    let cases: [(ImageFormat, Vec<u8>, u8); 7] = [
        (ImageFormat::Png, encode(&dynimg, ImageFormat::Png), 0),
        (ImageFormat::Pnm, encode(&dynimg, ImageFormat::Pnm), 0),
        (ImageFormat::Bmp, encode(&dynimg, ImageFormat::Bmp), 0),
        (ImageFormat::Tiff, encode(&dynimg, ImageFormat::Tiff), 0),
        (ImageFormat::WebP, encode(&dynimg, ImageFormat::WebP), 0), // image writes lossless WebP
        (ImageFormat::Jpeg, jpeg(&img, 95), 12),
        (ImageFormat::Gif, encode(&DynamicImage::ImageRgba8(dynimg.to_rgba8()), ImageFormat::Gif), 40),
    ];
    for (format, bytes, tolerance) in cases {
        let d = decode_bytes(&bytes, "t", &identity(40, 30)).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!((d.geometry.out_w, d.geometry.out_h), (40, 30), "{format:?}");
        assert_eq!(d.rgb.len(), 40 * 30 * 3, "{format:?}");
        let diff = max_abs_diff(&d.rgb, img.as_raw());
        assert!(diff <= tolerance, "{format:?}: max diff {diff}");
    }
    // A grey PGM comes out with the grey value in all three channels.
    let grey = dynimg.to_luma8();
    let d =
        decode_bytes(&encode(&DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Pnm), "g.pgm", &identity(40, 30))
            .unwrap();
    let expanded: Vec<u8> = grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
    assert_eq!(d.rgb, expanded);
}

#[test]
fn every_format_truncated_is_a_decode_error() {
    let img = gradient(64, 48);
    let dynimg = DynamicImage::ImageRgb8(img.clone());
    let rgba = DynamicImage::ImageRgba8(dynimg.to_rgba8());
    let cases = [
        ("png", encode(&dynimg, ImageFormat::Png)),
        ("bmp", encode(&dynimg, ImageFormat::Bmp)),
        ("tiff", encode(&dynimg, ImageFormat::Tiff)),
        ("webp", encode(&dynimg, ImageFormat::WebP)),
        ("jpeg", jpeg(&img, 90)),
        ("gif", encode(&rgba, ImageFormat::Gif)),
    ];
    for (name, bytes) in cases {
        for keep in [bytes.len() * 6 / 10, bytes.len() * 9 / 10] {
            let e = decode_bytes(&bytes[..keep], name, &identity(64, 48))
                .err()
                .unwrap_or_else(|| panic!("{name} cut to {keep} of {} bytes decoded", bytes.len()));
            assert_eq!(e.status, Status::DecodeError, "{name}: {e}");
        }
    }
}

#[test]
fn gif_first_frame_is_used() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, RgbaImage};
    let red = RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]));
    let blue = RgbaImage::from_pixel(8, 8, image::Rgba([0, 0, 255, 255]));
    let mut bytes = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut bytes);
        enc.encode_frames(vec![
            Frame::from_parts(red, 0, 0, Delay::from_numer_denom_ms(10, 1)),
            Frame::from_parts(blue, 0, 0, Delay::from_numer_denom_ms(10, 1)),
        ])
        .unwrap();
    }
    let d = decode_bytes(&bytes, "anim.gif", &identity(8, 8)).unwrap();
    assert_eq!(&d.rgb[..3], &[255, 0, 0]);
}

/// A JPEG with an APP1 EXIF segment (big-endian TIFF, one IFD entry: Orientation = `value`).
fn jpeg_with_orientation(img: &RgbImage, value: u16) -> Vec<u8> {
    with_orientation(&jpeg(img, 95), value)
}

/// The JPEG `plain` with an APP1 EXIF segment (Orientation = `value`) after its start marker.
fn with_orientation(plain: &[u8], value: u16) -> Vec<u8> {
    assert_eq!(&plain[..2], &[0xff, 0xd8]);
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // header, IFD at offset 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&value.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = vec![0xff, 0xd8, 0xff, 0xe1];
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&plain[2..]);
    out
}

#[test]
fn exif_orientation_6_rotates_clockwise() {
    // 16 wide × 8 high: left half red, right half blue.
    let img = RgbImage::from_fn(16, 8, |x, _| if x < 8 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let bytes = jpeg_with_orientation(&img, 6);
    let d = decode_bytes(&bytes, "rot.jpg", &pre(Resize::ShorterSide(8), None)).unwrap();
    let g = d.geometry;
    assert_eq!((g.orig_w, g.orig_h), (8, 16), "orientation 6 swaps the sides");
    assert_eq!((g.out_w, g.out_h), (8, 16));
    // Rotating 90° clockwise puts the old left (red) on top.
    let px = |x: usize, y: usize| &d.rgb[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3];
    assert!(px(4, 2)[0] > 200 && px(4, 2)[2] < 60, "top should be red: {:?}", px(4, 2));
    assert!(px(4, 13)[2] > 200 && px(4, 13)[0] < 60, "bottom should be blue: {:?}", px(4, 13));

    // Orientation 1 leaves it as is.
    let d1 = decode_bytes(&jpeg_with_orientation(&img, 1), "r1.jpg", &identity(16, 8)).unwrap();
    assert_eq!((d1.geometry.orig_w, d1.geometry.orig_h), (16, 8));
}

#[test]
fn grey_alpha_and_16_bit_become_rgb8() {
    let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([100])));
    let d = decode_bytes(&encode(&grey, ImageFormat::Png), "g.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.iter().all(|&v| v == 100));

    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(4, 3, image::Rgba([10, 20, 30, 0])));
    let d = decode_bytes(&encode(&rgba, ImageFormat::Png), "a.png", &identity(4, 3)).unwrap();
    assert_eq!(d.rgb.len(), 4 * 3 * 3);
    assert!(d.rgb.chunks(3).all(|p| p == [10, 20, 30]), "alpha is dropped, colour kept");

    let la = DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_pixel(4, 3, image::LumaA([7, 200])));
    let d = decode_bytes(&encode(&la, ImageFormat::Png), "la.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.iter().all(|&v| v == 7));

    // 16-bit colour by its high byte, as PIL reads it (0x01FF: 1, not 511/257 rounded, 2).
    let rgb16 = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(4, 3, Rgb([65535u16, 0x01FF, 32896])));
    let d = decode_bytes(&encode(&rgb16, ImageFormat::Png), "c16.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.chunks(3).all(|p| p == [255, 1, 128]), "{:?}", &d.rgb[..3]);
    let rgba16 =
        DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(4, 3, image::Rgba([0x01FFu16, 7, 0xFF00, 0])));
    let d = decode_bytes(&encode(&rgba16, ImageFormat::Png), "a16.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.chunks(3).all(|p| p == [1, 0, 255]), "{:?}", &d.rgb[..3]);
    let la16 = DynamicImage::ImageLumaA16(image::ImageBuffer::from_pixel(4, 3, image::LumaA([0x01FFu16, 9])));
    let d = decode_bytes(&encode(&la16, ImageFormat::Png), "la16.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.iter().all(|&v| v == 1), "{:?}", &d.rgb[..3]);

    // 16-bit grey alone is scaled, rounding (PIL would clip 0x01FF to 255).
    let grey16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(4, 3, image::Luma([0x01FFu16])));
    let d = decode_bytes(&encode(&grey16, ImageFormat::Png), "g16.png", &identity(4, 3)).unwrap();
    assert!(d.rgb.iter().all(|&v| v == 2), "{:?}", &d.rgb[..3]);
}

#[test]
fn bad_files_get_the_right_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = pre(Resize::ShorterSide(16), Some((16, 16)));

    let missing = dir.path().join("nope.jpg");
    let e = decode_file(&missing, &p).unwrap_err();
    assert_eq!(e.status, Status::Missing);
    assert!(e.message.contains("nope.jpg"), "{}", e.message);

    let empty = dir.path().join("empty.jpg");
    std::fs::File::create(&empty).unwrap();
    let e = decode_file(&empty, &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError);
    assert!(e.message.contains("empty.jpg") && e.message.contains("0 bytes"), "{}", e.message);

    let text = dir.path().join("notes.png");
    std::fs::File::create(&text).unwrap().write_all(b"this is not an image at all\n").unwrap();
    let e = decode_file(&text, &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError);
    assert!(e.message.contains("notes.png"), "{}", e.message);

    let e = decode_file(dir.path(), &p).unwrap_err();
    assert_eq!(e.status, Status::Unreadable, "a directory is not readable as a file");

    let full = jpeg(&gradient(64, 48), 90);
    let truncated = dir.path().join("cut.jpg");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let e = decode_file(&truncated, &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{e}");
    assert!(e.message.contains("cut.jpg"), "{}", e.message);

    // Header only: the SOI/APP0/DQT part of the file.
    let e = decode_bytes(&full[..20], "head.jpg", &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{e}");

    let png = encode(&DynamicImage::ImageRgb8(gradient(64, 48)), ImageFormat::Png);
    let e = decode_bytes(&png[..png.len() - 30], "cut.png", &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{e}");

    // Garbage after a valid signature.
    let mut junk = png[..16].to_vec();
    junk.extend(std::iter::repeat_n(0xAB, 200));
    let e = decode_bytes(&junk, "junk.png", &p).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{e}");
}

#[test]
fn oversized_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("huge.jpg");
    // Sparse file larger than any 1-pixel image could be (16 bytes + 256 MiB).
    std::fs::File::create(&f).unwrap().set_len((256 << 20) + 1024).unwrap();
    let e = decode_file(&f, &Preprocess { max_pixels: 1, ..identity(1, 1) }).unwrap_err();
    assert_eq!(e.status, Status::TooLarge, "{e}");
    assert!(e.message.contains("huge.jpg"));
}

#[cfg(unix)]
#[test]
fn permission_denied_is_unreadable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("locked.png");
    std::fs::write(&f, encode(&DynamicImage::ImageRgb8(gradient(8, 8)), ImageFormat::Png)).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&f).is_ok() {
        return; // running as root: permissions are not enforced, nothing to check
    }
    let e = decode_file(&f, &identity(8, 8)).unwrap_err();
    assert_eq!(e.status, Status::Unreadable);
}

#[test]
fn huge_header_is_too_large_without_decoding() {
    // A real 1×1 PNG whose IHDR is patched to claim 100000×100000 (CRC fixed up).
    let mut png = encode(&DynamicImage::ImageRgb8(gradient(1, 1)), ImageFormat::Png);
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = decode_bytes(&png, "bomb.png", &pre(Resize::ShorterSide(224), Some((224, 224)))).unwrap_err();
    assert_eq!(e.status, Status::TooLarge, "{e}");
    assert!(e.message.contains("bomb.png") && e.message.contains("100000"), "{}", e.message);

    // Same for a BMP header (no checksum to fix).
    let mut bmp = encode(&DynamicImage::ImageRgb8(gradient(2, 2)), ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&60_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&60_000i32.to_le_bytes());
    let e = decode_bytes(&bmp, "bomb.bmp", &pre(Resize::ShorterSide(224), None)).unwrap_err();
    assert_eq!(e.status, Status::TooLarge, "{e}");

    // And a real image just over a small limit.
    let small = Preprocess { max_pixels: 100, ..identity(11, 10) };
    let e = decode_bytes(&jpeg(&gradient(11, 10), 90), "x.jpg", &small).unwrap_err();
    assert_eq!(e.status, Status::TooLarge);
    let ok = Preprocess { max_pixels: 110, ..identity(11, 10) };
    assert!(decode_bytes(&jpeg(&gradient(11, 10), 90), "x.jpg", &ok).is_ok());
}

#[test]
fn geometry_shorter_side_and_centre_crop() {
    let g = Geometry::plan(400, 200, &pre(Resize::ShorterSide(100), Some((100, 100)))).unwrap();
    assert_eq!(
        g,
        Geometry {
            orig_w: 400,
            orig_h: 200,
            resized_w: 200,
            resized_h: 100,
            crop_left: 50,
            crop_top: 0,
            out_w: 100,
            out_h: 100
        }
    );
    assert_eq!(g.map_box([100.0, 0.0, 300.0, 200.0]), Some([0.0, 0.0, 1.0, 1.0]));
    assert_eq!(g.map_box([0.0, 0.0, 500.0, 400.0]), Some([0.0, 0.0, 1.0, 1.0]), "clipped");
    assert_eq!(g.map_box([50.0, 50.0, 150.0, 150.0]), Some([0.0, 0.25, 0.25, 0.75]));
    assert_eq!(g.map_box([0.0, 0.0, 100.0, 100.0]), None, "entirely in the cropped-off strip");
    assert_eq!(g.map_box([200.0, 100.0, 200.0, 150.0]), None, "zero width");
    assert_eq!(g.map_box([f32::NAN, 0.0, 1.0, 1.0]), None);

    // torchvision ImageNet eval: 500×375 → Resize(256) → 341×256 (truncated) → crop 224.
    let g = Geometry::plan(500, 375, &pre(Resize::ShorterSide(256), Some((224, 224)))).unwrap();
    assert_eq!((g.resized_w, g.resized_h), (341, 256));
    assert_eq!((g.crop_left, g.crop_top), (58, 16), "round(58.5) = 58 (half to even)");
    // Portrait: the width is the shorter side.
    let g = Geometry::plan(375, 500, &pre(Resize::ShorterSide(256), None)).unwrap();
    assert_eq!((g.resized_w, g.resized_h, g.out_w, g.out_h), (256, 341, 256, 341));
    // Exact resize.
    let g = Geometry::plan(500, 375, &pre(Resize::Exact { h: 10, w: 20 }, None)).unwrap();
    assert_eq!((g.resized_w, g.resized_h, g.crop_left, g.crop_top), (20, 10, 0, 0));
    // Zero sizes are errors, not panics.
    assert!(Geometry::plan(500, 375, &pre(Resize::ShorterSide(0), None)).is_err());
    assert!(Geometry::plan(500, 375, &pre(Resize::ShorterSide(8), Some((0, 8)))).is_err());
}

#[test]
fn centre_offsets_round_half_to_even_and_pad() {
    assert_eq!(center_offset(10, 10), 0);
    assert_eq!(center_offset(11, 10), 0); // round(0.5) = 0
    assert_eq!(center_offset(13, 10), 2); // round(1.5) = 2
    assert_eq!(center_offset(15, 10), 2); // round(2.5) = 2
    assert_eq!(center_offset(17, 10), 4); // round(3.5) = 4
    assert_eq!(center_offset(14, 10), 2);
    assert_eq!(center_offset(10, 13), -1); // pad (13-10)//2 = 1 before
    assert_eq!(center_offset(10, 14), -2);
}

#[test]
fn constant_image_stays_constant_through_resize_and_crop() {
    let img = RgbImage::from_pixel(500, 375, Rgb([37, 150, 222]));
    let bytes = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
    for p in [
        pre(Resize::ShorterSide(256), Some((224, 224))),
        pre(Resize::ShorterSide(256), None),
        pre(Resize::Exact { h: 64, w: 48 }, Some((32, 40))),
        pre(Resize::ShorterSide(600), Some((500, 500))), // upsampling
    ] {
        let d = decode_bytes(&bytes, "c.png", &p).unwrap();
        let g = d.geometry;
        assert_eq!(d.rgb.len(), g.out_w as usize * g.out_h as usize * 3);
        assert!(d.rgb.chunks(3).all(|px| px == [37, 150, 222]), "{p:?}");
    }
}

#[test]
fn crop_window_resize_equals_full_resize_then_crop() {
    // Noisy pattern so that any misplaced filter tap shows.
    let img = RgbImage::from_fn(500, 375, |x, y| {
        let v = x.wrapping_mul(2654435761).wrapping_add(y.wrapping_mul(40503)) >> 7;
        Rgb([(v & 255) as u8, ((v >> 8) & 255) as u8, ((x + y) & 255) as u8])
    });
    let bytes = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
    let full = decode_bytes(&bytes, "n.png", &pre(Resize::ShorterSide(256), None)).unwrap();
    let crop = decode_bytes(&bytes, "n.png", &pre(Resize::ShorterSide(256), Some((224, 224)))).unwrap();
    let (fw, g) = (full.geometry.out_w as usize, crop.geometry);
    assert_eq!((fw, full.geometry.out_h), (341, 256));
    let mut expected = Vec::with_capacity(224 * 224 * 3);
    for y in 0..224 {
        let start = ((y + g.crop_top as usize) * fw + g.crop_left as usize) * 3;
        expected.extend_from_slice(&full.rgb[start..start + 224 * 3]);
    }
    let diff = max_abs_diff(&crop.rgb, &expected);
    let differing = crop.rgb.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert!(diff <= 1 && differing * 1000 <= expected.len(), "max diff {diff}, {differing} values differ");
}

#[test]
fn crop_larger_than_image_is_zero_padded() {
    let img = RgbImage::from_pixel(50, 40, Rgb([9, 8, 7]));
    let bytes = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
    let d = decode_bytes(&bytes, "s.png", &pre(Resize::Exact { h: 40, w: 50 }, Some((45, 61)))).unwrap();
    let g = d.geometry;
    assert_eq!((g.crop_left, g.crop_top, g.out_w, g.out_h), (-5, -2, 61, 45));
    for y in 0..45i64 {
        for x in 0..61i64 {
            let i = ((y * 61 + x) * 3) as usize;
            let inside = (5..55).contains(&x) && (2..42).contains(&y);
            let want: [u8; 3] = if inside { [9, 8, 7] } else { [0, 0, 0] };
            assert_eq!(&d.rgb[i..i + 3], &want, "at ({x},{y})");
        }
    }
}

#[test]
fn mask_maps_into_the_crop() {
    let dir = tempfile::tempdir().unwrap();
    // 400×200 mask, right half (x ≥ 200) is object (value 1, not 255: any non-zero counts).
    let mask = image::GrayImage::from_fn(400, 200, |x, _| image::Luma([u8::from(x >= 200)]));
    let path = dir.path().join("m.png");
    mask.save(&path).unwrap();
    let g = Geometry::plan(400, 200, &pre(Resize::ShorterSide(100), Some((100, 100)))).unwrap();
    let m = load_mask(&path, &g).unwrap();
    assert_eq!(m.len(), 100 * 100);
    for y in 0..100 {
        for x in 0..100 {
            // Output column x is resized column x + 50 → source column 2x + 101.
            assert_eq!(m[y * 100 + x], u8::from(x >= 50), "at ({x},{y})");
        }
    }

    // Padding is 0; an RGB mask counts any non-zero channel.
    let rgb_mask = RgbImage::from_pixel(10, 10, Rgb([0, 0, 3]));
    let p2 = dir.path().join("rgb.png");
    rgb_mask.save(&p2).unwrap();
    let g2 = Geometry::plan(10, 10, &pre(Resize::ShorterSide(10), Some((12, 12)))).unwrap();
    let m2 = load_mask(&p2, &g2).unwrap();
    assert_eq!(m2.iter().map(|&v| v as usize).sum::<usize>(), 100);
    assert_eq!(m2[0], 0);
    assert_eq!(m2[12 + 1], 1);

    // Wrong size → bad_mask naming both sizes.
    let e = load_mask(&p2, &g).unwrap_err();
    assert_eq!(e.status, Status::BadMask);
    assert!(e.message.contains("10x10") && e.message.contains("400x200"), "{}", e.message);
    assert!(e.message.contains("rgb.png"), "{}", e.message);

    // Missing or not an image → bad_mask.
    let e = load_mask(dir.path().join("none.png"), &g).unwrap_err();
    assert_eq!(e.status, Status::BadMask);
    assert!(e.message.contains("none.png"));
    let txt = dir.path().join("t.png");
    std::fs::write(&txt, "hello").unwrap();
    assert_eq!(load_mask(&txt, &g).unwrap_err().status, Status::BadMask);
}

/// A smooth photo-like image: gradients plus a few waves, so resampling errors stay visible.
fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let wave = ((fx * 23.0).sin() * (fy * 17.0).cos() * 40.0) as i32;
        Rgb([
            (fx * 200.0) as u8 + 20,
            ((fy * 180.0) as i32 + 40 + wave).clamp(0, 255) as u8,
            ((1.0 - fx) * 120.0 + fy * 100.0) as u8,
        ])
    })
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64
}

#[test]
fn jpeg_dct_scaling_matches_the_full_decode_closely() {
    let imagenet = Preprocess { jpeg_dct_scaling: false, ..pre(Resize::ShorterSide(256), Some((224, 224))) };
    let scaled = Preprocess { jpeg_dct_scaling: true, ..imagenet };
    // 2000×1500 → the shorter side 256 needs ≥ 256/1500 of it: libjpeg decodes at 2/8 (500×375).
    for (name, bytes) in
        [("plain", jpeg(&photo(2000, 1500), 92)), ("exif6", jpeg_with_orientation(&photo(2000, 1500), 6))]
    {
        let full = decode_bytes(&bytes, name, &imagenet).unwrap();
        let fast = decode_bytes(&bytes, name, &scaled).unwrap();
        assert_eq!(full.geometry, fast.geometry, "{name}: geometry stays in the original frame");
        assert_eq!(fast.rgb.len(), 224 * 224 * 3);
        let (mean, max) = (mean_abs_diff(&full.rgb, &fast.rgb), max_abs_diff(&full.rgb, &fast.rgb));
        println!("{name}: DCT-scaled vs full decode: mean |diff| {mean:.3}, max {max}");
        // Not the same pixels (the scaled path ran), but the same picture.
        assert!(mean > 0.0, "{name}: identical output: the DCT-scaled path did not run");
        assert!(mean < 1.5 && max < 24, "{name}: mean |diff| {mean:.3}, max {max}");
    }
    let (w, h) = (2000, 1500);
    let rotated = decode_bytes(&jpeg_with_orientation(&photo(w, h), 6), "r", &scaled).unwrap();
    assert_eq!((rotated.geometry.orig_w, rotated.geometry.orig_h), (h, w), "orientation applied");
}

/// libjpeg's scaled image is ceil(side · k / 8) pixels, of which the last row and column cover
/// only part of the original: resampling must read the exact extent, in every EXIF
/// orientation, or the picture shifts by a fraction of a pixel. On a smooth ramp a shift shows
/// as a signed mean difference against the full decode.
#[test]
fn jpeg_dct_scaling_does_not_shift_the_picture() {
    let imagenet = Preprocess { jpeg_dct_scaling: false, ..pre(Resize::ShorterSide(256), Some((224, 224))) };
    let scaled = Preprocess { jpeg_dct_scaling: true, ..imagenet };
    // 2001 × 1503 at 2/8: 501 × 376 pixels for an extent of 500.25 × 375.75.
    let (w, h) = (2001u32, 1503u32);
    let ramp = RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        Rgb([(fx * 255.0) as u8, (fy * 255.0) as u8, ((fx + fy) * 127.0) as u8])
    });
    for orientation in 1..=8u16 {
        let bytes = jpeg_with_orientation(&ramp, orientation);
        let full = decode_bytes(&bytes, "ramp", &imagenet).unwrap();
        let fast = decode_bytes(&bytes, "ramp", &scaled).unwrap();
        assert_eq!(full.geometry, fast.geometry);
        let signed = |c: usize| {
            let n = full.rgb.len() / 3;
            (0..n).map(|i| fast.rgb[i * 3 + c] as f64 - full.rgb[i * 3 + c] as f64).sum::<f64>() / n as f64
        };
        let (r, g) = (signed(0), signed(1));
        let mean = mean_abs_diff(&full.rgb, &fast.rgb);
        println!("orientation {orientation}: signed mean diff R {r:+.3} G {g:+.3}, mean |diff| {mean:.3}");
        assert!(mean > 0.0, "orientation {orientation}: the DCT-scaled path did not run");
        assert!(r.abs() < 0.1 && g.abs() < 0.1, "orientation {orientation}: shifted (R {r:+.3}, G {g:+.3})");
        assert!(mean < 0.6, "orientation {orientation}: mean |diff| {mean:.3}");
    }
}

#[test]
fn jpeg_dct_scaling_keeps_errors_and_small_images() {
    let scaled = Preprocess { jpeg_dct_scaling: true, ..pre(Resize::ShorterSide(256), Some((224, 224))) };
    let bytes = jpeg(&photo(1200, 900), 90);
    // Cut short: the same truncation error as the full decode.
    let e = decode_bytes(&bytes[..bytes.len() / 2], "cut.jpg", &scaled).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{}", e.message);
    assert!(e.message.contains("cut.jpg") && e.message.contains("truncated"), "{}", e.message);
    // Garbage after a JPEG signature.
    let mut junk = vec![0xFF, 0xD8, 0xFF, 0xE0];
    junk.extend(std::iter::repeat_n(0x55u8, 400));
    let e = decode_bytes(&junk, "junk.jpg", &scaled).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{}", e.message);
    // Over the pixel limit: refused from the header.
    let e = decode_bytes(&bytes, "big.jpg", &Preprocess { max_pixels: 1000, ..scaled }).unwrap_err();
    assert_eq!(e.status, Status::TooLarge, "{}", e.message);
    // Already at the target size: no scale below 8/8 fits, the full path decodes it exactly.
    let small = jpeg(&photo(300, 256), 90);
    let full = Preprocess { jpeg_dct_scaling: false, ..scaled };
    assert_eq!(decode_bytes(&small, "s", &scaled).unwrap(), decode_bytes(&small, "s", &full).unwrap());
}

/// CMYK and YCCK JPEGs are libjpeg's, converted as PIL converts them (`tests/it/decode.rs`
/// compares both with PIL); damaged entropy-coded data that libjpeg decodes around (with
/// warnings) stays libjpeg's, as PIL keeps it (`tests/it/decode.rs` compares such a file with
/// PIL).
#[test]
fn cmyk_jpegs_and_damaged_ones_are_libjpegs() {
    let p = pre(Resize::ShorterSide(32), Some((32, 32)));
    // CMYK and YCCK, written by libjpeg itself; a part decoded equals the whole decode's.
    for space in [mozjpeg::ColorSpace::JCS_CMYK, mozjpeg::ColorSpace::JCS_YCCK] {
        let file = cmyk_jpeg(96, 80, space);
        let d = decode_jpeg(&file, "cmyk.jpg", &p).unwrap().expect("libjpeg's decode");
        assert_eq!(d.rgb.len(), 32 * 32 * 3);
        let whole = jpeg::decode(&file, 8, |_| None).unwrap();
        assert_eq!((whole.size, whole.held), ((96, 80), [0, 0, 96, 80]));
        let part = jpeg::decode(&file, 8, |_| Some((40..60, 30..50))).unwrap();
        let [x, y, w, h] = part.held;
        assert!(x <= 40 && y <= 30 && x + w >= 60 && y + h >= 50, "{:?}", part.held);
        for r in 0..h as usize {
            let at = |img: &[u8], stride: usize, col: usize, row: usize| {
                img[row * stride * 3 + col * 3..][..w as usize * 3].to_vec()
            };
            assert_eq!(
                at(&part.rgb, w as usize, 0, r),
                at(&whole.rgb, 96, x as usize, y as usize + r),
                "{space:?} row {r}"
            );
        }
    }

    // Damaged scan data (no marker bytes written): libjpeg warns, and its pixels are kept.
    let mut damaged = jpeg(&photo(160, 120), 90);
    let sos = damaged.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let start = sos + 2 + u16::from_be_bytes([damaged[sos + 2], damaged[sos + 3]]) as usize;
    let end = damaged.len() - 2;
    for i in (start + (end - start) / 3..end - 8).step_by(7) {
        if damaged[i] != 0xFF && damaged[i - 1] != 0xFF {
            damaged[i] = 0x5A;
        }
    }
    let kept = decode_jpeg(&damaged, "damaged.jpg", &p).unwrap().expect("libjpeg's decode");
    assert!(jpeg::LIBJPEG_WARNINGS.get() > 0, "libjpeg warned");
    assert_eq!(decode_bytes(&damaged, "damaged.jpg", &p).unwrap(), kept);

    // The undamaged file is libjpeg's, with no warning.
    let clean = jpeg(&photo(160, 120), 90);
    assert!(decode_jpeg(&clean, "clean.jpg", &p).unwrap().is_some());
    assert_eq!(jpeg::LIBJPEG_WARNINGS.get(), 0);
}

/// A `w × h` JPEG of varied CMYK written by libjpeg in `space` (CMYK or YCCK; with Adobe's
/// marker, as libjpeg writes both).
pub(crate) fn cmyk_jpeg(w: usize, h: usize, space: mozjpeg::ColorSpace) -> Vec<u8> {
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    c.set_color_space(space);
    c.set_size(w, h);
    c.set_quality(90.0);
    let mut started = c.start_compress(Vec::new()).unwrap();
    let cmyk: Vec<u8> = (0..w * h)
        .flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, (i % 97) as u8, (i % 31 * 8) as u8])
        .collect();
    started.write_scanlines(&cmyk).unwrap();
    started.finish().unwrap()
}

/// PIL's CMYK → RGB on values as libjpeg returns them (Adobe's inverted CMYK), on values
/// Pillow 13 converted (`Image.fromarray(255 - raw, "CMYK").convert("RGB")`).
#[test]
fn cmyk_converts_as_pil() {
    // (stored C, M, Y, K) → PIL's RGB.
    let cases: [([u8; 4], [u8; 3]); 6] = [
        ([255, 255, 255, 255], [255, 255, 255]),
        ([0, 0, 0, 0], [0, 0, 0]),
        ([0, 128, 255, 255], [0, 128, 255]),
        ([200, 100, 50, 128], [100, 50, 25]),
        ([1, 2, 3, 254], [1, 2, 3]),
        ([77, 140, 201, 17], [5, 9, 13]),
    ];
    let raw: Vec<u8> = cases.iter().flat_map(|(c, _)| *c).collect();
    let mut rgb = vec![0u8; cases.len() * 3];
    jpeg::cmyk_to_rgb(&raw, &mut rgb);
    let want: Vec<u8> = cases.iter().flat_map(|(_, r)| *r).collect();
    assert_eq!(rgb, want);
}

/// A window with no rows or no columns is empty, whether or not a pass is needed.
#[test]
fn resample_of_an_empty_window_is_empty() {
    let src = vec![7u8; 4 * 3 * 3];
    assert!(resample::resize_window(&src, (4, 3), [0.0, 0.0, 4.0, 3.0], (2, 2), 0..0, 0..2).is_empty());
    assert!(resample::resize_window(&src, (4, 3), [0.0, 0.0, 4.0, 3.0], (4, 2), 0..4, 1..1).is_empty());
    // The same call with rows and columns: a constant stays constant.
    assert_eq!(resample::resize_window(&src, (4, 3), [0.0, 0.0, 4.0, 3.0], (2, 2), 0..2, 0..2), vec![7u8; 12]);
}

/// A `w × h` JPEG of noisy colour, written by libjpeg with chroma sampled `chroma` (pixels per
/// sample across and down; `None`: grey), optionally progressive.
fn noisy_jpeg(w: usize, h: usize, chroma: Option<(u8, u8)>, progressive: bool) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let space = if chroma.is_some() { mozjpeg::ColorSpace::JCS_RGB } else { mozjpeg::ColorSpace::JCS_GRAYSCALE };
    let channels = if chroma.is_some() { 3 } else { 1 };
    let pixels: Vec<u8> =
        (0..w * h * channels).map(|i| (((i / channels) % w * 255 / w) as u64 / 2 + next() % 128) as u8).collect();
    let mut c = mozjpeg::Compress::new(space);
    // MozJPEG's own defaults write progressive files; these are baseline, as libjpeg-turbo's.
    c.set_fastest_defaults();
    c.set_size(w, h);
    c.set_quality(85.0);
    if let Some(s) = chroma {
        c.set_chroma_sampling_pixel_sizes(s, s);
    }
    if progressive {
        c.set_progressive_mode();
    }
    let mut started = c.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&pixels).unwrap();
    started.finish().unwrap()
}

/// The part of a JPEG libjpeg decodes for a rectangle (columns cropped, rows above skipped,
/// rows below left out) holds the same pixels as the whole decode there, for every chroma
/// sampling, grey, progressive files, DCT scales 1/8 … 8/8 and rectangles at every edge.
#[test]
fn a_decoded_part_equals_the_whole_decode_there() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as u32
    };
    let (mut cropped, mut baseline_columns_cropped) = (0, 0);
    for (chroma, progressive) in [
        (Some((2, 2)), false),
        (Some((2, 1)), false),
        (Some((1, 2)), false),
        (Some((1, 1)), false),
        (Some((4, 1)), false),
        (Some((2, 2)), true),
        (None, false),
    ] {
        let bytes = noisy_jpeg(203, 157, chroma, progressive);
        for k in [1u8, 2, 3, 4, 8] {
            let whole = jpeg::decode(&bytes, k, |_| None).unwrap();
            let (sw, sh) = whole.size;
            assert_eq!(whole.held, [0, 0, sw, sh]);
            for _ in 0..12 {
                let (x0, y0) = (rand(sw), rand(sh));
                let (x1, y1) = (x0 + 1 + rand(sw - x0), y0 + 1 + rand(sh - y0));
                let part = jpeg::decode(&bytes, k, |size| {
                    assert_eq!(size, (sw, sh));
                    Some((x0..x1, y0..y1))
                })
                .unwrap();
                let [hx, hy, hw, hh] = part.held;
                let case = format!(
                    "{chroma:?} progressive {progressive}, {k}/8, wanted {x0}..{x1} x {y0}..{y1}, held {:?}",
                    part.held
                );
                assert!(hx <= x0 && x1 <= hx + hw && hy <= y0 && y1 <= hy + hh, "{case}");
                assert!(hx + hw <= sw && hy + hh <= sh, "{case}");
                cropped += usize::from(hw < sw) + usize::from(hh < sh);
                // Columns are cropped in baseline files only (see jpeg::decode).
                assert!(!progressive || hw == sw, "{case}: a progressive file's columns were cropped");
                baseline_columns_cropped += usize::from(!progressive && hw < sw);
                for y in y0..y1 {
                    let (a, b) = (y * sw + x0, (y - hy) * hw + x0 - hx);
                    let (len, (a, b)) = ((x1 - x0) as usize * 3, (a as usize * 3, b as usize * 3));
                    assert_eq!(&part.rgb[b..b + len], &whole.rgb[a..a + len], "{case}: row {y}");
                }
            }
        }
    }
    assert!(cropped > 600, "too few cases cut the image: {cropped}");
    assert!(baseline_columns_cropped > 200, "too few baseline cases cut columns: {baseline_columns_cropped}");
}

/// In every EXIF orientation, the model input made from the part of a JPEG libjpeg decodes
/// equals the same outputs of a resize of the whole decode (PIL's pixels, oriented).
#[test]
fn a_partly_decoded_jpeg_resizes_as_the_whole_one_in_every_orientation() {
    let plain = noisy_jpeg(203, 157, Some((2, 2)), false);
    for value in 1..=8u16 {
        let (bytes, name) = (with_orientation(&plain, value), format!("orientation {value}"));
        let (ow, oh) = if value >= 5 { (157, 203) } else { (203, 157) };
        // An exact resize to its own oriented size keeps the pixels: the whole decode.
        let whole = decode_bytes(&bytes, &name, &identity(ow, oh)).unwrap();
        assert_eq!((whole.geometry.out_w, whole.geometry.out_h), (ow, oh));
        for p in [
            pre(Resize::ShorterSide(96), Some((80, 80))),
            pre(Resize::ShorterSide(64), Some((64, 40))),
            pre(Resize::Exact { h: 50, w: 120 }, Some((30, 100))),
        ] {
            let got = decode_bytes(&bytes, &name, &p).unwrap();
            let g = got.geometry;
            let (x0, y0, x1, y1) = g.visible_window().unwrap();
            assert_eq!((x1 - x0, y1 - y0), (g.out_w, g.out_h), "the crop fits: no padding");
            let expected = resample::resize_window(
                &whole.rgb,
                (ow as usize, oh as usize),
                [0.0, 0.0, ow as f64, oh as f64],
                (g.resized_w as usize, g.resized_h as usize),
                x0 as usize..x1 as usize,
                y0 as usize..y1 as usize,
            );
            assert!(got.rgb == expected, "{name}, {p:?}: differs from the whole decode's resize");
        }
    }
}

/// `map_rect` maps a rectangle as `apply_orientation` moves the pixels, and `inverse` undoes
/// it: in every orientation, the pixels of a rectangle of the oriented image are exactly those
/// of its image under the inverse in the stored one.
#[test]
fn rectangles_follow_the_pixels_through_every_orientation() {
    use image::metadata::Orientation::*;
    let (w, h) = (7u32, 5u32);
    // Each pixel holds its own stored coordinates.
    let stored = RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, 1]));
    for o in [NoTransforms, Rotate90, Rotate180, Rotate270, FlipHorizontal, FlipVertical, Rotate90FlipH, Rotate270FlipH]
    {
        let mut img = DynamicImage::ImageRgb8(stored.clone());
        img.apply_orientation(o);
        let img = img.into_rgb8();
        let (ow, oh) = img.dimensions();
        assert_eq!((ow, oh), oriented_size(w, h, o));
        for r in [[0, 0, ow, oh], [1, 2, 3, 4], [0, 1, ow, 2], [ow - 1, oh - 1, ow, oh]] {
            let [sx0, sy0, sx1, sy1] = map_rect(inverse(o), (ow, oh), r.map(|v| v as f64)).map(|v| v as u32);
            assert_eq!(map_rect(o, (w, h), [sx0, sy0, sx1, sy1].map(|v| v as f64)), r.map(|v| v as f64), "{o:?} {r:?}");
            let [x0, y0, x1, y1] = r;
            for y in y0..y1 {
                for x in x0..x1 {
                    let [px, py, _] = img.get_pixel(x, y).0;
                    let inside = (sx0..sx1).contains(&(px as u32)) && (sy0..sy1).contains(&(py as u32));
                    assert!(
                        inside,
                        "{o:?}: oriented ({x}, {y}) is stored ({px}, {py}), outside {sx0}..{sx1} x {sy0}..{sy1}"
                    );
                }
            }
            assert_eq!((x1 - x0) * (y1 - y0), (sx1 - sx0) * (sy1 - sy0), "{o:?} {r:?}: the same area");
        }
    }
}

/// A progressive JPEG cut short after some scans (legal: the missing refinement is zero) is
/// decoded with libjpeg's block smoothing; its part equals the whole decode there too.
#[test]
fn a_part_of_a_progressive_jpeg_without_its_last_scans_equals_the_whole_decode() {
    let full = noisy_jpeg(203, 157, Some((2, 2)), true);
    let scans: Vec<usize> = full.windows(2).enumerate().filter(|(_, w)| *w == [0xFF, 0xDA]).map(|(i, _)| i).collect();
    assert!(scans.len() > 4, "{} scans", scans.len());
    let mut cut = full[..scans[scans.len() - 3]].to_vec();
    cut.extend_from_slice(&[0xFF, 0xD9]);
    jpeg::LIBJPEG_WARNINGS.set(0);
    let whole = jpeg::decode(&cut, 8, |_| None).unwrap();
    assert_eq!(jpeg::LIBJPEG_WARNINGS.get(), 0, "libjpeg takes the cut file without a warning");
    for (x0, x1) in [(37, 150), (60, 203), (17, 90)] {
        let part = jpeg::decode(&cut, 8, |_| Some((x0..x1, 20..120))).unwrap();
        let [hx, hy, hw, _] = part.held;
        for y in 20..120u32 {
            let a = ((y * 203 + x0) * 3) as usize;
            let b = (((y - hy) * hw + x0 - hx) * 3) as usize;
            let len = ((x1 - x0) * 3) as usize;
            assert_eq!(&part.rgb[b..b + len], &whole.rgb[a..a + len], "columns {x0}..{x1}, row {y}");
        }
    }
}

/// A PNG whose colour profile (iCCP) inflates to 300 MiB of zeros from a few hundred KB (the
/// decoder would inflate it whole, up to the allocation limit: 1.5 GB under the default
/// `max_pixels`): the chunk is dropped unread, and the image decodes to the pixels of the same
/// PNG without it.
#[test]
fn a_png_colour_profile_is_never_inflated() {
    let plain = encode(&DynamicImage::ImageRgb8(gradient(64, 48)), ImageFormat::Png);
    let mut profile = b"bomb\0\0".to_vec();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..300 {
        z.write_all(&zeros).unwrap();
    }
    profile.extend(z.finish().unwrap());
    assert!(profile.len() < 2 << 20, "{} bytes", profile.len());
    let mut chunk = (profile.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"iCCP");
    chunk.extend_from_slice(&profile);
    chunk.extend_from_slice(&crc32fast::hash(&chunk[4..]).to_be_bytes());
    // After the signature (8 bytes) and IHDR (25).
    let bomb = [&plain[..33], &chunk[..], &plain[33..]].concat();
    assert_eq!(&png_without_iccp(&bomb)[..], &plain[..]);
    let small = Preprocess { max_pixels: 10_000, ..identity(64, 48) };
    let got = decode_bytes(&bomb, "bomb.png", &small).unwrap();
    assert_eq!(got.rgb, decode_bytes(&plain, "plain.png", &small).unwrap().rgb);
    // Not a PNG, or one cut inside its first chunk: as it is.
    assert_eq!(&png_without_iccp(b"GIF89a")[..], b"GIF89a");
    assert_eq!(&png_without_iccp(&bomb[..40])[..], &bomb[..40]);
    // A profile followed by a chunk that runs past the end: the profile is still dropped.
    let mut broken = bomb[..33 + chunk.len()].to_vec();
    broken.extend_from_slice(&[0, 0, 0x10, 0, b't', b'E', b'X', b't', 1, 2]);
    assert_eq!(&png_without_iccp(&broken)[..], [&plain[..33], &broken[33 + chunk.len()..]].concat());
}

/// A pipe or a device named like an image is `unreadable` at once: opening a pipe would wait
/// for a writer for ever, and /dev/zero never ends.
#[test]
fn a_pipe_or_device_is_unreadable_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.jpg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    for path in [fifo, std::path::PathBuf::from("/dev/zero")] {
        let e = read_file(&Loc::from(path.clone()), 1 << 20).unwrap_err();
        assert_eq!(e.status, Status::Unreadable, "{path:?}: {}", e.message);
        assert!(e.message.contains("not a regular file"), "{}", e.message);
    }
}

/// A progressive JPEG of 150 tiny scans (the same DC scan again and again: a few bytes each,
/// a pass over the whole image each): libjpeg stops past its 100th scan instead of decoding
/// them all, and the sample is a `decode_error`; a file of a few scans still decodes.
#[test]
fn a_jpeg_of_too_many_scans_is_stopped() {
    fn scans(n: usize) -> Vec<u8> {
        let seg = |m: u8, d: &[u8]| [&[0xff, m][..], &((d.len() + 2) as u16).to_be_bytes(), d].concat();
        let dqt = seg(0xdb, &[[0u8].as_slice(), &[1u8; 64]].concat());
        let sof = seg(0xc2, &[8, 0, 64, 0, 64, 1, 1, 0x11, 0]);
        let mut bits = vec![0u8, 1];
        bits.extend([0u8; 15]);
        bits.push(0);
        let dht = seg(0xc4, &bits);
        let sos = seg(0xda, &[1, 1, 0, 0, 0, 0]);
        let mut out = vec![0xff, 0xd8];
        out.extend([dqt, sof, dht].concat());
        for _ in 0..n {
            out.extend(&sos);
            out.extend([0u8; 16]);
        }
        out.extend([0xff, 0xd9]);
        out
    }
    let few = std::panic::catch_unwind(|| super::jpeg::decode(&scans(3), 8, |_| None));
    assert!(matches!(few, Ok(Ok(_))), "a file of three scans decodes");
    let many = std::panic::catch_unwind(|| super::jpeg::decode(&scans(150), 8, |_| None));
    let msg = many.err().map(|p| super::super::engine::batch::panic_message(p.as_ref()).to_owned());
    assert_eq!(msg.as_deref(), Some("libjpeg: too many scans"));
    let e = decode_bytes(&scans(150), "scans.jpg", &pre(Resize::ShorterSide(32), Some((32, 32)))).unwrap_err();
    assert_eq!(e.status, Status::DecodeError, "{}", e.message);
}
