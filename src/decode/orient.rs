//! The orientation PIL's `ImageOps.exif_transpose` applies, found where PIL looks for it: the
//! EXIF block's Orientation tag (of any numeric type: some writers store it as a LONG), else
//! an XMP packet's `tiff:Orientation`. In a PNG, the EXIF block is the last `eXIf` chunk
//! anywhere in the file (PIL reads the chunks after the image data too), else ImageMagick's
//! "Raw profile type exif" text chunk; in a WebP, its `EXIF` and `XMP ` chunks; in a JPEG,
//! the `Exif` APP1 segments (joined, as PIL joins them) and the last XMP one. Where PIL
//! refuses a file over its metadata (a text chunk past 1 MiB inflated, a raw profile that is
//! not hex), the metadata is skipped here and the image read.

use super::chunks::{self, Chunk};
use image::metadata::Orientation;
use std::io::Read;

/// Text chunks larger than this once inflated are skipped (PIL refuses them).
const MAX_TEXT: u64 = 1 << 20;

/// The orientation from an EXIF block (the TIFF structure, with or without `Exif\0\0` before
/// it) and an XMP packet. An Orientation tag that is not a whole number in 1..=8 applies
/// nothing, and XMP is read only where the EXIF block has no Orientation tag, as in PIL.
pub(super) fn from_metadata(exif: Option<&[u8]>, xmp: Option<&[u8]>) -> Orientation {
    let value = match exif.and_then(exif_tag) {
        Some(Tag::Number(v)) => Some(v),
        Some(Tag::Other) => None,
        None => xmp.and_then(xmp_orientation).map(f64::from),
    };
    match value {
        Some(v) if v.fract() == 0.0 && (1.0..=8.0).contains(&v) => {
            Orientation::from_exif(v as u8).unwrap_or(Orientation::NoTransforms)
        }
        _ => Orientation::NoTransforms,
    }
}

/// An Orientation tag as PIL's TIFF reader gives it: a number (the first of several), or
/// something else (bytes, text), which no orientation matches.
enum Tag {
    Number(f64),
    Other,
}

/// An IFD0 entry's type, the size of one value, and its data (the values).
struct Entry<'a> {
    kind: u64,
    unit: usize,
    data: &'a [u8],
}

/// IFD0's entry for `tag` in a TIFF structure, read as PIL reads it: the first entry of a type
/// PIL knows, with its data inside the block; an entry of no data or an unknown type is
/// skipped (a later one may stand). With the byte order (`true`: big-endian). `None` where
/// there is none, or no readable IFD (BigTIFF included).
fn ifd0_entry(t: &[u8], tag: u64) -> Option<(Entry<'_>, bool)> {
    // Both byte orders with either magic order, as PIL accepts them.
    let big = match t.get(..4)? {
        b"MM\0*" | b"MM*\0" => true,
        b"II*\0" | b"II\0*" => false,
        _ => return None,
    };
    let bytes_at = |at: usize, n: usize| -> Option<&[u8]> { t.get(at..at.checked_add(n)?) };
    let uint = |b: &[u8]| uint(b, big);
    let ifd = uint(bytes_at(4, 4)?) as usize;
    let entries = uint(bytes_at(ifd, 2)?) as usize;
    for i in 0..entries {
        let entry = bytes_at(ifd + 2 + 12 * i, 12)?;
        if uint(&entry[..2]) != tag {
            continue;
        }
        let (kind, count) = (uint(&entry[2..4]), uint(&entry[4..8]));
        let unit: u64 = match kind {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 => 8,
            _ => continue,
        };
        let size = unit * count;
        let data = match size {
            0 => continue,
            1..=4 => &entry[8..8 + size as usize],
            _ => match bytes_at(uint(&entry[8..12]) as usize, size as usize) {
                Some(d) => d,
                None => continue,
            },
        };
        return Some((Entry { kind, unit: unit as usize, data }, big));
    }
    None
}

/// An unsigned number from bytes in the given order.
fn uint(b: &[u8], big: bool) -> u64 {
    let b = b.iter().copied();
    if big {
        b.fold(0, |v, x| v << 8 | x as u64)
    } else {
        b.rev().fold(0, |v, x| v << 8 | x as u64)
    }
}

/// The EXIF Orientation tag (0x0112) of IFD0 as PIL gives it (see [`ifd0_entry`]).
fn exif_tag(exif: &[u8]) -> Option<Tag> {
    let t = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let (Entry { kind, unit, data }, big) = ifd0_entry(t, 0x0112)?;
    let uint = |b: &[u8]| uint(b, big);
    let first = &data[..unit];
    let signed = |bits: u32| {
        let v = uint(first);
        (v as i64) << (64 - bits) >> (64 - bits)
    };
    let v = match kind {
        // BYTE, ASCII and UNDEFINED come back as bytes or text.
        1 | 2 | 7 => return Some(Tag::Other),
        6 => signed(8) as f64,
        8 => signed(16) as f64,
        9 => signed(32) as f64,
        11 => f32::from_bits(uint(first) as u32) as f64,
        12 => f64::from_bits(uint(first)),
        5 | 10 => {
            let (n, d) = if kind == 5 {
                (uint(&first[..4]) as f64, uint(&first[4..]) as f64)
            } else {
                let (n, d) = (uint(&first[..4]) as u32 as i32, uint(&first[4..]) as u32 as i32);
                (n as f64, d as f64)
            };
            if d == 0.0 {
                return Some(Tag::Other);
            }
            n / d
        }
        _ => uint(first) as f64,
    };
    Some(Tag::Number(v))
}

/// `tiff:Orientation="N"` or `<tiff:Orientation>N</…>` in an XMP packet: the first such digit
/// (PIL's pattern `tiff:Orientation(="|>)([0-9])`).
fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const TAG: &[u8] = b"tiff:Orientation";
    let mut rest = xmp;
    while let Some(at) = rest.windows(TAG.len()).position(|w| w == TAG) {
        let after = &rest[at + TAG.len()..];
        let digit = match after {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(d),
            _ => None,
        };
        if let Some(d) = digit {
            return Some((d - b'0') as u32);
        }
        rest = &rest[at + 1..];
    }
    None
}

/// A PNG's orientation (see the module's note). The chunks are read as PIL reads them: up to
/// IEND, a chunk name that is not four word characters, or (after the image data) the next
/// animation frame; the last `eXIf` (or `tEXt` "exif") wins, as each replaces the one before.
pub(super) fn png(bytes: &[u8]) -> Orientation {
    let mut exif: Option<&[u8]> = None;
    // The last text chunk of each key, inflated only once chosen.
    let mut raw: Option<(&[u8], &[u8])> = None;
    let mut xmp: Option<(&[u8], &[u8])> = None;
    let mut data_seen = false;
    for Chunk { kind, data, .. } in chunks::png(bytes) {
        if !kind.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_') || (data_seen && kind == b"fcTL") {
            break;
        }
        match kind {
            b"IEND" => break,
            b"IDAT" => data_seen = true,
            b"eXIf" => exif = Some(data),
            b"tEXt" | b"zTXt" | b"iTXt" => match data.split(|&b| b == 0).next() {
                // Its bytes as they are (none where the keyword has no NUL after it).
                Some(b"exif") if kind == b"tEXt" => exif = Some(data.get(5..).unwrap_or_default()),
                Some(b"Raw profile type exif") => raw = Some((kind, data)),
                Some(b"XML:com.adobe.xmp") => xmp = Some((kind, data)),
                _ => {}
            },
            _ => {}
        }
    }
    let text = |c: Option<(&[u8], &[u8])>| c.and_then(|(kind, data)| png_text(kind, data));
    let raw = if exif.is_none() { text(raw).and_then(|r| raw_profile(&r)) } else { None };
    from_metadata(exif.or(raw.as_deref()), text(xmp).as_deref())
}

/// A PNG text chunk's text (inflated where compressed); `None` where it cannot be read, or
/// inflates past [`MAX_TEXT`].
fn png_text(kind: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let (_, rest) = data.split_at(data.iter().position(|&b| b == 0)?);
    let rest = &rest[1..];
    let inflate = |z: &[u8]| -> Option<Vec<u8>> {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(z).take(MAX_TEXT + 1).read_to_end(&mut out).ok()?;
        (out.len() as u64 <= MAX_TEXT).then_some(out)
    };
    let text = match kind {
        b"tEXt" => rest.to_vec(),
        b"zTXt" => inflate(rest.strip_prefix(&[0])?)?,
        _ => {
            // iTXt: compression flag and method, language tag, translated keyword, text.
            let (&flag, rest) = rest.split_first()?;
            let (&method, rest) = rest.split_first()?;
            let mut parts = rest.splitn(3, |&b| b == 0);
            let (_, _, text) = (parts.next()?, parts.next()?, parts.next()?);
            match (flag, method) {
                (0, _) => text.to_vec(),
                (_, 0) => inflate(text)?,
                _ => return None,
            }
        }
    };
    Some(text)
}

/// ImageMagick's raw profile text (`\nexif\n   <length>\n<hex lines>`): its bytes, as PIL
/// reads them: the lines after the third, joined, through Python's `bytes.fromhex` (pairs of
/// hex digits; Python's white space, vertical tab and form feed included, only between pairs;
/// anything else, a sign say, refuses the whole profile).
fn raw_profile(text: &[u8]) -> Option<Vec<u8>> {
    let mut hex = text.split(|&b| b == b'\n').skip(3).flatten().copied();
    let digit = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::new();
    while let Some(b) = hex.next() {
        if matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c) {
            continue;
        }
        let (high, low) = (digit(b)?, digit(hex.next()?)?);
        out.push((high * 16 + low) as u8);
    }
    Some(out)
}

/// A WebP's orientation: its first `EXIF` chunk, else its first `XMP ` chunk, each only where
/// the file is an extended one (VP8X) whose flags announce it, as libwebp's demuxer (which PIL
/// reads with) keeps them.
pub(super) fn webp(bytes: &[u8]) -> Orientation {
    const EXIF_FLAG: u8 = 0x08;
    const XMP_FLAG: u8 = 0x04;
    let (mut exif, mut xmp, mut flags) = (None, None, 0u8);
    for Chunk { start, kind, data, .. } in chunks::riff(bytes) {
        match kind {
            b"VP8X" if start == 12 => flags = data.first().copied().unwrap_or(0),
            b"EXIF" if exif.is_none() && flags & EXIF_FLAG != 0 => exif = Some(data),
            b"XMP " if xmp.is_none() && flags & XMP_FLAG != 0 => xmp = Some(data),
            _ => {}
        }
    }
    from_metadata(exif, xmp)
}

/// A TIFF's orientation: IFD0's Orientation tag, else the XMP packet of its tag 700, as PIL
/// reads them; `None` for a TIFF this reader does not walk (BigTIFF).
pub(super) fn tiff(bytes: &[u8]) -> Option<Orientation> {
    let classic = matches!(bytes.get(..4), Some(b"MM\0*" | b"MM*\0" | b"II*\0" | b"II\0*"));
    classic.then(|| from_metadata(Some(bytes), ifd0_entry(bytes, 700).map(|(e, _)| e.data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A big-endian IFD0 with one Orientation entry of type `kind`.
    fn ifd(kind: u16, count: u32, value: [u8; 4]) -> Vec<u8> {
        let mut t = b"MM\0*\0\0\0\x08\0\x01\x01\x12".to_vec();
        t.extend(kind.to_be_bytes());
        t.extend(count.to_be_bytes());
        t.extend(value);
        t.extend([0; 4]);
        t
    }

    #[test]
    fn orientation_as_pil_finds_it() {
        let of = |exif: &[u8]| from_metadata(Some(exif), None);
        assert_eq!(of(&ifd(3, 1, [0, 6, 0, 0])), Orientation::Rotate90);
        // A LONG, and the `Exif\0\0` prefix.
        let long = [b"Exif\0\0".as_slice(), &ifd(4, 1, [0, 0, 0, 8])].concat();
        assert_eq!(of(&long), Orientation::Rotate270);
        // The first of two SHORTs; a SIGNED SHORT; the other magic order PIL accepts.
        assert_eq!(of(&ifd(3, 2, [0, 3, 0, 6])), Orientation::Rotate180);
        assert_eq!(of(&ifd(8, 1, [0, 6, 0, 0])), Orientation::Rotate90);
        let mut other_magic = ifd(3, 1, [0, 6, 0, 0]);
        other_magic[2..4].copy_from_slice(b"*\0");
        assert_eq!(of(&other_magic), Orientation::Rotate90);
        // A RATIONAL 12/2 (its data after the IFD, at offset 26).
        let mut rational = ifd(5, 1, [0, 0, 0, 26]);
        rational.extend([0, 0, 0, 12, 0, 0, 0, 2]);
        assert_eq!(of(&rational), Orientation::Rotate90);
        // A BYTE is bytes to PIL: nothing, and the XMP is not read.
        let xmp = br#"<x:xmpmeta><rdf:Description tiff:Orientation="3"/></x:xmpmeta>"#;
        assert_eq!(from_metadata(Some(&ifd(1, 1, [6, 0, 0, 0])), Some(xmp)), Orientation::NoTransforms);
        // Out of range: nothing, and the XMP is not read.
        assert_eq!(from_metadata(Some(&ifd(3, 1, [0, 9, 0, 0])), Some(xmp)), Orientation::NoTransforms);
        // An entry of no data is skipped: the XMP's.
        assert_eq!(from_metadata(Some(&ifd(3, 0, [0, 6, 0, 0])), Some(xmp)), Orientation::Rotate180);
        // No tag: the XMP's, in either form.
        assert_eq!(from_metadata(None, Some(xmp)), Orientation::Rotate180);
        assert_eq!(
            from_metadata(Some(b"II*\0"), Some(b"<tiff:Orientation>6</tiff:Orientation>")),
            Orientation::Rotate90
        );
        assert_eq!(from_metadata(None, Some(b"tiff:Orientation tiff:Orientation=\"2\"")), Orientation::FlipHorizontal);
        assert_eq!(from_metadata(None, Some(b"tiff:Orientation=6")), Orientation::NoTransforms);
        assert_eq!(raw_profile(b"\nexif\n       4\n4d4d\n 002a\n").as_deref(), Some(&b"MM\0*"[..]));
        // As Python's bytes.fromhex: vertical tab and form feed between pairs are white space;
        // a sign, white space inside a pair, an odd digit or a non-ASCII byte refuse it.
        assert_eq!(raw_profile(b"\nexif\n 2\n4d\x0b4d\x0c\r").as_deref(), Some(&b"MM"[..]));
        for refused in [&b"\nexif\n 2\n+64d"[..], b"\nexif\n 2\n4 d4d", b"\nexif\n 2\n4d4", b"\nexif\n 1\n\xe94"] {
            assert_eq!(raw_profile(refused), None, "{:?}", String::from_utf8_lossy(refused));
        }
    }

    /// Chunks cut short or without their parts (a `tEXt` "exif" with no NUL, a zTXt that is not
    /// zlib, a chunk past the end) lose the orientation, without a panic.
    #[test]
    fn odd_png_chunks_are_no_orientation() {
        let chunk = |kind: &[u8], data: &[u8]| [&(data.len() as u32).to_be_bytes()[..], kind, data, &[0; 4]].concat();
        let png = |chunks: &[Vec<u8>]| [b"\x89PNG\r\n\x1a\n".as_slice(), &chunks.concat()].concat();
        for odd in [
            png(&[chunk(b"tEXt", b"exif")]),
            png(&[chunk(b"zTXt", b"Raw profile type exif\0\0not zlib")]),
            png(&[chunk(b"iTXt", b"XML:com.adobe.xmp\0\x01")]),
            png(&[chunk(b"eXIf", &ifd(3, 1, [0, 6, 0, 0]))])[..30].to_vec(),
        ] {
            assert_eq!(super::png(&odd), Orientation::NoTransforms);
        }
        assert_eq!(super::png(&png(&[chunk(b"eXIf", &ifd(3, 1, [0, 6, 0, 0]))])), Orientation::Rotate90);
    }
}
