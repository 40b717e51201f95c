//! A request's `arguments`, read in every form Celery's clients send them (`celery` CLI, Python's
//! `app.control`, Flower): numbers as numbers or strings, flags as `true`, `1` or `"true"`, ids as
//! one string or a list. What does not fit becomes the error a Python worker's handler raises,
//! answered as Kombu's dispatch does: `{"error": repr(exc)}`.

use serde_json::Value;

/// The most task ids (or stamp values) one request may name.
pub(crate) const MAX_IDS: usize = 10_000;

/// A Python exception as a control reply carries it: `TypeError("...")`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.repr())]
pub(crate) struct PyError {
    kind: &'static str,
    message: String,
}

impl PyError {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> PyError {
        PyError { kind, message: message.into() }
    }

    /// `KeyError('name')`: an unknown method.
    pub(crate) fn key(name: &str) -> PyError {
        PyError::new("KeyError", name)
    }

    pub(crate) fn value(message: impl Into<String>) -> PyError {
        PyError::new("ValueError", message)
    }

    pub(crate) fn type_error(message: impl Into<String>) -> PyError {
        PyError::new("TypeError", message)
    }

    /// Python's `repr(exc)`.
    pub(crate) fn repr(&self) -> String {
        format!("{}({})", self.kind, py_str(&self.message))
    }
}

/// Python's `repr(str)`: single quotes unless the text has one and no double quote.
pub(crate) fn py_str(s: &str) -> String {
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
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The arguments of one call of `method`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Args<'a> {
    method: &'a str,
    args: &'a Value,
}

impl<'a> Args<'a> {
    pub(crate) fn new(method: &'a str, args: &'a Value) -> Args<'a> {
        Args { method, args }
    }

    /// The value of `name`, if given and not null.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Value> {
        self.args.get(name).filter(|v| !v.is_null())
    }

    /// `name`, which the handler requires (Python's missing-argument `TypeError` otherwise).
    pub(crate) fn required(&self, name: &str) -> Result<&'a Value, PyError> {
        self.get(name).ok_or_else(|| {
            PyError::type_error(format!("{}() missing 1 required positional argument: '{name}'", self.method))
        })
    }

    /// A text argument (a number is taken as its text, as Python's `str(x)`).
    pub(crate) fn text(&self, name: &str) -> Result<Option<String>, PyError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(if *b { "True" } else { "False" }.into())),
            Some(other) => Err(PyError::type_error(format!("{name} must be a string, not {}", json_type(other)))),
        }
    }

    /// A required text argument.
    pub(crate) fn required_text(&self, name: &str) -> Result<String, PyError> {
        self.required(name)?;
        self.text(name).map(Option::unwrap_or_default)
    }

    /// An integer argument (`3`, `3.0` or `"3"`), as Python's `int(x)`.
    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, PyError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(Some(i)),
                (None, Some(f)) if f.is_finite() && f.abs() < 9.0e15 => Ok(Some(f.trunc() as i64)),
                _ => Err(PyError::value(format!("{name} out of range: {n}"))),
            },
            Some(Value::String(s)) => s
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| PyError::value(format!("invalid literal for int() with base 10: {}", py_str(s)))),
            Some(other) => Err(PyError::type_error(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                json_type(other)
            ))),
        }
    }

    /// A count within `0..=max` (`default` when absent).
    pub(crate) fn count(&self, name: &str, default: usize, max: usize) -> Result<usize, PyError> {
        match self.int(name)? {
            None => Ok(default),
            Some(n) if n < 0 => Err(PyError::value(format!("{name} must not be negative: {n}"))),
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| PyError::value(format!("{name} must be at most {max}: {n}"))),
        }
    }

    /// A number argument (`1.5` or `"1.5"`), as Python's `float(x)`; finite only.
    pub(crate) fn float(&self, name: &str) -> Result<Option<f64>, PyError> {
        let f = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(other) => {
                return Err(PyError::type_error(format!(
                    "float() argument must be a string or a real number, not '{}'",
                    json_type(other)
                )))
            }
        };
        match f {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(PyError::value(format!(
                "could not convert string to float: {}",
                py_str(&self.get(name).map(value_text).unwrap_or_default())
            ))),
        }
    }

    /// A flag in any form Celery's clients send it ([`super::truthy`]); false when absent.
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(super::truthy)
    }

    /// Ids: one string or a list of them (other items skipped), at most [`MAX_IDS`] of at most
    /// [`MAX_ID_LEN`](super::MAX_ID_LEN) bytes each.
    pub(crate) fn ids(&self, name: &str) -> Result<Vec<String>, PyError> {
        let ids: Vec<String> = match self.get(name) {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                if a.len() > MAX_IDS {
                    return Err(PyError::value(format!("at most {MAX_IDS} ids per request, not {}", a.len())));
                }
                a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
            }
            Some(other) => {
                return Err(PyError::type_error(format!("{name} must be an id or a list, not {}", json_type(other))))
            }
        };
        if let Some(long) = ids.iter().find(|id| id.len() > super::MAX_ID_LEN) {
            return Err(PyError::value(format!(
                "task ids are at most {} bytes, not {}",
                super::MAX_ID_LEN,
                long.len()
            )));
        }
        Ok(ids)
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The Python type name a JSON value decodes to.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_read_as_pythons_repr() {
        assert_eq!(PyError::key("foo").repr(), "KeyError('foo')");
        let missing = Args::new("add_consumer", &json!({})).required("queue").unwrap_err();
        assert_eq!(missing.repr(), r#"TypeError("add_consumer() missing 1 required positional argument: 'queue'")"#);
        assert_eq!(py_str("a\\b\n"), r"'a\\b\n'");
        assert_eq!(py_str(r#"it's "x""#), r#"'it\'s "x"'"#);
    }

    #[test]
    fn numbers_flags_and_ids_in_every_form() {
        let v =
            json!({"n": "3", "m": 2.0, "f": "1.5", "bad": "x", "t": "true", "one": 1, "id": "a", "ids": ["a", "b", 3]});
        let a = Args::new("m", &v);
        assert_eq!((a.int("n").unwrap(), a.int("m").unwrap(), a.int("none").unwrap()), (Some(3), Some(2), None));
        assert_eq!(a.float("f").unwrap(), Some(1.5));
        assert_eq!(a.int("bad").unwrap_err().repr(), "ValueError(\"invalid literal for int() with base 10: 'x'\")");
        assert!(a.float("bad").is_err());
        assert!(a.flag("t") && a.flag("one") && !a.flag("none"));
        assert_eq!(a.ids("id").unwrap(), ["a"]);
        assert_eq!(a.ids("ids").unwrap(), ["a", "b"]);
        assert_eq!(a.count("n", 1, 10).unwrap(), 3);
        assert!(a.count("n", 1, 2).is_err(), "bounded");
        assert_eq!(a.text("one").unwrap().as_deref(), Some("1"));
        let many = json!({"ids": vec!["x"; MAX_IDS + 1]});
        assert!(Args::new("m", &many).ids("ids").is_err());
    }
}
