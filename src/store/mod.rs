//! Where bytes live: a local path or an object-store URL (`s3://`, `gs://`, `az://`, …).
//!
//! [`Loc`] names a file or folder in either place, and the functions here read, list, write
//! and remove through it. Local paths go to `std::fs`; URLs go to the `object_store` crate,
//! driven by one small Tokio runtime and blocking callers (the stages are threads, not tasks).
//! This is the only module that talks to object stores.
//!
//! Credentials and endpoints come from the environment, as each cloud's own tools read them:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (an
//! S3-compatible server), `AWS_ALLOW_HTTP=true` (plain HTTP to such a server);
//! `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS`; `AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, and the rest that `object_store`'s builders document.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[cfg(test)]
mod tests;

/// URL schemes served by an object store.
pub const REMOTE_SCHEMES: [&str; 8] = ["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl"];

/// A file or folder: a local path, or an object in a bucket (a "folder" there is a key prefix).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Loc {
    /// A path on the local file system.
    Local(PathBuf),
    /// `<bucket>/<key>`: `bucket` is `scheme://name`, `key` has no leading or trailing `/`.
    Remote {
        /// `scheme://bucket`, the store it lives in.
        bucket: String,
        /// The object's key (or folder prefix) in the bucket, `/`-separated, may be empty.
        key: String,
    },
}

impl Loc {
    /// Parses a path or URL: `s3://bucket/key` and the other [`REMOTE_SCHEMES`] are remote,
    /// `file:///path` (percent-decoded; `file://localhost/path` too) and anything without a
    /// scheme are local. Other schemes are refused.
    pub fn parse(text: &str) -> anyhow::Result<Loc> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(Loc::Local(PathBuf::from(text)));
        };
        let scheme_lc = scheme.to_ascii_lowercase();
        let plain = !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-');
        if !plain {
            // Not a URL scheme (for example a local path that contains "://").
            return Ok(Loc::Local(PathBuf::from(text)));
        }
        if scheme_lc == "file" {
            // `file:///path` or `file://localhost/path`, percent-encoded bytes decoded (as
            // Python's `Path.as_uri()` writes spaces and non-ASCII names); anything else after
            // `file://` is taken as a path, relative where it does not start with `/`.
            let rest = rest.strip_prefix("localhost").filter(|r| r.starts_with('/')).unwrap_or(rest);
            let bytes: Vec<u8> = percent_encoding::percent_decode_str(rest).collect();
            return Ok(Loc::Local(PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                bytes,
            ))));
        }
        if !REMOTE_SCHEMES.contains(&scheme_lc.as_str()) {
            bail!("{text}: unsupported URL scheme `{scheme}://` (use a local path or one of {})", schemes_list());
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{text}: no bucket or container name after `{scheme}://`");
        }
        // A URL names a key as it is: `a//b` is another object than `a/b`, one object_store
        // cannot address, so it is refused rather than read as `a/b`.
        let inner = key.strip_suffix('/').unwrap_or(key);
        if !inner.is_empty() && inner.split('/').any(str::is_empty) {
            bail!(
                "{text}: the key has an empty segment (`//`), which object_store cannot address: rename the object \
                 (a path relative to a manifest may have one: it is joined as on local disk)"
            );
        }
        let key = normalize_key("", key).with_context(|| format!("{text}: bad object key"))?;
        Ok(Loc::Remote { bucket: format!("{scheme_lc}://{bucket}"), key })
    }

    /// `rel` resolved against this folder: a URL or an absolute local path stays as it is (a
    /// `file://` URL is its path); a relative one is appended (`.` and `..` segments resolved
    /// for keys). A URL of a scheme no store serves (`http://`) is an error that names it.
    pub fn join(&self, rel: &str) -> anyhow::Result<Loc> {
        if rel.contains("://") {
            match Loc::parse(rel)? {
                loc @ Loc::Remote { .. } => return Ok(loc),
                // A file:// URL: its path, a relative one against this folder as any path.
                Loc::Local(path) if path.as_os_str() != rel && path.is_absolute() => return Ok(Loc::Local(path)),
                Loc::Local(path) if path.as_os_str() != rel => return self.join(&path.to_string_lossy()),
                // A local path that contains "://".
                Loc::Local(_) => {}
            }
        }
        match self {
            Loc::Local(p) => Ok(Loc::Local(p.join(rel))),
            Loc::Remote { bucket, key } => {
                let key = normalize_key(key, rel).with_context(|| format!("{self}: cannot resolve {rel:?}"))?;
                Ok(Loc::Remote { bucket: bucket.clone(), key })
            }
        }
    }

    /// The folder holding this file (the bucket root for a top-level key).
    pub fn parent(&self) -> Loc {
        match self {
            Loc::Local(p) => Loc::Local(p.parent().map(Path::to_path_buf).unwrap_or_default()),
            Loc::Remote { bucket, key } => {
                let key = key.rsplit_once('/').map(|(k, _)| k.to_owned()).unwrap_or_default();
                Loc::Remote { bucket: bucket.clone(), key }
            }
        }
    }

    /// The last name of the path or key.
    pub fn file_name(&self) -> Option<String> {
        match self {
            Loc::Local(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            Loc::Remote { key, .. } => key.rsplit('/').next().filter(|n| !n.is_empty()).map(str::to_owned),
        }
    }

    /// The lower-cased extension of the last name, if any.
    pub fn extension(&self) -> Option<String> {
        let name = self.file_name()?;
        let (stem, ext) = name.rsplit_once('.')?;
        (!stem.is_empty()).then(|| ext.to_ascii_lowercase())
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::Local(p) => write!(f, "{}", p.display()),
            Loc::Remote { bucket, key } if key.is_empty() => f.write_str(bucket),
            Loc::Remote { bucket, key } => write!(f, "{bucket}/{key}"),
        }
    }
}

impl std::str::FromStr for Loc {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Loc> {
        Loc::parse(s)
    }
}

impl From<PathBuf> for Loc {
    fn from(p: PathBuf) -> Loc {
        Loc::Local(p)
    }
}

impl From<&PathBuf> for Loc {
    fn from(p: &PathBuf) -> Loc {
        Loc::Local(p.clone())
    }
}

impl From<&Loc> for Loc {
    fn from(l: &Loc) -> Loc {
        l.clone()
    }
}

impl From<&Path> for Loc {
    fn from(p: &Path) -> Loc {
        Loc::Local(p.to_path_buf())
    }
}

fn schemes_list() -> String {
    REMOTE_SCHEMES.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ")
}

/// `base` + `/` + `rel` as paths join: empty and `.` segments dropped and `..` applied (a
/// manifest's `img//a.png` is `img/a.png`, as it is on local disk); a `rel` that starts with
/// `/` starts from the bucket's root.
fn normalize_key(base: &str, rel: &str) -> anyhow::Result<String> {
    let mut parts: Vec<&str> = if rel.starts_with('/') { Vec::new() } else { base.split('/').collect() };
    parts.retain(|p| !p.is_empty());
    for seg in rel.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("`..` leaves the bucket");
                }
            }
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store")
            .enable_all()
            .build()
            .expect("cannot start the object-store runtime")
    })
}

/// The store serving `bucket` (`scheme://name`), built once per bucket from the environment.
fn store(bucket: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = stores.get(bucket) {
        return Ok(s.clone());
    }
    let scheme = bucket.split("://").next().unwrap_or_default();
    let retry = retry_config()?;
    let built: Arc<dyn ObjectStore> = match scheme {
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(bucket)
                .with_retry(retry)
                .build()
                .with_context(|| format!("cannot set up S3 access to {bucket}"))?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(bucket)
                .with_retry(retry)
                .build()
                .with_context(|| format!("cannot set up Google Cloud Storage access to {bucket}"))?,
        ),
        _ => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(bucket)
                .with_retry(retry)
                .build()
                .with_context(|| format!("cannot set up Azure storage access to {bucket}"))?,
        ),
    };
    stores.insert(bucket.to_owned(), built.clone());
    Ok(built)
}

/// How often a failed store request (a time-out, a lost connection, a server error) is retried
/// before the error counts: `SALIENCY_AUDIT_STORE_RETRIES` times (default 10, with exponential
/// back-off from 100 ms to 15 s, within 3 minutes a request).
pub const STORE_RETRIES_ENV: &str = "SALIENCY_AUDIT_STORE_RETRIES";

/// Checks the store settings taken from the environment ([`STORE_RETRIES_ENV`]), so that a bad
/// value is the job's error before any work rather than every remote file's.
pub fn check_settings() -> anyhow::Result<()> {
    retry_config().map(drop)
}

fn retry_config() -> anyhow::Result<object_store::RetryConfig> {
    let mut retry = object_store::RetryConfig::default();
    if let Some(v) = std::env::var_os(STORE_RETRIES_ENV) {
        let v = v.to_string_lossy();
        retry.max_retries = v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{STORE_RETRIES_ENV}={v:?}: expected a number of retries (0 or more)"))?;
    }
    Ok(retry)
}

/// The store and object path of a remote location.
fn object(bucket: &str, key: &str) -> anyhow::Result<(Arc<dyn ObjectStore>, ObjPath)> {
    Ok((store(bucket)?, obj_path(bucket, key)?))
}

/// The key as the store names it. `ObjPath::from` would percent-encode characters such as
/// `~ # [ ] %`, so that a key listed from the bucket (`cls/img[1].jpg`) or given by the user
/// (`runs/exp#3`) would name another object; `parse` keeps it as it is.
fn obj_path(bucket: &str, key: &str) -> anyhow::Result<ObjPath> {
    ObjPath::parse(key).with_context(|| format!("key {key:?} in bucket {bucket} is not a valid object path"))
}

/// The store's error as an [`io::Error`] whose kind says whether a retry may help (see
/// `exit::code`): a missing object or bucket, a refusal, a bad key or setting stay as
/// they are; the rest (time-outs, lost connections, the server's errors) may not. Requests
/// that `object_store` reports as `Generic` (listing, writing, deleting) are sorted by the
/// HTTP status (or S3 error code) of the store's answer, so that listing a bucket that does
/// not exist (404) or writing where it may not (403) is the job's error rather than one worth
/// retrying. A failure to get credentials (from the instance metadata endpoint, say) is not
/// the object's: whatever its status, it stays one a retry may get past, with a hint.
fn io_error(loc: &Loc, e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let text = e.to_string();
    let credentials = credential_request(&text);
    // S3 answers a request signed for another region with a redirect or a 400 that names it.
    let region = ["incorrectly configured region", "AuthorizationHeaderMalformed", "PermanentRedirect"]
        .iter()
        .any(|m| text.contains(m));
    let kind = match &e {
        _ if credentials => io::ErrorKind::Other,
        _ if region => io::ErrorKind::InvalidInput,
        E::NotFound { .. } => io::ErrorKind::NotFound,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        E::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => io::ErrorKind::InvalidInput,
        E::NotSupported { .. } | E::NotImplemented { .. } => io::ErrorKind::Unsupported,
        _ => match http_status(&e) {
            Some(404) => io::ErrorKind::NotFound,
            Some(401 | 403) => io::ErrorKind::PermissionDenied,
            // 400 stays retryable: S3 answers a stalled upload (RequestTimeout) and an expired
            // session token (ExpiredToken) with it.
            _ => io::ErrorKind::Other,
        },
    };
    let hint = match &e {
        E::InvalidPath { .. } => {
            " (object_store cannot address a key with an empty segment `//`, a `.` or `..` segment or a control \
             character: rename the object, or list the images in a manifest)"
        }
        _ if region => " (the bucket is in another region than AWS_REGION names: set AWS_REGION to the bucket's)",
        _ if credentials => {
            " (getting credentials failed: with none in the environment the S3 client asks the instance \
             metadata endpoint; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE; \
             ~/.aws and AWS_PROFILE are not read)"
        }
        _ => "",
    };
    io::Error::new(kind, format!("{loc}: {text}{hint}"))
}

/// Whether an error's text is about a request for credentials rather than to the store: the
/// cloud metadata endpoints (EC2, ECS, GCE, Azure), `AWS_METADATA_ENDPOINT`, STS and the
/// OAuth token services.
fn credential_request(text: &str) -> bool {
    const ENDPOINTS: [&str; 9] = [
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "/latest/meta-data",
        "/latest/api/token",
        "AssumeRoleWithWebIdentity",
        "metadata.google.internal",
        "oauth2.googleapis.com",
        "login.microsoftonline.com",
    ];
    ENDPOINTS.iter().any(|m| text.contains(m))
        || std::env::var("AWS_METADATA_ENDPOINT").is_ok_and(|m| !m.is_empty() && text.contains(m.as_str()))
}

/// The HTTP status of the store's failed answer behind an error, if its causes name one
/// (`object_store` keeps the status in a private type but writes it into the message); S3's
/// per-key errors of a batch delete, which come in a 200 answer, by their error code.
fn http_status(e: &object_store::Error) -> Option<u16> {
    const MARK: &str = "non-2xx status code: ";
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if let Some(at) = text.find(MARK) {
            return text.get(at + MARK.len()..at + MARK.len() + 3)?.parse().ok();
        }
        if text.contains("(code: AccessDenied)") {
            return Some(403);
        }
        if text.contains("(code: NoSuchBucket)") {
            return Some(404);
        }
        cause = c.source();
    }
    None
}

/// Sets up the store of every bucket among `locs` (local paths are skipped), so that a bucket
/// URL or setting the store refuses (an Azure container without an account, a GCS service
/// account file that is missing) is the job's error before any work, naming the bucket and
/// the first file in it, rather than every remote sample's `unreadable` row. No request is made.
pub fn check_stores<'a>(locs: impl IntoIterator<Item = &'a Loc>) -> anyhow::Result<()> {
    let mut seen = std::collections::HashSet::new();
    for loc in locs {
        if let Loc::Remote { bucket, .. } = loc {
            if seen.insert(bucket.as_str()) {
                store(bucket).with_context(|| format!("{loc} (the first file in {bucket})"))?;
            }
        }
    }
    Ok(())
}

/// A store that cannot be set up (a bad bucket URL or setting, an invalid key): not something
/// a retry changes.
fn setup_error(e: anyhow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{e:#}"))
}

fn too_large(len: u64, max: u64) -> io::Error {
    io::Error::new(io::ErrorKind::FileTooLarge, format!("{len} bytes or more, over the limit of {max} bytes"))
}

/// GET requests made to object stores by this process, and the bytes they returned.
static REMOTE_READS: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));

fn count_read(bytes: &Bytes) {
    REMOTE_READS.0.fetch_add(1, Ordering::Relaxed);
    REMOTE_READS.1.fetch_add(bytes.len() as u64, Ordering::Relaxed);
}

/// GET requests this process has made to object stores, and the bytes they returned (what a
/// store bills as egress).
pub fn remote_reads() -> (u64, u64) {
    (REMOTE_READS.0.load(Ordering::Relaxed), REMOTE_READS.1.load(Ordering::Relaxed))
}

/// Reads a whole file. `max_bytes` refuses a larger file with [`io::ErrorKind::FileTooLarge`]
/// before reading it. A local path that is not a regular file (a pipe, whose open waits for a
/// writer; a device such as /dev/zero, which never ends) is refused with
/// [`io::ErrorKind::InvalidInput`] before it is opened. Not-found and permission errors keep
/// their [`io::ErrorKind`].
pub fn read(loc: &Loc, max_bytes: Option<u64>) -> io::Result<Bytes> {
    match loc {
        Loc::Local(p) => {
            use std::io::Read;
            let meta = std::fs::metadata(p)?;
            if !meta.is_file() && !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file (a pipe, socket or device: reading it could wait or never end)",
                ));
            }
            let file = std::fs::File::open(p)?;
            let len = file.metadata()?.len();
            let max = max_bytes.unwrap_or(u64::MAX);
            if len > max {
                return Err(too_large(len, max));
            }
            let mut bytes = Vec::with_capacity(len as usize);
            file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > max {
                return Err(too_large(bytes.len() as u64, max));
            }
            Ok(Bytes::from(bytes))
        }
        Loc::Remote { bucket, key } => {
            let (s, path) = object(bucket, key).map_err(setup_error)?;
            tracing::trace!("GET {loc}");
            runtime().block_on(async {
                let got = s.get(&path).await.map_err(|e| io_error(loc, e))?;
                if let Some(max) = max_bytes.filter(|&m| got.meta.size > m) {
                    return Err(too_large(got.meta.size, max));
                }
                let bytes = got.bytes().await.map_err(|e| io_error(loc, e))?;
                count_read(&bytes);
                Ok(bytes)
            })
        }
    }
}

/// Reads a whole file, with an error naming it.
pub fn read_all(loc: &Loc) -> anyhow::Result<Bytes> {
    read(loc, None).map_err(|e| anyhow!(e)).with_context(|| format!("cannot read {loc}"))
}

/// The size of a remote object, in bytes (one HEAD request).
pub fn remote_size(loc: &Loc) -> io::Result<u64> {
    let Loc::Remote { bucket, key } = loc else {
        return Err(io::Error::other(format!("{loc} is not in an object store")));
    };
    let (s, path) = object(bucket, key).map_err(setup_error)?;
    runtime().block_on(s.head(&path)).map(|m| m.size).map_err(|e| io_error(loc, e))
}

/// Bytes `range` of a remote object (one ranged GET).
pub fn read_remote_range(loc: &Loc, range: std::ops::Range<u64>) -> io::Result<Bytes> {
    let Loc::Remote { bucket, key } = loc else {
        return Err(io::Error::other(format!("{loc} is not in an object store")));
    };
    let (s, path) = object(bucket, key).map_err(setup_error)?;
    tracing::trace!("GET {loc} bytes {}..{}", range.start, range.end);
    let bytes = runtime().block_on(s.get_range(&path, range)).map_err(|e| io_error(loc, e))?;
    count_read(&bytes);
    Ok(bytes)
}

/// Whether a file exists (for a folder: whether it exists locally, or holds any object).
pub fn exists(loc: &Loc) -> anyhow::Result<bool> {
    let Loc::Remote { bucket, key } = loc else {
        return Ok(matches!(loc, Loc::Local(p) if p.exists()));
    };
    let (s, path) = object(bucket, key)?;
    runtime().block_on(async {
        match s.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(anyhow!(io_error(loc, e))),
        }
    })
}

/// The files directly in a folder with their last-modified times (as `list_names`, in one
/// listing).
pub fn list_modified(dir: &Loc) -> anyhow::Result<Vec<(String, std::time::SystemTime)>> {
    let mut out = Vec::new();
    match dir {
        Loc::Local(p) => {
            for entry in std::fs::read_dir(p).with_context(|| format!("cannot list folder {}", p.display()))? {
                let entry = entry.with_context(|| format!("cannot list folder {}", p.display()))?;
                if let (Ok(name), Ok(time)) =
                    (entry.file_name().into_string(), entry.metadata().and_then(|m| m.modified()))
                {
                    out.push((name, time));
                }
            }
        }
        Loc::Remote { .. } => {
            out.extend(
                remote_files(dir)?
                    .iter()
                    .filter_map(|o| Some((o.location.filename()?.to_owned(), o.last_modified.into()))),
            );
        }
    }
    Ok(out)
}

/// A file's last-modified time, `None` when it does not exist.
pub fn modified(loc: &Loc) -> anyhow::Result<Option<std::time::SystemTime>> {
    match loc {
        Loc::Local(p) => match std::fs::metadata(p) {
            Ok(m) => Ok(Some(m.modified()?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot read {}", p.display()))),
        },
        Loc::Remote { bucket, key } => {
            let (s, path) = object(bucket, key)?;
            runtime().block_on(async {
                match s.head(&path).await {
                    Ok(meta) => Ok(Some(meta.last_modified.into())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(anyhow!(io_error(loc, e))),
                }
            })
        }
    }
}

/// Names of the files directly in a folder, sorted; for a local folder, entries whose name is
/// not UTF-8 are skipped. A missing remote folder is empty (there are no empty prefixes).
pub fn list_names(dir: &Loc) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    match dir {
        Loc::Local(p) => {
            for entry in std::fs::read_dir(p).with_context(|| format!("cannot list folder {}", p.display()))? {
                let entry = entry.with_context(|| format!("cannot list folder {}", p.display()))?;
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Loc::Remote { .. } => {
            names.extend(remote_files(dir)?.iter().filter_map(|o| o.location.filename().map(str::to_owned)));
        }
    }
    names.sort();
    Ok(names)
}

/// The objects directly under a remote folder (one listing, with a delimiter).
fn remote_files(dir: &Loc) -> anyhow::Result<Vec<object_store::ObjectMeta>> {
    let Loc::Remote { bucket, key } = dir else {
        anyhow::bail!("{dir} is not in an object store");
    };
    let (s, prefix) = object(bucket, key)?;
    let listed = runtime()
        .block_on(s.list_with_delimiter(Some(&prefix)))
        .map_err(|e| io_error(dir, e))
        .with_context(|| format!("cannot list {dir}"))?;
    Ok(listed.objects)
}

/// Every object under a remote folder (at any depth), as keys relative to it, sorted.
pub fn walk_remote(dir: &Loc) -> anyhow::Result<Vec<String>> {
    let Loc::Remote { bucket, key } = dir else {
        bail!("{dir} is not an object-store folder");
    };
    let (s, prefix) = object(bucket, key)?;
    let base = prefix.as_ref().to_owned();
    let listed: Vec<object_store::ObjectMeta> = runtime()
        .block_on(s.list(Some(&prefix)).try_collect())
        .map_err(|e| io_error(dir, e))
        .with_context(|| format!("cannot list {dir}"))?;
    let mut rels: Vec<String> = listed
        .iter()
        .filter_map(|o| {
            let key = o.location.as_ref();
            let rel = if base.is_empty() { key } else { key.strip_prefix(&base)?.strip_prefix('/')? };
            (!rel.is_empty()).then(|| rel.to_owned())
        })
        .collect();
    rels.sort();
    Ok(rels)
}

/// Writes a remote object in one request: it appears whole or not at all.
pub fn put_remote(loc: &Loc, bytes: Vec<u8>) -> anyhow::Result<()> {
    let Loc::Remote { bucket, key } = loc else {
        bail!("{loc} is not an object-store location");
    };
    let (s, path) = object(bucket, key)?;
    runtime()
        .block_on(s.put(&path, PutPayload::from(bytes)))
        .map_err(|e| io_error(loc, e))
        .with_context(|| format!("cannot write {loc}"))?;
    Ok(())
}

/// Creates a local folder and its parents; object stores have no folders to create.
pub fn create_dir_all(dir: &Loc) -> anyhow::Result<()> {
    if let Loc::Local(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    Ok(())
}

/// Removes a file; `Ok(false)` if it was not there.
pub fn remove_if_exists(loc: &Loc) -> anyhow::Result<bool> {
    match loc {
        Loc::Local(p) => match std::fs::remove_file(p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
        },
        Loc::Remote { bucket, key } => {
            // S3 deletes a missing key without complaint: ask first, to report whether it was there.
            if !exists(loc)? {
                return Ok(false);
            }
            let (s, path) = object(bucket, key)?;
            runtime()
                .block_on(s.delete(&path))
                .map_err(|e| io_error(loc, e))
                .with_context(|| format!("cannot remove {loc}"))?;
            Ok(true)
        }
    }
}

/// Moves a file (for remote files: copy, then delete the original).
pub fn rename(from: &Loc, to: &Loc) -> anyhow::Result<()> {
    match (from, to) {
        (Loc::Local(a), Loc::Local(b)) => std::fs::rename(a, b).with_context(|| format!("cannot move {from} to {to}")),
        (Loc::Remote { bucket: ba, key: ka }, Loc::Remote { bucket: bb, key: kb }) if ba == bb => {
            let (s, pa) = object(ba, ka)?;
            let pb = obj_path(bb, kb)?;
            runtime()
                .block_on(async {
                    s.copy(&pa, &pb).await?;
                    s.delete(&pa).await
                })
                .map_err(|e| io_error(from, e))
                .with_context(|| format!("cannot move {from} to {to}"))
        }
        _ => bail!("cannot move {from} to {to}: not in the same store"),
    }
}
