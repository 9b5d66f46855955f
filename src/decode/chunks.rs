//! The chunks of a PNG and of a RIFF (WebP) file, walked by their lengths: the one walk that
//! the repairs before decoding and the orientation search share.

/// A PNG's signature.
pub(super) const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// One chunk whose data is in the file: its four-letter kind, its data, and where it starts
/// and ends (for a PNG, after its checksum; for a RIFF chunk, after its padding byte; the
/// file's end where those are cut off). `whole`: a PNG chunk's checksum is there too.
pub(super) struct Chunk<'a> {
    pub start: usize,
    pub end: usize,
    pub kind: &'a [u8],
    pub data: &'a [u8],
    pub whole: bool,
}

/// The chunks of a file, in order, up to the first whose data does not fit in it (a PNG chunk
/// cut in its checksum is the last one given, not `whole`).
pub(super) struct Chunks<'a> {
    bytes: &'a [u8],
    at: usize,
    riff: bool,
}

/// A PNG's chunks, after its signature (which is not checked: see [`is_png`]).
pub(super) fn png(bytes: &[u8]) -> Chunks<'_> {
    Chunks { bytes, at: PNG_SIGNATURE.len(), riff: false }
}

/// A RIFF file's chunks, after its 12-byte header (`RIFF`, size, form type; not checked).
pub(super) fn riff(bytes: &[u8]) -> Chunks<'_> {
    Chunks { bytes, at: 12, riff: true }
}

/// A PNG chunk's checksum: the CRC-32 of its kind and data, big-endian.
pub(super) fn png_crc(kind: &[u8], data: &[u8]) -> [u8; 4] {
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    crc.sum().to_be_bytes()
}

/// Whether `bytes` start with a PNG's signature.
pub(super) fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(PNG_SIGNATURE)
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Chunk<'a>;

    fn next(&mut self) -> Option<Chunk<'a>> {
        let at = self.at;
        let head = self.bytes.get(at..at.checked_add(8)?)?;
        let len = match self.riff {
            false => u32::from_be_bytes([head[0], head[1], head[2], head[3]]),
            true => u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        } as usize;
        let kind = if self.riff { &head[..4] } else { &head[4..8] };
        let data_at = at + 8;
        let data = self.bytes.get(data_at..data_at.checked_add(len)?)?;
        // After the padding byte of an odd length, or after the checksum.
        let full = data_at + len + if self.riff { len & 1 } else { 4 };
        let end = full.min(self.bytes.len());
        self.at = end;
        Some(Chunk { start: at, end, kind, data, whole: self.riff || end == full })
    }
}
