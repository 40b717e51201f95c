//! A pickle reader for plain values only, for rows that Celery before 5.7 wrote into
//! `celery_taskmeta.result` through SQLAlchemy's `PickleType` (they start with `0x80`).
//!
//! It reads protocols 0 to 5 and builds `None`, `bool`, `int`, `float`, `str`, `bytes`, `list`,
//! `tuple` and `dict` (with `str`, `int`, `bool` or `None` keys, named as `json.dumps` names them),
//! and nothing else: every opcode that would import, call or build an object (`GLOBAL`,
//! `STACK_GLOBAL`, `REDUCE`, `BUILD`, `INST`, `OBJ`, `NEWOBJ`, `NEWOBJ_EX`, `EXT1/2/4`, `PERSID`,
//! `BINPERSID`, the out-of-band buffers) and sets are refused with [`PickleError::Refused`], naming
//! it. Nothing in the input is ever executed: the reader is a small stack machine over an arena of
//! the plain values above.
//!
//! The result is the JSON value Kombu's JSON serializer would have written for the same object
//! (tuples become arrays, `bytes` become `{"__type__": "bytes" | "base64", "__value__": ...}`).
//!
//! Bounds: the input length ([`Limits::max_bytes`]), the number of values built
//! ([`Limits::max_items`], which also bounds the memo and the output, so shared references cannot
//! blow up), and the nesting depth of the output ([`Limits::max_depth`], which also stops
//! self-referencing structures). Every length an opcode declares is checked against the input
//! left before anything is allocated.
//!
//! ```
//! use result_backends::postgres::pickle::{loads, Limits};
//! // pickle.dumps({'a': [1, None]}, protocol=2)
//! let v = loads(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01Nes.", &Limits::default()).unwrap();
//! assert_eq!(v, serde_json::json!({"a": [1, null]}));
//! // pickle.dumps(R(), protocol=2) where R.__reduce__ returns (os.system, ('echo pwned',))
//! let e = loads(b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.", &Limits::default());
//! assert!(e.unwrap_err().to_string().contains("GLOBAL"));
//! ```

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{Map, Number, Value};
use thiserror::Error;

/// What the reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest input, in bytes.
    pub max_bytes: usize,
    /// The most values built (and output), memo entries included.
    pub max_items: usize,
    /// The deepest nesting of lists, tuples and dicts in the output.
    pub max_depth: usize,
}

impl Default for Limits {
    /// 64 MiB, 1,000,000 values, 128 levels.
    fn default() -> Self {
        Limits { max_bytes: 64 << 20, max_items: 1_000_000, max_depth: 128 }
    }
}

/// Why a pickle was not read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PickleError {
    /// An opcode that imports, calls or builds objects, or a type that is not a plain value.
    #[error("pickle refused: opcode {name} (0x{code:02x}) at byte {at} {why}")]
    Refused {
        /// The opcode's name (`REDUCE`, `STACK_GLOBAL`, ...).
        name: &'static str,
        /// Its byte.
        code: u8,
        /// Its offset in the input.
        at: usize,
        /// What it would do.
        why: &'static str,
    },
    /// The input is not a well-formed pickle of plain values.
    #[error("malformed pickle at byte {at}: {reason}")]
    Malformed {
        /// The offset where reading failed.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A bound of [`Limits`] was reached.
    #[error("pickle exceeds a limit: {0}")]
    TooLarge(String),
}

/// A value in the arena; containers hold indices, so the memo shares them as pickle does.
#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
}

/// A stack entry: a value or a MARK.
#[derive(Debug, Clone, Copy)]
enum Item {
    Mark,
    Obj(usize),
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    /// Where the current opcode began.
    at: usize,
    limits: Limits,
    arena: Vec<Obj>,
    stack: Vec<Item>,
    memo: HashMap<u64, usize>,
}

/// Reads a pickle of plain values into the JSON value Kombu's serializer would write for it.
pub fn loads(input: &[u8], limits: &Limits) -> Result<Value, PickleError> {
    if input.len() > limits.max_bytes {
        return Err(PickleError::TooLarge(format!("{} bytes (at most {})", input.len(), limits.max_bytes)));
    }
    let mut r =
        Reader { input, pos: 0, at: 0, limits: *limits, arena: Vec::new(), stack: Vec::new(), memo: HashMap::new() };
    let root = r.run()?;
    let mut budget = Output { values: limits.max_items, bytes: limits.max_bytes.saturating_mul(4) };
    r.to_json(root, 0, &mut budget)
}

/// What the JSON output may still hold: values, and bytes of strings and byte strings (a memoized
/// string referenced many times is copied each time, so its bytes are charged each time).
#[derive(Debug)]
struct Output {
    values: usize,
    bytes: usize,
}

impl Output {
    fn charge_bytes(&mut self, n: usize) -> Result<(), PickleError> {
        self.bytes = self
            .bytes
            .checked_sub(n)
            .ok_or_else(|| PickleError::TooLarge("more than 4 times the input's bytes in the output".into()))?;
        Ok(())
    }
}

/// The refused opcodes: (byte, name, what it would do).
const REFUSED: &[(u8, &str, &str)] = &[
    (b'c', "GLOBAL", "imports a module attribute"),
    (0x93, "STACK_GLOBAL", "imports a module attribute"),
    (b'R', "REDUCE", "calls an object"),
    (b'b', "BUILD", "sets an object's state"),
    (b'i', "INST", "imports and calls a class"),
    (b'o', "OBJ", "calls a class"),
    (0x81, "NEWOBJ", "calls cls.__new__"),
    (0x92, "NEWOBJ_EX", "calls cls.__new__"),
    (0x82, "EXT1", "imports from the extension registry"),
    (0x83, "EXT2", "imports from the extension registry"),
    (0x84, "EXT4", "imports from the extension registry"),
    (b'P', "PERSID", "asks the unpickler for a persistent object"),
    (b'Q', "BINPERSID", "asks the unpickler for a persistent object"),
    (0x97, "NEXT_BUFFER", "reads an out-of-band buffer"),
    (0x98, "READONLY_BUFFER", "reads an out-of-band buffer"),
    (0x8f, "EMPTY_SET", "builds a set, which is not a plain value"),
    (0x90, "ADDITEMS", "adds to a set, which is not a plain value"),
    (0x91, "FROZENSET", "builds a frozenset, which is not a plain value"),
];

impl Reader<'_> {
    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed { at: self.at, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        if n > self.input.len() - self.pos {
            return Err(self.malformed(format!("{n} bytes declared, {} left", self.input.len() - self.pos)));
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    /// A length declared by an opcode, as usize (checked against the input when taken).
    fn len(&mut self, n: usize) -> Result<usize, PickleError> {
        let v = self.le(n)?;
        usize::try_from(v).map_err(|_| self.malformed("length out of range"))
    }

    /// A protocol 0 argument: the bytes up to the next newline.
    fn line_bytes(&mut self) -> Result<Vec<u8>, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.malformed("line without a newline"));
        };
        self.pos += end + 1;
        Ok(rest[..end].to_vec())
    }

    /// A protocol 0 argument that must be ASCII text (a number, a memo key, a quoted string).
    fn line(&mut self) -> Result<String, PickleError> {
        let b = self.line_bytes()?;
        String::from_utf8(b).map_err(|_| self.malformed("line is not UTF-8"))
    }

    fn push_obj(&mut self, o: Obj) -> Result<(), PickleError> {
        if self.arena.len() >= self.limits.max_items {
            return Err(PickleError::TooLarge(format!("more than {} values", self.limits.max_items)));
        }
        self.arena.push(o);
        self.stack.push(Item::Obj(self.arena.len() - 1));
        Ok(())
    }

    fn pop(&mut self) -> Result<usize, PickleError> {
        match self.stack.pop() {
            Some(Item::Obj(i)) => Ok(i),
            Some(Item::Mark) => Err(self.malformed("a MARK where a value was expected")),
            None => Err(self.malformed("stack underflow")),
        }
    }

    fn top(&self) -> Result<usize, PickleError> {
        match self.stack.last() {
            Some(Item::Obj(i)) => Ok(*i),
            Some(Item::Mark) => Err(self.malformed("a MARK where a value was expected")),
            None => Err(self.malformed("stack underflow")),
        }
    }

    /// The values above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        let Some(m) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return Err(self.malformed("no MARK on the stack"));
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items.into_iter().filter_map(|i| if let Item::Obj(o) = i { Some(o) } else { None }).collect())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        if self.memo.len() >= self.limits.max_items && !self.memo.contains_key(&key) {
            return Err(PickleError::TooLarge(format!("more than {} memo entries", self.limits.max_items)));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let Some(&i) = self.memo.get(&key) else {
            return Err(self.malformed(format!("memo key {key} was never stored")));
        };
        self.stack.push(Item::Obj(i));
        Ok(())
    }

    fn append(&mut self, list: usize, items: Vec<usize>) -> Result<(), PickleError> {
        match &mut self.arena[list] {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(self.malformed("APPEND to something that is not a list")),
        }
    }

    fn set_items(&mut self, dict: usize, items: Vec<usize>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of items for a dict"));
        }
        let pairs: Vec<(usize, usize)> = items.chunks(2).map(|p| (p[0], p[1])).collect();
        match &mut self.arena[dict] {
            Obj::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            _ => Err(self.malformed("SETITEM on something that is not a dict")),
        }
    }

    fn string(&self, bytes: &[u8]) -> Result<Obj, PickleError> {
        std::str::from_utf8(bytes).map(|s| Obj::Str(s.to_owned())).map_err(|_| self.malformed("str is not UTF-8"))
    }

    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            self.at = self.pos;
            // Each opcode pushes at most one item: the stack stays within the value limit.
            if self.stack.len() > self.limits.max_items {
                return Err(PickleError::TooLarge(format!("more than {} items on the stack", self.limits.max_items)));
            }
            let op = self.byte()?;
            if let Some((_, name, why)) = REFUSED.iter().find(|(c, _, _)| *c == op) {
                return Err(PickleError::Refused { name, code: op, at: self.at, why });
            }
            match op {
                b'.' => {
                    let root = self.pop()?;
                    return if self.stack.is_empty() {
                        Ok(root)
                    } else {
                        Err(self.malformed("values left after STOP"))
                    };
                }
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("unsupported protocol {proto}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint; the opcodes follow inline.
                    self.take(8)?;
                }
                b'(' => self.stack.push(Item::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| self.malformed("stack underflow"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(Item::Obj(top));
                }
                b'N' => self.push_obj(Obj::None)?,
                0x88 => self.push_obj(Obj::Bool(true))?,
                0x89 => self.push_obj(Obj::Bool(false))?,
                b'I' => {
                    let line = self.line()?;
                    let o = match line.as_str() {
                        "01" => Obj::Bool(true),
                        "00" => Obj::Bool(false),
                        s => Obj::Int(s.parse().map_err(|_| self.malformed(format!("INT `{s}`")))?),
                    };
                    self.push_obj(o)?;
                }
                b'L' => {
                    let line = self.line()?;
                    let digits = line.strip_suffix('L').unwrap_or(&line);
                    let n = digits.parse().map_err(|_| self.malformed(format!("LONG `{line}` is out of range")))?;
                    self.push_obj(Obj::Int(n))?;
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.push_obj(Obj::Int(i128::from(v)))?;
                }
                b'K' => {
                    let v = self.le(1)?;
                    self.push_obj(Obj::Int(i128::from(v)))?;
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push_obj(Obj::Int(i128::from(v)))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.len(1)? } else { self.le(4)? as u32 as i32 as i64 as usize };
                    if n > 16 {
                        return Err(self.malformed(format!("an integer of {n} bytes is out of range")));
                    }
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i128::from(x) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    self.push_obj(Obj::Int(v))?;
                }
                b'F' => {
                    let line = self.line()?;
                    let f = line.parse().map_err(|_| self.malformed(format!("FLOAT `{line}`")))?;
                    self.push_obj(Obj::Float(f))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push_obj(Obj::Float(f64::from_be_bytes(a)))?;
                }
                b'S' => {
                    let line = self.line()?;
                    let s = unquote_py2(&line).ok_or_else(|| self.malformed("STRING is not a quoted ASCII literal"))?;
                    self.push_obj(Obj::Str(s))?;
                }
                b'T' | b'U' => {
                    // Python 2 str: Python 3 reads it as ASCII text.
                    let n = if op == b'T' { self.le(4)? as u32 as i32 as i64 as usize } else { self.len(1)? };
                    let b = self.take(n)?.to_vec();
                    if !b.is_ascii() {
                        return Err(self.malformed("BINSTRING is not ASCII"));
                    }
                    let o = self.string(&b)?;
                    self.push_obj(o)?;
                }
                b'V' => {
                    let line = self.line_bytes()?;
                    let s = raw_unicode_unescape(&line).ok_or_else(|| self.malformed("UNICODE escape is invalid"))?;
                    self.push_obj(Obj::Str(s))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.len(4)?,
                        0x8c => self.len(1)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?.to_vec();
                    let o = self.string(&b)?;
                    self.push_obj(o)?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.len(4)?,
                        b'C' => self.len(1)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push_obj(Obj::Bytes(b))?;
                }
                b']' => self.push_obj(Obj::List(Vec::new()))?,
                b')' => self.push_obj(Obj::Tuple(Vec::new()))?,
                b'}' => self.push_obj(Obj::Dict(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::List(items))?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_obj(Obj::Tuple(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Dict(Vec::new()))?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.append(l, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.append(l, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b'g' | b'p' => {
                    let line = self.line()?;
                    let key = line.parse().map_err(|_| self.malformed(format!("memo key `{line}`")))?;
                    if op == b'g' {
                        self.memo_get(key)?;
                    } else {
                        self.memo_put(key)?;
                    }
                }
                b'h' => {
                    let k = self.le(1)?;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.le(4)?;
                    self.memo_get(k)?;
                }
                b'q' => {
                    let k = self.le(1)?;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.le(4)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                other => return Err(self.malformed(format!("unknown opcode 0x{other:02x}"))),
            }
        }
    }

    fn to_json(&self, i: usize, depth: usize, budget: &mut Output) -> Result<Value, PickleError> {
        if budget.values == 0 {
            return Err(PickleError::TooLarge(format!("more than {} values in the output", self.limits.max_items)));
        }
        budget.values -= 1;
        let nested = |this: &Self, items: &[usize], budget: &mut Output| -> Result<Value, PickleError> {
            if depth >= this.limits.max_depth {
                return Err(PickleError::TooLarge(format!(
                    "nested deeper than {} levels (or refers to itself)",
                    this.limits.max_depth
                )));
            }
            items.iter().map(|&c| this.to_json(c, depth + 1, budget)).collect::<Result<Vec<_>, _>>().map(Value::Array)
        };
        Ok(match &self.arena[i] {
            Obj::None => Value::Null,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(n) => int_json(*n).ok_or_else(|| PickleError::Malformed {
                at: 0,
                reason: format!("integer {n} does not fit in 64 bits"),
            })?,
            Obj::Float(f) => Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| PickleError::Malformed { at: 0, reason: format!("float {f} has no JSON form") })?,
            Obj::Str(s) => {
                budget.charge_bytes(s.len())?;
                Value::String(s.clone())
            }
            Obj::Bytes(b) => {
                budget.charge_bytes(b.len().saturating_mul(2))?;
                kombu_bytes(b)
            }
            Obj::List(items) | Obj::Tuple(items) => nested(self, items, budget)?,
            Obj::Dict(pairs) => {
                if depth >= self.limits.max_depth {
                    return Err(PickleError::TooLarge(format!(
                        "nested deeper than {} levels (or refers to itself)",
                        self.limits.max_depth
                    )));
                }
                let mut m = Map::new();
                for &(k, v) in pairs {
                    let key = match &self.arena[k] {
                        Obj::Str(s) => {
                            budget.charge_bytes(s.len())?;
                            s.clone()
                        }
                        Obj::Int(n) => n.to_string(),
                        Obj::Bool(b) => b.to_string(),
                        Obj::None => "null".into(),
                        _ => {
                            return Err(PickleError::Malformed {
                                at: 0,
                                reason: "a dict key that is not a str, int, bool or None".into(),
                            })
                        }
                    };
                    m.insert(key, self.to_json(v, depth + 1, budget)?);
                }
                Value::Object(m)
            }
        })
    }
}

fn int_json(n: i128) -> Option<Value> {
    if let Ok(v) = i64::try_from(n) {
        return Some(Value::from(v));
    }
    u64::try_from(n).ok().map(Value::from)
}

/// Kombu's JSON form of bytes.
fn kombu_bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::json!({"__type__": "bytes", "__value__": s}),
        Err(_) => {
            serde_json::json!({"__type__": "base64", "__value__": base64::engine::general_purpose::STANDARD.encode(b)})
        }
    }
}

/// Protocol 0's `UNICODE` argument (`raw-unicode-escape`): `\uXXXX` and `\UXXXXXXXX` escapes,
/// every other byte a Latin-1 character.
fn raw_unicode_unescape(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' && i + 1 < bytes.len() && (bytes[i + 1] == b'u' || bytes[i + 1] == b'U') {
            let n = if bytes[i + 1] == b'u' { 4 } else { 8 };
            let hex = std::str::from_utf8(bytes.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + n;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    Some(out)
}

/// Protocol 0's `STRING` argument: a Python 2 repr, `'...'` or `"..."`, of ASCII text.
fn unquote_py2(line: &str) -> Option<String> {
    let b = line.as_bytes();
    if b.len() < 2 || b[0] != b[b.len() - 1] || !(b[0] == b'\'' || b[0] == b'"') {
        return None;
    }
    let inner = &b[1..b.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        if inner[i] != b'\\' {
            out.push(inner[i]);
            i += 1;
            continue;
        }
        let c = *inner.get(i + 1)?;
        i += 2;
        match c {
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'\\' | b'\'' | b'"' => out.push(c),
            b'x' => {
                let hex = std::str::from_utf8(inner.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => return None,
        }
    }
    if !out.is_ascii() {
        return None;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    include!("pickle_vectors.rs");

    fn plain_value() -> Value {
        json!({"a": [1, "x", null, 1.5, true, false], "big": 9223372036854775808u64, "neg": -5, "t": [1, 2],
               "u": "é€😀", "k": {"n": -1099511627776i64}, "e": [], "d": {}, "q": "it's \"q\"\\"})
    }

    #[test]
    fn a_memoized_string_referenced_many_times_is_charged_each_time() {
        // A 1 MiB string memoized, then referenced 100,000 times: 100 GB of output from 1.3 MB.
        let mut p = vec![0x80, 4, b'X'];
        p.extend_from_slice(&(1u32 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'a', 1 << 20));
        p.extend_from_slice(&[0x94, b'0', b'(']);
        for _ in 0..100_000 {
            p.extend_from_slice(&[b'h', 0]);
        }
        p.extend_from_slice(b"l.");
        let e = loads(&p, &Limits::default()).unwrap_err();
        assert!(matches!(e, PickleError::TooLarge(_)), "{e:?}");
    }

    #[test]
    fn plain_values_of_every_protocol_are_read() {
        for (p, bytes) in PLAIN.iter().enumerate() {
            assert_eq!(loads(bytes, &Limits::default()), Ok(plain_value()), "protocol {p}");
        }
    }

    #[test]
    fn every_malicious_pickle_is_refused() {
        for (name, bytes) in MALICIOUS {
            match loads(bytes, &Limits::default()) {
                Err(PickleError::Refused { .. }) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn refusals_name_the_opcode() {
        let e = loads(MALICIOUS[0].1, &Limits::default()).unwrap_err().to_string();
        assert!(e.contains("GLOBAL") && e.contains("imports"), "{e}");
        // Protocol 4's REDUCE payload uses STACK_GLOBAL.
        let p4 = MALICIOUS.iter().find(|(n, _)| *n == "os.system REDUCE p4").unwrap().1;
        assert!(loads(p4, &Limits::default()).unwrap_err().to_string().contains("STACK_GLOBAL"));
        // Each refused opcode alone, after a valid prefix, is refused before anything else.
        for (code, name, _) in REFUSED {
            let bytes = [0x80, 4, b'N', *code, b'.'];
            match loads(&bytes, &Limits::default()) {
                Err(PickleError::Refused { name: n, at: 3, .. }) => assert_eq!(n, *name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn small_values_and_bytes() {
        let l = Limits::default();
        assert_eq!(loads(b"\x80\x04N.", &l), Ok(Value::Null));
        assert_eq!(loads(b"\x80\x04\x88.", &l), Ok(json!(true)));
        assert_eq!(loads(b"I42\n.", &l), Ok(json!(42)));
        assert_eq!(loads(b"S'a\\nb'\n.", &l), Ok(json!("a\nb")));
        // pickle.dumps(b'ab\xff', protocol=3) and b'ab'
        assert_eq!(loads(b"\x80\x03C\x03ab\xffq\x00.", &l), Ok(json!({"__type__": "base64", "__value__": "YWL/"})));
        assert_eq!(loads(b"\x80\x03C\x02ab.", &l), Ok(json!({"__type__": "bytes", "__value__": "ab"})));
        // pickle.dumps(-1, 2) as LONG1 and 2**64 (too large for JSON numbers here).
        assert_eq!(loads(b"\x80\x02\x8a\x01\xff.", &l), Ok(json!(-1)));
        assert!(loads(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.", &l).is_err());
        // Shared references: pickle.dumps([a, a]) with a = [1].
        assert_eq!(loads(b"\x80\x02]q\x00(]q\x01K\x01ah\x01e.", &l), Ok(json!([[1], [1]])));
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let l = Limits::default();
        for bad in [
            &b""[..],
            b"\x80",
            b"\x80\x09N.",
            b"N",
            b"NN.",
            b"a.",
            b"(.",
            b"h\x05.",
            b"X\xff\xff\xff\xffab.",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f.",
            b"\x8b\xff\xff\xff\xff.",
            b"I12x\n.",
            b"N\xfe.",
            b"]N}s.",
        ] {
            assert!(loads(bad, &l).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_bound_size_depth_and_sharing() {
        let small = Limits { max_bytes: 8, ..Limits::default() };
        assert!(matches!(loads(PLAIN[2], &small), Err(PickleError::TooLarge(_))));
        // A list that contains itself: a = []; a.append(a).
        let e = loads(b"\x80\x02]q\x00h\x00a.", &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("refers to itself"), "{e}");
        let deep: Vec<u8> = [&b"\x80\x02"[..], &[b']'; 200], &[b'a'; 199], b"."].concat();
        assert!(matches!(loads(&deep, &Limits::default()), Err(PickleError::TooLarge(_))));
        // Doubling by reference: level i+1 is [x, x] of level i; 40 levels would be 2^40 leaves.
        let mut b = b"\x80\x04N\x940".to_vec();
        for i in 0..40u8 {
            b.extend_from_slice(&[b'(', b'h', i, b'h', i, b'l', 0x94, b'0']);
        }
        b.extend_from_slice(b"h\x28.");
        let e = loads(&b, &Limits { max_depth: 1000, ..Limits::default() }).unwrap_err();
        assert!(matches!(e, PickleError::TooLarge(_)), "{e}");
    }

    /// The fuzz target's corpus (`fuzz/corpus/pickle`) and any crash it saved
    /// (`fuzz/artifacts/pickle`): each input gives a value or an error, never a panic.
    #[test]
    fn fuzz_corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in [root.join("corpus/pickle"), root.join("artifacts/pickle")] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let data = std::fs::read(entry.path()).unwrap();
                let _ = loads(&data, &Limits { max_items: 100_000, ..Limits::default() });
                n += 1;
            }
        }
        assert!(n >= 60, "the seed corpus is missing: {n} inputs");
    }

    proptest::proptest! {
        /// Any bytes: an error or a value, never a panic; refused opcodes never pass.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = loads(&bytes, &Limits { max_items: 10_000, ..Limits::default() });
        }

        /// A valid pickle of any protocol with one byte changed: an error or a value, never a panic.
        #[test]
        fn mutated_pickles_never_panic(p in 0usize..6, at in 0usize..400, byte in proptest::num::u8::ANY) {
            let mut bytes = PLAIN[p].to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = loads(&bytes, &Limits { max_items: 10_000, ..Limits::default() });
        }
    }
}
