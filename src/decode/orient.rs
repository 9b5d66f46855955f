//! The orientation PIL's `ImageOps.exif_transpose` applies, found where PIL looks for it: the
//! EXIF block's Orientation tag (of any integer type: some writers store it as a LONG), else
//! an XMP packet's `tiff:Orientation`. In a PNG, the EXIF block is the last `eXIf` chunk
//! anywhere in the file (PIL reads the chunks after the image data too), else ImageMagick's
//! "Raw profile type exif" text chunk; in a WebP, its `EXIF` and `XMP ` chunks; in a JPEG,
//! the first `Exif` APP1 segment and the last XMP one.

use image::metadata::Orientation;
use std::io::Read;

/// Text chunks larger than this once inflated are skipped (PIL refuses them).
const MAX_TEXT: u64 = 1 << 20;

/// The orientation from an EXIF block (the TIFF structure, with or without `Exif\0\0` before
/// it) and an XMP packet. An Orientation tag outside 1..=8 (or not one number) applies
/// nothing, and XMP is read only where the EXIF block has no Orientation tag, as in PIL.
pub(super) fn from_metadata(exif: Option<&[u8]>, xmp: Option<&[u8]>) -> Orientation {
    let value = match exif.and_then(exif_tag) {
        Some(v) => Some(v),
        None => xmp.and_then(xmp_orientation),
    };
    value.and_then(|v| u8::try_from(v).ok()).and_then(Orientation::from_exif).unwrap_or(Orientation::NoTransforms)
}

/// The EXIF Orientation tag (0x0112) of IFD0: `Some(0)` where it is there but not a single
/// integer; `None` where there is no tag or no readable IFD.
fn exif_tag(exif: &[u8]) -> Option<u32> {
    let t = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let big = match t.get(..4)? {
        b"II*\0" => false,
        b"MM\0*" => true,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = t.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = t.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    for i in 0..entries {
        let e = ifd + 2 + 12 * i;
        if u16_at(e)? != 0x0112 {
            continue;
        }
        let (kind, count) = (u16_at(e + 2)?, u32_at(e + 4)?);
        let value = match (kind, count) {
            (1 | 6 | 7, 1) => t.get(e + 8).map(|&b| b as u32),
            (3 | 8, 1) => u16_at(e + 8).map(u32::from),
            (4 | 9, 1) => u32_at(e + 8),
            _ => Some(0),
        };
        return Some(value.unwrap_or(0));
    }
    None
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

/// A PNG's orientation (see the module's note).
pub(super) fn png(bytes: &[u8]) -> Orientation {
    let mut exif: Option<&[u8]> = None;
    let (mut raw, mut xmp): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let mut at = 8usize;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        let Some(data) = bytes.get(at + 8..at + 8 + len) else { break };
        match kind {
            b"IEND" => break,
            b"eXIf" => exif = Some(data),
            b"tEXt" | b"zTXt" | b"iTXt" => {
                if let Some((key, text)) = png_text(kind, data) {
                    match key {
                        b"Raw profile type exif" => raw = Some(text),
                        b"XML:com.adobe.xmp" => xmp = Some(text),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        at += 12 + len;
    }
    let raw = if exif.is_none() { raw.and_then(|r| raw_profile(&r)) } else { None };
    from_metadata(exif.or(raw.as_deref()), xmp.as_deref())
}

/// A PNG text chunk's keyword and text (inflated where compressed); `None` where it cannot be
/// read, or inflates past [`MAX_TEXT`].
fn png_text<'a>(kind: &[u8], data: &'a [u8]) -> Option<(&'a [u8], Vec<u8>)> {
    let (key, rest) = data.split_at(data.iter().position(|&b| b == 0)?);
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
    Some((key, text))
}

/// ImageMagick's raw profile text (`\nexif\n   <length>\n<hex lines>`): its bytes, as PIL
/// reads them (the lines after the third, hex digits with white space ignored).
fn raw_profile(text: &[u8]) -> Option<Vec<u8>> {
    let hex: Vec<u8> =
        text.split(|&b| b == b'\n').skip(3).flatten().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect()
}

/// A WebP's orientation: its first `EXIF` chunk, else its first `XMP ` chunk.
pub(super) fn webp(bytes: &[u8]) -> Orientation {
    let (mut exif, mut xmp) = (None, None);
    let mut at = 12usize;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let Some(data) = bytes.get(at + 8..at + 8 + len) else { break };
        match &head[..4] {
            b"EXIF" if exif.is_none() => exif = Some(data),
            b"XMP " if xmp.is_none() => xmp = Some(data),
            _ => {}
        }
        at += 8 + len + (len & 1);
    }
    from_metadata(exif, xmp)
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
        assert_eq!(from_metadata(Some(&ifd(3, 1, [0, 6, 0, 0])), None), Orientation::Rotate90);
        // A LONG, and the `Exif\0\0` prefix.
        let long = [b"Exif\0\0".as_slice(), &ifd(4, 1, [0, 0, 0, 8])].concat();
        assert_eq!(from_metadata(Some(&long), None), Orientation::Rotate270);
        // A tag there but out of range: nothing, and the XMP is not read.
        let xmp = br#"<x:xmpmeta><rdf:Description tiff:Orientation="3"/></x:xmpmeta>"#;
        assert_eq!(from_metadata(Some(&ifd(3, 1, [0, 9, 0, 0])), Some(xmp)), Orientation::NoTransforms);
        // No tag: the XMP's, in either form.
        assert_eq!(from_metadata(None, Some(xmp)), Orientation::Rotate180);
        assert_eq!(
            from_metadata(Some(b"II*\0"), Some(b"<tiff:Orientation>6</tiff:Orientation>")),
            Orientation::Rotate90
        );
        assert_eq!(from_metadata(None, Some(b"tiff:Orientation tiff:Orientation=\"2\"")), Orientation::FlipHorizontal);
        assert_eq!(from_metadata(None, Some(b"tiff:Orientation=6")), Orientation::NoTransforms);
        assert_eq!(raw_profile(b"\nexif\n       4\n4d4d\n 002a\n").as_deref(), Some(&b"MM\0*"[..]));
    }
}
