//! `Accept` negotiation for refusal bodies (`decisions.md` §3).

/// Splits `input` at `sep` bytes that are outside double-quoted strings (with `\` escapes).
fn split_unquoted(input: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(input);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, &c) in s.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                quoted = !quoted;
            } else if c == sep && !quoted {
                rest = Some(&s[i + 1..]);
                return Some(&s[..i]);
            }
        }
        rest = None;
        Some(s)
    })
}

fn trim(s: &[u8]) -> &[u8] {
    let is_ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n');
    let start = s.iter().position(|c| !is_ws(c)).unwrap_or(s.len());
    let end = s.iter().rposition(|c| !is_ws(c)).map_or(start, |e| e + 1);
    &s[start..end]
}

/// True when a qvalue is a decimal number greater than zero. Malformed values count as zero.
fn q_positive(v: &[u8]) -> bool {
    let v = trim(v);
    let v = v
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(v);
    let (int, frac) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &v[..0]),
    };
    if int.is_empty() || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return false;
    }
    int.iter().chain(frac).any(|&c| c != b'0')
}

/// One media range: `application/json` with no `q` or a positive `q`.
fn range_is_json(range: &[u8]) -> bool {
    let mut parts = split_unquoted(range, b';');
    let media = trim(parts.next().unwrap_or_default());
    let Some(slash) = media.iter().position(|&c| c == b'/') else {
        return false;
    };
    let (ty, sub) = (trim(&media[..slash]), trim(&media[slash + 1..]));
    if !ty.eq_ignore_ascii_case(b"application") || !sub.eq_ignore_ascii_case(b"json") {
        return false;
    }
    for param in parts {
        let param = trim(param);
        let (name, value) = match param.iter().position(|&c| c == b'=') {
            Some(i) => (trim(&param[..i]), &param[i + 1..]),
            None => (param, &param[..0]),
        };
        if name.eq_ignore_ascii_case(b"q") {
            return q_positive(value);
        }
    }
    true
}

/// True when any `Accept` field value contains the media range `application/json` (type and
/// subtype case-insensitive, parameters ignored except `q`, which must be absent or > 0).
/// `*/*` and `application/*` do not count. Never panics on malformed input.
pub fn accepts_json<'a>(accept_values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    accept_values
        .into_iter()
        .any(|value| split_unquoted(value, b',').any(range_is_json))
}
