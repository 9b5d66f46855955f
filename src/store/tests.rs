use super::*;

fn remote(bucket: &str, key: &str) -> Loc {
    Loc::Remote { bucket: bucket.to_owned(), key: key.to_owned() }
}

#[test]
fn parses_urls_and_paths() {
    assert_eq!(Loc::parse("s3://b/x/y.jpg").unwrap(), remote("s3://b", "x/y.jpg"));
    assert_eq!(Loc::parse("S3://b/x/y/").unwrap(), remote("s3://b", "x/y"));
    // `x//y` is another object than `x/y`, one object_store cannot address: refused, not collapsed.
    for bad in ["s3://b/x//y", "s3://b//x"] {
        let e = format!("{:#}", Loc::parse(bad).unwrap_err());
        assert!(e.contains(bad) && e.contains("empty segment"), "{e}");
    }
    assert_eq!(Loc::parse("gs://b").unwrap(), remote("gs://b", ""));
    assert_eq!(Loc::parse("data/x.csv").unwrap(), Loc::Local(PathBuf::from("data/x.csv")));
    assert_eq!(Loc::parse("file:///tmp/x").unwrap(), Loc::Local(PathBuf::from("/tmp/x")));
    // As Python's Path.as_uri() writes them: percent-encoded, and the localhost form.
    assert_eq!(
        Loc::parse("file:///tmp/my%20dir/%C3%A9%20a.png").unwrap(),
        Loc::Local(PathBuf::from("/tmp/my dir/é a.png"))
    );
    assert_eq!(Loc::parse("file://localhost/tmp/x%23").unwrap(), Loc::Local(PathBuf::from("/tmp/x#")));
    let err = Loc::parse("ftp://host/x").unwrap_err().to_string();
    assert!(err.contains("ftp://host/x") && err.contains("unsupported URL scheme"), "{err}");
    assert!(Loc::parse("s3:///key").unwrap_err().to_string().contains("no bucket"));
    assert!(Loc::parse("s3://b/../x").is_err());
    // A key is taken as it is: `#` and `?` are not a URL's fragment and query.
    assert_eq!(Loc::parse("s3://b/runs/exp#3/a?.jpg").unwrap(), remote("s3://b", "runs/exp#3/a?.jpg"));
    assert_eq!(obj_path("s3://b", "runs/exp#3/a?.jpg").unwrap().as_ref(), "runs/exp#3/a?.jpg");
}

#[test]
fn joins_and_parents() {
    let dir = Loc::parse("s3://b/data/set").unwrap();
    assert_eq!(dir.join("img/a.jpg").unwrap(), remote("s3://b", "data/set/img/a.jpg"));
    assert_eq!(dir.join("../other/a.jpg").unwrap(), remote("s3://b", "data/other/a.jpg"));
    assert_eq!(dir.join("./a.jpg").unwrap(), remote("s3://b", "data/set/a.jpg"));
    assert_eq!(dir.join("/top.jpg").unwrap(), remote("s3://b", "top.jpg"));
    assert_eq!(dir.join("gs://c/z.png").unwrap(), remote("gs://c", "z.png"));
    assert!(dir.join("../../../x").is_err());
    // A relative path joins as on local disk; a URL names its key as it is.
    assert_eq!(dir.join("img//a.jpg").unwrap(), remote("s3://b", "data/set/img/a.jpg"));
    let e = format!("{:#}", dir.join("s3://b/img//a.jpg").unwrap_err());
    assert!(e.contains("s3://b/img//a.jpg") && e.contains("empty segment"), "{e}");
    assert_eq!(dir.join("img/").unwrap(), remote("s3://b", "data/set/img"));
    assert_eq!(dir.parent(), remote("s3://b", "data"));
    assert_eq!(remote("s3://b", "x").parent(), remote("s3://b", ""));
    assert_eq!(dir.join("m.CSV").unwrap().extension().as_deref(), Some("csv"));
    assert_eq!(dir.file_name().as_deref(), Some("set"));
    assert_eq!(dir.to_string(), "s3://b/data/set");
    assert_eq!(remote("s3://b", "").to_string(), "s3://b");
    let local = Loc::parse("/d/m.csv").unwrap();
    assert_eq!(local.parent().join("x.jpg").unwrap(), Loc::Local(PathBuf::from("/d/x.jpg")));
    assert_eq!(local.parent().join("/abs.jpg").unwrap(), Loc::Local(PathBuf::from("/abs.jpg")));
    // A file:// URL is its path; a scheme no store serves is an error naming it, not a
    // relative path that is then missing; a local name that contains "://" stays a name.
    assert_eq!(local.parent().join("file:///e/y.jpg").unwrap(), Loc::Local(PathBuf::from("/e/y.jpg")));
    assert_eq!(dir.join("file:///e/y.jpg").unwrap(), Loc::Local(PathBuf::from("/e/y.jpg")));
    assert_eq!(local.parent().join("file://rel/y.jpg").unwrap(), Loc::Local(PathBuf::from("/d/rel/y.jpg")));
    let e = format!("{:#}", local.parent().join("http://example.com/a.jpg").unwrap_err());
    assert!(e.contains("unsupported URL scheme `http://`"), "{e}");
    assert_eq!(local.parent().join("a ://b.jpg").unwrap(), Loc::Local(PathBuf::from("/d/a ://b.jpg")));
}

#[test]
fn local_io_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = Loc::from(dir.path());
    std::fs::write(dir.path().join("a.bin"), b"hello").unwrap();
    let a = d.join("a.bin").unwrap();
    assert_eq!(&read(&a, None).unwrap()[..], b"hello");
    assert_eq!(read(&a, Some(4)).unwrap_err().kind(), io::ErrorKind::FileTooLarge);
    assert_eq!(read(&d.join("nope").unwrap(), None).unwrap_err().kind(), io::ErrorKind::NotFound);
    assert_eq!(list_names(&d).unwrap(), vec!["a.bin".to_owned()]);
    let b = d.join("b.bin").unwrap();
    rename(&a, &b).unwrap();
    assert!(!exists(&a).unwrap() && exists(&b).unwrap());
    assert!(remove_if_exists(&b).unwrap());
    assert!(!remove_if_exists(&b).unwrap());
}

/// A store error as object_store reports a failed request: `Generic`, the answer's status in
/// the text of its cause.
fn generic(text: &str) -> object_store::Error {
    object_store::Error::Generic { store: "S3", source: text.to_owned().into() }
}

#[test]
fn store_errors_are_sorted_by_the_stores_answer() {
    let loc = remote("s3://b", "x");
    let kind = |text: &str| io_error(&loc, generic(text)).kind();
    let list = "Error performing list request: Error performing GET http://127.0.0.1:9000/b?list-type=2 in 2ms - \
                Server returned non-2xx status code: ";
    assert_eq!(kind(&format!("{list}404 Not Found: <Code>NoSuchBucket</Code>")), io::ErrorKind::NotFound);
    assert_eq!(kind(&format!("{list}403 Forbidden: <Code>AccessDenied</Code>")), io::ErrorKind::PermissionDenied);
    assert_eq!(kind(&format!("{list}503 Service Unavailable")), io::ErrorKind::Other);
    assert_eq!(kind(&format!("{list}400 Bad Request: RequestTimeout")), io::ErrorKind::Other);
    let redirect = "Error performing list request: Error performing GET https://b.s3.amazonaws.com/ in 30ms - \
                    Received redirect without LOCATION, this normally indicates an incorrectly configured region";
    let e = io_error(&loc, generic(redirect));
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("AWS_REGION"), "{e}");
    let delete = "DeleteObjects request failed for key x: Access Denied (code: AccessDenied)";
    assert_eq!(kind(delete), io::ErrorKind::PermissionDenied);
    // Getting credentials failed: not the object's answer, whatever its status; with a hint.
    let imds = "Error performing GET http://169.254.169.254/latest/meta-data/iam/security-credentials/ in 1ms - \
                Server returned non-2xx status code: 404 Not Found";
    let e = io_error(&loc, generic(imds));
    assert_eq!(e.kind(), io::ErrorKind::Other);
    assert!(e.to_string().contains("AWS_ACCESS_KEY_ID") && e.to_string().contains("~/.aws"), "{e}");
}
