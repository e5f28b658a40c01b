//! RFC 3339 UTC timestamps with milliseconds (`2026-11-24T09:15:02.117Z`, always 24 characters).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Milliseconds since the epoch, floored (also before 1970).
fn unix_millis(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_nanos() / 1_000_000) as i128,
        Err(e) => (-(e.duration().as_nanos() as i128)).div_euclid(1_000_000),
    }
}

/// Appends the 24-character timestamp. Times outside years 0000..=9999 are clamped.
pub(crate) fn push_timestamp(out: &mut String, t: SystemTime) {
    let min = (days_from_civil(0, 1, 1) * MS_PER_DAY) as i128;
    let max = (days_from_civil(10_000, 1, 1) * MS_PER_DAY) as i128 - 1;
    let ms = unix_millis(t).clamp(min, max) as i64;
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let mut buf = [0u8; 24];
    let put = |buf: &mut [u8; 24], at: usize, width: usize, mut v: i64| {
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(&mut buf, 0, 4, y);
    buf[4] = b'-';
    put(&mut buf, 5, 2, i64::from(mo));
    buf[7] = b'-';
    put(&mut buf, 8, 2, i64::from(d));
    buf[10] = b'T';
    put(&mut buf, 11, 2, h);
    buf[13] = b':';
    put(&mut buf, 14, 2, mi);
    buf[16] = b':';
    put(&mut buf, 17, 2, s);
    buf[19] = b'.';
    put(&mut buf, 20, 3, milli);
    buf[23] = b'Z';
    // All bytes are ASCII.
    out.push_str(std::str::from_utf8(&buf).unwrap_or("0000-00-00T00:00:00.000Z"));
}

/// RFC 3339 UTC with milliseconds and `Z`, always 24 characters (`decisions.md` §1).
/// Sub-millisecond precision is truncated; years outside 0000..=9999 are clamped.
pub fn format_timestamp(t: SystemTime) -> String {
    let mut s = String::with_capacity(24);
    push_timestamp(&mut s, t);
    s
}

/// Parses exactly the form [`format_timestamp`] writes (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |at: usize, width: usize| -> Option<i64> {
        b[at..at + width].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 2)? as u32, num(8, 2)? as u32);
    let (h, mi, sec, ms) = (num(11, 2)?, num(14, 2)?, num(17, 2)?, num(20, 3)?);
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || sec > 59
    {
        return None;
    }
    let total =
        days_from_civil(y, mo, d) * MS_PER_DAY + h * 3_600_000 + mi * 60_000 + sec * 1000 + ms;
    if total >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(total as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(total.unsigned_abs()))
    }
}
