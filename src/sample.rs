//! Plain data shared by the stages: a dataset sample and the status of its row.

use crate::store::Loc;

/// One input sample, as the source stage resolves it from a manifest or an image folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Position in the (shard's) deterministic sample order, 0-based.
    pub index: u64,
    /// Unique id (the manifest's `id`, else the path as written in the manifest or relative to the folder).
    pub id: String,
    /// Path as written in the manifest (or relative to the image folder).
    pub path: String,
    /// Resolved location of the image file.
    pub location: Loc,
    /// Class id of the label, if the sample has one and it resolved.
    pub label: Option<i64>,
    /// Why the label did not resolve (a row with status `bad_label`).
    pub label_error: Option<String>,
    /// Object box in the original image's pixels: x0, y0, x1, y1.
    pub bbox: Option<[f32; 4]>,
    /// Why the row's box is not usable (a row with status `bad_box`): a value that is not a
    /// number, an empty box, some box columns set and others not.
    pub box_error: Option<String>,
    /// Object mask PNG (non-zero pixels are the object), resolved.
    pub mask: Option<Loc>,
}

/// The status of a sample's row: `ok` or the kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// The image file does not exist.
    Missing,
    /// The file exists but cannot be read (permissions, I/O error).
    Unreadable,
    /// Zero bytes, truncated, not an image, or an unsupported format.
    DecodeError,
    /// Over the pixel limit (decompression-bomb guard).
    TooLarge,
    /// The label is not one of the model's classes.
    BadLabel,
    /// The manifest row's object box is not usable.
    BadBox,
    /// The mask file is missing or unreadable or not an image.
    BadMask,
    /// The engine failed on this sample.
    AttributionError,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::Missing,
        Status::Unreadable,
        Status::DecodeError,
        Status::TooLarge,
        Status::BadLabel,
        Status::BadBox,
        Status::BadMask,
        Status::AttributionError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Unreadable => "unreadable",
            Status::DecodeError => "decode_error",
            Status::TooLarge => "too_large",
            Status::BadLabel => "bad_label",
            Status::BadBox => "bad_box",
            Status::BadMask => "bad_mask",
            Status::AttributionError => "attribution_error",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.iter().copied().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of one sample: its status and a message naming the file.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleError {
    pub status: Status,
    pub message: String,
    /// The failure is not the sample's: reading it from an object store failed for a reason a
    /// rerun may get past (a time-out, a lost connection, the store's own error). Such a sample
    /// gets no row; the run stops (exit 3) and a rerun resumes with it.
    pub transient: bool,
}

impl SampleError {
    /// A failure of `status`; the message loses trailing white space (some decoders end
    /// theirs with a newline, which would end up in the row).
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        let mut message = message.into();
        message.truncate(message.trim_end().len());
        Self { status, message, transient: false }
    }
}

impl std::fmt::Display for SampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for SampleError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_loses_its_trailing_newline() {
        let e = SampleError::new(Status::DecodeError, "Corrupt JPEG data: premature end of data segment\n");
        assert_eq!(e.message, "Corrupt JPEG data: premature end of data segment");
        assert_eq!(SampleError::new(Status::Missing, "  kept at the start").message, "  kept at the start");
    }
}
