#![no_main]
// The PostgreSQL result backend's reader of old rows' pickles: any bytes give a value or an error.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = result_backends::postgres::pickle::Limits { max_items: 100_000, ..Default::default() };
    let _ = result_backends::postgres::pickle::loads(data, &limits);
});
