//! Human tables and `--output json`.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints `rows` (JSON objects) as a table of the given (header, JSON pointer) columns,
/// or the whole objects as JSON.
pub fn rows(format: Format, rows: &[Value], cols: &[(&str, &str)]) {
    if format == Format::Json {
        json(&Value::Array(rows.to_vec()));
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(cols.iter().map(|c| c.0));
    for r in rows {
        t.add_row(cols.iter().map(|(_, ptr)| cell(r.pointer(ptr))));
    }
    println!("{t}");
}

/// One object as a two-column table of fields.
pub fn object(format: Format, v: &Value, fields: &[(&str, &str)]) {
    if format == Format::Json {
        json(v);
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    for (name, ptr) in fields {
        t.add_row(vec![name.to_string(), cell(v.pointer(ptr))]);
    }
    println!("{t}");
}

pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    }
}
