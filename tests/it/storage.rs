//! Object storage: manifest, images and output in S3, served over real HTTP by a local
//! S3-compatible server (moto's server mode, from the project's .venv) that the test starts.

use crate::common::{bin, engine_cases, python, repo};
use crate::pipeline::{assert_outputs_agree, make_dataset, rows_by_id as rows, write_job};
use saliency_audit::sample::Status;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A moto S3 server on a free local port, stopped on drop.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = repo().join(".venv/bin/moto_server");
        assert!(server.exists(), "{} is missing: run scripts/setup.sh", server.display());
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let s = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "moto_server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// Environment that points both boto3 and the binary at this server.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ]
    }

    /// Runs a boto3 snippet; `s3` is a client for this server.
    fn boto(&self, code: &str, args: &[&str]) {
        let script = format!("import sys, os, boto3\ns3 = boto3.client('s3')\n{code}\n");
        let out = Command::new(python()).arg("-c").arg(script).args(args).envs(self.env()).output().unwrap();
        assert!(out.status.success(), "boto3 snippet failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn bin(&self, args: &[&str]) -> Output {
        self.bin_with(args, &[])
    }

    fn bin_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(bin());
        c.envs(env.iter().copied());
        // Credentials of the machine running the tests must not leak into the requests.
        for k in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] {
            c.env_remove(k);
        }
        c.args(args).envs(self.env()).output().unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const UPLOAD: &str = r#"
bucket, root, prefix = sys.argv[1:4]
s3.create_bucket(Bucket=bucket)
for dirpath, _, files in os.walk(root):
    for f in files:
        p = os.path.join(dirpath, f)
        s3.upload_file(p, bucket, prefix + os.path.relpath(p, root))
"#;

const DOWNLOAD: &str = r#"
bucket, prefix, dest = sys.argv[1:4]
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix):
    for o in page.get('Contents', []):
        rel = o['Key'][len(prefix):]
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, o['Key'], path)
"#;

const CORRUPT: &str = r#"
bucket, key = sys.argv[1:3]
s3.put_object(Bucket=bucket, Key=key, Body=b'PAR1 not really a part')
s3.delete_object(Bucket=bucket, Key=key.rsplit('/', 1)[0] + '/_SUCCESS')
"#;

fn ok_or_failed(o: &Output, what: &str) {
    assert!(
        matches!(o.status.code(), Some(0) | Some(1)),
        "{what}: exit {:?}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Manifest, images and output in S3 over HTTP: two shards, `finalize`, a resume that keeps
/// every part, a corrupt part moved aside and redone, an image-folder dataset, and the report —
/// with the same rows as a local run of the same files.
#[test]
fn s3_manifest_images_and_output_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(&tmp.path().join("data"), 24);
    let model = engine_cases().join("pipeline/model.pt");
    let s3 = S3Server::start();
    s3.boto(UPLOAD, &["audit", ds.dir.to_str().unwrap(), "datasets/set1/"]);

    // The local reference run over the same files. Maps of 128² make the parts large enough
    // (about 3 KB a row here) for the resume check's ranged reads to show against their size.
    let job = write_job(&ds.dir, &model, "");
    let text = std::fs::read_to_string(&job).unwrap().replace("map_size = 16", "map_size = 128");
    std::fs::write(&job, text).unwrap();
    let local = tmp.path().join("local");
    let o = Command::new(bin()).args(["-q", "run"]).arg(&job).arg("--output").arg(&local).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "local run: the dataset's planted bad files fail\n{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The S3 job: manifest by URL, image paths relative to it, output by URL.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("manifest = \"samples.csv\"", "manifest = \"s3://audit/datasets/set1/samples.csv\"")
        .replace("path = \"out\"", "path = \"s3://audit/runs/r1\"");
    let s3_job = tmp.path().join("s3-job.toml");
    std::fs::write(&s3_job, text).unwrap();
    let job_arg = s3_job.to_str().unwrap();

    let v = s3.bin(&["validate", job_arg]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let plan = String::from_utf8_lossy(&v.stdout);
    assert!(plan.contains("s3://audit/datasets/set1/samples.csv") && plan.contains("s3://audit/runs/r1"), "{plan}");

    for shard in ["0", "1"] {
        let o = s3.bin(&["-q", "run", job_arg, "--shard-index", shard, "--num-shards", "2"]);
        ok_or_failed(&o, &format!("S3 shard {shard}"));
    }
    let f = s3.bin(&["finalize", "s3://audit/runs/r1"]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));
    let total: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(total["rows"], ds.expected.len());

    // A rerun resumes from the bucket: every part is kept, nothing is written again.
    let again = s3.bin(&["run", job_arg, "--shard-index", "1", "--num-shards", "2"]);
    ok_or_failed(&again, "S3 rerun");
    // It checked the parts by ranged reads of their footers and two columns, not whole.
    let log = String::from_utf8_lossy(&again.stderr);
    let (read, held) = log
        .split("with ranged reads: ")
        .nth(1)
        .and_then(|t| {
            let mut w = t.split_whitespace();
            let read: u64 = w.next()?.parse().ok()?;
            let held: u64 = w.nth(2)?.parse().ok()?;
            Some((read, held))
        })
        .unwrap_or_else(|| panic!("no ranged-read line in the rerun's log:\n{log}"));
    println!("resume check over S3: {read} of {held} bytes read");
    assert!(held > 0 && read * 2 < held, "read {read} of {held} bytes");
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(said.starts_with("0 of 0 samples processed") && said.contains("kept from an earlier run"), "{said}");

    // --retry-failed over the bucket: the parts holding failed rows are read whole and written
    // again (the files are as they were, so the rows come out the same; compared below).
    let retry = s3.bin(&["run", job_arg, "--shard-index", "1", "--num-shards", "2", "--retry-failed"]);
    ok_or_failed(&retry, "S3 retry of failed rows");
    let said = String::from_utf8_lossy(&retry.stdout);
    assert!(said.contains("failed there and redone") || said.contains("failed in an earlier run and redone"), "{said}");

    // A damaged part in the bucket is moved aside and its chunk written again.
    s3.boto(CORRUPT, &["audit", "runs/r1/part-00000-of-00002-000000.parquet"]);
    let redo = s3.bin(&["run", job_arg, "--shard-index", "0", "--num-shards", "2"]);
    ok_or_failed(&redo, "S3 run after a damaged part");
    assert!(
        String::from_utf8_lossy(&redo.stderr).contains("is not valid"),
        "{}",
        String::from_utf8_lossy(&redo.stderr)
    );
    let f = s3.bin(&["finalize", "s3://audit/runs/r1"]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));

    // Read back what the bucket holds, with boto3, and compare with the local run.
    let fetched = tmp.path().join("fetched");
    s3.boto(DOWNLOAD, &["audit", "runs/r1/", fetched.to_str().unwrap()]);
    let names: Vec<String> =
        std::fs::read_dir(&fetched).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with(".part-00000-of-00002-000000.parquet.corrupt-")), "{names:?}");
    assert!(names.iter().any(|n| n == "_SUCCESS") && names.iter().any(|n| n == "_run-00001-of-00002.json"));
    let (want, got) = (rows(&local), rows(&fetched));
    assert_eq!(got.len(), ds.expected.len());
    // A dataset reader skips the set-aside part (hidden name), so it sees every sample once.
    let read = Command::new(python())
        .args([
            "-c",
            "import sys, pyarrow.dataset as ds; print(ds.dataset(sys.argv[1], format='parquet').count_rows())",
        ])
        .arg(&fetched)
        .output()
        .unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), ds.expected.len().to_string());
    // A folder named like an image exists only locally; in a bucket there is no such key.
    assert_eq!((want["x_dir"].0.as_str(), got["x_dir"].0.as_str()), ("unreadable", "missing"));
    assert_outputs_agree(&local, &fetched, "the output from S3 input against the local run's", &["x_dir"]);
    assert_eq!(got.values().filter(|(s, _)| s == Status::Ok.as_str()).count(), 24);

    // The report reads the output and the images from the bucket.
    let report_dir = tmp.path().join("report");
    let r = s3.bin_with(
        &["report", "s3://audit/runs/r1", "--out", report_dir.to_str().unwrap()],
        &[("RUST_LOG", "info,saliency_audit::store=trace")],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let html = std::fs::read_to_string(report_dir.join("index.html")).unwrap();
    assert!(html.contains("s3://audit/runs/r1"));
    // Its two passes download each part once, and its metadata comes from a footer (the store's
    // trace names every GET; ranged ones with their bytes); it says how much it read.
    let log = String::from_utf8_lossy(&r.stderr);
    assert!(!log.contains('\x1b'), "log lines off a terminal carry no colour codes:\n{log}");
    let parts: Vec<String> = std::fs::read_dir(&fetched)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("part-"))
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    for part in &parts {
        let whole = format!("GET s3://audit/runs/r1/{part}");
        let n = log.lines().filter(|l| l.trim_end().ends_with(&whole)).count();
        assert_eq!(n, 1, "{part} downloaded {n} times:\n{log}");
    }
    let read: u64 = log
        .lines()
        .find_map(|l| l.split(" bytes from the object store").next().filter(|h| h.len() < l.len()))
        .and_then(|head| head.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no object-store line in the report's log:\n{log}"));
    let part_bytes: u64 = parts.iter().map(|p| fetched.join(p).metadata().unwrap().len()).sum();
    assert!(read > part_bytes, "read {read} bytes; the parts hold {part_bytes}");
    // Cards show the model-input crop only when the image could be read: as many pictures as
    // the local run's report, whose images are on disk.
    let local_report = tmp.path().join("local-report");
    let r = Command::new(bin()).arg("report").arg(&local).arg("--out").arg(&local_report).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let pictures = |html: &str| html.matches("data:image/png;base64").count();
    let local_html = std::fs::read_to_string(local_report.join("index.html")).unwrap();
    assert!(pictures(&local_html) > 0);
    assert_eq!(pictures(&html), pictures(&local_html), "the report fetched the images from the bucket");

    // An image folder given by URL: class folders are the first key segment under the prefix.
    // Keys keep characters a URL would escape (`~`, `[`, `]`, `#`).
    s3.boto(UPLOAD, &["folders", ds.dir.join("img").to_str().unwrap(), "train~v2/cls_[a]#1/"]);
    s3.boto(UPLOAD, &["folders2", ds.dir.join("bad").to_str().unwrap(), "x/"]);
    let folder_job = tmp.path().join("folder-job.toml");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("manifest = \"samples.csv\"", "image_folder = \"s3://folders/train~v2\"")
        .replace("target = \"label\"", "target = \"predicted\"")
        .replace("path = \"out\"", &format!("path = \"{}\"", tmp.path().join("folder-out").display()));
    std::fs::write(&folder_job, text).unwrap();
    let o = s3.bin(&["-q", "run", folder_job.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let folder_rows = rows(&tmp.path().join("folder-out"));
    assert_eq!(folder_rows.len(), 24);
    assert!(folder_rows.keys().all(|id| id.starts_with("cls_[a]#1/")), "{:?}", folder_rows.keys().collect::<Vec<_>>());

    // Clear errors: a missing manifest object names the key; a bad scheme names the value.
    let bad = tmp.path().join("bad-job.toml");
    let text = std::fs::read_to_string(&s3_job).unwrap().replace("set1/samples.csv", "set1/nope.csv");
    std::fs::write(&bad, text).unwrap();
    let e = s3.bin(&["validate", bad.to_str().unwrap()]);
    assert_eq!(e.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("dataset.manifest") && msg.contains("s3://audit/datasets/set1/nope.csv"), "{msg}");
    let e = s3.bin(&["finalize", "ftp://host/out"]);
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("unsupported URL scheme"));

    // Output to a bucket that does not exist: `validate` fails as the run would.
    let e = s3.bin(&["validate", job_arg, "--output", "s3://nobucket/out"]);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{msg}");
    assert!(msg.contains("s3://nobucket/out") && msg.contains("NoSuchBucket"), "{msg}");

    // An image folder in a bucket that does not exist (404 on listing): the job's error, not a
    // failure worth retrying. One whose keys include `a//b.png`, which object_store cannot
    // address: refused with what to do, as is a manifest row that names such a key.
    s3.boto(
        "s3.create_bucket(Bucket='oddkeys'); s3.put_object(Bucket='oddkeys', Key='set/cls//a.png', Body=b'x')",
        &[],
    );
    for (folder, expect) in [("s3://nobucket/train", "NoSuchBucket"), ("s3://oddkeys/set", "empty segment `//`")] {
        std::fs::write(&bad, std::fs::read_to_string(&folder_job).unwrap().replace("s3://folders/train~v2", folder))
            .unwrap();
        let e = s3.bin(&["validate", bad.to_str().unwrap()]);
        let msg = String::from_utf8_lossy(&e.stderr);
        assert_eq!(e.status.code(), Some(2), "{folder}: {msg}");
        assert!(msg.contains(folder) && msg.contains(expect), "{msg}");
    }
    let rows =
        std::fs::read_to_string(ds.dir.join("samples.csv")).unwrap() + "s3://oddkeys/set/cls//a.png,square,odd,,,,,\n";
    std::fs::write(tmp.path().join("odd.csv"), rows).unwrap();
    let odd_job = std::fs::read_to_string(&job)
        .unwrap()
        .replace("samples.csv", &tmp.path().join("odd.csv").display().to_string());
    std::fs::write(&bad, odd_job).unwrap();
    let e = s3.bin(&["validate", bad.to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{msg}");
    assert!(msg.contains("odd.csv line 35") && msg.contains("empty segment"), "{msg}");
    // A sample in a store that cannot be set up (an Azure container, no account named): the
    // job's error before any work, naming the container, not an `unreadable` row per sample.
    let rows = std::fs::read_to_string(ds.dir.join("samples.csv")).unwrap() + "az://nocontainer/a.png,square,az,,,,,\n";
    std::fs::write(tmp.path().join("odd.csv"), rows).unwrap();
    let mut c = Command::new(bin());
    for k in [
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
    ] {
        c.env_remove(k);
    }
    let e = c.args(["run", bad.to_str().unwrap(), "--output"]).arg(tmp.path().join("az-out")).output().unwrap();
    let msg = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("az://nocontainer/a.png (the first file in az://nocontainer)") && msg.contains("cannot set up"),
        "{msg}"
    );
    assert!(!tmp.path().join("az-out").exists(), "nothing written before the store is set up");
}

/// An object store that fails while an image or a mask is read (here: nothing listens at its
/// endpoint) stops the run with exit 3 instead of giving the sample an `unreadable` or
/// `bad_mask` row for good. With `--store-failures-as-rows` the run gives them those rows and
/// finishes; once the store is back, `--retry-failed` reads them, and every sample has one row.
#[test]
fn a_store_failing_during_image_or_mask_reads_stops_the_run_and_the_rerun_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = make_dataset(&tmp.path().join("data"), 12);
    let csv = ds.dir.join("samples.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("s3://audit/remote/0001.png,square,s_remote,,,,,\n");
    // A local image (0002.bmp, 54×46) whose mask is in the store.
    text.push_str("img/0002.bmp,triangle,s_mask,,,,,s3://audit/masks/m2.png\n");
    std::fs::write(&csv, text).unwrap();
    std::fs::create_dir_all(ds.dir.join("masks")).unwrap();
    image::GrayImage::from_pixel(54, 46, image::Luma([255])).save(ds.dir.join("masks/m2.png")).unwrap();
    let job = write_job(&ds.dir, &engine_cases().join("pipeline/model.pt"), "");
    let text = std::fs::read_to_string(&job).unwrap().replace("rows_per_part = 50", "rows_per_part = 2");
    std::fs::write(&job, text).unwrap();
    let out = tmp.path().join("out");

    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let against_closed_store = |extra: &[&str]| {
        let mut c = Command::new(bin());
        for k in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] {
            c.env_remove(k);
        }
        c.args(["run", job.to_str().unwrap(), "--output", out.to_str().unwrap()])
            .args(extra)
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("SALIENCY_AUDIT_STORE_RETRIES", "0");
        c.output().unwrap()
    };
    let o = against_closed_store(&[]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{log}");
    assert!(log.contains("object store failed"), "{log}");
    // Ids sort as s0000 … s0011, s_mask, s_remote, x_…: the twelve before them were decoded
    // first and their parts (two rows each) are committed; the parts that needed the two are not.
    let before = rows(&out);
    for id in ["s_remote", "s_mask"] {
        assert!(!before.contains_key(id), "no row for {id}, whose image or mask the store failed to give");
    }
    let ok_before = before.iter().filter(|(id, (s, _))| id.starts_with("s00") && s == "ok").count();
    assert_eq!(ok_before, 12, "{:?}", before.keys().collect::<Vec<_>>());

    // A store that keeps failing on them: their rows say so, and the run finishes.
    let o = against_closed_store(&["--store-failures-as-rows"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let given_up = rows(&out);
    assert_eq!(given_up.len(), ds.expected.len() + 2, "every sample once");
    assert_eq!((given_up["s_remote"].0.as_str(), given_up["s_mask"].0.as_str()), ("unreadable", "bad_mask"));

    let s3 = S3Server::start();
    s3.boto(UPLOAD, &["audit", ds.dir.join("img").to_str().unwrap(), "remote/"]);
    s3.boto(UPLOAD, &["audit", ds.dir.join("masks").to_str().unwrap(), "masks/"]);
    let o = s3.bin(&["-q", "run", job.to_str().unwrap(), "--output", out.to_str().unwrap(), "--retry-failed"]);
    assert_eq!(o.status.code(), Some(1), "bad samples on purpose: {}", String::from_utf8_lossy(&o.stderr));
    let after = rows(&out);
    assert_eq!(after.len(), ds.expected.len() + 2, "every sample once");
    assert_eq!((after["s_remote"].0.as_str(), after["s_mask"].0.as_str()), ("ok", "ok"));
}
