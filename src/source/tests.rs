use crate::store::Loc;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, DictionaryArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Int8Type, Schema};
use parquet::arrow::ArrowWriter;

use super::*;
use crate::job::DatasetSource;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn manifest(path: &Path, classes: Option<&[String]>, n: Option<i64>) -> anyhow::Result<SampleSet> {
    load_samples(&DatasetSource::Manifest(Loc::from(path)), classes, n)
}

fn err_of(r: anyhow::Result<SampleSet>) -> String {
    format!("{:#}", r.expect_err("manifest should be rejected"))
}

const CSV: &str = "path,label,extra,bbox_x0,bbox_y0,bbox_x1,bbox_y1,mask\n\
                   img/b.jpg,dog,x,1,2,30,40,masks/b.png\n\
                   img/a.jpg,0,y,,,,,\n\
                   /data/c.jpg,cat,z,,,,,\n\
                   img/d.jpg,,w,,,,,\n\
                   img/e.jpg,7,w,,,,,\n\
                   img/f.jpg,2.5,w,,,,,\n";

#[test]
fn csv_manifest() {
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "sets/samples.csv", CSV);
    let classes = names(&["cat", "dog"]);
    let set = manifest(&m, Some(&classes), Some(2)).unwrap();
    assert_eq!(set.class_names, Some(classes.clone()));
    let ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["/data/c.jpg", "img/a.jpg", "img/b.jpg", "img/d.jpg", "img/e.jpg", "img/f.jpg"]);
    for (i, s) in set.samples.iter().enumerate() {
        assert_eq!(s.index, i as u64);
    }
    let by: HashMap<&str, &Sample> = set.samples.iter().map(|s| (s.id.as_str(), s)).collect();
    let b = by["img/b.jpg"];
    assert_eq!(b.label, Some(1));
    assert_eq!(b.label_error, None);
    assert_eq!(b.bbox, Some([1.0, 2.0, 30.0, 40.0]));
    assert_eq!(b.location, Loc::from(d.path().join("sets/img/b.jpg")));
    assert_eq!(b.mask, Some(Loc::from(d.path().join("sets/masks/b.png"))));
    assert_eq!(b.path, "img/b.jpg");
    assert_eq!(by["img/a.jpg"].label, Some(0));
    assert_eq!(by["img/a.jpg"].bbox, None);
    assert_eq!(by["img/a.jpg"].mask, None);
    // Absolute paths stay absolute.
    assert_eq!(by["/data/c.jpg"].location, Loc::from(PathBuf::from("/data/c.jpg")));
    assert_eq!(by["/data/c.jpg"].label, Some(0));
    // No label: no error either.
    assert_eq!((by["img/d.jpg"].label, by["img/d.jpg"].label_error.as_deref()), (None, None));
    // Out-of-range id and non-integral number: row-level label errors.
    let e = by["img/e.jpg"].label_error.as_deref().unwrap();
    assert!(e.contains("label 7 is not a class of the model") && e.contains("2 classes"), "{e}");
    assert_eq!(by["img/e.jpg"].label, None);
    let f = by["img/f.jpg"].label_error.as_deref().unwrap();
    assert!(f.contains("label \"2.5\" is not a class of the model"), "{f}");
}

#[test]
fn bad_label_names_become_row_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "m.csv", "path,label\na.jpg,cat\nb.jpg,horse\nc.jpg,3.0\n");
    let classes = names(&["cat", "dog", "a", "b", "c", "d", "e"]);
    let set = manifest(&m, Some(&classes), None).unwrap();
    let s = &set.samples;
    assert_eq!(s[0].label, Some(0));
    assert_eq!(s[1].label, None);
    let e = s[1].label_error.as_deref().unwrap();
    // Named with the manifest's file and line, as a box error is.
    assert!(
        e.contains("m.csv line 3: label \"horse\" is not a class of the model (its classes: \"cat\", \"dog\""),
        "{e}"
    );
    assert!(e.contains("2 more"), "{e}");
    // An integral decimal (as pandas writes integer columns with gaps) is a class id.
    assert_eq!(s[2].label, Some(3));
    // Without class names, a name cannot resolve; ids are unbounded without a class count.
    let set = manifest(&m, None, None).unwrap();
    let e = set.samples[0].label_error.as_deref().unwrap();
    assert!(e.contains("no class names"), "{e}");
    assert_eq!(set.samples[2].label, Some(3));
}

/// Class names that are numbers in another order (an ImageFolder of folders 1..12 sorts as
/// "1", "10", "11", "12", "2", …): a label that is both an id and another class's name is a
/// row error, not silently one of the two; labels the names do not contradict resolve.
#[test]
fn numeric_class_names_in_another_order_make_labels_ambiguous() {
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "m.csv", "path,label\na.jpg,10\nb.jpg,0\nc.jpg,1\n");
    let classes = names(&["1", "10", "11", "12", "2", "3", "4", "5", "6", "7", "8", "9"]);
    let set = manifest(&m, Some(&classes), None).unwrap();
    let s = &set.samples;
    assert_eq!(s[0].label, None);
    let e = s[0].label_error.as_deref().unwrap();
    assert!(e.contains("label 10 is ambiguous") && e.contains("named \"8\"") && e.contains("has id 1"), "{e}");
    assert_eq!(s[1].label, Some(0), "no class is named \"0\"");
    assert!(s[2].label_error.as_deref().unwrap().contains("label 1 is ambiguous"));
    // Numeric names in id order ("0", "1", …) agree with the ids.
    let set = manifest(&m, Some(&names(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"])), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(10), Some(0), Some(1)]);
}

/// A label written exactly as a class name is that class, even when it also reads as a
/// number: zero-padded names ("01", "02", …) are not the ids 1, 2, …, and a name such as "5"
/// is a class of a model with three classes; a plain integer that such a name reads as is
/// ambiguous.
#[test]
fn labels_written_as_class_names_that_read_as_numbers_are_those_classes() {
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "m.csv", "path,label\na.jpg,01\nb.jpg,02\nc.jpg,03\nd.jpg,1\ne.jpg,04\n");
    let set = manifest(&m, Some(&names(&["01", "02", "03"])), None).unwrap();
    let s = &set.samples;
    let labels: Vec<Option<i64>> = s.iter().map(|s| s.label).collect();
    // "1" is not a class name, and reads as the number of the class named "01", whose id is
    // 0, not 1: ambiguous. "04" is neither a name nor an id.
    assert_eq!(labels, [Some(0), Some(1), Some(2), None, None]);
    let e = s[3].label_error.as_deref().unwrap();
    assert!(e.contains("label 1 is ambiguous: class id 1 is named \"02\", but the class named \"01\" has id 0"), "{e}");
    let e = s[4].label_error.as_deref().unwrap();
    assert!(e.contains("line 6: label 04 is not a class of the model (it has 3 classes"), "{e}");
    let m = write(d.path(), "n.csv", "path,label\na.jpg,5\nb.jpg,7\nc.jpg,1\nd.jpg,8\n");
    let set = manifest(&m, Some(&names(&["5", "6", "7"])), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(0), Some(2), Some(1), None]);
    // A JSON number is an id, never a name.
    let j =
        write(d.path(), "m.jsonl", "{\"path\": \"a.jpg\", \"label\": 5}\n{\"path\": \"b.jpg\", \"label\": \"5\"}\n");
    let set = manifest(&j, Some(&names(&["5", "6", "7"])), None).unwrap();
    assert_eq!(set.samples[0].label, None);
    assert!(set.samples[0].label_error.as_deref().unwrap().contains("label 5 is not a class of the model"));
    assert_eq!(set.samples[1].label, Some(0));
}

#[test]
fn jsonl_manifest() {
    let d = tempfile::tempdir().unwrap();
    let text = r#"{"path": "b.jpg", "label": "dog", "id": "second", "bbox_x0": 1, "bbox_y0": 2.5, "bbox_x1": 3, "bbox_y1": 4}

{"path": "a.jpg", "label": 0, "id": 7, "mask": "a.png", "other": [1, 2]}
{"path": "c.jpg", "label": null, "bbox_x0": null}
{"path": "d.jpg", "label": 1.5}
{"path": "e.jpg", "label": true}
"#;
    let m = write(d.path(), "m.jsonl", text);
    let classes = names(&["cat", "dog"]);
    let set = manifest(&m, Some(&classes), None).unwrap();
    let by: HashMap<&str, &Sample> = set.samples.iter().map(|s| (s.id.as_str(), s)).collect();
    assert_eq!(by["second"].label, Some(1));
    assert_eq!(by["second"].bbox, Some([1.0, 2.5, 3.0, 4.0]));
    assert_eq!(by["7"].label, Some(0));
    assert_eq!(by["7"].mask, Some(Loc::from(d.path().join("a.png"))));
    assert_eq!((by["c.jpg"].label, by["c.jpg"].bbox), (None, None));
    assert!(by["d.jpg"].label_error.as_deref().unwrap().contains("label 1.5"));
    assert!(by["e.jpg"].label_error.as_deref().unwrap().contains("label true"));
    // .ndjson is the same format.
    let m2 = write(d.path(), "m.ndjson", text);
    // (Label errors name the file.)
    let read = format!("{:?}", manifest(&m2, Some(&classes), None).unwrap());
    assert_eq!(read.replace("m.ndjson line", "m.jsonl line"), format!("{set:?}"));

    let bad = write(d.path(), "bad.jsonl", "{\"path\": \"a.jpg\"}\n{\"path\": \"b.jpg\",}\n");
    let e = err_of(manifest(&bad, None, None));
    assert!(e.contains("bad.jsonl line 2") && e.contains("not valid JSON"), "{e}");
    let bad = write(d.path(), "bad2.jsonl", "{\"label\": 1}\n");
    let e = err_of(manifest(&bad, None, None));
    assert!(e.contains("bad2.jsonl line 1") && e.contains("no path"), "{e}");
    // A byte-order mark before the first line is not an error.
    let bom = write(d.path(), "bom.jsonl", "\u{feff}{\"path\": \"a.jpg\"}\n");
    assert_eq!(manifest(&bom, None, None).unwrap().samples[0].path, "a.jpg");
    let bad = write(d.path(), "bad3.jsonl", "[1, 2]\n");
    assert!(err_of(manifest(&bad, None, None)).contains("line 1: not a JSON object"));
    let bad = write(d.path(), "bad4.jsonl", "{\"path\": 5}\n");
    assert!(err_of(manifest(&bad, None, None)).contains("`path` must be a string"));
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|(_, a)| a).collect()).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_manifest() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.parquet");
    write_parquet(
        &m,
        vec![
            ("path", Arc::new(StringArray::from(vec![Some("b.jpg"), Some("a.jpg"), Some("c.jpg")])) as ArrayRef),
            ("label", Arc::new(Int32Array::from(vec![Some(1), None, Some(5)])) as ArrayRef),
            ("id", Arc::new(Int64Array::from(vec![Some(20), Some(10), None])) as ArrayRef),
            ("bbox_x0", Arc::new(Float32Array::from(vec![Some(1.0), None, None])) as ArrayRef),
            ("bbox_y0", Arc::new(Int32Array::from(vec![Some(2), None, None])) as ArrayRef),
            ("bbox_x1", Arc::new(Float32Array::from(vec![Some(3.0), None, None])) as ArrayRef),
            ("bbox_y1", Arc::new(Float32Array::from(vec![Some(4.0), None, None])) as ArrayRef),
            ("ignored", Arc::new(StringArray::from(vec!["x", "y", "z"])) as ArrayRef),
        ],
    );
    let set = manifest(&m, None, Some(3)).unwrap();
    let ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["10", "20", "c.jpg"]);
    let s = &set.samples;
    assert_eq!((s[0].path.as_str(), s[0].label), ("a.jpg", None));
    assert_eq!(s[1].label, Some(1));
    assert_eq!(s[1].bbox, Some([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(s[1].location, Loc::from(d.path().join("b.jpg")));
    assert!(s[2].label_error.as_deref().unwrap().contains("label 5 is not a class"));

    // String labels resolve by name.
    let m = d.path().join("names.parquet");
    write_parquet(
        &m,
        vec![
            ("path", Arc::new(StringArray::from(vec!["a.jpg", "b.jpg"])) as ArrayRef),
            ("label", Arc::new(StringArray::from(vec!["dog", "emu"])) as ArrayRef),
        ],
    );
    let classes = names(&["cat", "dog"]);
    let set = manifest(&m, Some(&classes), None).unwrap();
    assert_eq!(set.samples[0].label, Some(1));
    assert!(set.samples[1].label_error.as_deref().unwrap().contains("\"emu\""));

    // Dictionary-encoded columns (pandas' `category`, pyarrow's `dictionary_encode`) hold their
    // dictionary's type: paths are strings, integer labels ids, float boxes boxes.
    let m = d.path().join("dictionary.parquet");
    let dict = |keys: Vec<i8>, values: ArrayRef| {
        Arc::new(DictionaryArray::<Int8Type>::try_new(keys.into(), values).unwrap()) as ArrayRef
    };
    let coords = |v: f32| dict(vec![0, 1], Arc::new(Float32Array::from(vec![v, v + 1.0])));
    write_parquet(
        &m,
        vec![
            ("path", dict(vec![0, 1], Arc::new(StringArray::from(vec!["a.jpg", "b.jpg"])))),
            ("label", dict(vec![1, 0], Arc::new(Int32Array::from(vec![0, 1])))),
            ("bbox_x0", coords(1.0)),
            ("bbox_y0", coords(1.0)),
            ("bbox_x1", coords(3.0)),
            ("bbox_y1", coords(3.0)),
        ],
    );
    let set = manifest(&m, Some(&classes), None).unwrap();
    let s = &set.samples;
    assert_eq!((s[0].label, s[1].label), (Some(1), Some(0)));
    assert_eq!((s[0].bbox, s[1].bbox), (Some([1.0, 1.0, 3.0, 3.0]), Some([2.0, 2.0, 4.0, 4.0])));
    assert_eq!((s[0].label_error.as_deref(), s[0].box_error.as_deref()), (None, None));

    // A partial box names the row and the column, as that sample's error.
    let m = d.path().join("partial.parquet");
    write_parquet(
        &m,
        vec![
            ("path", Arc::new(StringArray::from(vec!["a.jpg", "b.jpg"])) as ArrayRef),
            ("bbox_x0", Arc::new(Float32Array::from(vec![None, Some(1.0)])) as ArrayRef),
            ("bbox_y0", Arc::new(Float32Array::from(vec![None, Some(1.0)])) as ArrayRef),
            ("bbox_x1", Arc::new(Float32Array::from(vec![None, Some(2.0)])) as ArrayRef),
            ("bbox_y1", Arc::new(Float32Array::from(vec![None, None])) as ArrayRef),
        ],
    );
    let set = manifest(&m, None, None).unwrap();
    let e = set.samples[1].box_error.as_deref().unwrap_or_default();
    assert!(e.contains("partial.parquet row 2") && e.contains("bbox_y1"), "{e}");
    assert_eq!(set.samples[1].bbox, None);
    // Some box columns and not others: the manifest's error, not every row's.
    for (name, cols) in [("three.parquet", 3), ("one.parquet", 1)] {
        let m = d.path().join(name);
        let boxes = ["bbox_x0", "bbox_y0", "bbox_x1"].into_iter().take(cols);
        let mut columns = vec![("path", Arc::new(StringArray::from(vec!["a.jpg"])) as ArrayRef)];
        columns.extend(boxes.map(|b| (b, Arc::new(Float32Array::from(vec![Some(1.0)])) as ArrayRef)));
        write_parquet(&m, columns);
        let e = err_of(manifest(&m, None, None));
        assert!(e.contains(name) && e.contains("without") && e.contains("bbox_y1"), "{e}");
    }
    let m = write(d.path(), "x0only.csv", "path,bbox_x0\na.jpg,1\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("x0only.csv line 1: box column(s) bbox_x0 without bbox_y0, bbox_x1, bbox_y1"), "{e}");

    // No path column; a path column of the wrong type.
    let m = d.path().join("nopath.parquet");
    write_parquet(&m, vec![("file", Arc::new(StringArray::from(vec!["a.jpg"])) as ArrayRef)]);
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("nopath.parquet") && e.contains("no `path` column") && e.contains("file"), "{e}");
    let m = d.path().join("intpath.parquet");
    write_parquet(&m, vec![("path", Arc::new(Int32Array::from(vec![1])) as ArrayRef)]);
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("column `path` has type Int32"), "{e}");
    // Ids as pandas writes an integer column with a missing value: floats, whole numbers the
    // integers they were (the missing one falls back to the path); a fraction is refused.
    // A manifest `name` of paths a.jpg, b.jpg, … with float `ids`.
    let float_ids = |name: &str, ids: Vec<Option<f64>>| -> PathBuf {
        let m = d.path().join(name);
        let paths: Vec<String> = (0..ids.len()).map(|i| format!("{}.jpg", (b'a' + i as u8) as char)).collect();
        write_parquet(
            &m,
            vec![
                ("path", Arc::new(StringArray::from(paths)) as ArrayRef),
                ("id", Arc::new(Float64Array::from(ids)) as ArrayRef),
            ],
        );
        m
    };
    let set = manifest(&float_ids("float_ids.parquet", vec![Some(3.0), None, Some(-12.0)]), None, None).unwrap();
    let mut ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["-12", "3", "b.jpg"]);
    let e = err_of(manifest(&float_ids("fraction_ids.parquet", vec![Some(2.5)]), None, None));
    assert!(e.contains("column `id` has type Float64 and holds 2.5, not a whole number"), "{e}");
    let e = err_of(manifest(&float_ids("huge_ids.parquet", vec![Some(1e19)]), None, None));
    assert!(e.contains("holds 10000000000000000000, not a whole number of at most 2^53"), "{e}");
    // A known column in other letter case: refused, naming it.
    let m = d.path().join("case.parquet");
    write_parquet(
        &m,
        vec![
            ("path", Arc::new(StringArray::from(vec!["a.jpg"])) as ArrayRef),
            ("Mask", Arc::new(StringArray::from(vec!["m.png"])) as ArrayRef),
        ],
    );
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("case.parquet: column `Mask`") && e.contains("name it `mask`"), "{e}");
    // Not Parquet at all.
    let m = write(d.path(), "junk.parquet", "not parquet");
    assert!(err_of(manifest(&m, None, None)).contains("junk.parquet"));
    let _ = DataType::Utf8;
}

#[test]
fn structural_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "nopath.csv", "file,label\na.jpg,1\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("nopath.csv line 1") && e.contains("no `path` column"), "{e}");

    let m = write(d.path(), "dup.csv", "path,id\na.jpg,x\nb.jpg,y\nc.jpg,x\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("dup.csv") && e.contains("duplicate id \"x\" at line 2 and line 4"), "{e}");
    let m = write(d.path(), "dup2.csv", "path\na.jpg\na.jpg\n");
    assert!(err_of(manifest(&m, None, None)).contains("duplicate id \"a.jpg\" at line 2 and line 3"));
    // The same lines with Windows line ends.
    let m = write(d.path(), "dup_crlf.csv", "path,id\r\na.jpg,x\r\nb.jpg,y\r\nc.jpg,x\r\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("duplicate id \"x\" at line 2 and line 4"), "{e}");
    let m = write(d.path(), "ragged_crlf.csv", "path,label\r\na.jpg,1\r\nb.jpg,1,extra\r\n");
    let e = err_of(manifest(&m, None, None));
    // One line number, the file's: not the csv crate's record count besides it.
    assert!(
        e.contains(
            "ragged_crlf.csv line 3: cannot parse the CSV record: it has 3 fields, where the lines before it have 2"
        ),
        "{e}"
    );
    assert!(!e.contains("record 2"), "{e}");

    let m = write(d.path(), "ragged.csv", "path,label\na.jpg,1\nb.jpg,1,extra\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("ragged.csv line 3"), "{e}");

    // A box that cannot be used is that sample's error (a `bad_box` row), not the job's.
    let box_error = |name: &str, text: &str, id: &str| -> String {
        let set = manifest(&write(d.path(), name, text), None, None).unwrap();
        let s = set.samples.iter().find(|s| s.id == id).unwrap();
        assert_eq!(s.bbox, None, "{name}");
        s.box_error.clone().unwrap_or_else(|| panic!("{name}: no box error"))
    };
    let e = box_error("partial.csv", "path,bbox_x0,bbox_y0,bbox_x1,bbox_y1\na.jpg,1,2,3,4\nb.jpg,1,,3,4\n", "b.jpg");
    assert!(e.contains("partial.csv line 3") && e.contains("bbox_y0 empty"), "{e}");
    let e = box_error("nan.csv", "path,bbox_x0,bbox_y0,bbox_x1,bbox_y1\na.jpg,1,two,3,4\n", "a.jpg");
    assert!(e.contains("nan.csv line 2") && e.contains("bbox_y0 \"two\" is not a number"), "{e}");
    let e = box_error("empty_box.csv", "path,bbox_x0,bbox_y0,bbox_x1,bbox_y1\na.jpg,5,2,3,4\nb.jpg,1,2,3,4\n", "a.jpg");
    assert!(e.contains("empty_box.csv line 2") && e.contains("is empty"), "{e}");
    let set = manifest(&d.path().join("empty_box.csv"), None, None).unwrap();
    let good = set.samples.iter().find(|s| s.id == "b.jpg").unwrap();
    assert_eq!((good.bbox, good.box_error.as_deref()), (Some([1.0, 2.0, 3.0, 4.0]), None));
    let e = box_error(
        "str.jsonl",
        "{\"path\": \"a.jpg\", \"bbox_x0\": \"1\", \"bbox_y0\": 2, \"bbox_x1\": 3, \"bbox_y1\": 4}\n",
        "a.jpg",
    );
    assert!(e.contains("str.jsonl line 1") && e.contains("bbox_x0 must be a number"), "{e}");
    let m = write(d.path(), "emptypath.csv", "path,label\n,1\n");
    assert!(err_of(manifest(&m, None, None)).contains("emptypath.csv line 2: no path"));
    // Records of empty cells only (what spreadsheets leave at the end) are not rows.
    let m = write(d.path(), "trailing.csv", "path,label\r\na.jpg,1\r\n,\r\n , \r\n");
    let set = manifest(&m, None, None).unwrap();
    assert_eq!(set.samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a.jpg"]);

    // A known column in other letter case would be ignored: refused, naming it.
    let m = write(d.path(), "case.csv", "path,label,ID\na.jpg,1,x\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("case.csv line 1: column `ID`: column names are lower case; name it `id`"), "{e}");
    let m = write(d.path(), "case.jsonl", "{\"path\": \"a.jpg\"}\n{\"path\": \"b.jpg\", \"Label\": 1}\n");
    let e = err_of(manifest(&m, None, None));
    assert!(e.contains("case.jsonl line 2: column `Label`") && e.contains("name it `label`"), "{e}");

    let e = err_of(manifest(&d.path().join("absent.csv"), None, None));
    assert!(e.contains("absent.csv"), "{e}");
    let e = err_of(manifest(&d.path().join("absent.jsonl"), None, None));
    assert!(e.contains("absent.jsonl"), "{e}");
}

#[test]
fn order_does_not_depend_on_row_order() {
    let d = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..50).map(|i| format!("img/{i:03}.jpg,{}", i % 3)).collect();
    let mut reversed = rows.clone();
    reversed.reverse();
    let a = write(d.path(), "a.csv", &format!("path,label\n{}\n", rows.join("\n")));
    let b = write(
        d.path(),
        "b.csv",
        &format!(
            "label_ignored,path,label\n{}\n",
            reversed.iter().map(|r| format!("x,{r}")).collect::<Vec<_>>().join("\n")
        ),
    );
    let sa = manifest(&a, None, Some(3)).unwrap();
    let sb = manifest(&b, None, Some(3)).unwrap();
    assert_eq!(sa, sb);
    assert_eq!(sa.samples.len(), 50);
    assert_eq!(sa.samples[0].id, "img/000.jpg");
}

fn touch(root: &Path, rel: &str) {
    write(root, rel, "");
}

#[test]
fn image_folder_labels_and_ids() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("train");
    for f in
        ["dog/b.JPG", "dog/sub/c.png", "cat/a.jpeg", "cat/notes.txt", "cat/.hidden.jpg", "zebra/x.webp", "loose.jpg"]
            .into_iter()
            // What unzipping a macOS archive and a volume's root leave: never classes.
            .chain(["__MACOSX/cat/._a.jpeg", "__MACOSX/cat/a.jpeg", "lost+found/x.png"])
    {
        touch(&root, f);
    }
    std::fs::create_dir_all(root.join(".ipynb_checkpoints")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let src = DatasetSource::ImageFolder(Loc::from(&root));
    let set = load_samples(&src, None, None).unwrap();
    assert_eq!(set.class_names, Some(names(&["cat", "dog", "empty", "zebra"])));
    let got: Vec<(&str, Option<i64>, u64)> = set.samples.iter().map(|s| (s.id.as_str(), s.label, s.index)).collect();
    assert_eq!(
        got,
        [
            ("cat/a.jpeg", Some(0), 0),
            ("dog/b.JPG", Some(1), 1),
            ("dog/sub/c.png", Some(1), 2),
            ("zebra/x.webp", Some(3), 3)
        ]
    );
    assert_eq!(set.samples[2].location, Loc::from(root.join("dog").join("sub").join("c.png")));
    assert_eq!(set.samples[2].path, "dog/sub/c.png");

    // A class count smaller than the folder count: the extra folders' samples get label errors.
    let set = load_samples(&src, None, Some(2)).unwrap();
    let z = &set.samples[3];
    assert_eq!(z.label, None);
    let e = z.label_error.as_deref().unwrap();
    assert!(e.contains("label 3 is not a class") && e.contains("class folder \"zebra\""), "{e}");

    // When every class folder is a model class name, labels are the model's ids of those names.
    let model = names(&["zebra", "empty", "dog", "cat", "emu"]);
    let set = load_samples(&src, Some(&model), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(3), Some(2), Some(2), Some(0)]);
    assert_eq!(set.class_names, Some(model));

    // A folder without images does not stop the match by name.
    let model = names(&["zebra", "dog", "cat"]);
    let set = load_samples(&src, Some(&model), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(2), Some(1), Some(1), Some(0)]);

    // A folder that is not a model class (a stray `zebra/` here) does not renumber the others:
    // they keep the model's ids, its images have no label (not a wrong one: a target other than
    // the label attributes them), and the output's class names are the model's.
    let model = names(&["dog", "cat", "emu"]);
    let set = load_samples(&src, Some(&model), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(1), Some(0), Some(0), None]);
    assert_eq!(set.samples[3].label_error, None);
    assert_eq!(set.class_names, Some(model));

    // Otherwise (no folder is a model class) the sorted folder order, as torchvision (the
    // empty folder counted, as with its allow_empty=True).
    let model = names(&["n1", "n2", "n3", "n4"]);
    let set = load_samples(&src, Some(&model), None).unwrap();
    let labels: Vec<Option<i64>> = set.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, [Some(0), Some(1), Some(1), Some(3)]);
}

/// A name that is not UTF-8 (Latin-1 "résumé.jpg") does not stop the listing: the image is a
/// sample with the real path as its location, and only its id shows U+FFFD.
#[test]
fn image_folder_keeps_names_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("train");
    touch(&root, "cat/a.jpg");
    let latin1 = std::ffi::OsStr::from_bytes(b"r\xe9sum\xe9.jpg");
    std::fs::write(root.join("cat").join(latin1), b"").unwrap();
    std::fs::write(root.join("cat").join(std::ffi::OsStr::from_bytes(b"n\xf6tes.txt")), b"").unwrap();
    let set = load_samples(&DatasetSource::ImageFolder(Loc::from(&root)), None, None).unwrap();
    let ids: Vec<&str> = set.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["cat/a.jpg", "cat/r\u{fffd}sum\u{fffd}.jpg"]);
    assert_eq!(set.samples[1].location, Loc::from(root.join("cat").join(latin1)));
}

/// Two names that are not UTF-8 and read the same would give two samples one id: refused,
/// naming both files.
#[test]
fn image_folder_refuses_names_that_read_the_same() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("train");
    touch(&root, "cat/a.jpg");
    for name in [&b"caf\xe9.jpg"[..], b"caf\xe8.jpg"] {
        std::fs::write(root.join("cat").join(std::ffi::OsStr::from_bytes(name)), b"").unwrap();
    }
    let e = err_of(load_samples(&DatasetSource::ImageFolder(Loc::from(&root)), None, None));
    assert!(e.contains("have the same id \"cat/caf\u{fffd}.jpg\"") && e.contains("rename one"), "{e}");
}

/// Links are followed wherever they point, each class folder's tree whole; only a link back to
/// a folder above (a loop) is not.
#[test]
fn image_folder_follows_links_into_other_classes_but_not_loops() {
    use std::os::unix::fs::symlink;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("train");
    touch(&root, "circle/1.jpg");
    touch(&root, "triangle/2.jpg");
    symlink(root.join("triangle"), root.join("circle").join("more")).unwrap();
    symlink(root.join("circle"), root.join("square")).unwrap();
    symlink(root.join("triangle"), root.join("triangle").join("loop")).unwrap();
    let set = load_samples(&DatasetSource::ImageFolder(Loc::from(&root)), None, None).unwrap();
    assert_eq!(set.class_names, Some(names(&["circle", "square", "triangle"])));
    let got: Vec<(&str, Option<i64>)> = set.samples.iter().map(|s| (s.id.as_str(), s.label)).collect();
    assert_eq!(
        got,
        [
            ("circle/1.jpg", Some(0)),
            ("circle/more/2.jpg", Some(0)),
            ("square/1.jpg", Some(1)),
            ("square/more/2.jpg", Some(1)),
            ("triangle/2.jpg", Some(2)),
        ]
    );
}

#[test]
fn image_folder_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        load_samples(&DatasetSource::ImageFolder(Loc::from(d.path().join("nope"))), None, None).unwrap_err()
    );
    assert!(e.contains("nope"), "{e}");
    touch(d.path(), "flat/a.jpg");
    let e = format!(
        "{:#}",
        load_samples(&DatasetSource::ImageFolder(Loc::from(d.path().join("flat"))), None, None).unwrap_err()
    );
    assert!(e.contains("flat") && e.contains("no class folders"), "{e}");
    // Class folders with no images, and a manifest with no rows: an empty dataset is refused.
    touch(d.path(), "texts/cat/notes.txt");
    let e = err_of(load_samples(&DatasetSource::ImageFolder(Loc::from(d.path().join("texts"))), None, None));
    assert!(e.contains("texts: no image files in its class folders (names ending in .jpg, .jpeg"), "{e}");
    for (name, text) in [("empty.csv", "path,label\n"), ("empty.jsonl", "")] {
        let m = write(d.path(), name, text);
        let e = err_of(manifest(&m, None, None));
        assert!(e.contains(name) && e.contains("the manifest has no rows"), "{e}");
    }
}

#[test]
fn shards_partition_the_samples() {
    let ids: Vec<String> = (0..1000).map(|i| format!("sample-{i}")).collect();
    let samples: Vec<Sample> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Sample {
            index: i as u64,
            id: id.clone(),
            path: id.clone(),
            location: Loc::from(PathBuf::from(id)),
            label: None,
            label_error: None,
            bbox: None,
            box_error: None,
            mask: None,
        })
        .collect();
    for n in [1u32, 3, 7] {
        let mut seen: Vec<String> = Vec::new();
        for k in 0..n {
            let shard = select_shard(samples.clone(), k, n);
            assert!(!shard.is_empty() || n == 1);
            for (i, s) in shard.iter().enumerate() {
                assert_eq!(s.index, i as u64);
                assert_eq!(shard_of(&s.id, n), k);
            }
            // Kept in the input order.
            assert!(shard
                .windows(2)
                .all(|w| ids.iter().position(|x| *x == w[0].id) < ids.iter().position(|x| *x == w[1].id)));
            seen.extend(shard.into_iter().map(|s| s.id));
        }
        let before = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(before, 1000, "no overlap for {n} shards");
        assert_eq!(seen.len(), 1000, "union is everything for {n} shards");
    }
    // Stable across runs and machines: fixed values.
    assert_eq!(shard_of("anything", 1), 0);
    assert_eq!(shard_of("a", 0), 0);
    // SHA-256("abc") starts with ba7816bf8f01cfea.
    assert_eq!(shard_of("abc", 1000), (0xba7816bf8f01cfea_u64 % 1000) as u32);
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k: &str| map.get(k).cloned()
}

fn shard_env(index: Option<u32>, count: Option<u32>, pairs: &[(&str, &str)]) -> anyhow::Result<ShardSpec> {
    ShardSpec::from_env_or_args(index, count, &env_of(pairs))
}

#[test]
fn shard_spec_from_args_and_env() {
    let spec = |index, count| ShardSpec { index, count };
    assert_eq!(shard_env(None, None, &[]).unwrap(), spec(0, 1));
    // Explicit arguments win over the environment.
    assert_eq!(shard_env(Some(2), Some(5), &[("JOB_COMPLETION_INDEX", "1"), ("NUM_SHARDS", "3")]).unwrap(), spec(2, 5));
    assert!(shard_env(Some(5), Some(5), &[]).unwrap_err().to_string().contains("not below"));
    assert!(shard_env(Some(0), Some(0), &[]).unwrap_err().to_string().contains("0"));
    assert!(shard_env(Some(1), None, &[]).is_err());
    assert!(shard_env(None, Some(1), &[]).is_err());

    // Kubernetes Indexed Job.
    assert_eq!(shard_env(None, None, &[("JOB_COMPLETION_INDEX", "2"), ("NUM_SHARDS", "4")]).unwrap(), spec(2, 4));
    let e = shard_env(None, None, &[("JOB_COMPLETION_INDEX", "2")]).unwrap_err().to_string();
    assert!(e.contains("NUM_SHARDS"), "{e}");
    let e = shard_env(None, None, &[("NUM_SHARDS", "2")]).unwrap_err().to_string();
    assert!(e.contains("JOB_COMPLETION_INDEX"), "{e}");
    let e = shard_env(None, None, &[("JOB_COMPLETION_INDEX", "x"), ("NUM_SHARDS", "2")]).unwrap_err().to_string();
    assert!(e.contains("JOB_COMPLETION_INDEX") && e.contains("\"x\""), "{e}");
    let e = shard_env(None, None, &[("JOB_COMPLETION_INDEX", "4"), ("NUM_SHARDS", "4")]).unwrap_err().to_string();
    assert!(e.contains("not below"), "{e}");
    let e = shard_env(None, None, &[("JOB_COMPLETION_INDEX", "0"), ("NUM_SHARDS", "0")]).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");

    // A Slurm array task without NUM_SHARDS (a sweep of jobs, one per task) is not sharded.
    let sweep = [("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_MIN", "5"), ("SLURM_ARRAY_TASK_COUNT", "3")];
    assert_eq!(shard_env(None, None, &sweep).unwrap(), spec(0, 1));

    // With NUM_SHARDS, the array index is the shard: task 3 resubmitted alone (--array=3,
    // where Slurm says MIN 3, COUNT 1) is still shard 3 of 8.
    let alone = [
        ("SLURM_ARRAY_TASK_ID", "3"),
        ("SLURM_ARRAY_TASK_MIN", "3"),
        ("SLURM_ARRAY_TASK_COUNT", "1"),
        ("NUM_SHARDS", "8"),
    ];
    assert_eq!(shard_env(None, None, &alone).unwrap(), spec(3, 8));
    let e = shard_env(None, None, &[("SLURM_ARRAY_TASK_ID", "8"), ("NUM_SHARDS", "8")]).unwrap_err().to_string();
    assert!(e.contains("not below") && e.contains("NUM_SHARDS"), "{e}");
    // A 1-based array (--array=1-8 for 8 shards) is refused in every task, not only the last.
    let one_based = [("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MAX", "8"), ("NUM_SHARDS", "8")];
    let e = shard_env(None, None, &one_based).unwrap_err().to_string();
    assert!(e.contains("SLURM_ARRAY_TASK_MAX=8 is not below NUM_SHARDS=8") && e.contains("--array=0-7"), "{e}");
    let last = [("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_MAX", "7"), ("NUM_SHARDS", "8")];
    assert_eq!(shard_env(None, None, &last).unwrap(), spec(7, 8));

    // AWS Batch array job.
    let aws = [("AWS_BATCH_JOB_ARRAY_INDEX", "7"), ("AWS_BATCH_JOB_ARRAY_SIZE", "8")];
    assert_eq!(shard_env(None, None, &aws).unwrap(), spec(7, 8));
    let e = shard_env(None, None, &[("AWS_BATCH_JOB_ARRAY_INDEX", "7")]).unwrap_err().to_string();
    assert!(e.contains("AWS_BATCH_JOB_ARRAY_SIZE"), "{e}");
    let e = shard_env(None, None, &[("AWS_BATCH_JOB_ARRAY_SIZE", "7")]).unwrap_err().to_string();
    assert!(e.contains("AWS_BATCH_JOB_ARRAY_INDEX"), "{e}");
    let e = shard_env(None, None, &[("AWS_BATCH_JOB_ARRAY_INDEX", "-1"), ("AWS_BATCH_JOB_ARRAY_SIZE", "8")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("AWS_BATCH_JOB_ARRAY_INDEX"), "{e}");
}
