//! Command-line overrides, `--section.key=value` or `--section.key value`, applied to the
//! recipe's YAML tree before it is turned into a [`super::Recipe`], so an override is
//! parsed and checked exactly like the same value written in the file.

use anyhow::{bail, Result};
use serde_norway::{Mapping, Value};

/// Pairs up override arguments: `["--peft.r=8", "--step_scheduler.max_steps", "20"]`
/// becomes `[("peft.r", "8"), ("step_scheduler.max_steps", "20")]`.
///
/// In the two-argument form the value may start with a single `-` (`--optimizer.lr -1` is
/// a negative number for validation to reject), but not with `--`, which starts the next
/// override: a missing value is an error rather than a silent swallow of the next flag.
pub fn split_overrides(args: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix("--") else {
            bail!("override `{arg}`: expected `--section.key=value` or `--section.key value`");
        };
        let (key, value) = match body.split_once('=') {
            Some((k, v)) => (k, v.to_string()),
            None => match it.next() {
                Some(v) if !v.starts_with("--") => (body, v.clone()),
                _ => bail!("override `{arg}` has no value: write `{arg}=VALUE` or `{arg} VALUE`"),
            },
        };
        check_key(key).map_err(|e| anyhow::anyhow!("override `{arg}`: {e}"))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// A key is dot-separated names of letters, digits and `_`, like the recipe's own keys.
fn check_key(key: &str) -> Result<()> {
    let valid_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key.split('.').all(valid_part) {
        bail!("`{key}` is not a key path like `peft.r` or `step_scheduler.max_steps`");
    }
    Ok(())
}

/// An override's value read as YAML: `8` is a number, `null` is null, `[q_proj,v_proj]`
/// a list, anything else a string. An empty value is null, as `key:` is in a file.
pub(super) fn parse_value(raw: &str) -> Result<Value> {
    if raw.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_norway::from_str(raw).map_err(|e| anyhow::anyhow!("`{raw}` is not a YAML value: {e}"))
}

/// Sets `key` (dotted) in `root` to `value`, creating the sections on the way.
pub(super) fn set(root: &mut Value, key: &str, value: Value) -> Result<()> {
    check_key(key)?;
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        // `peft:` with nothing under it is null in YAML: an empty section.
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            bail!("`{}` is a value, not a section", parts[..i].join("."));
        };
        let slot = map.entry(Value::String(part.to_string())).or_insert(Value::Null);
        if i + 1 == parts.len() {
            *slot = value;
            return Ok(());
        }
        node = slot;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_both_forms() {
        let got = split_overrides(&args(&[
            "--peft.r=8",
            "--step_scheduler.max_steps",
            "20",
            "--optimizer.lr",
            "-1",
        ]))
        .expect("valid overrides");
        let want = [("peft.r", "8"), ("step_scheduler.max_steps", "20"), ("optimizer.lr", "-1")];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())));
    }

    #[test]
    fn value_may_contain_equals() {
        let got = split_overrides(&args(&["--output_dir=runs/a=b"])).expect("valid override");
        assert_eq!(got, vec![("output_dir".to_string(), "runs/a=b".to_string())]);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &["peft.r=8"][..],
            &["--peft.r"],
            &["--peft.r", "--seed=1"],
            &["--=3"],
            &["--a..b=1"],
            &["--a b=1"],
        ] {
            assert!(split_overrides(&args(bad)).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn set_creates_sections_and_refuses_to_descend_into_values() {
        let mut tree: Value = serde_norway::from_str("peft:\nmodel: {path: m}\n").expect("yaml");
        set(&mut tree, "peft.r", Value::Number(4.into())).expect("set into null section");
        set(&mut tree, "data.filters.max_tokens", Value::Number(9.into())).expect("create sections");
        assert_eq!(tree["peft"]["r"], Value::Number(4.into()));
        assert_eq!(tree["data"]["filters"]["max_tokens"], Value::Number(9.into()));
        let err = set(&mut tree, "model.path.x", Value::Null).expect_err("path is a value");
        assert!(err.to_string().contains("`model.path` is a value"), "{err}");
    }

    #[test]
    fn values_parse_as_yaml() {
        assert_eq!(parse_value("null").expect("null"), Value::Null);
        assert_eq!(parse_value("").expect("empty"), Value::Null);
        assert_eq!(parse_value("8").expect("int"), Value::Number(8.into()));
        assert!(parse_value("3e-3").expect("float").is_f64());
        assert!(parse_value("[q_proj,v_proj]").expect("list").is_sequence());
        assert!(parse_value("[unclosed").is_err());
    }
}
