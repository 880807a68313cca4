//! A MiniJinja environment that renders HF chat templates the way transformers' Jinja2
//! environment does (`ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])` plus its `tojson`,
//! `raise_exception` and `strftime_now`), and the rewrite that lets MiniJinja run the
//! `{% generation %}` tag HF's AssistantTracker adds.

use super::pyjson::{self, is_python_space, JsonOptions};
use super::strftime::DateTime;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Rest, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind, State, Value};

/// The filter a `{% generation %}` block becomes. Its output is found again by the
/// source span of this name (see `template::ChatTemplate::render`).
pub const GENERATION_FILTER: &str = "__tuneloop_generation__";

/// Builds the environment. Keep `keep_trailing_newline` off as Jinja2's default is: a
/// single newline at the very end of the template source is dropped.
pub fn environment() -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).keep_trailing_newline(false).build()?,
    );
    env.set_unknown_method_callback(unknown_method);
    env.set_formatter(|out, state, value| match pyjson::python_str(value) {
        Some(s) => out.write_str(&s).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", tojson);
    env.add_filter("trim", trim);
    env.add_filter("string", |v: Value| match pyjson::python_str(&v) {
        Some(s) => Value::from(s),
        None => Value::from(v.to_string()),
    });
    env.add_filter(GENERATION_FILTER, |body: Value| body);
    env.add_function("raise_exception", |message: Value| -> Result<Value, Error> {
        let message = message.as_str().map(str::to_string).unwrap_or_else(|| message.to_string());
        Err(Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: &str| DateTime::now_utc().format(format));
    Ok(env)
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
/// is `json.dumps` with those arguments, positional or by keyword. Jinja2's own filter
/// (and MiniJinja's) HTML-escape `<>&'`, which would change what the model sees.
fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    let args: Vec<Value> = args.0.into_iter().map(ValueOrKwargs::into_value).collect();
    type Args = (Option<Value>, Option<Value>, Option<Value>, Option<Value>, Kwargs);
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(&args)?;
    let arg = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        let by_name: Option<Value> = kwargs.get(name)?;
        match (positional, by_name) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson got multiple values for argument '{name}'"),
            )),
            (p, n) => Ok(p.or(n).filter(|v| !v.is_none() && !v.is_undefined())),
        }
    };
    let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?;
    let indent = arg(indent, "indent")?;
    let separators = arg(separators, "separators")?;
    let sort_keys = arg(sort_keys, "sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        // Python: `' ' * indent`, so True is one space and negatives are none.
        Some(v) => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
    };
    let mut opts = JsonOptions::new(indent);
    opts.ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    opts.sort_keys = sort_keys.is_some_and(|v| v.is_true());
    if let Some(seps) = separators {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                opts.item_sep = item.as_str().unwrap_or_default().to_string();
                opts.key_sep = key.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be a pair of strings",
                ))
            }
        }
    }
    pyjson::dumps(value, &opts).map(Value::from)
}

/// Jinja2's `trim` is `str(value).strip(chars)`: non-strings print as Python would,
/// and Python's notion of whitespace is slightly wider than Rust's.
fn trim(value: &Value, chars: Option<&str>) -> String {
    let text = match value.as_str() {
        Some(s) => s.to_string(),
        None => pyjson::python_str(value).unwrap_or_else(|| value.to_string()),
    };
    match chars {
        Some(chars) => text.trim_matches(|c| chars.contains(c)).to_string(),
        None => text.trim_matches(is_python_space).to_string(),
    }
}

/// Python's string and dict methods (`.strip()`, `.items()`, `.startswith()` ...)
/// through minijinja-contrib, with the argument-less strips using Python whitespace.
fn unknown_method(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let (Some(s), true) = (value.as_str(), args.is_empty()) {
        match method {
            "strip" => return Ok(Value::from(s.trim_matches(is_python_space))),
            "lstrip" => return Ok(Value::from(s.trim_start_matches(is_python_space))),
            "rstrip" => return Ok(Value::from(s.trim_end_matches(is_python_space))),
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` into a filter block
/// (`{% filter GENERATION_FILTER %}` / `{% endfilter %}`), keeping the tags'
/// whitespace-control signs, so trim_blocks/lstrip_blocks treat them exactly as Jinja2
/// treats HF's block tag. Returns the new source and whether any tag was found.
/// Comments, `{% raw %}` blocks and string literals inside tags are skipped.
pub fn rewrite_generation_tags(src: &str) -> (String, bool) {
    let mut out = String::with_capacity(src.len());
    let mut found = false;
    let mut rest = src;
    while let Some(pos) = rest.find('{') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        if rest.starts_with("{#") {
            let end = rest.find("#}").map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        } else if rest.starts_with("{{") {
            let end = tag_end(rest, "}}");
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        } else if rest.starts_with("{%") {
            let end = tag_end(rest, "%}");
            let tag = &rest[..end];
            let (word, word_start) = tag_word(tag);
            match word {
                "generation" | "endgeneration" => {
                    found = true;
                    let replacement = if word == "generation" {
                        format!("filter {GENERATION_FILTER}")
                    } else {
                        "endfilter".to_string()
                    };
                    out.push_str(&tag[..word_start]);
                    out.push_str(&replacement);
                    out.push_str(&tag[word_start + word.len()..]);
                    rest = &rest[end..];
                }
                "raw" => {
                    let body_end = find_endraw(&rest[end..]).map_or(rest.len(), |e| end + e);
                    out.push_str(&rest[..body_end]);
                    rest = &rest[body_end..];
                }
                _ => {
                    out.push_str(tag);
                    rest = &rest[end..];
                }
            }
        } else {
            out.push('{');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    (out, found)
}

/// The byte index just past the `close` delimiter of the tag starting at `s[0]`,
/// skipping quoted strings (which may contain the delimiter); `s.len()` if unclosed.
fn tag_end(s: &str, close: &str) -> usize {
    let bytes = s.as_bytes();
    let mut i = 2;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if s[i..].starts_with(close) => return i + close.len(),
            None => {}
        }
        i += 1;
    }
    s.len()
}

/// The first word of a `{% ... %}` tag and its byte offset in the tag.
fn tag_word(tag: &str) -> (&str, usize) {
    let inner = &tag[2..];
    let skip_sign = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let trimmed = skip_sign.trim_start();
    let start = tag.len() - trimmed.len();
    let len = trimmed.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(trimmed.len());
    (&trimmed[..len], start)
}

/// Offset of the start of the `{% endraw %}` tag in `s`.
fn find_endraw(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = s[from..].find("{%") {
        let at = from + pos;
        let end = tag_end(&s[at..], "%}");
        if tag_word(&s[at..at + end]).0 == "endraw" {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn render(src: &str, ctx: Value) -> Result<String, Error> {
        environment()?.render_str(src, ctx)
    }

    #[test]
    fn rewrites_generation_tags_only() {
        let src = "{# {% generation %} #}{{ '{% generation %}' }}{%- generation -%}x{% endgeneration %}{% raw %}{% generation %}{% endraw %}";
        let (out, found) = rewrite_generation_tags(src);
        assert!(found);
        assert_eq!(
            out,
            format!(
                "{{# {{% generation %}} #}}{{{{ '{{% generation %}}' }}}}{{%- filter {GENERATION_FILTER} -%}}x{{% endfilter %}}{{% raw %}}{{% generation %}}{{% endraw %}}"
            )
        );
        assert!(!rewrite_generation_tags("{% if a %}{% endif %}").1);
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let v: Value = serde_json::from_str(r#"{"a": "<é>", "b": [1.0, 2]}"#).unwrap();
        let ctx = context! { v };
        assert_eq!(render("{{ v|tojson }}", ctx.clone()).unwrap(), r#"{"a": "<é>", "b": [1.0, 2]}"#);
        assert_eq!(
            render("{{ v|tojson(indent=2) }}", ctx.clone()).unwrap(),
            "{\n  \"a\": \"<é>\",\n  \"b\": [\n    1.0,\n    2\n  ]\n}"
        );
        assert_eq!(
            render("{{ v|tojson(separators=(',', ':'), ensure_ascii=true) }}", ctx).unwrap(),
            r#"{"a":"<\u00e9>","b":[1.0,2]}"#
        );
    }

    #[test]
    fn python_semantics_for_printing_and_strings() {
        let ctx = context! { n => Value::from(()), t => true, s => " x\u{1f}", f => 2.0 };
        assert_eq!(render("[{{ n|trim }}]", ctx.clone()).unwrap(), "[None]");
        assert_eq!(render("{{ n }} {{ t }} {{ f }}", ctx.clone()).unwrap(), "None True 2.0");
        assert_eq!(
            render("[{{ s|trim }}][{{ s.strip() }}][{{ 'ab'.startswith('a') }}]", ctx).unwrap(),
            "[x][x][True]"
        );
        let err = render("{{ raise_exception('bad role') }}", context! {}).unwrap_err();
        assert!(err.to_string().contains("bad role"), "{err}");
    }

    #[test]
    fn whitespace_follows_hf_settings() {
        let src = "{% for x in xs %}\n  {% if x %}\n{{ x }}\n  {% endif %}\n{% endfor %}\n";
        let out = render(src, context! { xs => vec![1, 2] }).unwrap();
        assert_eq!(out, "1\n2\n");
    }
}
