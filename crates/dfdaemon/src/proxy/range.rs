//! `Range` request headers (RFC 9110 §14): what the proxy answers itself from a task's
//! content (one range), and what it leaves to the origin (several ranges).

/// A `Range` header as the client sent it, before the content length is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=first-` or `bytes=first-last`.
    FromTo { first: u64, last: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
    /// Several ranges: passed through to the origin (it builds the multipart body).
    Multi,
}

/// What a single range is against a content of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Bytes `start..end` (end exclusive, never empty).
    Bytes { start: u64, end: u64 },
    /// 416: no byte of the content lies in the range.
    Unsatisfiable,
}

/// Why a header is not a byte range we understand. Such a header is ignored, as RFC 9110
/// lets a server do, and the whole content is answered with 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unparsable;

/// Parses a `Range` header value.
pub fn parse(value: &str) -> Result<RangeRequest, Unparsable> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or(Unparsable)?
        .trim();
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() > 1 {
        // Every part must still be well-formed; a multipart answer is the origin's job.
        for part in &parts {
            parse_one(part)?;
        }
        return Ok(RangeRequest::Multi);
    }
    parse_one(parts[0])
}

fn number(s: &str) -> Result<u64, Unparsable> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Unparsable);
    }
    s.parse().map_err(|_| Unparsable)
}

fn parse_one(part: &str) -> Result<RangeRequest, Unparsable> {
    let (first, last) = part.split_once('-').ok_or(Unparsable)?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return Ok(RangeRequest::Suffix(number(last)?));
    }
    let first = number(first)?;
    let last = if last.is_empty() {
        None
    } else {
        let last = number(last)?;
        if last < first {
            return Err(Unparsable);
        }
        Some(last)
    };
    Ok(RangeRequest::FromTo { first, last })
}

impl RangeRequest {
    /// The bytes a single range covers in a content of `len` bytes.
    pub fn resolve(&self, len: u64) -> Option<Resolved> {
        match *self {
            RangeRequest::Multi => None,
            RangeRequest::FromTo { first, last } => Some(if first >= len {
                Resolved::Unsatisfiable
            } else {
                let end = last.map_or(len, |l| l.saturating_add(1).min(len));
                Resolved::Bytes { start: first, end }
            }),
            RangeRequest::Suffix(n) => Some(if n == 0 || len == 0 {
                Resolved::Unsatisfiable
            } else {
                Resolved::Bytes {
                    start: len - n.min(len),
                    end: len,
                }
            }),
        }
    }
}

/// The `Content-Range` value of a 206 answer.
pub fn content_range(start: u64, end: u64, len: u64) -> String {
    format!("bytes {start}-{}/{len}", end - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        use RangeRequest::*;
        let cases: [(&str, Result<RangeRequest, Unparsable>); 12] = [
            (
                "bytes=0-0",
                Ok(FromTo {
                    first: 0,
                    last: Some(0),
                }),
            ),
            (
                "bytes=10-",
                Ok(FromTo {
                    first: 10,
                    last: None,
                }),
            ),
            (
                "bytes=5-9",
                Ok(FromTo {
                    first: 5,
                    last: Some(9),
                }),
            ),
            (
                " bytes= 5 - 9 ",
                Ok(FromTo {
                    first: 5,
                    last: Some(9),
                }),
            ),
            ("bytes=-100", Ok(Suffix(100))),
            ("bytes=0-1,4-5", Ok(Multi)),
            ("bytes=0-1,x", Err(Unparsable)),
            ("bytes=9-5", Err(Unparsable)),
            ("items=0-5", Err(Unparsable)),
            ("bytes=-", Err(Unparsable)),
            ("bytes=+1-2", Err(Unparsable)),
            ("bytes=99999999999999999999999-", Err(Unparsable)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse(value), expected, "{value}");
        }
    }

    #[test]
    fn resolve_table() {
        use Resolved::*;
        let len = 100;
        let cases = [
            ("bytes=0-0", Some(Bytes { start: 0, end: 1 })),
            ("bytes=0-", Some(Bytes { start: 0, end: 100 })),
            (
                "bytes=90-200",
                Some(Bytes {
                    start: 90,
                    end: 100,
                }),
            ),
            (
                "bytes=99-99",
                Some(Bytes {
                    start: 99,
                    end: 100,
                }),
            ),
            ("bytes=100-", Some(Unsatisfiable)),
            (
                "bytes=-10",
                Some(Bytes {
                    start: 90,
                    end: 100,
                }),
            ),
            ("bytes=-1000", Some(Bytes { start: 0, end: 100 })),
            ("bytes=-0", Some(Unsatisfiable)),
            ("bytes=0-1,3-4", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse(value).unwrap().resolve(len), expected, "{value}");
        }
        assert_eq!(
            parse("bytes=0-").unwrap().resolve(0),
            Some(Unsatisfiable),
            "nothing to send of an empty content"
        );
        assert_eq!(content_range(90, 100, 100), "bytes 90-99/100");
    }
}
