//! Names the registry accepts (agents, versions, aliases), UTC timestamps and the
//! default author of a change.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

/// Agent names become directory names, so they must be safe as one path component on
/// every OS: `[A-Za-z0-9_.-]+`, and not starting with `.` (which would allow `..` and
/// would collide with the hidden temp and lock entries).
pub fn check_agent(name: &str) -> Result<()> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.is_empty() || !ok_chars {
        bail!("agent name `{name}` is not valid: use letters, digits, `_`, `.` and `-` only");
    }
    if name.starts_with('.') {
        bail!("agent name `{name}` is not valid: it must not start with `.`");
    }
    Ok(())
}

/// `v1`, `v2`, ... as a number; `None` for anything else (`v0`, `v01`, `latest`).
pub fn version_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix('v')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn check_version(name: &str) -> Result<u32> {
    match version_number(name) {
        Some(n) => Ok(n),
        None => bail!("`{name}` is not a version name (expected v1, v2, ...)"),
    }
}

/// Aliases are `[a-z0-9_-]+`. A name shaped like a version (`v3`) is refused, since
/// `resolve` takes either and must never have to guess which one was meant.
pub fn check_alias(name: &str) -> Result<()> {
    let ok_chars =
        name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if name.is_empty() || !ok_chars {
        bail!("alias `{name}` is not valid: use lowercase letters, digits, `_` and `-` only");
    }
    if version_number(name).is_some() {
        bail!("alias `{name}` is not valid: it reads as a version name");
    }
    Ok(())
}

/// `2026-11-25T03:29:21Z`: RFC 3339 in UTC, whole seconds.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::util::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub fn now_rfc3339() -> String {
    rfc3339_utc(SystemTime::now())
}

/// Who to record when the caller names no one: `$USER`, `$LOGNAME` (cron, some
/// containers) or `$USERNAME` (Windows), else `unknown`.
pub fn current_user() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names() {
        for ok in ["order-help", "a", "A_b.c-9"] {
            check_agent(ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é"] {
            assert!(check_agent(bad).is_err(), "{bad}");
        }
        assert_eq!(version_number("v12"), Some(12));
        for bad in ["v0", "v01", "v", "12", "V1", "v1a", "v-1"] {
            assert_eq!(version_number(bad), None, "{bad}");
        }
        check_alias("production").unwrap();
        check_alias("canary-2").unwrap();
        for bad in ["", "Prod", "v2", "a.b", "a/b"] {
            assert!(check_alias(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!(rfc3339_utc(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_577_361);
        assert_eq!(rfc3339_utc(t), "2026-11-25T03:29:21Z");
    }
}
