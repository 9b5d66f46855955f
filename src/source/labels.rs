//! Resolving a label as written (a class id or a class name) to a class id of the model.

use std::collections::HashMap;

/// A label as a manifest writes it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawLabel {
    /// An integer: a class id.
    Id(i64),
    /// Text, kept as written: a class name, or an integer (or an integral decimal such as
    /// `3.0`, as pandas writes an integer column that has gaps) that is a class id.
    Text(String),
    /// Anything else (a fractional number, a boolean), shown as written.
    Other(String),
}

impl RawLabel {
    /// A label written as text (see [`Classes::resolve`] for what it means).
    pub(super) fn from_text(text: &str) -> RawLabel {
        RawLabel::Text(text.to_owned())
    }

    /// A label written as a float: an integral value is a class id.
    pub(super) fn from_float(v: f64) -> RawLabel {
        integral(v).map(RawLabel::Id).unwrap_or_else(|| RawLabel::Other(v.to_string()))
    }
}

/// `text` as an integer: `7`, `07`, `+7`, or an integral decimal such as `7.0`.
fn as_integer(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| text.parse::<f64>().ok().and_then(integral))
}

/// `v` as an i64 when it is a whole number in range.
fn integral(v: f64) -> Option<i64> {
    (v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

/// The model's classes, as far as they are known.
pub(super) struct Classes<'a> {
    names: Option<&'a [String]>,
    count: Option<i64>,
    by_name: HashMap<&'a str, i64>,
    /// Class names that read as an integer (`7`, `07`, `7.0`), by that integer: the first class.
    by_number: HashMap<i64, i64>,
}

impl<'a> Classes<'a> {
    pub(super) fn new(names: Option<&'a [String]>, count: Option<i64>) -> Self {
        let (mut by_name, mut by_number) = (HashMap::new(), HashMap::new());
        for (i, n) in names.unwrap_or_default().iter().enumerate() {
            // The first of repeated names wins.
            by_name.entry(n.as_str()).or_insert(i as i64);
            if let Some(v) = as_integer(n) {
                by_number.entry(v).or_insert(i as i64);
            }
        }
        Classes { names, count: count.or(names.map(|n| n.len() as i64)), by_name, by_number }
    }

    /// The model's class names, if known.
    pub(super) fn names(&self) -> Option<&'a [String]> {
        self.names
    }

    /// The class id of `name`, if it is one of the model's class names.
    pub(super) fn id_of(&self, name: &str) -> Option<i64> {
        self.by_name.get(name).copied()
    }

    /// Whether `id` can be a class id of the model.
    fn in_range(&self, id: i64) -> bool {
        id >= 0 && self.count.is_none_or(|n| id < n)
    }

    /// The class id of `label`, or why it is not a class of the model. Text written exactly as
    /// one of the class names is that class, unless it is also the plain spelling of another
    /// class's id (`7`, where class 7 is not the one named "7"). Otherwise a number, or text
    /// that reads as an integer (`3`, `03`, `3.0`), is a class id, unless a class name reads
    /// as that integer under another id (names `1`, `10`, `11`, … or `01`, `02`, …): then it
    /// is ambiguous. Anything else is a class name.
    pub(super) fn resolve(&self, label: &RawLabel) -> Result<i64, String> {
        match label {
            RawLabel::Id(id) => self.resolve_id(*id, &id.to_string()),
            RawLabel::Text(text) => {
                let as_id = as_integer(text);
                match (self.id_of(text), as_id) {
                    (Some(_), Some(id)) if *text == id.to_string() && self.in_range(id) => self.resolve_id(id, text),
                    (Some(named), _) => Ok(named),
                    (None, Some(id)) => self.resolve_id(id, text),
                    (None, None) => match self.names {
                        Some(names) => Err(format!(
                            "label \"{text}\" is not a class of the model (its classes: {})",
                            preview(names)
                        )),
                        None => Err(format!(
                            "label \"{text}\" is not a class id, and the model's metadata has no class names"
                        )),
                    },
                }
            }
            RawLabel::Other(v) => Err(format!("label {v} is neither a class id nor a class name")),
        }
    }

    /// The class id `id`, written as `shown`, or why it is not a class of the model.
    fn resolve_id(&self, id: i64, shown: &str) -> Result<i64, String> {
        if id < 0 {
            return Err(format!("label {shown} is not a class of the model (class ids start at 0)"));
        }
        if let Some(n) = self.count.filter(|n| id >= *n) {
            return Err(format!("label {shown} is not a class of the model (it has {n} classes: ids 0..{})", n - 1));
        }
        // Class names that are numbers in another order (an ImageFolder of folders 1..102
        // sorts as "1", "10", "100", …; zero-padded "01", "02", … from 0): the label could mean
        // either class.
        match (self.by_number.get(&id), self.names) {
            (Some(&named), Some(names)) if named != id => Err(format!(
                "label {shown} is ambiguous: class id {id} is named \"{}\", but the class named \"{}\" \
                 has id {named}, and a manifest cannot say which it means; write the class's name as \
                 the model names it, or give the model class names that are not numbers in another \
                 order (in its export's metadata)",
                names.get(id as usize).map(String::as_str).unwrap_or("?"),
                names.get(named as usize).map(String::as_str).unwrap_or("?")
            )),
            _ => Ok(id),
        }
    }
}

/// The first few names, quoted, and how many more there are.
fn preview(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s: Vec<String> = names.iter().take(SHOWN).map(|n| format!("\"{n}\"")).collect();
    if names.len() > SHOWN {
        s.push(format!("… {} more", names.len() - SHOWN));
    }
    if s.is_empty() {
        "none".to_owned()
    } else {
        s.join(", ")
    }
}
