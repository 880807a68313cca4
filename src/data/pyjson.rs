//! Python's `json.dumps` and `repr` over template values.
//!
//! HF chat templates run under Jinja2, so whatever a template prints goes through Python:
//! `tojson` is `json.dumps(x, ensure_ascii=False, ...)` and `{{ x }}` is `str(x)`. A model
//! was trained on exactly those bytes, so the spacing of separators, the spelling of
//! floats and of `None`/`True` must match Python, not serde_json or MiniJinja defaults.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};
use std::fmt::Write;

/// The options of Python's `json.dumps` that HF's `tojson` filter passes through.
#[derive(Debug, Clone)]
pub struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: everything on one line; `Some(s)`: newline plus `s` per nesting level.
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// Python's defaults for the given indent: `", "` between items on one line, `","`
    /// once items go on their own lines; `": "` after keys either way.
    pub fn new(indent: Option<String>) -> Self {
        let item_sep = if indent.is_some() { "," } else { ", " };
        JsonOptions {
            ensure_ascii: false,
            indent,
            item_sep: item_sep.to_string(),
            key_sep: ": ".to_string(),
            sort_keys: false,
        }
    }
}

/// `json.dumps(value, **opts)`.
pub fn dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, value, opts, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, opts: &JsonOptions, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_json(value)?),
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, opts, depth, |out, item, depth| {
                write_json(out, item, opts, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                // Rust orders `str` by UTF-8 bytes, which is Python's code-point order.
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', &entries, opts, depth, |out, (key, item), depth| {
                write_json_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, depth)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Writes `[a, b]` / `{...}` with Python's layout: empty containers stay `[]` even when
/// indenting, otherwise each item goes on its own line one level deeper.
fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    opts: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        newline(out, depth + 1);
        write_item(out, item, depth + 1)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// Python converts non-string dict keys to their JSON spelling before writing them.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number | ValueKind::Bool | ValueKind::None => {
            let mut s = String::new();
            write_json(&mut s, key, &JsonOptions::new(None), 0)?;
            Ok(s)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => push_u_escape(out, c as u32),
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_u_escape(out, u32::from(*unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_u_escape(out: &mut String, unit: u32) {
    let _ = write!(out, "\\u{unit:04x}");
}

/// JSON spelling of a number: integers in full, floats as Python's `float.__repr__`,
/// and Python's non-standard `NaN` / `Infinity` (json.dumps allows them by default).
fn number_json(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        return Ok(integer_str(value));
    }
    let f = f64::try_from(value.clone())?;
    Ok(if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        float_repr(f)
    })
}

fn integer_str(value: &Value) -> String {
    match i128::try_from(value.clone()) {
        Ok(i) => i.to_string(),
        // Only u128 values above i128::MAX land here; their Display is plain digits.
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip (Rust finds the same
/// ones), in fixed notation when the decimal exponent is in -4 <= e < 16, otherwise
/// scientific with a signed, at least two-digit exponent (`1e+16`, `1e-05`).
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let (int_part, frac_part) = if point <= 0 {
            let zeros = "0".repeat(point.unsigned_abs() as usize);
            ("0".to_string(), format!("{zeros}{digits}"))
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            (format!("{digits}{zeros}"), String::new())
        } else {
            let (a, b) = digits.split_at(point as usize);
            (a.to_string(), b.to_string())
        };
        let frac_part = if frac_part.is_empty() { "0".to_string() } else { frac_part };
        format!("{sign}{int_part}.{frac_part}")
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

/// Python's `str(x)` for what a template prints with `{{ x }}`; `None` for kinds that
/// print the same in both languages (strings, undefined), which the caller leaves to
/// MiniJinja.
pub fn python_str(value: &Value) -> Option<String> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            Some(python_repr(value))
        }
        _ => None,
    }
}

/// Python's `repr(x)`, which is also how containers print their items.
pub fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number if value.is_integer() => integer_str(value),
        ValueKind::Number => f64::try_from(value.clone()).map(float_repr).unwrap_or_default(),
        ValueKind::String => str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let items: Vec<String> = match value.try_iter() {
                Ok(iter) => iter.map(|v| python_repr(&v)).collect(),
                Err(_) => Vec::new(),
            };
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = match value.try_iter() {
                Ok(iter) => iter
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        format!("{}: {}", python_repr(&k), python_repr(&v))
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            format!("{{{}}}", items.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; escapes for
/// backslash, the quote, `\t\n\r` and control characters. Python also escapes other
/// non-printable code points (format characters, separators); only the common ones are
/// covered here.
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `str.isspace()`: Unicode White_Space plus the ASCII information separators
/// U+001C..U+001F, which Rust's `char::is_whitespace` leaves out.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn dumps_matches_python_defaults() {
        let v = json(r#"{"b": [1, 2.5, "é\"\n\u0001"], "a": {"x": null, "y": true}, "e": []}"#);
        let got = dumps(&v, &JsonOptions::new(None)).unwrap();
        assert_eq!(got, r#"{"b": [1, 2.5, "é\"\n\u0001"], "a": {"x": null, "y": true}, "e": []}"#);
    }

    #[test]
    fn dumps_indent_sort_and_ascii() {
        let v = json(r#"{"b": [1, {}], "a": "東"}"#);
        let mut opts = JsonOptions::new(Some("  ".to_string()));
        opts.sort_keys = true;
        opts.ensure_ascii = true;
        let got = dumps(&v, &opts).unwrap();
        assert_eq!(got, "{\n  \"a\": \"\\u6771\",\n  \"b\": [\n    1,\n    {}\n  ]\n}");
    }

    #[test]
    fn floats_print_like_python() {
        let cases = [
            (0.1, "0.1"),
            (12.0, "12.0"),
            (-0.0, "-0.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (1e100, "1e+100"),
            (123.456, "123.456"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn repr_of_containers() {
        let v = json(r#"{"a": [1, null, true, "it's"], "b": 2.0}"#);
        assert_eq!(python_repr(&v), r#"{'a': [1, None, True, "it's"], 'b': 2.0}"#);
    }
}
