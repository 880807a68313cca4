//! `strftime_now(format)`, the one clock HF chat templates may read (Llama 3.x prints
//! "Today Date: 26 Jul 2024" with it). Python formats local time with C-locale names; this
//! formats UTC, which is what training hosts and containers usually run on, so no time
//! zone database is needed.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday
    pub weekday: u32,
    /// 1..=366
    pub yearday: u32,
}

impl DateTime {
    pub fn now_utc() -> Self {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        Self::from_unix(secs)
    }

    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = crate::util::civil_from_days(days);
        let jan1 = days_from_civil(year, 1, 1);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday (3 when Monday is 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            yearday: (days - jan1 + 1) as u32,
        }
    }

    /// Formats like glibc's strftime in the C locale, including the `%-d` (no padding)
    /// extension; unknown directives are written through unchanged, as glibc does.
    pub fn format(&self, fmt: &str) -> String {
        let mut out = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let no_pad = chars.peek() == Some(&'-');
            if no_pad {
                chars.next();
            }
            let Some(d) = chars.next() else {
                out.push('%');
                break;
            };
            let num = |n: u32, width: usize| {
                if no_pad {
                    n.to_string()
                } else {
                    format!("{n:0width$}")
                }
            };
            let hour12 = if self.hour % 12 == 0 { 12 } else { self.hour % 12 };
            let day_name = DAYS[self.weekday as usize % 7];
            let month_name = MONTHS[(self.month as usize + 11) % 12];
            match d {
                'a' => out.push_str(&day_name[..3]),
                'A' => out.push_str(day_name),
                'b' | 'h' => out.push_str(&month_name[..3]),
                'B' => out.push_str(month_name),
                'd' => out.push_str(&num(self.day, 2)),
                'e' => out.push_str(&format!("{:2}", self.day)),
                'm' => out.push_str(&num(self.month, 2)),
                'y' => out.push_str(&num(self.year.rem_euclid(100) as u32, 2)),
                'Y' => out.push_str(&self.year.to_string()),
                'H' => out.push_str(&num(self.hour, 2)),
                'I' => out.push_str(&num(hour12, 2)),
                'M' => out.push_str(&num(self.minute, 2)),
                'S' => out.push_str(&num(self.second, 2)),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'j' => out.push_str(&num(self.yearday, 3)),
                'u' => out.push_str(&(self.weekday + 1).to_string()),
                'w' => out.push_str(&((self.weekday + 1) % 7).to_string()),
                'F' => out.push_str(&format!("{}-{:02}-{:02}", self.year, self.month, self.day)),
                'T' => out.push_str(&format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)),
                'D' => out.push_str(&format!(
                    "{:02}/{:02}/{:02}",
                    self.month,
                    self.day,
                    self.year.rem_euclid(100)
                )),
                'Z' => out.push_str("UTC"),
                'z' => out.push_str("+0000"),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '%' => out.push('%'),
                other => {
                    out.push('%');
                    if no_pad {
                        out.push('-');
                    }
                    out.push(other);
                }
            }
        }
        out
    }
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_known_instant() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = DateTime::from_unix(1_721_999_109);
        assert_eq!(t.format("%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            t.format("%A %B %-d, %H:%M:%S %p %j %y %I %q"),
            "Friday July 26, 13:05:09 PM 208 24 01 %q"
        );
        let epoch = DateTime::from_unix(0);
        assert_eq!(epoch.format("%Y-%m-%d %a %j"), "1970-01-01 Thu 001");
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!(leap.format("%F"), "2000-02-29");
    }
}
