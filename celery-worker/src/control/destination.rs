//! Which workers a request is for, as Kombu's `Node.handle_message` decides: the ones its
//! `destination` lists; else, with both `pattern` and `matcher`, the ones whose name matches
//! (`glob`: Python's `fnmatch`; `pcre`: Python's `re.match`, anchored at the start only); else
//! every worker. A matcher Kombu does not know, or a pattern that does not compile, answers
//! nothing (Kombu raises before dispatching, so no reply is sent).

use serde_json::Value;

/// The longest `pattern` accepted.
pub(crate) const MAX_PATTERN: usize = 1024;

/// Why a request's addressing cannot be evaluated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AddressError {
    /// Kombu's `MatcherNotInstalled`.
    #[error("No matcher installed for {0}")]
    UnknownMatcher(String),
    /// The pattern is too long or does not compile.
    #[error("invalid pattern: {0}")]
    Pattern(String),
}

/// True when the request `body` is meant for `hostname`.
pub(crate) fn meant_for(body: &Value, hostname: &str) -> Result<bool, AddressError> {
    let nonempty = |v: &Value| match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    };
    let destination = &body["destination"];
    if nonempty(destination) {
        return Ok(match destination {
            Value::Array(names) => names.iter().any(|n| n.as_str() == Some(hostname)),
            // Python's `in` on a string: a substring test.
            Value::String(s) => s.contains(hostname),
            _ => false,
        });
    }
    let (pattern, matcher) = (&body["pattern"], &body["matcher"]);
    if !(nonempty(pattern) && nonempty(matcher)) {
        return Ok(true);
    }
    let (Some(pattern), Some(matcher)) = (pattern.as_str(), matcher.as_str()) else {
        return Err(AddressError::Pattern("pattern and matcher must be strings".into()));
    };
    if pattern.len() > MAX_PATTERN {
        return Err(AddressError::Pattern(format!("longer than {MAX_PATTERN} bytes")));
    }
    match matcher {
        "glob" => Ok(fnmatch(hostname, pattern)),
        "pcre" => {
            let re = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| AddressError::Pattern(e.to_string()))?;
            Ok(re.find(hostname).is_some_and(|m| m.start() == 0))
        }
        other => Err(AddressError::UnknownMatcher(other.to_owned())),
    }
}

/// Python's `fnmatch.fnmatchcase`: `*` any run, `?` one character, `[seq]` and `[!seq]` sets
/// (with ranges); anything else literally. Linear in practice: one backtracking point.
pub(crate) fn fnmatch(name: &str, pattern: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < n.len() {
        if j < p.len() {
            match p[j] {
                '*' => {
                    star = Some((j, i));
                    j += 1;
                    continue;
                }
                '?' => {
                    i += 1;
                    j += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(&p, j, n[i]) {
                        if matched {
                            i += 1;
                            j = next;
                            continue;
                        }
                    } else if n[i] == '[' {
                        // An unclosed `[` is a literal.
                        i += 1;
                        j += 1;
                        continue;
                    }
                }
                c if c == n[i] => {
                    i += 1;
                    j += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sj, si)) => {
                star = Some((sj, si + 1));
                i = si + 1;
                j = sj + 1;
            }
            None => return false,
        }
    }
    p[j..].iter().all(|c| *c == '*')
}

/// The set `[...]` starting at `p[start]` against `c`: whether it matches and where the pattern
/// goes on; `None` when it is not closed.
fn class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut k = start + 1;
    let negate = p.get(k) == Some(&'!');
    if negate {
        k += 1;
    }
    let first = k;
    let mut matched = false;
    while k < p.len() && (p[k] != ']' || k == first) {
        if k + 2 < p.len() && p[k + 1] == '-' && p[k + 2] != ']' {
            matched |= p[k] <= c && c <= p[k + 2];
            k += 3;
        } else {
            matched |= p[k] == c;
            k += 1;
        }
    }
    (k < p.len()).then_some((matched != negate, k + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn destination_pattern_and_everyone() {
        let yes = |b: Value| meant_for(&b, "celery@web1").unwrap();
        assert!(yes(json!({"destination": null})));
        assert!(yes(json!({"destination": []})), "an empty list is no destination");
        assert!(yes(json!({"destination": ["celery@web1", "x"]})));
        assert!(!yes(json!({"destination": ["celery@web2"]})));
        assert!(yes(json!({"destination": "celery@web1,celery@web2"})), "Python's `in` on a string");
        assert!(yes(json!({"pattern": "celery@web*", "matcher": "glob"})));
        assert!(!yes(json!({"pattern": "celery@db*", "matcher": "glob"})));
        assert!(yes(json!({"pattern": "celery@web*", "matcher": null})), "a pattern alone is ignored");
        assert!(yes(json!({"pattern": r"celery@web\d", "matcher": "pcre"})));
        assert!(yes(json!({"pattern": "celery", "matcher": "pcre"})), "re.match anchors at the start only");
        assert!(!yes(json!({"pattern": "web", "matcher": "pcre"})));
        assert!(matches!(
            meant_for(&json!({"pattern": "x", "matcher": "soundex"}), "a"),
            Err(AddressError::UnknownMatcher(_))
        ));
        assert!(meant_for(&json!({"pattern": "(", "matcher": "pcre"}), "a").is_err());
        let long = "a".repeat(MAX_PATTERN + 1);
        assert!(meant_for(&json!({"pattern": long, "matcher": "glob"}), "a").is_err());
    }

    #[test]
    fn fnmatch_as_python() {
        for (name, pat, want) in [
            ("celery@web1", "celery@*", true),
            ("celery@web1", "*@web?", true),
            ("celery@web1", "*@web", false),
            ("celery@web1", "celery@web[0-9]", true),
            ("celery@webx", "celery@web[!0-9]", true),
            ("celery@web1", "celery@web[!0-9]", false),
            ("a]", "a[]]", true),
            ("a[", "a[", true),
            ("", "*", true),
            ("abc", "a*b*c*", true),
            ("abd", "a*c", false),
        ] {
            assert_eq!(fnmatch(name, pat), want, "{name} ~ {pat}");
        }
    }
}
