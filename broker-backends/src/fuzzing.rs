//! Entry points of the fuzz targets in `fuzz/` (cargo feature `fuzzing`): each takes arbitrary
//! bytes and runs one decoder that reads bytes from the network or the disk. None may panic, hang or
//! allocate without bound, whatever the input. The corpora in `fuzz/corpus/<target>/` and every
//! crash found (`fuzz/artifacts/<target>/`) are replayed by this module's tests in `cargo test`.

use std::io::Write;

/// The Kombu JSON envelope (a Redis queue's element) and a task's protocol v2 body.
pub fn protocol(data: &[u8]) {
    let _ = crate::envelope::decode(data).into_parts();
    let _ = crate::envelope::body_of(data);
    let _ = celery_core::protocol::TaskBody::from_slice(data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = celery_core::protocol::Headers::from_json(&v);
    }
}

/// The log broker's compact task payload, and its conversion back to an envelope.
#[cfg(feature = "log")]
pub fn compact_payload(data: &[u8]) {
    let _ = crate::log::storage::payload::decode(data);
    let _ = crate::log::storage::payload::to_envelope(data, "q");
}

/// One framed log record.
#[cfg(feature = "log")]
pub fn record(data: &[u8]) {
    if let Ok((rec, used)) = crate::log::Record::decode(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        rec.encode_into(&mut again);
        assert_eq!(&again[..], &data[..used], "a decoded record encodes back to its bytes");
    }
}

/// A whole segment file as recovery finds it: recovery, then reading every record from the start
/// the way the cursor does (skipping damage).
#[cfg(feature = "log")]
pub fn segment(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("fuzz-segment-{}", uuid::Uuid::new_v4().simple()));
    let part = dir.join("0");
    let run = || -> Option<()> {
        std::fs::create_dir_all(&part).ok()?;
        std::fs::File::create(part.join("00000000000000000000.log")).ok()?.write_all(data).ok()?;
        let rec =
            crate::log::storage::segment::recover(&part, 0, &crate::log::storage::files::FileCache::new(8)).ok()?;
        assert!(rec.tail_len <= data.len() as u64);
        let seg = rec.segments.last()?;
        let (mut pos, mut offset) = (0u64, 0u64);
        let mut ahead = crate::log::storage::segment::ReadAhead::default();
        while offset < rec.next_offset {
            match crate::log::storage::segment::read_at(seg, pos, &mut ahead, Some(rec.tail_len)) {
                Ok((r, next)) if r.offset >= offset => (pos, offset) = (next, r.offset + 1),
                _ => {
                    let (at, found) =
                        crate::log::storage::segment::resync(&*seg.file().ok()?, &seg.path, pos, rec.tail_len, offset)
                            .ok()??;
                    assert!(at > pos && found >= offset, "resync moves forward");
                    pos = at;
                }
            }
        }
        Some(())
    };
    run();
    let _ = std::fs::remove_dir_all(dir);
}

/// The socket protocol's frames, read the way a connection reads them.
#[cfg(feature = "log")]
pub fn socket_frames(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().build();
    let Ok(rt) = rt else { return };
    rt.block_on(async {
        let mut r = data;
        // The first frame under the limit before HELLO, the rest under a limit small enough to keep
        // the fuzzer fast (the checks are the same).
        let mut max = crate::log::net::wire::MAX_HELLO_FRAME;
        while let Ok(Some(frame)) = crate::log::net::wire::read_frame(&mut r, max).await {
            max = 1 << 20;
            let mut d = crate::log::net::wire::Dec::new(&frame.body);
            let _ = d.stream_record();
            let mut d = crate::log::net::wire::Dec::new(&frame.body);
            while d.bytes().is_ok() {}
        }
    });
}

/// Broker URLs of every scheme.
pub fn url(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(u) = celery_core::url::ServiceUrl::parse(s) {
        let _ = (u.to_string(), u.finish());
    }
    let _ = celery_core::url::redacted(s);
    #[cfg(feature = "log")]
    let _ = crate::log::parse_url(s);
    let _ = celery_core::routing::topic_matches(s, s);
}

/// The topic matcher: a pattern and a key separated by the first newline.
pub fn topic(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let (pattern, key) = s.split_once('\n').unwrap_or((&s, ""));
    let _ = celery_core::routing::topic_matches(pattern, key);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of `fuzz/corpus/<target>` and `fuzz/artifacts/<target>` through `f`.
    fn replay(target: &str, f: fn(&[u8])) -> usize {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in [root.join("corpus").join(target), root.join("artifacts").join(target)] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let data = std::fs::read(entry.path()).unwrap();
                f(&data);
                n += 1;
            }
        }
        n
    }

    /// Writes the seed corpora from valid encodings (`cargo test -p broker-backends --lib
    /// write_seed_corpora -- --ignored`; `scripts/fuzz` runs it when a corpus is missing).
    #[test]
    #[ignore]
    fn write_seed_corpora() {
        use crate::log::net::wire::{kind, Enc};
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let save = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let sig = celery_core::Signature::by_name("add")
            .args(serde_json::json!([1, 2]))
            .kwargs(serde_json::json!({"x": "é"}))
            .countdown(std::time::Duration::from_secs(5));
        let msg = celery_core::protocol::Message::from_signature(&sig).unwrap();
        save("protocol", "envelope.json", crate::envelope::encode(&msg, "", "celery").as_bytes());
        save("protocol", "body.json", &msg.body);
        save("compact_payload", "task", &crate::log::storage::payload::encode(&msg));
        let rec = crate::log::Record {
            offset: 0,
            timestamp_ms: 1,
            not_before_ms: 2,
            headers: vec![("h".into(), b"v".to_vec())],
            key: b"k".to_vec(),
            payload: crate::log::storage::payload::encode(&msg),
        };
        let mut one = Vec::new();
        rec.encode_into(&mut one);
        save("record", "task", &one);
        let mut seg = Vec::new();
        for offset in 0..4 {
            crate::log::Record { offset, ..rec.clone() }.encode_into(&mut seg);
        }
        save("segment", "four-records", &seg);
        let frames = [
            Enc::frame(kind::HELLO, 1).str("token").finish(),
            Enc::frame(kind::PUBLISH, 2).str("q").u32(1).i64(0).bytes(b"").bytes(&one).finish(),
            Enc::frame(kind::ACK, 0).u32(2).u64(1).u64(2).finish(),
        ]
        .concat();
        save("socket_frames", "hello-publish-ack", &frames);
        save("url", "log", b"log://./data?fsync=os&partitions=4&max_record_bytes=1024");
        save("url", "remote", b"log+tls://host:7575/?token=abc&ca_certs=/ca.pem");
        save("topic", "hashes", b"#.*.a.#\na.b.a.c");
    }

    #[test]
    fn corpora_and_crashes_replay() {
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 7] = [
            ("protocol", super::protocol),
            ("compact_payload", super::compact_payload),
            ("record", super::record),
            ("segment", super::segment),
            ("socket_frames", super::socket_frames),
            ("url", super::url),
            ("topic", super::topic),
        ];
        for (target, f) in targets {
            let n = replay(target, f);
            assert!(n > 0, "fuzz/corpus/{target} is empty: run scripts/fuzz to seed it");
        }
    }
}
