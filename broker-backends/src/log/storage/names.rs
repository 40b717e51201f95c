//! Names that become paths. Every queue and stream group name passes [`component`] before it is
//! joined to a directory: one validation and one encoding for all of them.
//!
//! The encoding keeps `[A-Za-z0-9._-]` and writes every other byte as `%XX`, and a leading `.` too,
//! so an encoded name is never `.`, `..` or a hidden entry, never holds a `/`, and two distinct
//! names never share a path (the encoding is reversible: [`decode`]). Empty names and names longer
//! than [`MAX_ENCODED`] bytes once encoded are refused with an error that names them.

use std::path::{Component, Path, PathBuf};

use super::error::LogError;

/// The longest encoded name: room for `.dead` and a temporary prefix under the usual 255-byte
/// limit of a file name.
pub(crate) const MAX_ENCODED: usize = 200;

/// The directory entry for `name` (a `what`: "queue", "stream group"), or why there is none.
pub(crate) fn component(what: &'static str, name: &str) -> Result<String, LogError> {
    let bad = |reason: String| LogError::InvalidName { what, name: shown(name), reason };
    if name.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        if out.len() > MAX_ENCODED {
            return Err(bad(format!("it is too long (at most {MAX_ENCODED} bytes once encoded)")));
        }
    }
    Ok(out)
}

/// `parent/<component(name)>`, checked to stay inside `parent`.
pub(crate) fn child(parent: &Path, what: &'static str, name: &str) -> Result<PathBuf, LogError> {
    let c = component(what, name)?;
    // The encoding guarantees it; checked anyway, so no future change to it can escape `parent`.
    let mut parts = Path::new(&c).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(parent.join(c)),
        _ => Err(LogError::InvalidName { what, name: shown(name), reason: "it is not a plain file name".into() }),
    }
}

/// The name a directory entry encodes, if it is one [`component`] made (or an older version's
/// encoding, which kept a leading `.`).
pub(crate) fn decode(entry: &str) -> Option<String> {
    let b = entry.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// A name as shown in an error: escaped, and cut at 100 characters.
fn shown(name: &str) -> String {
    let mut s: String = name.chars().take(100).collect::<String>().escape_debug().collect();
    if name.chars().count() > 100 {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_inside_and_distinct() {
        let names = [".", "..", "0", "%2E", "a/b", "../x", "a.b", ".hidden", "é", "a b", "a%b", "\0", "a\\b"];
        let encoded: Vec<String> = names.iter().map(|n| component("queue", n).unwrap()).collect();
        for (n, e) in names.iter().zip(&encoded) {
            assert!(!e.starts_with('.') && !e.contains('/') && !e.contains('\0'), "{n:?} -> {e}");
            assert_eq!(decode(e).as_deref(), Some(*n), "{n:?} -> {e} round trip");
            let p = child(Path::new("/data/topics"), "queue", n).unwrap();
            assert_eq!(p.parent(), Some(Path::new("/data/topics")), "{n:?} -> {}", p.display());
        }
        let mut unique = encoded.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), encoded.len(), "distinct names share a path: {encoded:?}");
        assert_eq!(component("queue", "celery.dead").unwrap(), "celery.dead", "usual names are unchanged");
    }

    #[test]
    fn empty_and_long_names_are_refused_by_name() {
        let err = component("queue", "").unwrap_err().to_string();
        assert!(err.contains("queue") && err.contains("empty"), "{err}");
        assert!(component("queue", &"a".repeat(MAX_ENCODED)).is_ok());
        let err = component("stream group", &"a".repeat(MAX_ENCODED + 1)).unwrap_err().to_string();
        assert!(err.contains("stream group") && err.contains("too long"), "{err}");
        // Multi-byte characters take three bytes each once encoded.
        assert!(component("queue", &"é".repeat(40)).is_err());
        assert!(decode("%zz").is_none() && decode("%4").is_none() && decode("").is_none());
    }
}
